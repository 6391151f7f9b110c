"""An island process's side of the mesh: reach the coordinator, register, heartbeat, follow epochs.

Every local rank of an island connects (each needs the store for its global groups); only local
rank 0 (the island's leader) registers, heartbeats, leaves, reports failures, posts results and
waits at barriers; it tells the other local ranks what it saw over the island's own group, so all
local ranks of an island always move to the same epoch.

Failure semantics: an unreachable coordinator is a UserError after `connect_timeout`; an epoch
that does not form (or admit this island) within `join_timeout` is a UserError naming the
coordinator; an epoch that the coordinator refused to form, or a refusal of this island, raises
with its reason. Waits at barriers, for outcomes and for the next epoch are unbounded on purpose:
they end when the peers arrive or when the coordinator, watching heartbeats, replaces the epoch
(within the heartbeat timeout of a peer's death or hang). A store operation failing because the
coordinator is gone raises out of the training loop.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

from atoll.config import MeshConfig
from atoll.errors import UserError
from atoll.mesh import protocol
from atoll.mesh.auth import run_token, sign, verify
from atoll.mesh.membership import Epoch, Registration, StepResult

POLL_INTERVAL_S = 0.02


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

    def __init__(self, address: str, island_id: str, connect_timeout: float, token: str | None = None) -> None:
        host, port = parse_address(address)
        self.address = address
        self.island_id = island_id
        self.token = token
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
        """Announce this island, first clearing a deathrattle of an earlier life (local rank 0 only)."""
        self.store.delete_key(protocol.leaving_key(self.island_id))
        self.store.set(protocol.island_key(self.island_id), Registration(self.island_id, local_ranks, sign(self.token, self.island_id)).to_json())
        self.store.append(protocol.REGISTRATIONS, f"{self.island_id},")

    def leave(self, reason: str) -> None:
        """The deathrattle: tell the coordinator this island is gone, so it is dropped at once.

        Best effort: if the coordinator is unreachable there is nobody left to tell.
        """
        try:
            self.store.set(protocol.leaving_key(self.island_id), reason)
        except (RuntimeError, OSError):
            pass

    def wait_for_epoch(self, number: int, timeout: float) -> Epoch:
        """Block until epoch `number` is published, then return it."""
        deadline = time.monotonic() + timeout
        key, error_key = protocol.epoch_key(number), protocol.epoch_error_key(number)
        while time.monotonic() < deadline:
            self._check_refused()
            if self.store.check([error_key]):
                raise UserError(f"the coordinator at {self.address} could not start the run: {self.store.get(error_key).decode()}")
            if self.store.check([key]):
                return self.epoch(number)
            time.sleep(POLL_INTERVAL_S)
        raise UserError(
            f"no epoch {number} from the coordinator at {self.address} within {timeout:.0f}s: "
            "are all islands started (see `atoll coordinator --islands`)?"
        )

    def _check_refused(self) -> None:
        key = protocol.refused_key(self.island_id)
        if self.store.check([key]):
            why = self.store.get(key).decode()
            if why.startswith("wrong run token"):
                raise UserError(f"{why}; the coordinator at {self.address} refused island {self.island_id!r}")
            raise UserError(f"the coordinator at {self.address} refused island {self.island_id!r}: {why}")

    def epoch(self, number: int) -> Epoch:
        """Epoch `number`, checked against the run token: a forged one is a UserError."""
        epoch = Epoch.from_json(self.store.get(protocol.epoch_key(number)))
        if not verify(self.token, epoch.signed_text(), epoch.mac):
            raise UserError(
                f"wrong run token: epoch {number} from the coordinator at {self.address} is not signed with this "
                "island's token (ATOLL_RUN_TOKEN or mesh.token), or was forged"
            )
        return epoch

    def newest_after(self, number: int) -> int:
        """Follow the chain of `next` keys from epoch `number` to the newest epoch (no waiting)."""
        while self.store.check([protocol.next_epoch_key(number)]):
            number = int(self.store.get(protocol.next_epoch_key(number)))
        return number

    def dissolved(self, number: int) -> bool:
        return self.store.check([protocol.next_epoch_key(number)])

    def wait_for_admission(self, timeout: float) -> int:
        """Block until an epoch that has this island as a member is current; return its number.

        A joiner (or an island that came back) waits here for the next outer-step boundary.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_refused()
            if self.store.check([protocol.ENDED]):
                raise UserError(f"the run of the coordinator at {self.address} has ended ({self.store.get(protocol.ENDED).decode()}): nothing to join")
            if self.store.check([protocol.LATEST_EPOCH]):
                number = self.newest_after(int(self.store.get(protocol.LATEST_EPOCH)))
                if self.island_id in self.epoch(number).members:
                    return number
            time.sleep(POLL_INTERVAL_S)
        raise UserError(f"island {self.island_id!r} was not admitted by the coordinator at {self.address} within {timeout:.0f}s")

    def wait_at_barrier(self, number: int, name: str, world: int) -> bool:
        """Count this island in at barrier `name` of epoch `number` and wait for all `world` members.

        Returns True when all arrived, False when the epoch is dissolved first (a member died,
        hung or left: the coordinator replaced the epoch within the heartbeat timeout).
        """
        key = protocol.barrier_key(number, name)
        self.store.add(key, 1)
        while True:
            if int(self.store.add(key, 0)) >= world:
                return True
            if self.dissolved(number):
                return False
            time.sleep(POLL_INTERVAL_S)

    def report_failure(self, number: int, what: str) -> None:
        """Tell the coordinator that a global collective of epoch `number` failed here."""
        self.store.set(protocol.failed_key(number, self.island_id), what)

    def post_result(self, number: int, result: StepResult) -> None:
        self.store.set(protocol.result_key(number, self.island_id), result.to_text())

    def wait_for_outcome(self, number: int, outer_step: int) -> str:
        """The outcome of `outer_step` in epoch `number`: "commit <next>", "diverged" or "abort".

        The coordinator sets it; an island that finds the epoch dissolved sets a missing one to
        "abort" with compare_set. The first writer wins, so every island reads the same value.
        """
        key = protocol.outcome_key(number, outer_step)
        while True:
            if self.store.check([key]):
                return self.store.get(key).decode()
            if self.dissolved(number):
                return self.store.compare_set(key, "", "abort").decode()
            time.sleep(POLL_INTERVAL_S)

    def wait_for_next_epoch(self, number: int) -> int:
        """Block until epoch `number` is dissolved; return the newest epoch after it."""
        while not self.dissolved(number):
            time.sleep(POLL_INTERVAL_S)
        return self.newest_after(number)


class Heartbeat:
    """Adds 1 to this island's heartbeat counter every `interval_s`, from a thread of its own.

    It has its own store connection, so it never waits behind the training loop's store calls.
    A stopped process (SIGSTOP) stops beating, which is how the coordinator notices a hang. If
    the coordinator goes away the thread ends quietly; the training loop fails at its next store
    operation instead.
    """

    def __init__(self, address: str, island_id: str, interval_s: float, connect_timeout: float) -> None:
        host, port = parse_address(address)
        self._store = dist.TCPStore(host, port, is_master=False, wait_for_workers=False, timeout=timedelta(seconds=connect_timeout))
        self._key = protocol.heartbeat_key(island_id)
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="atoll-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.is_set():
            try:
                self._store.add(self._key, 1)
            except (RuntimeError, OSError):
                return
            self._stop.wait(self._interval_s)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


@dataclass
class MeshMember:
    """This process's place in the run: its island id, the current epoch and the store client."""

    island_id: str
    epoch: Epoch
    client: MeshClient
    heartbeat: Heartbeat | None
    """Running on local rank 0 only."""

    @property
    def index(self) -> int:
        """This island's rank among the epoch's islands."""
        return self.epoch.index_of(self.island_id)

    @property
    def world(self) -> int:
        """Islands in the epoch."""
        return self.epoch.world

    def leave(self, reason: str) -> None:
        """Stop heartbeating and write the deathrattle (local rank 0; a no-op elsewhere)."""
        if self.heartbeat is not None:
            self.heartbeat.stop()
            self.client.leave(reason)


def join_mesh(cfg: MeshConfig, island_id: str, local_rank: int, local_ranks: int, share: Callable[[int], int]) -> MeshMember:
    """Connect, register and heartbeat (local rank 0), and wait until an epoch has this island.

    A run that has not started yet waits for epoch 0; a running one admits this island at its
    next outer-step boundary. `share` hands local rank 0's epoch number to every local rank.
    """
    client = MeshClient(cfg.coordinator, island_id, cfg.connect_timeout_s, run_token(cfg.token))
    heartbeat = None
    number = -1
    if local_rank == 0:
        client.register(local_ranks)
        heartbeat = Heartbeat(cfg.coordinator, island_id, cfg.heartbeat_interval_s, cfg.connect_timeout_s)
        epoch = client.wait_for_epoch(0, cfg.join_timeout_s)
        if epoch.local_ranks != local_ranks:
            raise UserError(f"this island runs {local_ranks} local ranks but the run's islands run {epoch.local_ranks}: use --nproc {epoch.local_ranks}")
        number = client.wait_for_admission(cfg.join_timeout_s)
    number = share(number)
    return MeshMember(island_id, client.epoch(number), client, heartbeat)
