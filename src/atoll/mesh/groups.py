"""Global process groups: for local rank k, one gloo group joining rank k of every island.

An island of L local ranks therefore syncs over L independent groups (L connections per island
pair), and `comm.streams` = K multiplies that by K: K groups per local rank, K rings. Each epoch
builds its groups under its own store prefix, so a new epoch never collides with the sockets or
keys of an old one. Groups are used directly (not registered with c10d), so they
never disturb the island's default group.
"""

from __future__ import annotations

from datetime import timedelta

import torch.distributed as dist

from atoll.mesh import protocol
from atoll.mesh.membership import Epoch


def global_groups(
    store: dist.Store, epoch: Epoch, island_id: str, local_rank: int, streams: int, timeout: timedelta
) -> list[dist.ProcessGroup]:
    """The `streams` gloo groups of `epoch` for `local_rank`; their collectives fail after `timeout`.

    Blocks until every member's rank k has joined (gloo's rendezvous), or raises at `timeout`.
    """
    rank = epoch.index_of(island_id)
    return [
        dist.ProcessGroupGloo(dist.PrefixStore(protocol.group_prefix(epoch.number, local_rank, s), store), rank, epoch.world, timeout)
        for s in range(streams)
    ]
