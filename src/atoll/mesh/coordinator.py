"""The coordinator: decides membership epochs and outer-step outcomes, and holds their rendezvous.

It does no training and holds no weights. `atoll coordinator` runs one on any reachable host;
`atoll simulate` runs one in a thread. Islands talk to it over the authenticated request/response
protocol of `atoll.mesh.protocol` (an HTTP/1.1 service, one thread per connection, one port, its
paths in `atoll.mesh.endpoints`; operators read the run there too: `atoll.mesh.status`); the
gloo rendezvous of each epoch's global groups goes through the same protocol
(`atoll.mesh.rendezvous`): only the current epoch's members write and read it, bounded. The
decision rules are the pure functions of `atoll.mesh.membership` (`first_epoch`, then `decide`),
run under one lock on every event (an arrival, a report, a result, a closed connection) and on a
0.1 s tick for the rules that depend on time (heartbeat timeout, report grace).

Failure semantics:
- Its decisions survive its own restart: each is appended to the journal (fsynced) before any
  island hears of it; a coordinator started again with the same journal continues the run (same
  run id, epoch, members and outcomes) and gives members a heartbeat timeout to come back.
  Islands retry through the gap (see `atoll.mesh.client`).
- A request that fails authentication, names an older boot, or replays a sequence number changes
  nothing and is counted (`refused`), with a log line for the first ones.
- Outsiders' connections are bounded before anything is read or authenticated (in count, per
  source and in all, in time and in size: `atoll.mesh.service`), and a request's MAC is checked
  before its JSON is parsed; members keep their own connections and are answered throughout.
- An island whose control connection closes without a deathrattle (kill -9, OOM, a crash) is
  dropped when that incarnation has not beaten again on a new connection within its reconnect
  grace (two beats and a second), or at once when a peer's failed collective blames it
  (`membership.blamed_and_closed`); one that hangs (SIGSTOP) at the heartbeat timeout. An island's
  client closes its connection itself when its own request times out (the coordinator was
  stopped, or starved): it reconnects at once and is kept.
- A coordinator that was stopped (SIGSTOP, a suspended VM) judges nobody on the silence it caused:
  every heartbeat clock restarts when it runs again (`_forgive_own_stall`).
- Ring order (`comm.ring_order = "measured"`): islands report the links they measured (`links`);
  each new epoch's members are put in the order `atoll.mesh.ring_order` picks from them, journalled
  with the epoch (and the links it was picked from), so a restarted coordinator keeps the order and
  picks the next from the same figures until new reports come. At an outer step's boundary, with
  nothing else to decide, an order `REORDER_GAIN` times faster in each link's last two
  measurements re-forms the epoch with the same members (reason "ring reordered"), entered from the
  barrier as a join is.
- When every member has left, the run has ended: it says so to anyone who asks, and `serve()`
  returns (unless told to stay).
"""

from __future__ import annotations

import dataclasses
import secrets
import threading
import time
from collections.abc import Callable
from collections import deque
from pathlib import Path
from typing import Any

from atoll import __version__
from atoll.mesh import protocol, status
from atoll.mesh.auth import is_loopback, run_key, status_key, verify
from atoll.mesh.events import EventLog
from atoll.mesh.journal import Journal, replay
from atoll.mesh.membership import (
    Decision, IslandView, Registration, Rules, StepResult, decide, fingerprint_mismatch, first_epoch, in_ring_order, reconnecting,
    successor, without,
)
from atoll.mesh.endpoints import CoordinatorServer
from atoll.mesh.ring_order import RING_ORDER_KEY, Link, better_ring, links_to_json, parse_report, ring_for

TICK_S = 0.1
MAX_WAIT_S = 30.0
LOGGED_REFUSALS = 20
RECENT_REFUSALS = 20
"""Refusals the status page lists (the count covers them all)."""
WRONG_TOKEN = "wrong run token: set the run's token in ATOLL_RUN_TOKEN (or mesh.token)"
NO_DECISION = (0, 0)
RENDEZVOUS_KEYS = 4096
"""Rendezvous keys an epoch may hold: gloo writes one per rank of each group (local ranks x streams x islands)."""
RENDEZVOUS_KEY_CHARS = 512
RENDEZVOUS_VALUE_CHARS = 64 << 10
"""A gloo address blob is about 100 bytes per member (base64: 4/3 of that)."""
RENDEZVOUS_GET_KEYS = 64


class Coordinator:
    """Serves the protocol on (host, port), forms epoch 0 once `min_islands` have registered, then
    keeps the membership: drops the dead and the hung, admits joiners, decides outer steps."""

    def __init__(
        self,
        host: str,
        port: int,
        min_islands: int,
        rules: Rules = Rules(),
        events_path: Path | None = None,
        token: str | None = None,
        journal_path: Path | None = None,
        log: Callable[[str], None] = lambda line: None,
        public_status: bool = False,
    ) -> None:
        """`public_status`: the status paths (`atoll.mesh.status`) are open on any address, not
        only on loopback."""
        if min_islands < 1:
            raise ValueError(f"min_islands must be at least 1, got {min_islands}")
        self.min_islands = min_islands
        self.rules = rules
        self.events = EventLog(events_path)
        self.log = log
        self.host = host
        self.boot = secrets.token_hex(8)
        self.started = time.time()
        self.refused = 0
        self.refusals: deque[dict[str, Any]] = deque(maxlen=RECENT_REFUSALS)
        self.status_key = status_key(token)
        self.status_open = public_status or is_loopback(host)
        self._cond = threading.Condition()
        self._journal_path = journal_path
        self._restore(replay(journal_path), token)
        self.journal = Journal(journal_path)
        if self._fresh:
            self.journal.append({"kind": "run", "run_id": self.run_id, "local_ranks": None, "fingerprint": {}})
        self.server = CoordinatorServer((host, port), self)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def _restore(self, state, token: str | None) -> None:
        """Take up the journal's run, or start a new one."""
        self._fresh = state.run_id is None
        self.resumed = not self._fresh
        self.run_id = state.run_id or secrets.token_hex(16)
        self.key = run_key(token, self.run_id)
        self.local_ranks = state.local_ranks
        self.fingerprint = state.fingerprint
        self.ended = state.ended
        self.epochs = dict(state.epochs)
        self.epoch = self.epochs[max(self.epochs)] if self.epochs else None
        self.outcomes = dict(state.outcomes)
        self.links: dict[tuple[str, str], Link] = dict(state.links)
        """Directed links measured by the islands (`links`), newest report per pair."""
        self.previous_links: dict[tuple[str, str], Link] = {}
        """Each pair's measurement before its newest (not journalled): a reorder needs both (`ring_order.better_ring`)."""
        self._reorder_looked: tuple[int, int] | None = None
        """(epoch, links reports) when `_reorder` last looked: it looks again only after a change."""
        self._link_reports = 0
        now = time.monotonic()
        self.arrivals: list[Registration] = []
        self.views: dict[str, IslandView] = {}
        for registration in state.registrations.values():
            self.views[registration.island_id] = IslandView(registration, heard_at=now)
            if self.epoch is None:
                self.arrivals.append(registration)
        current = self.epoch.number if self.epoch else -1
        decided = [(s, r) for (e, s, r) in self.outcomes if e == current]
        self.decided = max(decided) if decided else NO_DECISION
        self.committed = max([s for (_, s, _), o in self.outcomes.items() if o["outcome"] == "commit"], default=0)
        self._barriers: dict[tuple[int, str], set[str]] = {}
        self._rendezvous: dict[str, str] = {}
        """The current epoch's gloo rendezvous values (key -> base64), written by its members."""
        self._last_seq: dict[tuple[str, str, str], int] = {}
        self._connections: dict[int, tuple[str, str]] = {}
        self._failures_in_a_row = 0
        self._last_run = now
        if not self._fresh:
            self.log(f"coordinator: resumed run {self.run_id} from its journal at epoch {current} "
                     f"({len(self.views)} island(s) have {self.rules.heartbeat_timeout_s:.0f}s to come back)")

    # --- addresses and lifetime ---------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port actually bound (useful when constructed with port 0)."""
        return self.server.server_address[1]

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def start(self) -> Coordinator:
        """Serve in background threads (for `atoll simulate` and tests)."""
        for target, name in ((self.server.serve_forever, "atoll-coordinator-http"), (self._tick, "atoll-coordinator-tick")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def serve(self, stay: bool = False) -> None:
        """Serve until the run has ended (or, with `stay`, until stop())."""
        self.start()
        while not self._stop.wait(0.2):
            if self.ended is not None and not stay:
                time.sleep(1.0)  # islands still waiting hear "ended" before the port closes
                break
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        if self._threads:
            self.server.shutdown()  # waits for serve_forever, which only start() runs
        self.server.server_close()
        self.server.close_connections()
        with self._cond:
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=5)
        self.journal.close()

    def _tick(self) -> None:
        while not self._stop.wait(TICK_S):
            with self._cond:
                self._decide()

    def _forgive_own_stall(self, now: float) -> None:
        """If the coordinator itself stood still (stopped, starved, a suspended VM) since the last
        decision or tick, the islands' silence was ours: nobody is judged on it (lock held). Runs
        before every decision, so a request answered first after the stall sees it too."""
        if now - self._last_run > self.rules.heartbeat_timeout_s / 2:
            for view in self.views.values():
                view.heard_at = max(view.heard_at, now)
            self.log(f"coordinator: it did not run for {now - self._last_run:.1f}s; every island's heartbeat clock restarts")
        self._last_run = now

    # --- requests ----------------------------------------------------------------------------------

    def hello(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "boot": self.boot, "version": __version__}

    def handle(self, body: bytes, mac: str, connection: int, source: str = "") -> tuple[int, dict[str, Any]]:
        """Authenticate, then parse, then answer one request (see `atoll.mesh.protocol`): (status,
        answer). Nothing of a request whose MAC does not verify is parsed."""
        if not verify(self.key, mac, body):
            return self.refuse(f"a request from {source or 'somewhere'} with a MAC that does not verify (no or wrong token)")
        request = protocol.parse_request(body)
        if request is None:
            return protocol.MALFORMED, {"error": "malformed request"}
        if request.boot != self.boot:
            return protocol.STALE_BOOT, {"error": "the coordinator restarted: say hello again"}
        island, incarnation = request.island, request.incarnation
        channel = (island, incarnation, request.channel)
        with self._cond:
            if request.seq <= self._last_seq.get(channel, 0):
                return self.refuse(f"a replayed request ({request.op}, seq {request.seq}) for island {island!r}")
            self._last_seq[channel] = request.seq
            view = self.views.get(island)
            if view is not None and view.registration.incarnation == incarnation:
                view.heard_at, view.address = time.monotonic(), source
            try:
                return 200, getattr(self, f"_op_{request.op}")(island, incarnation, request.args, connection)
            except (KeyError, TypeError, ValueError, OverflowError) as err:
                return protocol.MALFORMED, {"error": f"malformed {request.op} arguments: {str(err)[:200]}"}

    def refuse(self, what: str) -> tuple[int, dict[str, Any]]:
        """Count (and, for the first ones, log) a refused request; the protocol's answer to it."""
        self.refused += 1
        self.refusals.append({"time": time.time(), "what": what})
        if self.refused <= LOGGED_REFUSALS or self.refused % 100 == 0:
            self.log(f"coordinator: refused {what} ({self.refused} refused so far)")
        return protocol.REFUSED, {"error": "refused"}

    def _member(self, island: str, incarnation: str) -> bool:
        view = self.views.get(island)
        return view is not None and view.registration.incarnation == incarnation

    def _wait(self, ready: Callable[[], Any], wait_s: float) -> Any:
        """Wait (lock held) until ready() is truthy, at most wait_s; returns its last value."""
        deadline = time.monotonic() + min(float(wait_s), MAX_WAIT_S)
        value = ready()
        while not value and not self._stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._cond.wait(remaining)
            value = ready()
        return value

    def _op_register(self, island: str, incarnation: str, args: dict, connection: int) -> dict:
        registration = Registration(island, incarnation, int(args["local_ranks"]), dict(args["fingerprint"]), dict(args.get("serve") or {}))
        refusal = self._admissible(registration)
        if refusal:
            self.log(f"coordinator: refused island {island!r}: {refusal[0]}")
            return {"refused": refusal[0], "refused_as": refusal[1]}
        old = self.views.get(island)
        if old is not None and old.registration.incarnation == incarnation:
            return {}
        if old is not None:
            duplicate = self._op_preflight(island, incarnation, args, connection)
            if duplicate:
                return duplicate
            self._drop_replaced(island)
        if self.local_ranks is None:
            self.local_ranks, self.fingerprint = registration.local_ranks, registration.fingerprint
            self.journal.append({"kind": "run", "run_id": self.run_id, "local_ranks": self.local_ranks, "fingerprint": self.fingerprint})
        self.journal.append({"kind": "registration", "registration": registration.to_dict()})
        self.views[island] = IslandView(registration, heard_at=time.monotonic(), admitted=-1)
        if self.epoch is None:
            self.arrivals.append(registration)
        self.log(f"coordinator: island {island!r} arrived (incarnation {incarnation[:8]}, {registration.local_ranks} local rank(s))")
        self._decide()
        return {}

    def _op_preflight(self, island: str, incarnation: str, args: dict, connection: int) -> dict:
        """Refuse a process whose island id a live process of another incarnation holds (asked by
        an island before it builds its model, and again at registration)."""
        old = self.views.get(island)
        if old is None or old.registration.incarnation == incarnation or not self._alive(old):
            return {}
        self.log(f"coordinator: refused a second live island {island!r}")
        why = (f"island id {island!r} is in use by a live process (incarnation {old.registration.incarnation[:8]}): "
               "give this island another --island-id, or stop the other one first")
        return {"refused": why, "refused_as": "duplicate"}

    def _admissible(self, registration: Registration) -> tuple[str, str] | None:
        """(why, its kind: "ended" or "mismatch") this registration cannot join the run, or None."""
        if self.ended is not None:
            return f"the run has ended ({self.ended}): nothing to join", "ended"
        if self.local_ranks is not None and registration.local_ranks != self.local_ranks:
            return (f"this island runs {registration.local_ranks} local ranks but the run's islands run "
                    f"{self.local_ranks}: use --nproc {self.local_ranks}"), "mismatch"
        differences = fingerprint_mismatch(self.fingerprint, registration.fingerprint) if self.local_ranks is not None else []
        if differences:
            return "this island's job differs from the run's: " + "; ".join(differences), "mismatch"
        return None

    def _alive(self, view: IslandView) -> bool:
        """Whether an incarnation still answers: its control connection is open and it beat lately."""
        registration = view.registration
        connected = (registration.island_id, registration.incarnation) in self._connections.values() and view.lost_at is None
        return connected and time.monotonic() - view.heard_at <= 2 * view.beat_interval_s + 0.5

    def _drop_replaced(self, island: str) -> None:
        """A new incarnation replaces a dead one: drop the old at once (a new epoch if it was a member)."""
        why = "replaced by a new incarnation of the same id (the old process is gone)"
        if self.epoch is not None and island in self.epoch.members:
            self._apply(without(self.epoch, self.views, {island: why}, "replaced", time.time()))
        else:
            self.views.pop(island, None)
            self.arrivals = [r for r in self.arrivals if r.island_id != island]

    def _op_beat(self, island: str, incarnation: str, args: dict, connection: int) -> dict:
        """A heartbeat; the connection it comes on becomes (or stays) the incarnation's control
        connection, and a beat on a new one after the old one closed means the process lives."""
        if self._member(island, incarnation):
            self._connections[connection] = (island, incarnation)
            view = self.views[island]
            view.beat_interval_s = float(args.get("interval", 2.0))
            if view.lost_at is not None:
                self.log(f"coordinator: island {island!r} reconnected {time.monotonic() - view.lost_at:.1f}s after its control connection closed")
                view.lost_at = None
        return self._status(island, incarnation)

    def _status(self, island: str, incarnation: str) -> dict:
        return {"latest": self.epoch.number if self.epoch else -1, "ended": self.ended, "known": self._member(island, incarnation)}

    def _op_latest(self, island: str, incarnation: str, args: dict, connection: int) -> dict:
        return self._status(island, incarnation)

    def _op_links(self, island: str, incarnation: str, args: dict, connection: int) -> dict:
        """An island's measured links to its peers (`atoll.mesh.ring_order.parse_report`); a newer
        report of a pair replaces the older. The next epoch's order is picked from them."""
        if self._member(island, incarnation):
            reported = parse_report(island, args["links"], set(self.views))
            self.previous_links.update({pair: self.links[pair] for pair in reported if pair in self.links})
            self.links.update(reported)
            self._link_reports += 1
        return {}

    def _op_leave(self, island: str, incarnation: str, args: dict, connection: int) -> dict:
        if self._member(island, incarnation):
            self.views[island].leaving = str(args["reason"])
            self.log(f"coordinator: island {island!r} left ({args['reason']})")
            self._decide()
        return {}

    def _op_admission(self, island: str, incarnation: str, args: dict, connection: int) -> dict:
        after = int(args["after"])

        def ready() -> dict | None:
            if self.ended is not None:
                return {"ended": self.ended}
            if not self._member(island, incarnation):
                return {"refused": "the coordinator no longer knows this process (dropped or replaced): restart it to join again"}
            if self.epoch is not None and self.epoch.number > after and self.epoch.has(island, incarnation):
                return {"epoch": self.epoch.to_dict()}
            if self.epoch is not None and island not in self.epoch.members and self.views[island].ready is None:
                self.views[island].fetching = True
                return {"fetch": {"step": self.committed, "sources": self._sources()}}
            return None

        answer = self._wait(ready, args["wait_s"])
        return answer or {"status": self._where()}

    def _sources(self) -> list[dict[str, Any]]:
        """Where the current members serve the run's state (those that said where)."""
        serving = [self.views[m].registration for m in self.epoch.members if m in self.views]
        return [{"island": r.island_id, "host": r.serve["host"], "ports": r.serve["ports"]} for r in serving if r.serve]

    def _op_ready(self, island: str, incarnation: str, args: dict, connection: int) -> dict:
        """A joiner holds the state of outer step `step` (-1: it takes it by broadcast on entering);
        a state older than the last commit is stale: it fetches again."""
        step = int(args["step"])
        if not self._member(island, incarnation) or self.epoch is None or island in self.epoch.members:
            return {}
        if 0 <= step < self.committed:
            return {"stale": self.committed}
        self.views[island].ready, self.views[island].fetching = step, False
        self.log(f"coordinator: island {island!r} is ready to enter" + (f" with the state of outer step {step}" if step >= 0 else " (it takes the state by broadcast)"))
        self._decide()
        return {}

    def _where(self) -> str:
        """Where the run is, for islands waiting to be admitted."""
        if self.epoch is None:
            return f"waiting for {self.min_islands} island(s) to start the run ({len(self.arrivals)} arrived)"
        step = self.decided[0] if self.decided != NO_DECISION else max([s for (e, s, _) in self.outcomes] or [0])
        return f"the run is at outer step {step} (epoch {self.epoch.number}, {self.epoch.world} island(s)); joiners enter at the next outer step's boundary"

    def _op_barrier(self, island: str, incarnation: str, args: dict, connection: int) -> dict:
        number, name = int(args["epoch"]), str(args["name"])
        epoch = self.epochs.get(number)
        if epoch is None or not epoch.has(island, incarnation):
            return {"dissolved": True}
        arrived = self._barriers.setdefault((number, name), set())
        if self._member(island, incarnation):
            status.at_barrier(self.views[island], name, args.get("numbers"))
        if island not in arrived:
            if name.startswith("outer-"):
                self._decide(at_boundary=True)  # a ready joiner enters here, before this step is averaged
            if self.epoch.number > number:
                return {"dissolved": True}
            arrived.add(island)
            self._cond.notify_all()

        def ready() -> dict | None:
            if len(arrived) >= epoch.world:
                return {"passed": True}
            if self.epoch.number > number:
                return {"dissolved": True}
            return None

        return self._wait(ready, args["wait_s"]) or {}

    def _op_report(self, island: str, incarnation: str, args: dict, connection: int) -> dict:
        number = int(args["epoch"])
        if self.epoch is not None and number == self.epoch.number and self.epoch.has(island, incarnation):
            view = self.views[island]
            if view.failed_at is None:
                view.failed_at, view.blamed, view.origin = time.monotonic(), args.get("blamed"), not args.get("abandoned", False)
                self.log(f"coordinator: island {island!r} reports a failed collective in epoch {number}: {args.get('what', '')}")
            self._decide()
        return {}

    def _op_result(self, island: str, incarnation: str, args: dict, connection: int) -> dict:
        number = int(args["epoch"])
        result = StepResult(int(args["step"]), bool(args["ok"]), str(args["digest"]), int(args["round"]))
        if self.epoch is not None and number == self.epoch.number and self.epoch.has(island, incarnation) and result.key > self.decided:
            self.views[island].result = result
            self._decide()

        def ready() -> dict | None:
            outcome = self.outcomes.get((number, result.outer_step, result.round))
            if outcome is not None:
                return {"outcome": outcome["outcome"], "next": outcome["next"], "source": outcome["source"]}
            if self.epoch.number > number:
                return {"outcome": "abort", "next": self.epoch.number, "source": 0}
            return None

        return self._wait(ready, args["wait_s"]) or {}

    def _op_next_epoch(self, island: str, incarnation: str, args: dict, connection: int) -> dict:
        number = int(args["epoch"])
        newer = self._wait(lambda: self.epoch is not None and self.epoch.number > number, args["wait_s"])
        return {"next": self.epoch.number} if newer else {}

    def _rendezvous_refusal(self, island: str, incarnation: str, number: int) -> str | None:
        """Why this process may not use epoch `number`'s rendezvous (only the current epoch's members may)."""
        if self.epoch is None or number != self.epoch.number:
            return f"epoch {number} is not the current epoch ({self.epoch.number if self.epoch else 'none'})"
        if not self.epoch.has(island, incarnation):
            return f"this process is not a member of epoch {number}"
        return None

    def _op_rendezvous_set(self, island: str, incarnation: str, args: dict, connection: int) -> dict:
        """One gloo rendezvous value of the current epoch, from one of its members, bounded."""
        key, value = args["key"], args["value"]
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError("key and value must be strings")
        refusal = self._rendezvous_refusal(island, incarnation, int(args["epoch"]))
        if refusal is None and (len(key) > RENDEZVOUS_KEY_CHARS or len(value) > RENDEZVOUS_VALUE_CHARS):
            refusal = f"a rendezvous key over {RENDEZVOUS_KEY_CHARS} characters or a value over {RENDEZVOUS_VALUE_CHARS}"
        if refusal is None and key not in self._rendezvous and len(self._rendezvous) >= RENDEZVOUS_KEYS:
            refusal = f"the epoch's rendezvous holds {RENDEZVOUS_KEYS} keys already"
        if refusal is not None:
            return {"refused": refusal}
        self._rendezvous[key] = value
        self._cond.notify_all()
        return {}

    def _op_rendezvous_get(self, island: str, incarnation: str, args: dict, connection: int) -> dict:
        """The values of `keys` once all are set (a long-poll); refused once the epoch is replaced."""
        number, keys = int(args["epoch"]), args["keys"]
        if not isinstance(keys, list) or not 0 < len(keys) <= RENDEZVOUS_GET_KEYS or not all(isinstance(k, str) for k in keys):
            raise TypeError(f"keys must be a list of 1 to {RENDEZVOUS_GET_KEYS} strings")

        def ready() -> dict | None:
            refusal = self._rendezvous_refusal(island, incarnation, number)
            if refusal is not None:
                return {"refused": refusal}
            if all(key in self._rendezvous for key in keys):
                return {"values": {key: self._rendezvous[key] for key in keys}}
            return None

        return self._wait(ready, args["wait_s"]) or {}

    def _op_epoch(self, island: str, incarnation: str, args: dict, connection: int) -> dict:
        epoch = self.epochs.get(int(args["number"]))
        return {"epoch": epoch.to_dict() if epoch else None}

    def connection_closed(self, connection: int) -> None:
        """A connection ended; if it was an incarnation's only control connection, that process is
        gone unless it beats again within its reconnect grace (`membership.reconnect_grace_s`)."""
        with self._cond:
            owner = self._connections.pop(connection, None)
            if owner is None or not self._member(*owner) or owner in self._connections.values():
                return
            view = self.views[owner[0]]
            if view.leaving is None and view.lost_at is None:
                view.lost_at = time.monotonic()
                self._decide()

    # --- decisions ---------------------------------------------------------------------------------

    def _decide(self, at_boundary: bool = False) -> None:
        """Run the membership rules (lock held) and publish what they decide; `at_boundary`: a
        member is arriving at an outer step's boundary barrier (else the barriers tell)."""
        if self.ended is not None:
            return
        now = time.monotonic()
        self._forgive_own_stall(now)
        if self.epoch is None:
            self._form_first_epoch(now)
            return
        at_boundary = at_boundary or self._at_boundary()
        decision = decide(self.epoch, self.views, self.decided, now, self.rules, self._failures_in_a_row, at_boundary)
        if decision == Decision() and at_boundary:
            decision = self._reorder(now)
        self._apply(decision)

    @property
    def ring_policy(self) -> str:
        """The run's `comm.ring_order` ("id" until the first island registered)."""
        return str(self.fingerprint.get(RING_ORDER_KEY, "id"))

    def _reorder(self, now: float) -> Decision:
        """The same members in a measured ring order worth re-forming the epoch for (see
        `ring_order.better_ring`), or no decision; never while a member's connection is unsure."""
        looked = (self.epoch.number, self._link_reports)
        if self.ring_policy != "measured" or self._reorder_looked == looked or reconnecting(self.epoch.members, self.views, now):
            return Decision()
        self._reorder_looked = looked  # the solver runs once per new figures, not on every tick
        if better_ring(self.epoch.members, self.links, self.previous_links) is None:
            return Decision()
        return Decision(epoch=successor(self.epoch, self.epoch.members, self.views, "ring reordered", time.time()))

    def _at_boundary(self) -> bool:
        """Some member waits at an outer step's boundary barrier of the current epoch that has not passed."""
        return any(
            number == self.epoch.number and name.startswith("outer-") and 0 < len(arrived) < self.epoch.world
            for (number, name), arrived in self._barriers.items()
        )

    def _form_first_epoch(self, now: float) -> None:
        alive = [r for r in self.arrivals if r.island_id in self.views and self.views[r.island_id].lost_at is None and self.views[r.island_id].leaving is None]
        epoch = first_epoch(alive, self.min_islands, time.time())
        if epoch is not None:
            for island in epoch.members:
                self.views[island].admitted = 0
            self._apply(Decision(epoch=epoch, joined=epoch.members))

    def _apply(self, decision: Decision) -> None:
        """Journal, then publish, one decision (lock held); wakes every waiter."""
        if decision.ended is not None:
            self.journal.append({"kind": "ended", "why": decision.ended})
            self.ended = decision.ended
            self.events.append(self.epoch.number, [], [], decision.left, "ended")
            self.log(f"coordinator: the run has ended ({decision.ended})")
        if decision.outcome is not None:
            step, round_ = decision.step
            record = {
                "kind": "outcome", "epoch": self.epoch.number, "step": step, "round": round_, "outcome": decision.outcome,
                "next": decision.epoch.number if decision.epoch else self.epoch.number, "source": decision.source,
            }
            self.journal.append(record)
            self.outcomes[(self.epoch.number, step, round_)] = record
            self.decided = decision.step
            for view in self.views.values():
                view.result = None
            if decision.outcome == "commit":
                self.committed = max(self.committed, step)
                for view in self.views.values():
                    if view.ready is not None and 0 <= view.ready < step:
                        view.ready = None  # its fetched state is a step old now: it fetches again
            if decision.outcome == "resync":
                self.events.append(self.epoch.number, list(self.epoch.members), [], {}, "resync", digests=decision.digests, source=self.epoch.members[decision.source])
                self.log(f"coordinator: outer step {step}: digests differ ({decision.digests}); every island takes "
                         f"{self.epoch.members[decision.source]!r}'s state")
            else:
                self.log(f"coordinator: outer step {step} committed by {self.epoch.world} island(s) in epoch {self.epoch.number}")
        if decision.epoch is not None:
            self._start_epoch(decision)
        self._failures_in_a_row = self._failures_in_a_row + 1 if decision.repeated_failure else 0 if decision.epoch else self._failures_in_a_row
        self._cond.notify_all()

    def _start_epoch(self, decision: Decision) -> None:
        epoch = dataclasses.replace(decision.epoch, started_at=time.time())
        epoch = in_ring_order(epoch, ring_for(epoch.members, self.links, self.ring_policy))
        self.journal.append({
            "kind": "epoch", "epoch": epoch.to_dict(), "left": decision.left, "joined": list(decision.joined),
            "links": links_to_json(self.links, epoch.members),
        })
        for island in decision.left:
            self.views.pop(island, None)
        for view in self.views.values():
            view.failed_at, view.blamed, view.origin, view.result = None, None, False, None
        for island in decision.joined:
            self.views[island].admitted, self.views[island].ready = epoch.number, None
        self._barriers = {key: arrived for key, arrived in self._barriers.items() if key[0] >= epoch.number}
        self._rendezvous = {}
        self.epochs[epoch.number] = epoch
        self.epoch = epoch
        self.decided = NO_DECISION
        self.events.append(epoch.number, list(epoch.members), list(decision.joined), decision.left, epoch.reason)
        self.log(f"coordinator: epoch {epoch.number}: {epoch.world} island(s) {list(epoch.members)} ({epoch.reason})"
                 + (f"; left: {decision.left}" if decision.left else ""))

    def status(self) -> dict[str, Any]:
        """The run as the status paths show it (`atoll.mesh.status.snapshot`), copied under the lock."""
        with self._cond:
            return status.snapshot(self)
