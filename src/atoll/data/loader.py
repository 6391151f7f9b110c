"""Packed-sequence batches from a flat token array, with a resumable position.

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
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Protocol

import numpy as np
import torch


class BatchSource(Protocol):
    """What the train loop needs from a training-data stream: batches and a resumable position."""

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]: ...

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
    the same on every call, so validation losses are comparable across steps.

    Raises:
        ValueError: ``max_batches < 1``, or as :class:`PackedLoader` (notably when ``tokens``
            hold fewer than ``batch`` windows).
    """
    # Not a generator itself, so that bad arguments raise here rather than at first iteration.
    if max_batches < 1:
        raise ValueError(f"max_batches must be at least 1, got {max_batches}")
    loader = PackedLoader(tokens, seq_len, batch, rank, world, seed=0, shuffle=False)
    return (loader.next_batch() for _ in range(min(max_batches, loader.windows // batch)))
