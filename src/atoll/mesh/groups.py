"""Global process groups: for local rank k, one gloo group joining rank k of every island.

An island of L local ranks therefore syncs over L independent groups (L connections per island
pair), and `comm.streams` = K multiplies that by K: K groups per local rank, K rings. Each epoch
builds its groups under its own prefix of the coordinator's rendezvous store, so a new epoch
never collides with the sockets or keys of an old one. Groups are used directly (not registered
with c10d), so they never disturb the island's default group.

The rendezvous store is a plain TCPStore: anyone who reaches it can rewrite an address there (gloo
keeps each member's listening address under `<prefix>/0/<rank>`), and so sit between two members.
Everything a group carries is therefore authenticated under the epoch key: ring payloads by the
ring (`atoll.comm.ring`), statistics, progress and state broadcasts by `atoll.comm.sealed`; a
rewritten address can only make the group fail.
"""

from __future__ import annotations

from datetime import timedelta

import torch.distributed as dist

from atoll.mesh.membership import Epoch


def group_prefix(epoch: int, local_rank: int, stream: int) -> str:
    return f"atoll/epoch/{epoch}/pg/{local_rank}/{stream}/"


def global_groups(
    store_address: tuple[str, int], epoch: Epoch, island_id: str, local_rank: int, streams: int, timeout: timedelta
) -> list[dist.ProcessGroup]:
    """The `streams` gloo groups of `epoch` for `local_rank`; their collectives fail after `timeout`.

    Blocks until every member's rank k has joined (gloo's rendezvous), or raises RuntimeError at
    `timeout` (a member that never comes, an unreachable store).
    """
    host, port = store_address
    store = dist.TCPStore(host, port, is_master=False, wait_for_workers=False, timeout=timeout)
    rank = epoch.index_of(island_id)
    return [
        dist.ProcessGroupGloo(dist.PrefixStore(group_prefix(epoch.number, local_rank, s), store), rank, epoch.world, timeout)
        for s in range(streams)
    ]
