"""From the ``[data]`` config to what training needs: a tokenizer, a batch loader, validation sets.

Two roads, chosen by ``data.sources``:

- empty: the single corpus of ``data.source`` (the standard library by default), tokenised into
  one cached array, memory-mapped, read by :class:`PackedLoader`; unchanged from before mixtures;
- a mixture: each source's prepared shards (``data.prepared``), or, when that is unset, the
  sources tokenised by training itself into ``<data.cache_dir>/prepared``, read by
  :class:`MixtureLoader`. One process of a machine at a time prepares, verifies and downloads
  (a lock in the cache directory); the machine's other local ranks wait, then reuse its work.

Every failure a user can cause (missing file, bad source, foreign or corrupt shard, too little
data) becomes a :class:`UserError` of one line.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from atoll import logs
from atoll.config import DataConfig
from atoll.data.shards import (
    PrepareReport,
    PrepareSettings,
    ShardError,
    exclusive,
    open_prepared,
    prepare,
)
from atoll.data.sources import SourceError, SourceSpec
from atoll.data.tokenizer import Tokenizer, load_tokenizer
from atoll.data.tokens import load_split_tokens
from atoll.errors import UserError

if TYPE_CHECKING:
    from atoll.data.loader import MixtureLoader, PackedLoader

PREPARED_CACHE = "prepared"
"""Subdirectory of data.cache_dir where training tokenises sources it was not given shards for."""

LOCK_FILE = "data.lock"
"""In data.cache_dir: held while a process prepares, verifies or downloads shards."""


@dataclass
class TrainingData:
    """The tokenizer, the train token arrays (one per source) and the validation sets."""

    tokenizer: Tokenizer
    names: list[str]
    weights: list[float]
    train: list[Any]
    val: dict[str, Any]
    mixture: bool
    """False for the single corpus of data.source (no per-source metrics)."""
    summaries: list[str] = field(default_factory=list)

    def loader(self, seq_len: int, global_batch: int, rank: int, world: int, seed: int) -> PackedLoader | MixtureLoader:
        """This rank's training stream (see :class:`PackedLoader` / :class:`MixtureLoader`).

        Raises:
            UserError: too little data for one global batch, or the validation split of a source
                holds fewer than one global batch of windows.
        """
        loaders = _loader_module()
        try:
            if not self.mixture:
                return loaders.PackedLoader(self.train[0], seq_len, global_batch, rank, world, seed)
            return loaders.MixtureLoader(self.train, self.names, self.weights, seq_len, global_batch, rank, world, seed)
        except ValueError as err:
            raise UserError(f"data: {err}") from None

    def check_val(self, seq_len: int, global_batch: int, rank: int, world: int, batches: int) -> None:
        """Raise a UserError now if a validation set cannot fill one global batch."""
        for name, tokens in self.val.items():
            try:
                _loader_module().iter_eval_batches(tokens, seq_len, global_batch, rank, world, batches)
            except ValueError as err:
                where = f"source {name!r} validation split" if self.mixture else "validation split"
                raise UserError(f"data: {where}: {err}; raise data.val_fraction or add data") from None


# The loaders need torch; `atoll data prepare` imports this module and should not load it.
def _loader_module() -> Any:
    import atoll.data.loader

    return atoll.data.loader


def source_specs(cfg: DataConfig) -> list[SourceSpec]:
    return [SourceSpec.from_config(s) for s in cfg.sources]


def prepare_settings(cfg: DataConfig) -> PrepareSettings:
    return PrepareSettings(cfg.tokenizer, cfg.val_fraction, cfg.shard_tokens, cfg.on_bad_file)


def cache_dir(cfg: DataConfig) -> str | None:
    return str(Path(cfg.cache_dir).expanduser()) if cfg.cache_dir else None


def prepared_url(cfg: DataConfig) -> str:
    """Where `atoll data prepare` writes and training reads: data.prepared, else the cache.

    Raises:
        UserError: neither data.prepared nor data.cache_dir is set.
    """
    if cfg.prepared:
        return cfg.prepared
    cache = cache_dir(cfg)
    if cache is None:
        raise UserError("data: a mixture needs data.prepared (shards from `atoll data prepare`) or a data.cache_dir to tokenise into")
    return str(Path(cache) / PREPARED_CACHE)


def run_prepare(cfg: DataConfig, workers: int, progress: bool, log: Callable[[str], None] = logs.info) -> PrepareReport:
    """`atoll data prepare`: tokenise every source of the mixture into shards; UserError on bad input."""
    if not cfg.sources:
        raise UserError("data prepare: the config lists no [[data.sources]] (or data.mixture); see configs/data/")
    url = prepared_url(cfg)
    try:
        return prepare(source_specs(cfg), url, prepare_settings(cfg), workers, progress, log)
    except (SourceError, FileNotFoundError, ValueError) as err:
        raise UserError(f"data: {err}") from None


def training_tokenizer(cfg: DataConfig) -> Tokenizer:
    """``data.tokenizer`` loaded; a missing or bad one raises UserError."""
    try:
        return load_tokenizer(cfg.tokenizer)
    except (FileNotFoundError, ValueError) as err:
        raise UserError(f"data: {err}") from None


def load_training_data(cfg: DataConfig, log: Callable[[str], None], tokenizer: Tokenizer | None = None) -> TrainingData:
    """The tokenizer (``training_tokenizer``'s, unless the caller loaded it already) and tokens
    training reads (see the module docstring); ``log`` gets progress lines.

    Raises:
        UserError: a missing or bad tokenizer, source, or shard.
    """
    tokenizer = training_tokenizer(cfg) if tokenizer is None else tokenizer
    if not cfg.sources:
        try:
            splits = [load_split_tokens(cfg.source, split, cfg.val_fraction, tokenizer, cache_dir(cfg)) for split in ("train", "val")]
        except (FileNotFoundError, ValueError) as err:
            raise UserError(f"data: {err}") from None
        return TrainingData(tokenizer, [cfg.source], [1.0], [splits[0]], {cfg.source: splits[1]}, mixture=False)
    url, cache = prepared_url(cfg), cache_dir(cfg)
    # One process per machine prepares, hashes and downloads; the machine's other ranks then reuse its work.
    lock = exclusive(Path(cache) / LOCK_FILE) if cache is not None else nullcontext()
    try:
        with lock:
            if not cfg.prepared:
                prepare(source_specs(cfg), url, prepare_settings(cfg), workers=1, progress=False, log=log)
            prepared = [open_prepared(s.name, url, tokenizer, cache) for s in cfg.sources]
    except (ShardError, SourceError, ValueError) as err:
        raise UserError(f"data: {err}") from None
    summaries = [f"{p.name} ({w / sum(s.weight for s in cfg.sources):.0%}): {len(p.train):,} train / {len(p.val):,} val tokens"
                 for p, w in zip(prepared, (s.weight for s in cfg.sources))]
    return TrainingData(
        tokenizer, [p.name for p in prepared], [s.weight for s in cfg.sources],
        [p.train for p in prepared], {p.name: p.val for p in prepared}, mixture=True, summaries=summaries,
    )


def weighted_mean(values: dict[str, float], names: list[str], weights: list[float]) -> float:
    """Mean of per-source ``values`` under the mixture ``weights`` (normalised)."""
    return float(np.dot([values[n] for n in names], weights) / sum(weights))
