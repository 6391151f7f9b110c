"""The global all-reduce: every pseudo-gradient or gradient that crosses islands goes through here.

`GlobalMean` averages a flat fp32 CPU buffer across the islands of the current epoch. The buffer
is split into K contiguous parts, one per stream (`comm.streams` process groups per local rank),
and each part goes through atoll's pipelined ring (`comm/ring.py`) in the configured codec; the K
rings run at the same time in threads, so one process can keep K connections busy. Bytes are
counted as the ring puts them on the wire (encoded sizes).

Failure semantics: a dead peer (closed socket) makes the rings raise `RingError` at once, a silent
one after `deadline_s` without progress; `mean_` raises only after every stream's ring has
stopped, the buffer's contents are then undefined and the groups unusable (the epoch ends).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.distributed as dist

from atoll.comm.codecs import Codec
from atoll.comm.ring import ring_all_reduce_mean_


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

    @property
    def control_group(self) -> dist.ProcessGroup:
        """The group that small control collectives (digest checks) use."""
        return self.groups[0]

    def mean_(self, tensor: torch.Tensor) -> None:
        """Replace a contiguous 1-D CPU fp32 tensor by its mean over the islands, in place.

        Bit-identical on every island. Returns only when every stream's ring has finished; if any
        failed, raises its RingError and the tensor's contents are undefined.
        """
        parts = tensor.tensor_split(len(self.groups))
        sequence = self.calls
        self.calls += 1
        if len(self.groups) == 1:
            moved = [self._ring(parts[0], self.groups[0], sequence)]
        else:
            # leaving the pool's block joins every ring, so none still writes into `tensor` after a failure
            with ThreadPoolExecutor(len(self.groups), thread_name_prefix="atoll-ring") as pool:
                futures = [pool.submit(self._ring, part, group, sequence) for part, group in zip(parts, self.groups)]
            moved = [future.result() for future in futures]
        for sent, recv in moved:
            self.wire.add(sent, recv)

    def _ring(self, part: torch.Tensor, group: dist.ProcessGroup, sequence: int) -> tuple[int, int]:
        return ring_all_reduce_mean_(part, group, self.codec, self.deadline_s, self.chunk_bytes, sequence)
