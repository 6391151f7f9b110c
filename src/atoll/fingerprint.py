"""The job fingerprint: everything the islands of one run must agree on, checked at registration.

Two islands that differ in any of these would not fail at once: they would break data
disjointness, average tensors of different shapes, or disagree at every outer step. The
coordinator compares each registering island's fingerprint with the run's and refuses a mismatch,
naming every differing key with both values (`atoll.mesh.membership.fingerprint_mismatch`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from atoll import __version__
from atoll.config import JobConfig
from atoll.model import ModelArgs


def job_fingerprint(cfg: JobConfig, args: ModelArgs, tokenizer: Any, seq_len: int) -> dict[str, Any]:
    """The keys that must agree across islands, as JSON values."""
    return {
        "atoll_version": __version__,
        "model": {k: v for k, v in dataclasses.asdict(args).items() if k != "max_seq_len"},
        "tokenizer": f"{type(tokenizer).__name__}:{tokenizer.vocab_size}:{Path(cfg.data.tokenizer).name}",
        # what is read, not where each machine keeps it (paths, caches and workers are local)
        "data": {
            "source": cfg.data.source if not cfg.data.sources else None,
            "sources": [[s.name, s.weight, s.text_field] for s in cfg.data.sources],
            "val_fraction": cfg.data.val_fraction,
        },
        "seq_len": seq_len,
        "global_batch": cfg.train.global_batch,
        "steps": cfg.train.steps,
        "seed": cfg.train.seed,
        "schedule": cfg.schedule.model_dump(mode="json"),
        "mode": cfg.mesh.mode,
        "diloco": cfg.diloco.model_dump(mode="json"),
        "comm": cfg.comm.model_dump(mode="json"),
    }
