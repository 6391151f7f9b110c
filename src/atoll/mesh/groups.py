"""Global process groups: for local rank k, one gloo group joining rank k of every island.

An island of L local ranks therefore syncs over L independent groups (L connections per island
pair), and `comm.streams` = K multiplies that by K: K groups per local rank, K rings. Each epoch
builds its groups under its own prefix of the epoch's rendezvous (`atoll.mesh.rendezvous`: through
the coordinator's authenticated protocol, members only), so a new epoch never collides with the
sockets or keys of an old one. Groups are used directly (not registered with c10d), so they never
disturb the island's default group.

The rendezvous tells each member where the others listen; whoever sits on the network path can
still redirect or alter the connections. Everything a group carries is therefore authenticated
under the epoch key: ring payloads by the ring (`atoll.comm.ring`), statistics, progress and state
broadcasts by `atoll.comm.sealed`; a man in the middle can only make the group fail.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import torch.distributed as dist

from atoll.mesh.membership import Epoch


def group_prefix(epoch: int, local_rank: int, stream: int) -> str:
    return f"atoll/epoch/{epoch}/pg/{local_rank}/{stream}/"


def global_groups(
    store_for: Callable[[str], dist.Store], epoch: Epoch, island_id: str, local_rank: int, streams: int, timeout: timedelta
) -> list[dist.ProcessGroup]:
    """The `streams` gloo groups of `epoch` for `local_rank`; their collectives fail after `timeout`.
    `store_for(prefix)` is the rendezvous store of the group under that prefix (`EpochStore`).

    Blocks until every member's rank k has joined (gloo's rendezvous), or raises RuntimeError at
    `timeout` (a member that never comes) or when the epoch is replaced meanwhile.
    """
    rank = epoch.index_of(island_id)
    return [
        dist.ProcessGroupGloo(store_for(group_prefix(epoch.number, local_rank, s)), rank, epoch.world, timeout)
        for s in range(streams)
    ]
