"""The job fingerprint: everything the islands of one run must agree on, checked at registration.

Two islands that differ in any of these would not fail at once: they would break data
disjointness, average tensors of different shapes, or disagree at every outer step. The
coordinator compares each registering island's fingerprint with the run's and refuses a mismatch,
naming every differing key with both values (`atoll.mesh.membership.fingerprint_mismatch`).

The fingerprint is flat, one dotted config key per entry, so a mismatch names the key
(`optim.lr`), not its section. It holds every run-wide setting: every config field but those its
section lists as `per_island` (see `atoll.config.Section`), with the values that are resolved at
start-up (the model's shape, the sequence length, the tokenizer's identity) in place of the
settings that lead to them. A new config field is run-wide until it is listed as per island.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from atoll import __version__
from atoll.config import JobConfig
from atoll.model import ModelArgs


def flat_config(section: BaseModel, prefix: str = "", run_wide_only: bool = False) -> dict[str, Any]:
    """{dotted key: JSON value} of a config (tree); the sources of a mixture are keyed by their name
    (`data.sources.web.weight`), their order as `data.sources`. `run_wide_only` leaves out per-island fields."""
    flat: dict[str, Any] = {}
    for name in type(section).model_fields:
        if run_wide_only and name in getattr(section, "per_island", ()):
            continue
        key, value = f"{prefix}{name}", getattr(section, name)
        if isinstance(value, BaseModel):
            flat.update(flat_config(value, f"{key}.", run_wide_only))
        elif isinstance(value, list) and value and isinstance(value[0], BaseModel):
            flat[key] = [getattr(item, "name", i) for i, item in enumerate(value)]
            for i, item in enumerate(value):
                item_flat = flat_config(item, f"{key}.{getattr(item, 'name', i)}.", run_wide_only)
                flat.update({k: v for k, v in item_flat.items() if not k.endswith(".name")})
        else:
            flat[key] = section.model_dump(mode="json", include={name})[name]
    return flat


def job_fingerprint(cfg: JobConfig, args: ModelArgs, tokenizer: Any, seq_len: int) -> dict[str, Any]:
    """The run-wide settings and resolved values that must agree across islands, as flat JSON values."""
    fingerprint = flat_config(cfg, run_wide_only=True)
    for name in ("model.vocab_size", "model.rope_theta", "train.seq_len"):  # None means "the size's": compare what it resolved to
        fingerprint.pop(name)
    if cfg.data.sources:  # data.source is not read then
        fingerprint.pop("data.source")
    return {
        "atoll_version": __version__,
        **fingerprint,
        **{f"model.shape.{k}": v for k, v in dataclasses.asdict(args).items() if k != "max_seq_len"},
        "train.seq_len": seq_len,
        "data.tokenizer": f"{type(tokenizer).__name__}:{tokenizer.vocab_size}:{Path(cfg.data.tokenizer).name}",
    }


def config_changes(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """'key old -> new' for every dotted key whose value differs between two flat configs, sorted."""
    keys = sorted(set(before) | set(after))
    return [f"{k} {before.get(k)!r} -> {after.get(k)!r}" for k in keys if before.get(k) != after.get(k)]
