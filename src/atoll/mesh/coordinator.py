"""The coordinator: hosts the run's rendezvous store and decides membership epochs.

It does no training and holds no weights. `atoll coordinator` runs one on any reachable host;
`atoll simulate` runs one in a thread. The key protocol is in `atoll.mesh.protocol`; the decision
rules are the pure functions of `atoll.mesh.membership` (`first_epoch`, then `decide`).

Each round (every POLL_INTERVAL_S) it reads what the islands wrote: new registrations (a joiner,
or an island coming back under its old id), heartbeat counters (an island is alive while its
counter changes, judged on the coordinator's own clock), deathrattles, failure reports and
outer-step results of the current epoch. Then it publishes at most one outcome (commit or
diverged, set once with compare_set) and at most one new epoch: the epoch's JSON, then
`epoch/latest`, then the dissolved epoch's `next` key, in that order, so an island that sees
`next` can always read the epoch it names. Every new epoch is one line of the membership event
log (JSONL, `events_path`: time, epoch, members, joined, left with why, reason).

Failure semantics: the coordinator keeps its decisions in memory and its facts in its store; a
client that connects and sends garbage or nothing changes nothing (the store serves it, or drops
it). If epoch 0 cannot form (islands disagree on their shape), the reason is published under the
epoch's error key and the waiting islands stop with that message. An island registering with a
different number of local ranks than the run's, or without the run token's proof, is refused
(its refused key says why; see `atoll.mesh.auth` for what the token does and does not protect). If the
coordinator itself dies, islands fail at their next store operation: the run cannot outlive it.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from atoll.mesh import protocol
from atoll.mesh.auth import sign, verify
from atoll.mesh.membership import Decision, Epoch, IslandView, Registration, StepResult, decide, first_epoch

POLL_INTERVAL_S = 0.05
STORE_TIMEOUT = timedelta(seconds=60)
DEFAULT_HEARTBEAT_TIMEOUT_S = 10.0
DEFAULT_REPORT_GRACE_S = 0.5
WRONG_TOKEN = "wrong run token: set the run's token in ATOLL_RUN_TOKEN (or mesh.token)"


class Coordinator:
    """Hosts a TCPStore on (host, port), forms epoch 0 once `min_islands` have registered, then
    keeps the membership: drops the dead and the hung, admits joiners, commits outer steps."""

    def __init__(
        self,
        host: str,
        port: int,
        min_islands: int,
        heartbeat_timeout_s: float = DEFAULT_HEARTBEAT_TIMEOUT_S,
        report_grace_s: float = DEFAULT_REPORT_GRACE_S,
        events_path: Path | None = None,
        token: str | None = None,
    ) -> None:
        if min_islands < 1:
            raise ValueError(f"min_islands must be at least 1, got {min_islands}")
        self.min_islands = min_islands
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.report_grace_s = report_grace_s
        self.events_path = events_path
        self.token = token
        self.store = dist.TCPStore(host, port, is_master=True, wait_for_workers=False, timeout=STORE_TIMEOUT)
        self.host = host
        self.epoch: Epoch | None = None
        self.views: dict[str, IslandView] = {}
        self._arrivals: list[Registration] = []
        self._entries_seen = 0
        self._beats: dict[str, int] = {}
        self._decided_step = 0
        self._failed = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The port actually bound (useful when constructed with port 0)."""
        return self.store.port

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def registrations(self) -> list[Registration]:
        """Islands that have registered, in order of arrival (an island that came back counts again)."""
        self._read_registrations(time.monotonic())
        return list(self._arrivals)

    def _read_registrations(self, now: float) -> None:
        if not self.store.check([protocol.REGISTRATIONS]):
            return
        ids = [i for i in self.store.get(protocol.REGISTRATIONS).decode().split(",") if i]
        for island in ids[self._entries_seen:]:
            registration = Registration.from_json(self.store.get(protocol.island_key(island)))
            self._entries_seen += 1
            if not verify(self.token, island, registration.proof):
                self.store.set(protocol.refused_key(island), WRONG_TOKEN)
                continue
            if self.epoch is not None and registration.local_ranks != self.epoch.local_ranks:
                self.store.set(protocol.refused_key(island), (
                    f"this island runs {registration.local_ranks} local ranks but the run's islands run "
                    f"{self.epoch.local_ranks}: use --nproc {self.epoch.local_ranks}"
                ))
                continue
            self._arrivals.append(registration)
            self.views[island] = IslandView(registration, heard_at=now)
            self._beats[island] = int(self.store.add(protocol.heartbeat_key(island), 0))

    def _read_islands(self, now: float) -> None:
        """Heartbeats and deathrattles of every island; failure reports and results of members."""
        members = self.epoch.members if self.epoch is not None else ()
        for island, view in self.views.items():
            beat = int(self.store.add(protocol.heartbeat_key(island), 0))
            if beat != self._beats[island]:
                self._beats[island], view.heard_at = beat, now
            if view.leaving is None and self.store.check([protocol.leaving_key(island)]):
                view.leaving = self.store.get(protocol.leaving_key(island)).decode()
            if island not in members:
                continue
            if view.failed_at is None and self.store.check([protocol.failed_key(self.epoch.number, island)]):
                view.failed_at = now
            result_key = protocol.result_key(self.epoch.number, island)
            if self.store.check([result_key]):
                view.result = StepResult.from_text(self.store.get(result_key))

    def step(self) -> bool:
        """One round of decisions; True once epoch 0 is published (or has failed to form)."""
        if self._failed:
            return True
        now = time.monotonic()
        self._read_registrations(now)
        if self.epoch is None:
            return self._form_first_epoch(now)
        self._read_islands(now)
        self._publish(decide(self.epoch, self.views, self._decided_step, now, self.heartbeat_timeout_s, self.report_grace_s))
        return True

    def _form_first_epoch(self, now: float) -> bool:
        try:
            epoch = first_epoch(self._arrivals, self.min_islands, time.time())
        except ValueError as err:
            self.store.set(protocol.epoch_error_key(0), str(err))
            self._failed = True
            return True
        if epoch is None:
            return False
        self._start_epoch(epoch, {}, epoch.members)
        return True

    def _publish(self, decision: Decision) -> None:
        old = self.epoch
        if decision.ended is not None:
            if not self.store.check([protocol.ENDED]):
                self.store.set(protocol.ENDED, decision.ended)
                self._log_event({"time": time.time(), "epoch": old.number, "members": [], "joined": [], "left": decision.left, "reason": "ended"})
            return
        if decision.epoch is not None:
            self._start_epoch(decision.epoch, decision.left, decision.joined)
        if decision.outcome is not None:
            value = f"commit {self.epoch.number}" if decision.outcome == "commit" else decision.outcome
            self.store.compare_set(protocol.outcome_key(old.number, decision.step), "", value)
            self._decided_step = decision.step
        if decision.epoch is not None:
            self.store.set(protocol.next_epoch_key(old.number), str(decision.epoch.number))
            self._decided_step = 0

    def _start_epoch(self, epoch: Epoch, left: dict[str, str], joined: tuple[str, ...]) -> None:
        epoch = Epoch(epoch.number, epoch.members, epoch.local_ranks, epoch.reason, time.time())
        epoch = dataclasses.replace(epoch, mac=sign(self.token, epoch.signed_text()))
        self.store.set(protocol.epoch_key(epoch.number), epoch.to_json())
        self.store.set(protocol.LATEST_EPOCH, str(epoch.number))
        for island in left:
            self.views.pop(island, None)
        for view in self.views.values():
            view.failed_at, view.result = None, None
        self.epoch = epoch
        self._log_event({
            "time": epoch.started_at, "epoch": epoch.number, "members": list(epoch.members),
            "joined": list(joined), "left": left, "reason": epoch.reason,
        })

    def _log_event(self, event: dict) -> None:
        if self.events_path is None:
            return
        self.events_path.parent.mkdir(parents=True, exist_ok=True)
        with self.events_path.open("a") as f:
            f.write(json.dumps(event) + "\n")

    def serve(self) -> None:
        """Make decisions until stop() is called."""
        while not self._stop.is_set():
            self.step()
            self._stop.wait(POLL_INTERVAL_S)

    def start(self) -> Coordinator:
        """Serve in a background thread (for `atoll simulate` and tests)."""
        self._thread = threading.Thread(target=self.serve, name="atoll-coordinator", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
