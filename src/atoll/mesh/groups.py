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

Where a group listens (`gloo_device`): gloo binds each group's listener on a port the kernel
picks, on the address of `mesh.interface` (an overlay such as wg0 or tailscale0), else of
GLOO_SOCKET_IFNAME, else `atoll.mesh.addresses.ring_host`; it publishes exactly that address and
port in the rendezvous (torch 2.13's gloo takes no port and announces no other address), so the
members of a ring must reach each other's bound addresses in both directions.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING

import torch.distributed as dist

from atoll.mesh.addresses import GLOO_SOCKET_IFNAME_ENV, ring_host
from atoll.mesh.membership import Epoch

if TYPE_CHECKING:
    from atoll.config import MeshConfig

THREADS_PER_DEVICE = 2
"""gloo's worker threads per device (what torch's default construction uses)."""


def group_prefix(epoch: int, local_rank: int, stream: int) -> str:
    return f"atoll/epoch/{epoch}/pg/{local_rank}/{stream}/"


def gloo_device(mesh: MeshConfig) -> dist.ProcessGroupGloo.Device | None:
    """The device this island's groups listen on (see the module docstring); None: torch's default,
    which reads GLOO_SOCKET_IFNAME. A missing interface raises RuntimeError (gloo's own message)."""
    if mesh.interface:
        return dist.ProcessGroupGloo.create_device(interface=mesh.interface)
    if os.environ.get(GLOO_SOCKET_IFNAME_ENV):
        return None
    return dist.ProcessGroupGloo.create_device(hostname=ring_host(mesh))


def global_groups(
    store_for: Callable[[str], dist.Store], epoch: Epoch, island_id: str, local_rank: int, streams: int, timeout: timedelta,
    make_device: Callable[[], dist.ProcessGroupGloo.Device | None] = lambda: None,
) -> list[dist.ProcessGroup]:
    """The `streams` gloo groups of `epoch` for `local_rank`; their collectives fail after `timeout`.
    `store_for(prefix)` is the rendezvous store of the group under that prefix (`EpochStore`);
    `make_device()` makes the device each group listens on (`gloo_device`; None: torch's default).

    Blocks until every member's rank k has joined (gloo's rendezvous: each member dials the members
    whose address is smaller than its own and waits for the others to dial it), or raises
    RuntimeError at `timeout` (a member that never comes, or one whose address cannot be reached)
    or when the epoch is replaced meanwhile. Nothing is retried here: the island reports the failed
    entry and the coordinator forms the next epoch (`atoll.sync`).
    """
    rank = epoch.index_of(island_id)
    return [
        dist.ProcessGroupGloo(store_for(group_prefix(epoch.number, local_rank, s)), rank, epoch.world, _options(timeout, make_device()))
        for s in range(streams)
    ]


def _options(timeout: timedelta, device: dist.ProcessGroupGloo.Device | None) -> dist.ProcessGroupGloo._Options | timedelta:
    """gloo's construction argument: the timeout alone (torch picks the device) or options on `device`."""
    if device is None:
        return timeout
    options = dist.ProcessGroupGloo._Options()
    options._timeout, options._devices, options._threads = timeout, [device], THREADS_PER_DEVICE
    return options
