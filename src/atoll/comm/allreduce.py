"""The global all-reduce: every pseudo-gradient or gradient that crosses islands goes through here.

`GlobalMean` averages a flat fp32 CPU buffer across the islands of the current epoch. The buffer
is split into K contiguous parts, one per stream (`comm.streams` process groups per local rank),
and each part goes through atoll's pipelined ring (`comm/ring.py`) in the configured codec; the K
rings run at the same time in threads, so one process can keep K connections busy. Bytes are
counted as the ring puts them on the wire (encoded sizes).

Failure semantics: a dead peer (closed socket) makes the rings raise `RingError` at once, a silent
one after `deadline_s` without progress; `mean_` raises only after every stream's ring has
stopped, the buffer's contents are then undefined and the groups unusable (the epoch ends).
A gloo wait cannot be interrupted, so a peer that hangs mid-ring would hold the others until
`deadline_s`; with an `abandoned` check (the mesh passes "was this epoch dissolved?", which the
coordinator decides at the heartbeat timeout) the rings run on a copy in a thread that `mean_`
leaves behind as soon as the check says so, raising RingError; the left thread ends at its own
deadline and never writes into the caller's buffer.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.distributed as dist

from atoll.comm.codecs import Codec
from atoll.comm.ring import RingError, ring_all_reduce_mean_

ABANDON_POLL_S = 0.2
"""How often a running mean_ asks its `abandoned` check (a local flag on the island's leader)."""
ABANDONED = "rings abandoned"
"""The words of the RingError raised when an epoch ends under running rings (not the island's own failure)."""


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
        self.calls = 0  # equal on every island: it keeps each call's ring tags apart
        self.abandoned = abandoned
        """True once the rings' epoch is over: mean_ then stops waiting for them (see the module doc)."""
        self.key = key
        """The epoch key every ring payload is authenticated with (None: no MACs)."""

    @property
    def control_group(self) -> dist.ProcessGroup:
        """The group that small control collectives (digest checks) use."""
        return self.groups[0]

    def mean_(self, tensor: torch.Tensor) -> None:
        """Replace a contiguous 1-D CPU fp32 tensor by its mean over the islands, in place.

        Bit-identical on every island. Returns only when every stream's ring has finished; if any
        failed, raises its RingError and the tensor's contents are undefined.
        """
        sequence = self.calls
        self.calls += 1
        moved = self._rings(tensor, sequence) if self.abandoned is None else self._rings_abandonable(tensor, sequence)
        for sent, recv in moved:
            self.wire.add(sent, recv)

    def _rings(self, tensor: torch.Tensor, sequence: int) -> list[tuple[int, int]]:
        parts = tensor.tensor_split(len(self.groups))
        if len(self.groups) == 1:
            return [self._ring(parts[0], self.groups[0], sequence)]
        # leaving the pool's block joins every ring, so none still writes into `tensor` after a failure
        with ThreadPoolExecutor(len(self.groups), thread_name_prefix="atoll-ring") as pool:
            futures = [pool.submit(self._ring, part, group, sequence) for part, group in zip(parts, self.groups)]
        return [future.result() for future in futures]

    def _rings_abandonable(self, tensor: torch.Tensor, sequence: int) -> list[tuple[int, int]]:
        """_rings on a copy in a daemon thread, given up as soon as `abandoned()` says so."""
        work = tensor.clone()
        outcome: list = []

        def run() -> None:
            try:
                outcome.append(self._rings(work, sequence))
            except BaseException as err:  # handed to the caller's thread below
                outcome.append(err)

        thread = threading.Thread(target=run, name="atoll-mean", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(ABANDON_POLL_S)
            if thread.is_alive() and self.abandoned():
                raise RingError(f"the epoch ended while its rings were running (a peer was dropped): {ABANDONED}")
        if isinstance(outcome[0], BaseException):
            raise outcome[0]
        tensor.copy_(work)
        return outcome[0]

    def _ring(self, part: torch.Tensor, group: dist.ProcessGroup, sequence: int) -> tuple[int, int]:
        return ring_all_reduce_mean_(part, group, self.codec, self.deadline_s, self.chunk_bytes, sequence, self.key)
