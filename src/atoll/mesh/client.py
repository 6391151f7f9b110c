"""An island process's side of the mesh: reach the coordinator, register, learn the epoch.

Every local rank of an island connects (each needs the store for its global groups); only local
rank 0 registers the island. Failure semantics: an unreachable coordinator is a UserError after
`connect_timeout`; an epoch that does not form within `join_timeout` is a UserError naming the
coordinator; an epoch that the coordinator refused to form raises with its reason.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

from atoll.config import MeshConfig
from atoll.errors import UserError
from atoll.mesh import protocol
from atoll.mesh.groups import global_groups
from atoll.mesh.membership import Epoch, Registration

POLL_INTERVAL_S = 0.05


def parse_address(address: str) -> tuple[str, int]:
    """'host:port' or '[ipv6]:port' -> (host, port); a malformed address is a UserError."""
    host, sep, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise UserError(f"coordinator address {address!r} is not host:port (e.g. 127.0.0.1:29400 or [::1]:29400)")
    return host, int(port)


def wait_until_reachable(host: str, port: int, timeout: float) -> None:
    """Retry a plain TCP connect until it succeeds or `timeout` passes (then raise OSError).

    Checked before creating the TCPStore client, whose own retries print C++ stack traces.
    """
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        try:
            with socket.create_connection((host, port), timeout=max(remaining, 0.1)):
                return
        except OSError:
            if remaining <= 0:
                raise
            time.sleep(min(0.2, max(remaining, 0)))


class MeshClient:
    """A connection to the coordinator's store, for one process of one island."""

    def __init__(self, address: str, island_id: str, connect_timeout: float) -> None:
        host, port = parse_address(address)
        self.address = address
        self.island_id = island_id
        try:
            wait_until_reachable(host, port, connect_timeout)
            self.store = dist.TCPStore(
                host, port, is_master=False, wait_for_workers=False, timeout=timedelta(seconds=connect_timeout)
            )
        except (RuntimeError, OSError) as err:
            raise UserError(
                f"cannot reach the coordinator at {address} ({str(err).splitlines()[0]}): "
                f"start `atoll coordinator --port {port}` there, or fix --coordinator"
            ) from None

    def register(self, local_ranks: int) -> None:
        """Announce this island (call from local rank 0 only)."""
        self.store.set(protocol.island_key(self.island_id), Registration(self.island_id, local_ranks).to_json())
        self.store.append(protocol.REGISTRATIONS, f"{self.island_id},")

    def wait_for_epoch(self, number: int, timeout: float) -> Epoch:
        """Block until epoch `number` is published, then return it."""
        deadline = time.monotonic() + timeout
        key, error_key = protocol.epoch_key(number), protocol.epoch_error_key(number)
        while time.monotonic() < deadline:
            if self.store.check([error_key]):
                raise UserError(f"the coordinator at {self.address} could not start the run: {self.store.get(error_key).decode()}")
            if self.store.check([key]):
                return Epoch.from_json(self.store.get(key))
            time.sleep(POLL_INTERVAL_S)
        raise UserError(
            f"no epoch {number} from the coordinator at {self.address} within {timeout:.0f}s: "
            "are all islands started (see `atoll coordinator --islands`)?"
        )


@dataclass
class MeshMember:
    """This process's place in the current epoch."""

    island_id: str
    epoch: Epoch
    groups: list[dist.ProcessGroup]
    """The global groups of this process's local rank, one per comm stream (at least one)."""
    client: MeshClient

    @property
    def index(self) -> int:
        """This island's rank among the epoch's islands."""
        return self.epoch.index_of(self.island_id)

    @property
    def world(self) -> int:
        """Islands in the epoch."""
        return self.epoch.world


def join_mesh(cfg: MeshConfig, island_id: str, local_rank: int, local_ranks: int, streams: int = 1) -> MeshMember:
    """Connect, register (local rank 0), wait for epoch 0 and build this local rank's `streams` global groups."""
    client = MeshClient(cfg.coordinator, island_id, cfg.connect_timeout_s)
    if local_rank == 0:
        client.register(local_ranks)
    epoch = client.wait_for_epoch(0, cfg.join_timeout_s)
    if island_id not in epoch.members:
        raise UserError(f"island {island_id!r} is not in the run's first epoch {list(epoch.members)}: use a new --island-id")
    if epoch.local_ranks != local_ranks:
        raise UserError(f"this island runs {local_ranks} local ranks but the run's islands run {epoch.local_ranks}: use --nproc {epoch.local_ranks}")
    groups = global_groups(client.store, epoch, island_id, local_rank, streams, timedelta(seconds=cfg.collective_timeout_s))
    return MeshMember(island_id, epoch, groups, client)
