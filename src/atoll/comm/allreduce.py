"""The global all-reduce: every pseudo-gradient or gradient that crosses islands goes through here.

`GlobalMean` averages a flat fp32 CPU buffer across the islands of the current epoch. The buffer
is split into K contiguous parts, one per stream (`comm.streams` process groups per local rank),
and each part goes through atoll's pipelined ring (`comm/ring.py`) in the configured codec, or,
for a codec whose payloads do not add up along a ring (topk: `Codec.summable` is False), through
the sparse all-gather (`comm/allgather.py`), which has the same contract; the K rings run at the
same time in threads, so one process can keep K connections busy. `mean_buckets_`
averages many slices (DiLoCo's per-layer buckets) with one thread per stream for all of them,
each bucket's ring starting as the previous one drains.
Bytes are counted as the ring or the all-gather puts them on the wire (encoded sizes and MACs). With a `dropped` buffer the
rings also write what this island's encodings lost at each position (`comm/ring.py`), for error
feedback (`atoll.diloco`). Below, "ring" stands for the sparse all-gather too.

Failure semantics: a dead peer (closed socket) makes the rings raise `RingError` at once, a silent
one after `deadline_s` without progress; `mean_` raises only after every stream's ring has
stopped, the buffer's contents are then undefined and the groups unusable (the epoch ends).
A gloo wait cannot be interrupted, so a peer that hangs mid-ring would hold the others until
`deadline_s`; with an `abandoned` check (the mesh passes "was this epoch dissolved?", which the
coordinator decides at the heartbeat timeout) the rings run on a work buffer (one bucket's part
per stream) in a thread that `mean_` leaves behind as soon as the check says so, raising RingError;
the left thread ends at its own deadline (or its next bucket) and never writes into the caller's
buffer after that.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.distributed as dist

from atoll.comm import sealed
from atoll.comm.allgather import sparse_all_gather_means_
from atoll.comm.codecs import Codec
from atoll.comm.ring import RingError, ring_all_reduce_means_

ABANDON_POLL_S = 0.2
"""How often a running mean_ asks its `abandoned` check (one coordinator store lookup each)."""
ABANDONED = "rings abandoned"
"""The words of the RingError raised when an epoch ends under running rings (not the island's own failure)."""


T = TypeVar("T")


def run_abandonable(work: Callable[[], T], abandoned: Callable[[], bool], what: str, give_up: Callable[[], None] = lambda: None) -> T:
    """`work()` in a daemon thread: its result, or its error re-raised here; but as soon as
    `abandoned()` says the epoch is over, `give_up()` runs and RingError(... ABANDONED) is raised,
    leaving the thread behind (a gloo wait cannot be interrupted). `work` must not write into
    the caller's memory once `give_up` has returned."""
    outcome: list = []

    def run() -> None:
        try:
            outcome.append(work())
        except BaseException as err:  # handed to the caller's thread below
            outcome.append(err)

    thread = threading.Thread(target=run, name="atoll-abandonable", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(ABANDON_POLL_S)
        if thread.is_alive() and abandoned():
            give_up()
            raise RingError(f"the epoch ended while {what}: {ABANDONED}")
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


@dataclass
class WireStats:
    """Bytes this process put on and took off the wire for the global groups (cumulative)."""

    bytes_sent: int = 0
    bytes_recv: int = 0

    def add(self, sent: int, recv: int) -> None:
        self.bytes_sent += sent
        self.bytes_recv += recv


def ring_bytes(numel: int, element_size: int, world: int) -> int:
    """Bytes each member sends (and receives) in a ring all-reduce of numel elements."""
    return 2 * (world - 1) * numel * element_size // world


class GlobalMean:
    """Averages buffers over this local rank's global groups (one ring per group, K = comm.streams)."""

    def __init__(
        self, groups: list[dist.ProcessGroup], codec: Codec, deadline_s: float, chunk_bytes: int, wire: WireStats | None = None,
        abandoned: Callable[[], bool] | None = None, key: bytes | None = None,
    ) -> None:
        if not groups:
            raise ValueError("GlobalMean needs at least one process group")
        self.groups = groups
        self.codec = codec
        self.deadline_s = deadline_s
        self.chunk_bytes = chunk_bytes
        self.wire = wire if wire is not None else WireStats()
        """Shared by the GlobalMeans of successive epochs, so the counts stay cumulative."""
        self.calls = 0  # equal on every island: it keeps each call's ring tags and MACs apart
        self.abandoned = abandoned
        """True once the rings' epoch is over: mean_ then stops waiting for them (see the module doc)."""
        self.key = key
        """The epoch key every ring payload is authenticated with (None: no MACs)."""

    @property
    def control_group(self) -> dist.ProcessGroup:
        """The group that the small collectives below use."""
        return self.groups[0]

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every island's `tensor` in epoch order, each checked against its sender's MAC
        (`atoll.comm.sealed`); RingError on one that does not verify, gloo's errors otherwise."""
        self.calls += 1
        return sealed.all_gather(tensor, self.control_group, self.key, self.calls - 1)

    def broadcast_(self, tensors: list[torch.Tensor], source: int) -> None:
        """Island `source`'s contiguous `tensors` into every island's, in place, in MAC-checked
        chunks (`atoll.comm.sealed`); on failure they hold a mix of old and verified values."""
        self.calls += 1
        sealed.broadcast_(tensors, self.control_group, source, self.key, self.calls - 1, self.chunk_bytes)

    def mean_(self, tensor: torch.Tensor) -> None:
        """Replace a contiguous 1-D CPU fp32 tensor by its mean over the islands, in place.

        Bit-identical on every island. Returns only when every stream's ring has finished; if any
        failed, raises its RingError and the tensor's contents are undefined.
        """
        self.mean_buckets_(tensor, [slice(0, tensor.numel())])

    def mean_buckets_(self, tensor: torch.Tensor, buckets: list[slice], dropped: torch.Tensor | None = None) -> None:
        """mean_ of each slice of a contiguous 1-D CPU fp32 tensor, one ring after another.

        With `dropped` (like `tensor`), each bucket's positions of it are overwritten with what this
        island's encodings lost there (`ring_all_reduce_mean_`); on failure they are undefined.

        The same results, ring tags and failure semantics as one mean_ per bucket, without the
        per-bucket overhead: one thread per stream runs all buckets, each bucket's ring putting
        its first step on the wire as the previous one begins its second (`ring_all_reduce_means_`),
        so the link does not idle between buckets; a failed stream stops the others at their
        next bucket. With an `abandoned` check, one poll loop covers all buckets and the rings
        run on two work buffers per stream the size of the largest bucket's part (the draining
        ring's and the starting one's), copied back bucket by bucket while this call still waits
        (never after it has given up), so no copy of the whole tensor is made (`dropped` likewise).
        """
        first = self.calls
        self.calls += len(buckets)
        if self.abandoned is None:
            moved = self._streams(tensor, dropped, buckets, first, threading.Event(), None)
        else:
            moved = self._streams_abandonable(tensor, dropped, buckets, first)
        for sent, recv in moved:
            self.wire.add(sent, recv)

    def _streams(
        self, tensor: torch.Tensor, dropped: torch.Tensor | None, buckets: list[slice], first: int, stop: threading.Event,
        deliver: Callable[[list[torch.Tensor], list[torch.Tensor]], None] | None,
    ) -> list[tuple[int, int]]:
        """Stream k averages part k of every bucket on group k, in place or (deliver given: it gets
        the parts and their work buffers, the tensor's and then `dropped`'s) on work buffers."""
        streams = len(self.groups)

        def stream(k: int) -> tuple[int, int]:
            parts = [tensor[bucket].tensor_split(streams)[k] for bucket in buckets]
            lost_parts = [dropped[bucket].tensor_split(streams)[k] for bucket in buckets] if dropped is not None else None
            # two work buffers (and two for `dropped`): bucket i+1's ring starts while bucket i's drains
            longest = max((p.numel() for p in parts), default=0)
            works = [torch.empty(longest) for _ in range(2 if lost_parts is None else 4)] if deliver is not None else None

            def target(i: int) -> torch.Tensor:
                if stop.is_set():  # another stream failed or the caller left: its error is what counts
                    raise RingError("ring stopped: another stream of this all-reduce failed or it was abandoned")
                return parts[i] if works is None else works[i % 2][: parts[i].numel()].copy_(parts[i])

            def lost(i: int) -> torch.Tensor:
                return lost_parts[i] if works is None else works[2 + i % 2][: parts[i].numel()]

            def done(i: int, averaged: torch.Tensor) -> None:
                if deliver is not None:
                    if lost_parts is None:
                        deliver([parts[i]], [averaged])
                    else:
                        deliver([parts[i], lost_parts[i]], [averaged, lost(i)])

            means = ring_all_reduce_means_ if self.codec.summable else sparse_all_gather_means_
            try:
                return means(
                    target, len(parts), self.groups[k], self.codec, self.deadline_s, self.chunk_bytes, first, self.key, done,
                    None if lost_parts is None else lost,
                )
            except BaseException:
                stop.set()
                raise

        if streams == 1:
            return [stream(0)]
        # leaving the pool's block joins every stream, so none still writes into `tensor` after a failure
        with ThreadPoolExecutor(streams, thread_name_prefix="atoll-ring") as pool:
            futures = [pool.submit(stream, k) for k in range(streams)]
        errors = [f.exception() for f in futures if f.exception() is not None]
        # the first stream that failed for a reason of its own, not one that only stopped for it
        for error in sorted(errors, key=lambda e: str(e).startswith("ring stopped")):
            raise error
        return [future.result() for future in futures]

    def _streams_abandonable(
        self, tensor: torch.Tensor, dropped: torch.Tensor | None, buckets: list[slice], first: int,
    ) -> list[tuple[int, int]]:
        """_streams on work buffers in a daemon thread, given up as soon as `abandoned()` says so."""
        stop = threading.Event()
        delivering = threading.Lock()

        def deliver(parts: list[torch.Tensor], works: list[torch.Tensor]) -> None:
            with delivering:
                if stop.is_set():
                    raise RingError("ring abandoned: its result is no longer wanted")
                for part, work in zip(parts, works):
                    part.copy_(work)

        def run() -> list[tuple[int, int]]:
            return self._streams(tensor, dropped, buckets, first, stop, deliver)

        def give_up() -> None:
            with delivering:  # after this, the left thread never writes into `tensor`
                stop.set()

        return run_abandonable(run, self.abandoned, "its rings were running (a peer was dropped)", give_up)
