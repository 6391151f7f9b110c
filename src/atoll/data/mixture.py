"""Weighted mixture sampling: which source, and which of its windows, each run-wide sample reads.

Pure functions of ``(weights, seed, sample index)``: no state, random access, so an island can
read any slice of the run-wide sample cursor without having read what came before.

**Source of a sample.** Samples are grouped in blocks of :data:`MIXTURE_BLOCK`. Every block holds
exactly ``counts[s]`` samples of source ``s`` (the weights scaled to the block by largest
remainder, so each source is within 0.5 / MIXTURE_BLOCK of its weight), placed in an order drawn
from ``(seed, block)``. Over any number of whole blocks the mixture is exact; over a part of a
block it is a draw without replacement from the block's quota.

**Window of a sample.** The k-th sample of source ``s`` (counted from the start of the run) is
number ``k mod n_s`` of pass ``k div n_s`` over the source's ``n_s`` windows, through a random
permutation of the windows drawn from ``(seed, source name, pass)``. A pass therefore reads each
window once, in a new order each pass; samples read by different islands or ranks are different
run-wide indices, hence different ``k``, hence different windows within a pass.

The permutation is a 4-round Feistel network over the next power of four with cycle walking: a
bijection on ``[0, n)`` computed per index in O(1) memory, where ``numpy.random.permutation``
would hold 8 bytes per window (0.5 GB per rank for FineWeb-Edu's 67M windows of 8192 tokens).
"""

from __future__ import annotations

import hashlib

import numpy as np

MIXTURE_BLOCK = 8192
"""Samples per block of fixed source quotas: a source's share is exact to 0.5 / 8192 per block."""

_FEISTEL_ROUNDS = 4


def derive_key(*parts: object) -> int:
    """A 63-bit key from ``parts`` (sha256), so nearby seeds give unrelated streams."""
    digest = hashlib.sha256(":".join(["atoll.data.mixture", *map(str, parts)]).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def block_counts(weights: list[float], block: int = MIXTURE_BLOCK) -> np.ndarray:
    """Samples of each source per block: ``weights`` (any positive scale) times ``block``,
    rounded by largest remainder so they sum to ``block``.

    Raises:
        ValueError: a weight is not positive, or so small that its source gets no sample.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.size == 0 or (w <= 0).any() or not np.isfinite(w).all():
        raise ValueError(f"mixture weights must be positive numbers, got {list(weights)}")
    exact = w / w.sum() * block
    counts = np.floor(exact).astype(np.int64)
    leftover = block - int(counts.sum())
    counts[np.argsort(-(exact - counts), kind="stable")[:leftover]] += 1
    if (counts == 0).any():
        raise ValueError(f"a mixture weight below 1/{block} of the total gives its source no samples: {list(weights)}")
    return counts


class MixturePlan:
    """Maps run-wide sample indices to ``(source index, ordinal within that source)``."""

    def __init__(self, weights: list[float], seed: int, block: int = MIXTURE_BLOCK) -> None:
        self.counts = block_counts(weights, block)
        self.block = block
        self.seed = seed
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _layout(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, rank among that source's samples) of each position of block ``b``."""
        layout = self._cache.get(b)
        if layout is None:
            quota = np.repeat(np.arange(self.counts.size), self.counts)
            source = quota[np.random.default_rng(derive_key(self.seed, "block", b)).permutation(self.block)]
            order = np.argsort(source, kind="stable")
            starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]])
            rank = np.empty(self.block, dtype=np.int64)
            rank[order] = np.arange(self.block) - starts[source[order]]
            layout = (source, rank)
            self._cache = {k: v for k, v in self._cache.items() if k == b - 1}  # a batch spans <= 2 blocks
            self._cache[b] = layout
        return layout

    def locate(self, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(source, ordinal)`` of each run-wide sample index in ``samples`` (int64 arrays)."""
        samples = np.asarray(samples, dtype=np.int64)
        blocks, positions = np.divmod(samples, self.block)
        source = np.empty(samples.shape, dtype=np.int64)
        ordinal = np.empty(samples.shape, dtype=np.int64)
        for b in np.unique(blocks):
            mask = blocks == b
            src, rank = self._layout(int(b))
            source[mask] = src[positions[mask]]
            ordinal[mask] = int(b) * self.counts[source[mask]] + rank[positions[mask]]
        return source, ordinal


class WindowPermutation:
    """A random bijection on ``[0, n)`` keyed by ``key``, evaluated per index (see module doc)."""

    def __init__(self, n: int, key: int) -> None:
        if n < 1:
            raise ValueError(f"a permutation needs n >= 1, got {n}")
        self.n = n
        self.half = max(1, (int(n - 1).bit_length() + 1) // 2)
        self.mask = np.uint64((1 << self.half) - 1)
        rng = np.random.default_rng(key)
        self.keys = rng.integers(0, 2**63, size=_FEISTEL_ROUNDS, dtype=np.uint64)

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> np.uint64(self.half), x & self.mask
        for k in self.keys:
            mixed = (right ^ k) * np.uint64(0x9E3779B97F4A7C15)
            mixed ^= mixed >> np.uint64(29)
            mixed *= np.uint64(0xBF58476D1CE4E5B9)
            mixed ^= mixed >> np.uint64(32)
            left, right = right, left ^ (mixed & self.mask)
        return (left << np.uint64(self.half)) | right

    def __call__(self, index: np.ndarray) -> np.ndarray:
        """The images of ``index`` (int64, each in ``[0, n)``)."""
        x = np.asarray(index, dtype=np.uint64)
        out = self._encrypt(x)
        outside = out >= self.n
        while outside.any():  # cycle walking: the domain is < 4n, so few rounds are needed
            out[outside] = self._encrypt(out[outside])
            outside = out >= self.n
        return out.astype(np.int64)
