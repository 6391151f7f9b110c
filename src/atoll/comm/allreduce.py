"""The global all-reduce: every pseudo-gradient or gradient that crosses islands goes through here.

This version uses gloo's own fp32 all-reduce. Bytes are accounted as a ring all-reduce moves them:
2(n-1)/n x payload sent and received per island, the lower bound every all-reduce pays.

Failure semantics: a dead peer makes the collective raise (within ~10 ms for a closed socket), a
hung one at the group's timeout. The tensor's contents are then undefined; callers must not use it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


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


def all_reduce_mean_(tensor: torch.Tensor, group: dist.ProcessGroup, stats: WireStats) -> None:
    """Replace a CPU fp32 tensor by its mean over the group's members, in place."""
    world = group.size()
    if world == 1:
        return
    opts = dist.AllreduceOptions()
    opts.reduceOp = dist.ReduceOp.SUM
    group.allreduce([tensor], opts).wait()
    tensor.div_(world)
    moved = ring_bytes(tensor.numel(), tensor.element_size(), world)
    stats.add(moved, moved)
