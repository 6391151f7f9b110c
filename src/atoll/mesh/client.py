"""An island's side of the control plane: reach the coordinator, register, heartbeat, follow epochs.

Only an island's local rank 0 (its leader) talks to the coordinator; `atoll.sync` hands what it
hears to the other local ranks over the island's own group, so all local ranks of an island always
move to the same epoch. Every local rank's own client carries the rendezvous of its global groups
(`atoll.mesh.rendezvous`).

Failure semantics, for every request (`CoordinatorClient.call`):
- timeout or a closed connection (a blip, a stopped or restarting coordinator): reconnect, say
  hello again and resend with a fresh sequence number, for up to `retry_s`
  (mesh.coordinator_retry_s), saying at the first failure what it waits for and until when; then
  ExpectedFailure (LOST_COORDINATOR). Every op is safe to resend. A connection whose request timed
  out or failed is left open until a new one has carried an answer, so the heartbeat's control
  connection never closes while the process lives (the coordinator reads that as its death); and
  should it close anyway (a reset on the way), the coordinator keeps an incarnation that beats
  again on a new connection within its grace (`atoll.mesh.membership.reconnect_grace_s`).
- the coordinator restarted with its journal: the same run id, so the island keeps its place. A
  coordinator that restarted without it runs another run: ExpectedFailure (LOST_COORDINATOR).
- refused (401): the token is wrong (UserError at registration) or the message was mangled.
- malformed (400): the coordinator does not understand the request (another atoll version):
  UserError at once, naming both versions.
- waits (admission, barriers, outcomes, next epoch) are long-polls repeated until the event; they
  print what they wait for every WAIT_LOG_S, honour SIGTERM (the handler raises in the blocking
  socket read), and end when the coordinator decides (a dead peer is dropped within its reconnect
  grace, a hung one at the heartbeat timeout).
"""

from __future__ import annotations

import http.client
import itertools
import json
import secrets
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from atoll import __version__, errors
from atoll.errors import ExpectedFailure, UserError
from atoll.logs import log
from atoll.mesh import protocol
from atoll.mesh.auth import run_key, sign, verify
from atoll.mesh.membership import Epoch

LONG_POLL_S = 20.0
WAIT_LOG_S = 30.0
RETRY_PAUSE_S = 0.2
HELLO_TIMEOUT_S = 10.0
REFUSAL_CODES = {"duplicate": errors.DUPLICATE, "mismatch": errors.CONFIG_MISMATCH, "ended": errors.RUN_ENDED}
"""Exit codes of the coordinator's refusals, by the kind it names (`refused_as`)."""


def log_waiting(line: str) -> None:
    """Where a client says what it waits for, unless told otherwise: a log line (`atoll.logs`)."""
    log.info(line)


def clock(deadline: float) -> str:
    """A monotonic deadline as the UTC wall-clock time it falls at (HH:MM:SS UTC)."""
    return time.strftime("%H:%M:%S UTC", time.gmtime(time.time() + deadline - time.monotonic()))


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
        channel: str = "main", log: Callable[[str], None] = log_waiting,
    ) -> None:
        """Say hello, retrying for `connect_timeout` (saying at the first failure what it waits
        for and until when); then a UserError naming the address and the fix. A host name that
        does not resolve is a UserError at once."""
        self.address = address
        self.host, self.port = parse_address(address)
        self.island_id, self.incarnation, self.channel = island_id, incarnation, channel
        self.token = token
        self.retry_s = retry_s
        self.log = log
        self._seq = itertools.count(int(time.time() * 1000) * 1000)  # above any earlier run of this incarnation's channel
        self._conn: http.client.HTTPConnection | None = None
        self._parked: http.client.HTTPConnection | None = None
        """The first connection given up on (a request timed out or failed), left open until a
        newer one has carried an answer: the coordinator reads a closed control connection as a
        death. Later ones of the same outage are closed at once (at most one is held)."""
        self._outage_since: float | None = None
        deadline = time.monotonic() + connect_timeout
        while True:
            try:
                self._hello()
                break
            except socket.gaierror as err:
                raise UserError(
                    f"the coordinator address {address}: host {self.host!r} does not resolve ({err.strerror}); "
                    "fix --coordinator (mesh.coordinator) to a host name or address this machine can reach"
                ) from None
            except (OSError, http.client.HTTPException, ValueError) as err:
                if time.monotonic() > deadline:
                    raise UserError(
                        f"cannot reach the coordinator at {address} ({err}): start `atoll coordinator --port {self.port}` "
                        "there, or fix --coordinator"
                    ) from None
                if self._outage_since is None:
                    self._outage_since = time.monotonic()
                    self.log(f"atoll: waiting for the coordinator at {address} ({err}) until {clock(deadline)} (mesh.connect_timeout_s)")
                time.sleep(RETRY_PAUSE_S)
        self._outage_since = None
        self.run_id: str = self.hello["run_id"]
        self.key = run_key(token, self.run_id)

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        if self._conn is None:
            self._conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        self._conn.timeout = timeout
        if self._conn.sock is not None:
            self._conn.sock.settimeout(timeout)
        return self._conn

    def _close(self) -> None:
        self._park()
        self._unpark()

    def _park(self) -> None:
        if self._conn is not None and self._parked is None:
            self._parked = self._conn
        elif self._conn is not None:
            self._conn.close()
        self._conn = None

    def _unpark(self) -> None:
        if self._parked is not None:
            self._parked.close()
            self._parked = None

    def _exchange(self, method: str, path: str, body: bytes | None, headers: dict[str, str], timeout: float) -> tuple[int, bytes, str]:
        conn = self._connection(timeout)
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
        except BaseException:
            self._park()  # a half-read answer leaves the connection unusable; closed once a new one answered
            raise
        self._unpark()
        return response.status, data, response.getheader(protocol.MAC_HEADER, "")

    def _hello(self) -> None:
        status, data, _ = self._exchange("GET", protocol.HELLO_PATH, None, {}, HELLO_TIMEOUT_S)
        if status != 200:
            raise ValueError(f"not an atoll coordinator (HTTP {status})")
        hello = json.loads(data)
        if hasattr(self, "run_id") and hello["run_id"] != self.run_id:
            raise ExpectedFailure(
                f"the coordinator at {self.address} now runs another run ({hello['run_id']}, not {self.run_id}): it was "
                "restarted without its journal; restart the islands to start a new run", errors.LOST_COORDINATOR,
            )
        self.hello = hello

    def _outage(self, op: str, err: Exception, deadline: float) -> None:
        """Note a failed request: the first of an outage says what the client waits for and until when."""
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            self.log(f"atoll: no answer from the coordinator at {self.address} ({op} on {self.channel}: {err}); "
                     f"retrying until {clock(deadline)} (mesh.coordinator_retry_s)")

    def _answered(self) -> None:
        if self._outage_since is not None:
            self.log(f"atoll: the coordinator at {self.address} answers again after {time.monotonic() - self._outage_since:.0f}s")
            self._outage_since = None

    def call(self, op: str, args: dict[str, Any], wait_s: float = 0.0) -> dict[str, Any]:
        """One authenticated request; retried through blips, pauses and restarts of the coordinator
        for `retry_s`, then ExpectedFailure (LOST_COORDINATOR); see the module doc."""
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
                if status == protocol.MALFORMED:  # deterministic: resending the same request cannot help
                    raise UserError(
                        f"the coordinator at {self.address} (atoll {self.hello.get('version', '?')}) does not understand island "
                        f"{self.island_id!r}'s {op} request (atoll {__version__}): {data[:200].decode(errors='replace')}; "
                        "run the same atoll version on the coordinator and every island"
                    )
                if status == protocol.REFUSED:
                    raise UserError(
                        f"wrong run token: the coordinator at {self.address} refused island {self.island_id!r}'s request; "
                        "set the run's token in ATOLL_RUN_TOKEN (or mesh.token)"
                    )
                if status != 200 or not verify(self.key, answer_mac, mac, data):
                    raise ValueError(f"a bad answer to {op} (HTTP {status})")
                self._answered()
                return json.loads(data)
            except (OSError, http.client.HTTPException, ValueError) as err:
                if time.monotonic() > deadline:
                    raise ExpectedFailure(
                        f"lost the coordinator at {self.address}: no answer for {self.retry_s:.0f}s ({op}: {err}); restart "
                        "it with its journal and restart this island with --resume (mesh.coordinator_retry_s)", errors.LOST_COORDINATOR,
                    ) from None
                self._outage(op, err, deadline)
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

    The coordinator drops the island when this connection closes without a deathrattle and no
    beat comes on a new one within the reconnect grace (the process died), and after the heartbeat
    timeout when beats stop while it stays open (the process hangs, e.g. SIGSTOP). A failed beat
    (a timeout of its own, a blip, a stopped or restarted coordinator) is retried on a new
    connection at once and then every interval: nothing ends the thread but `stop`. Each answer
    tells the newest epoch, which `dissolved` reads without a request.
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
            except ExpectedFailure:
                pass  # the main thread decides when the coordinator is lost
            self._stop.wait(self._interval_s)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._client.close()


def register(client: CoordinatorClient, local_ranks: int, fingerprint: dict[str, Any], serve: dict[str, Any] | None = None) -> None:
    """Announce this incarnation (and where its local ranks serve the run's state, if they do); a
    refusal (wrong shape, a different job, a live duplicate id, an ended run) is a UserError saying
    why, with the exit code of its kind (`REFUSAL_CODES`)."""
    refused(client, client.call("register", {"local_ranks": local_ranks, "fingerprint": fingerprint, "serve": serve or {}}))


def refused(client: CoordinatorClient, answer: dict[str, Any]) -> None:
    """A UserError saying why, with the exit code of its kind (`REFUSAL_CODES`), if `answer` refuses."""
    if "refused" in answer:
        raise UserError(
            f"the coordinator at {client.address} refused island {client.island_id!r}: {answer['refused']}",
            REFUSAL_CODES.get(answer.get("refused_as", ""), errors.USER_ERROR),
        )


def wait_for_admission(client: CoordinatorClient, after: int, log: Callable[[str], None]) -> Epoch | dict[str, Any]:
    """Block until an epoch newer than `after` has this incarnation as a member, and return it; or
    return the coordinator's fetch instructions ({"step", "sources"}) at once when the run has
    started and this joiner does not hold its state yet.

    Unbounded while the run is alive: a ready joiner waits for the next outer step however long
    the inner phase is (saying where the run is every WAIT_LOG_S). An ended run (RUN_ENDED) or a
    coordinator that no longer knows this process (DROPPED) is an ExpectedFailure.
    """
    answer = client.wait("admission", {"after": after}, "admission to the run", log)
    if "ended" in answer:
        raise ExpectedFailure(f"the run of the coordinator at {client.address} has ended ({answer['ended']}): nothing to join", errors.RUN_ENDED)
    if "refused" in answer:
        raise ExpectedFailure(f"the coordinator at {client.address} refused island {client.island_id!r}: {answer['refused']}", errors.DROPPED)
    return answer["fetch"] if "fetch" in answer else Epoch.from_dict(answer["epoch"])


def connect(address: str, island_id: str, token: str | None, connect_timeout: float, retry_s: float) -> tuple[CoordinatorClient, CoordinatorClient]:
    """This process's main and heartbeat clients under a fresh incarnation."""
    incarnation = new_incarnation()
    main = CoordinatorClient(address, island_id, incarnation, token, connect_timeout, retry_s, "main")
    beat = CoordinatorClient(address, island_id, incarnation, token, connect_timeout, retry_s, "beat")
    return main, beat
