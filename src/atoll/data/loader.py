"""Packed-sequence batches, with a resumable position: from one token array, or from a mixture.

The array is cut into ``n = (len(tokens) - 1) // seq_len`` windows of ``seq_len + 1`` tokens
at stride ``seq_len`` (window ``w`` starts at ``w * seq_len``); a sample's inputs are the
window's first ``seq_len`` tokens and its targets the last ``seq_len``. Documents are packed
back to back, separated by eos, so windows cross document boundaries.

Global sample ``i`` is window ``perm_e[i % n]`` of data-epoch ``e = i // n``, where ``perm_e``
is a permutation drawn from ``torch.Generator`` seeded by ``(seed, e)``. Global batch ``b`` is
samples ``[b * global_batch, (b + 1) * global_batch)`` and rank ``r`` of ``world`` reads the
contiguous slice ``r * per_rank ...`` of it. Ranks thus read disjoint samples, and the
concatenation over ranks of a global batch does not depend on ``world``: a run may resume
on a different number of processes and see the same data.

:class:`MixtureLoader` does the same over several sources, each a token array cut into windows
the same way, choosing each sample's source and window by :mod:`atoll.data.mixture`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from atoll.data.mixture import MixturePlan, WindowPermutation, derive_key


class BatchSource(Protocol):
    """What the train loop needs from a training-data stream: batches and a resumable position."""

    global_batch: int

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]: ...

    def batch_at(self, first_sample: int) -> tuple[torch.Tensor, torch.Tensor]: ...

    def drain_notes(self) -> list[str]: ...

    def log_fields(self) -> dict[str, Any]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    @property
    def tokens_consumed(self) -> int: ...


def _epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit generator seed mixing ``seed`` and ``epoch`` (so nearby seeds differ fully)."""
    digest = hashlib.sha256(f"atoll.data.loader:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def _windows(tokens: np.ndarray, seq_len: int) -> int:
    return max(len(tokens) - 1, 0) // seq_len


class PackedLoader:
    """Deterministic stream of packed ``(inputs, targets)`` batches for one rank.

    The position is the number of global batches already served; :meth:`state_dict` holds it
    with the settings that fix the order, so a resumed loader continues exactly.

    Raises (on construction):
        ValueError: non-positive sizes, ``rank`` outside ``[0, world)``, ``global_batch`` not
            divisible by ``world``, or fewer than ``global_batch`` windows in ``tokens``.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        seq_len: int,
        global_batch: int,
        rank: int,
        world: int,
        seed: int,
        shuffle: bool = True,
    ) -> None:
        if seq_len < 1 or global_batch < 1 or world < 1:
            raise ValueError(
                f"seq_len, global_batch and world must be positive, "
                f"got {seq_len}, {global_batch}, {world}"
            )
        if not 0 <= rank < world:
            raise ValueError(f"rank must be in [0, {world}), got {rank}")
        if global_batch % world:
            raise ValueError(f"global_batch {global_batch} is not divisible by world {world}")
        self.windows = _windows(tokens, seq_len)
        if self.windows < global_batch:
            raise ValueError(
                f"{len(tokens)} tokens make {self.windows} windows of seq_len {seq_len}, fewer "
                f"than global_batch {global_batch}; need at least "
                f"{global_batch * seq_len + 1} tokens"
            )
        self.tokens = tokens
        self.seq_len = seq_len
        self.global_batch = global_batch
        self.per_rank = global_batch // world
        self.rank = rank
        self.world = world
        self.seed = seed
        self.shuffle = shuffle
        self.batches = 0
        self._offsets = np.arange(seq_len + 1)
        self._perms: dict[int, np.ndarray] = {}

    def _permutation(self, epoch: int) -> np.ndarray:
        """Window order of data-epoch ``epoch``; caches two (a batch spans at most two epochs)."""
        perm = self._perms.get(epoch)
        if perm is None:
            if self.shuffle:
                gen = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
                perm = torch.randperm(self.windows, generator=gen).numpy()
            else:
                perm = np.arange(self.windows)
            self._perms = {e: p for e, p in self._perms.items() if e == epoch - 1}
            self._perms[epoch] = perm
        return perm

    def _windows_of(self, first_sample: int, count: int) -> np.ndarray:
        """Window indices of global samples ``[first_sample, first_sample + count)``."""
        samples = np.arange(first_sample, first_sample + count)
        epochs, positions = np.divmod(samples, self.windows)
        out = np.empty(count, dtype=np.int64)
        for epoch in np.unique(epochs):
            mask = epochs == epoch
            out[mask] = self._permutation(int(epoch))[positions[mask]]
        return out

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's ``(inputs, targets)``, int64 ``[per_rank, seq_len]``.

        Advances the position by one global batch (all ranks' samples), not by ``per_rank``.
        """
        first = self.batches * self.global_batch + self.rank * self.per_rank
        starts = self._windows_of(first, self.per_rank) * self.seq_len
        windows = torch.from_numpy(self.tokens[starts[:, None] + self._offsets].astype(np.int64))
        self.batches += 1
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

    def batch_at(self, first_sample: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's slice of the global batch that starts at global sample ``first_sample``.

        For callers that keep their own position (elastic islands agree on a run-wide sample
        cursor); the loader's own position is untouched.
        """
        starts = self._windows_of(first_sample + self.rank * self.per_rank, self.per_rank) * self.seq_len
        windows = torch.from_numpy(self.tokens[starts[:, None] + self._offsets].astype(np.int64))
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

    @property
    def samples_consumed(self) -> int:
        """Global samples (over all ranks) served so far."""
        return self.batches * self.global_batch

    def drain_notes(self) -> list[str]:
        """Events worth a log line since the last call (none for one array)."""
        return []

    def log_fields(self) -> dict[str, Any]:
        """Extra fields for metrics records (none for one array)."""
        return {}

    @property
    def tokens_consumed(self) -> int:
        """Global input tokens (over all ranks) served so far."""
        return self.samples_consumed * self.seq_len

    def state_dict(self) -> dict:
        """The position and the settings that fix the sample order, as plain ints."""
        return {
            "batches": self.batches,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "global_batch": self.global_batch,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``; ``world`` and ``rank`` may differ from the saving run.

        Raises:
            ValueError: ``seed``, ``seq_len`` or ``global_batch`` differ from this loader's,
                which would silently change the order of the data.
        """
        for key in ("seed", "seq_len", "global_batch"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"data loader state was saved with {key}={state[key]} but this run has "
                    f"{key}={getattr(self, key)}; resuming would change the data order"
                )
        self.batches = int(state["batches"])


def iter_eval_batches(
    tokens: np.ndarray,
    seq_len: int,
    batch: int,
    rank: int,
    world: int,
    max_batches: int,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's slice of the first ``max_batches`` unshuffled global batches of ``tokens``.

    ``batch`` is the global batch size. Yields ``min(max_batches, windows // batch)`` batches,
    or all ``windows // batch`` of them when ``max_batches`` is 0, the same on every call, so
    validation losses are comparable across steps.

    Raises:
        ValueError: ``max_batches < 0``, or as :class:`PackedLoader` (notably when ``tokens``
            hold fewer than ``batch`` windows).
    """
    # Not a generator itself, so that bad arguments raise here rather than at first iteration.
    if max_batches < 0:
        raise ValueError(f"max_batches must be 0 (all) or more, got {max_batches}")
    loader = PackedLoader(tokens, seq_len, batch, rank, world, seed=0, shuffle=False)
    available = loader.windows // batch
    return (loader.next_batch() for _ in range(min(max_batches or available, available)))


class MixtureLoader:
    """Deterministic stream of packed batches drawn from weighted sources, for one rank.

    ``sources`` are token arrays (``numpy`` arrays or :class:`atoll.data.shards.ShardedTokens`),
    each cut into ``(len - 1) // seq_len`` windows like :class:`PackedLoader`. Run-wide sample
    ``i`` reads source ``s`` and window ``w`` as :class:`atoll.data.mixture.MixturePlan` and a
    :class:`~atoll.data.mixture.WindowPermutation` per ``(seed, source name, pass)`` decide; rank
    ``r`` reads the ``r``-th ``global_batch / world`` samples of every global batch.

    Keeps, per island, the input tokens read from each source (``tokens_by_source``, counted
    for the whole global batch by every rank alike) and the pass each source is in; a source
    starting a new pass gives a note for the log. Both are in :meth:`state_dict`.

    Raises (on construction):
        ValueError: as :class:`PackedLoader`, or a source with no full window, or bad weights.
    """

    def __init__(
        self,
        sources: Sequence[Any],
        names: Sequence[str],
        weights: Sequence[float],
        seq_len: int,
        global_batch: int,
        rank: int,
        world: int,
        seed: int,
    ) -> None:
        if seq_len < 1 or global_batch < 1 or world < 1:
            raise ValueError(f"seq_len, global_batch and world must be positive, got {seq_len}, {global_batch}, {world}")
        if not 0 <= rank < world:
            raise ValueError(f"rank must be in [0, {world}), got {rank}")
        if global_batch % world:
            raise ValueError(f"global_batch {global_batch} is not divisible by world {world}")
        self.windows = [max(len(t) - 1, 0) // seq_len for t in sources]
        for name, tokens, n in zip(names, sources, self.windows):
            if n < 1:
                raise ValueError(f"source {name!r} has {len(tokens)} training tokens, fewer than one window of "
                                 f"seq_len {seq_len} + 1; add data or shorten train.seq_len")
        self.sources = list(sources)
        self.names = list(names)
        self.weights = [float(w) for w in weights]
        self.plan = MixturePlan(self.weights, seed)
        self.seq_len = seq_len
        self.global_batch = global_batch
        self.per_rank = global_batch // world
        self.rank = rank
        self.world = world
        self.seed = seed
        self.batches = 0
        self.tokens_by_source = dict.fromkeys(self.names, 0)
        self.passes = dict.fromkeys(self.names, 0)
        self._offsets = np.arange(seq_len + 1)
        self._perms: dict[tuple[int, int], WindowPermutation] = {}
        self._notes: list[str] = []

    def _permutation(self, source: int, epoch: int) -> WindowPermutation:
        key = (source, epoch)
        if key not in self._perms:
            self._perms[key] = WindowPermutation(self.windows[source], derive_key(self.seed, self.names[source], epoch))
        return self._perms[key]

    def locate(self, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(source, pass, window)`` of each run-wide sample index."""
        source, ordinal = self.plan.locate(samples)
        n = np.asarray(self.windows, dtype=np.int64)[source]
        epoch, position = np.divmod(ordinal, n)
        window = np.empty_like(position)
        for s, e in {(int(s), int(e)) for s, e in zip(source, epoch)}:
            mask = (source == s) & (epoch == e)
            window[mask] = self._permutation(s, e)(position[mask])
        return source, epoch, window

    def batch_at(self, first_sample: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's slice of the global batch that starts at run-wide sample ``first_sample``.

        Also counts the whole global batch into ``tokens_by_source`` and notes new passes.
        """
        island = np.arange(first_sample, first_sample + self.global_batch)
        source, epoch, window = self.locate(island)
        for s, count in zip(*np.unique(source, return_counts=True)):
            self.tokens_by_source[self.names[s]] += int(count) * self.seq_len
        for s in np.unique(source):
            newest = int(epoch[source == s].max())
            if newest > self.passes[self.names[s]]:
                self.passes[self.names[s]] = newest
                self._notes.append(f"data: source {self.names[s]!r} ran out and starts pass {newest + 1} over its "
                                   f"{self.windows[s]:,} windows, reshuffled (run-wide sample {first_sample:,})")
        mine = slice(self.rank * self.per_rank, (self.rank + 1) * self.per_rank)
        rows = np.empty((self.per_rank, self.seq_len + 1), dtype=np.int64)
        for s in np.unique(source[mine]):
            at = source[mine] == s
            starts = window[mine][at] * self.seq_len
            rows[at] = self.sources[s][starts[:, None] + self._offsets]
        windows = torch.from_numpy(rows)
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's batch at the loader's own position, which then advances by one global batch."""
        batch = self.batch_at(self.batches * self.global_batch)
        self.batches += 1
        return batch

    @property
    def samples_consumed(self) -> int:
        return self.batches * self.global_batch

    @property
    def tokens_consumed(self) -> int:
        return self.samples_consumed * self.seq_len

    def drain_notes(self) -> list[str]:
        """Log lines since the last call: sources that started a new pass."""
        notes, self._notes = self._notes, []
        return notes

    def log_fields(self) -> dict[str, Any]:
        """``tokens_by_source``: input tokens this island has read from each source (cumulative)."""
        return {"tokens_by_source": dict(self.tokens_by_source)}

    def state_dict(self) -> dict:
        """Position, per-source counters and the settings that fix the sample order."""
        return {
            "batches": self.batches,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "global_batch": self.global_batch,
            "sources": ",".join(f"{n}={w!r}" for n, w in zip(self.names, self.weights)),
            "tokens_by_source": dict(self.tokens_by_source),
            "passes": dict(self.passes),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``; ``world`` and ``rank`` may differ from the saving run.

        Raises:
            ValueError: the seed, sequence length, global batch or the sources and weights differ,
                which would silently change what each sample reads.
        """
        mine = self.state_dict()
        for key in ("seed", "seq_len", "global_batch", "sources"):
            if state[key] != mine[key]:
                raise ValueError(
                    f"data loader state was saved with {key}={state[key]} but this run has {key}={mine[key]}; "
                    "resuming would change the data order"
                )
        self.batches = int(state["batches"])
        self.tokens_by_source = {n: int(state["tokens_by_source"][n]) for n in self.names}
        self.passes = {n: int(state["passes"][n]) for n in self.names}
