"""An island's side of the control plane: reach the coordinator, register, heartbeat, follow epochs.

Only an island's local rank 0 (its leader) talks to the coordinator; `atoll.sync` hands what it
hears to the other local ranks over the island's own group, so all local ranks of an island always
move to the same epoch. Every local rank connects to the coordinator's rendezvous store for its
global groups (`store_address`).

Failure semantics, for every request (`CoordinatorClient.call`):
- timeout or a closed connection (a blip, a coordinator restart): reconnect, say hello again and
  resend with a fresh sequence number, for up to `retry_s` (at least the heartbeat timeout); then
  RuntimeError ("lost the coordinator"). Every op is safe to resend.
- the coordinator restarted with its journal: the same run id, so the island keeps its place. A
  coordinator that restarted without it runs another run: UserError.
- refused (401): the token is wrong (UserError at registration) or the message was mangled.
- waits (admission, barriers, outcomes, next epoch) are long-polls repeated until the event; they
  print what they wait for every WAIT_LOG_S, honour SIGTERM (the handler raises in the blocking
  socket read), and end when the coordinator decides (a dead peer is dropped at once, a hung one
  at the heartbeat timeout).
"""

from __future__ import annotations

import http.client
import itertools
import json
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

from atoll.errors import UserError
from atoll.mesh import protocol
from atoll.mesh.auth import run_key, sign, verify
from atoll.mesh.membership import Epoch

LONG_POLL_S = 20.0
WAIT_LOG_S = 30.0
RETRY_PAUSE_S = 0.2


def parse_address(address: str) -> tuple[str, int]:
    """'host:port' or '[ipv6]:port' -> (host, port); a malformed address is a UserError."""
    host, sep, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise UserError(f"coordinator address {address!r} is not host:port (e.g. 127.0.0.1:29400 or [::1]:29400)")
    return host, int(port)


def new_incarnation() -> str:
    """A fresh nonce for this process start."""
    return secrets.token_hex(8)


class CoordinatorClient:
    """One connection (one channel) to the coordinator, for one thread of one island process."""

    def __init__(
        self, address: str, island_id: str, incarnation: str, token: str | None, connect_timeout: float, retry_s: float,
        channel: str = "main",
    ) -> None:
        self.address = address
        self.host, self.port = parse_address(address)
        self.island_id, self.incarnation, self.channel = island_id, incarnation, channel
        self.token = token
        self.retry_s = retry_s
        self._seq = itertools.count(int(time.time() * 1000) * 1000)  # above any earlier run of this incarnation's channel
        self._conn: http.client.HTTPConnection | None = None
        deadline = time.monotonic() + connect_timeout
        while True:
            try:
                self._hello()
                break
            except (OSError, http.client.HTTPException, ValueError) as err:
                if time.monotonic() > deadline:
                    raise UserError(
                        f"cannot reach the coordinator at {address} ({err}): start `atoll coordinator --port {self.port}` "
                        "there, or fix --coordinator"
                    ) from None
                time.sleep(RETRY_PAUSE_S)
        self.run_id: str = self.hello["run_id"]
        self.key = run_key(token, self.run_id)

    @property
    def store_address(self) -> tuple[str, int]:
        return self.host, int(self.hello["store_port"])

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        if self._conn is None:
            self._conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        self._conn.timeout = timeout
        if self._conn.sock is not None:
            self._conn.sock.settimeout(timeout)
        return self._conn

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _exchange(self, method: str, path: str, body: bytes | None, headers: dict[str, str], timeout: float) -> tuple[int, bytes, str]:
        conn = self._connection(timeout)
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
        except BaseException:
            self._close()  # a half-read answer leaves the connection unusable
            raise
        return response.status, data, response.getheader(protocol.MAC_HEADER, "")

    def _hello(self) -> None:
        status, data, _ = self._exchange("GET", protocol.HELLO_PATH, None, {}, 10.0)
        if status != 200:
            raise ValueError(f"not an atoll coordinator (HTTP {status})")
        hello = json.loads(data)
        if hasattr(self, "run_id") and hello["run_id"] != self.run_id:
            raise UserError(
                f"the coordinator at {self.address} now runs another run ({hello['run_id']}, not {self.run_id}): it was "
                "restarted without its journal; restart the islands to start a new run"
            )
        self.hello = hello

    def call(self, op: str, args: dict[str, Any], wait_s: float = 0.0) -> dict[str, Any]:
        """One authenticated request; retried through blips and coordinator restarts (see module doc)."""
        deadline = time.monotonic() + self.retry_s
        while True:
            body = protocol.request_body(op, self.island_id, self.incarnation, self.channel, self.hello["boot"], next(self._seq), args)
            mac = sign(self.key, body)
            try:
                status, data, answer_mac = self._exchange(
                    "POST", protocol.RPC_PATH, body, {protocol.MAC_HEADER: mac, "Content-Type": "application/json"}, wait_s + 15.0
                )
                if status == protocol.STALE_BOOT:
                    self._hello()
                    continue
                if status == protocol.REFUSED:
                    raise UserError(
                        f"wrong run token: the coordinator at {self.address} refused island {self.island_id!r}'s request; "
                        "set the run's token in ATOLL_RUN_TOKEN (or mesh.token)"
                    )
                if status != 200 or not verify(self.key, answer_mac, mac, data):
                    raise ValueError(f"a bad answer to {op} (HTTP {status})")
                return json.loads(data)
            except (OSError, http.client.HTTPException, ValueError) as err:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"lost the coordinator at {self.address} for {self.retry_s:.0f}s ({op}: {err})") from None
                time.sleep(RETRY_PAUSE_S)
                try:
                    self._hello()
                except (OSError, http.client.HTTPException, ValueError):
                    pass

    def wait(self, op: str, args: dict[str, Any], what: str, log: Callable[[str], None]) -> dict[str, Any]:
        """Repeat a long-poll until it answers something; says what it waits for every WAIT_LOG_S."""
        start = last_log = time.monotonic()
        while True:
            answer = self.call(op, {**args, "wait_s": LONG_POLL_S}, LONG_POLL_S)
            if answer and set(answer) != {"status"}:
                return answer
            if time.monotonic() - last_log >= WAIT_LOG_S:
                last_log = time.monotonic()
                status = f": {answer['status']}" if "status" in answer else ""
                log(f"atoll: waiting {last_log - start:.0f}s for {what}{status}")

    def close(self) -> None:
        self._close()


class Heartbeat:
    """Beats every `interval_s` on a connection of its own, the island's control connection.

    The coordinator drops the island at once when this connection closes without a deathrattle
    (the process died), and after the heartbeat timeout when beats stop while it stays open (the
    process hangs, e.g. SIGSTOP). A failed beat is retried at the next interval (a blip or a
    coordinator restart never ends the thread); each answer tells the newest epoch, which
    `dissolved` reads without a request.
    """

    def __init__(self, client: CoordinatorClient, interval_s: float) -> None:
        self._client = client
        self._interval_s = interval_s
        self.latest = -1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="atoll-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.is_set():
            try:
                answer = self._client.call("beat", {"interval": self._interval_s})
                self.latest = max(self.latest, int(answer["latest"]))
            except (RuntimeError, UserError):
                pass
            self._stop.wait(self._interval_s)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._client.close()


def register(client: CoordinatorClient, local_ranks: int, fingerprint: dict[str, Any], serve: dict[str, Any] | None = None) -> None:
    """Announce this incarnation (and where its local ranks serve the run's state, if they do); a
    refusal (wrong shape, a different job, a live duplicate id, an ended run) is a UserError saying why."""
    answer = client.call("register", {"local_ranks": local_ranks, "fingerprint": fingerprint, "serve": serve or {}})
    if "refused" in answer:
        raise UserError(f"the coordinator at {client.address} refused island {client.island_id!r}: {answer['refused']}")


def wait_for_admission(client: CoordinatorClient, after: int, log: Callable[[str], None]) -> Epoch | dict[str, Any]:
    """Block until an epoch newer than `after` has this incarnation as a member, and return it; or
    return the coordinator's fetch instructions ({"step", "sources"}) at once when the run has
    started and this joiner does not hold its state yet.

    Unbounded while the run is alive: a ready joiner waits for the next outer step however long
    the inner phase is (saying where the run is every WAIT_LOG_S). An ended run or a refusal is a
    UserError.
    """
    answer = client.wait("admission", {"after": after}, "admission to the run", log)
    if "ended" in answer:
        raise UserError(f"the run of the coordinator at {client.address} has ended ({answer['ended']}): nothing to join")
    if "refused" in answer:
        raise UserError(f"the coordinator at {client.address} refused island {client.island_id!r}: {answer['refused']}")
    return answer["fetch"] if "fetch" in answer else Epoch.from_dict(answer["epoch"])


def connect(address: str, island_id: str, token: str | None, connect_timeout: float, retry_s: float) -> tuple[CoordinatorClient, CoordinatorClient]:
    """This process's main and heartbeat clients under a fresh incarnation."""
    incarnation = new_incarnation()
    main = CoordinatorClient(address, island_id, incarnation, token, connect_timeout, retry_s, "main")
    beat = CoordinatorClient(address, island_id, incarnation, token, connect_timeout, retry_s, "beat")
    return main, beat
