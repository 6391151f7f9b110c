"""Membership epochs: which islands train together, decided by the coordinator.

An epoch is one fixed membership of the run. Process groups are never resized: every change of
membership makes a new epoch with new groups. Pure data and decisions, no I/O.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Epoch:
    """One fixed membership of the run."""

    number: int
    """Epochs count up from 0; each has its own process groups."""
    members: tuple[str, ...]
    """Island ids, in global-rank order."""
    local_ranks: int
    """Local ranks per island; global group k joins local rank k of every member."""
    reason: str = "start"
    """Why this epoch began (for the event log)."""
    started_at: float = field(default=0.0, compare=False)
    """Coordinator's clock when it formed the epoch (islands do not share a clock)."""
    mac: str = field(default="", compare=False)
    """The coordinator's HMAC of `signed_text()` under the run token (empty in an open run)."""

    @property
    def world(self) -> int:
        return len(self.members)

    def index_of(self, island_id: str) -> int:
        """This island's rank in the global groups; ValueError if it is not a member."""
        return self.members.index(island_id)

    def signed_text(self) -> str:
        """What the epoch's mac covers: every field but the mac."""
        return json.dumps([self.number, list(self.members), self.local_ranks, self.reason, self.started_at])

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @staticmethod
    def from_json(text: str | bytes) -> Epoch:
        raw = json.loads(text)
        return Epoch(raw["number"], tuple(raw["members"]), raw["local_ranks"], raw["reason"], raw["started_at"], raw.get("mac", ""))


@dataclass(frozen=True)
class Registration:
    """What an island tells the coordinator when it arrives."""

    island_id: str
    local_ranks: int
    proof: str = ""
    """HMAC of the island id under the run token (empty in an open run)."""

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @staticmethod
    def from_json(text: str | bytes) -> Registration:
        raw = json.loads(text)
        return Registration(raw["island_id"], raw["local_ranks"], raw.get("proof", ""))


def first_epoch(registered: list[Registration], min_islands: int, now: float) -> Epoch | None:
    """Epoch 0 once `min_islands` islands have registered, members in order of arrival.

    Raises ValueError if the islands disagree on their number of local ranks (their global groups
    could not pair up).
    """
    if len(registered) < min_islands:
        return None
    chosen = registered[:min_islands]
    ranks = {r.local_ranks for r in chosen}
    if len(ranks) != 1:
        detail = ", ".join(f"{r.island_id}: {r.local_ranks}" for r in chosen)
        raise ValueError(f"islands must run the same number of local ranks; got {detail}")
    return Epoch(0, tuple(r.island_id for r in chosen), ranks.pop(), "start", now)


# --- the elastic decisions: who is gone, what an outer step's outcome is, who forms the next epoch --


@dataclass(frozen=True)
class StepResult:
    """What an island posted after its attempt at averaging one outer step in the current epoch."""

    outer_step: int
    ok: bool
    digest: str = ""
    """With ok: digest of the island's outer weights before the step and the averaged pseudo-gradient."""

    def to_text(self) -> str:
        return f"{self.outer_step} {'ok' if self.ok else 'fail'} {self.digest}".rstrip()

    @staticmethod
    def from_text(text: str | bytes) -> StepResult:
        raw = text.decode() if isinstance(text, bytes) else text
        step, status, *digest = raw.split()
        return StepResult(int(step), status == "ok", digest[0] if digest else "")


@dataclass
class IslandView:
    """The coordinator's view of one registered island. Times are the coordinator's own clock."""

    registration: Registration
    heard_at: float
    """When the island's heartbeat counter last changed (or it registered)."""
    leaving: str | None = None
    """The island's deathrattle (why it left), once written."""
    failed_at: float | None = None
    """When its failure report for the current epoch was first seen."""
    result: StepResult | None = None
    """Its latest result posted in the current epoch."""


@dataclass(frozen=True)
class Decision:
    """What the coordinator publishes after one look at the islands (nothing, when both are None)."""

    outcome: str | None = None
    """For `step`: "commit" (apply the averaged update) or "diverged" (the digests differ)."""
    step: int | None = None
    epoch: Epoch | None = None
    """The next epoch, replacing the current one."""
    left: dict[str, str] = field(default_factory=dict)
    """Islands dropped by `epoch`, with why."""
    joined: tuple[str, ...] = ()
    """Islands admitted by `epoch`."""
    ended: str | None = None
    """Every member is gone (why): the run is over, and islands still waiting to join are told so."""


def departures(members: tuple[str, ...], views: dict[str, IslandView], now: float, heartbeat_timeout_s: float) -> dict[str, str]:
    """Members gone for good: those that wrote a deathrattle, and those whose heartbeat is stale.

    Staleness is judged on the coordinator's clock: `now - heard_at`, where heard_at is when the
    coordinator last saw the island's counter change (islands share no clock).
    """
    gone = {}
    for island in members:
        view = views[island]
        if view.leaving is not None:
            gone[island] = f"left ({view.leaving})"
        elif now - view.heard_at > heartbeat_timeout_s:
            gone[island] = f"no heartbeat for {now - view.heard_at:.1f}s"
    return gone


def pending_joiners(current: Epoch, views: dict[str, IslandView], now: float, heartbeat_timeout_s: float) -> tuple[str, ...]:
    """Registered islands outside the epoch that are alive, in order of registration."""
    outside = [i for i in views if i not in current.members]
    return tuple(i for i in outside if not departures((i,), views, now, heartbeat_timeout_s))


def decide(
    current: Epoch, views: dict[str, IslandView], decided_step: int, now: float, heartbeat_timeout_s: float, report_grace_s: float,
) -> Decision:
    """The coordinator's decision for the current epoch, given its view of the islands.

    Rules, in order:
    1. Every member posted an ok result for the same outer step s > `decided_step` (the last step
       decided in this epoch): the step commits, or is "diverged" if their digests differ. Alive
       joiners waiting outside are admitted at this boundary: a new epoch, members then joiners.
    2. Some member reported a failed collective (after a kill -9 every survivor's ring raises
       within a fraction of a second): once `report_grace_s` has passed since the first report,
       or every member is accounted for, the next epoch is the members that reported a failure or
       posted a result for the step in flight, minus departures. The silent ones are presumed dead.
    3. Some member departed (deathrattle, or heartbeat older than `heartbeat_timeout_s`, e.g. a
       SIGSTOPped island): the next epoch is the members minus the departed.
    When no member is left the run has ended (joiners cannot restart it: nobody holds its state).
    """
    members = current.members
    gone = departures(members, views, now, heartbeat_timeout_s)
    joiners = pending_joiners(current, views, now, heartbeat_timeout_s)
    results = [views[m].result for m in members]
    in_flight = [r for r in results if r is not None and r.outer_step > decided_step]
    if len(in_flight) == len(members) and all(r.ok for r in in_flight) and len({r.outer_step for r in in_flight}) == 1:
        step = in_flight[0].outer_step
        if len({r.digest for r in in_flight}) > 1:
            return Decision(outcome="diverged", step=step)
        epoch = successor(current, members + joiners, "joined", now) if joiners else None
        return Decision(outcome="commit", step=step, epoch=epoch, joined=joiners)
    reported = {m: views[m].failed_at for m in members if views[m].failed_at is not None}
    if reported:
        posted = {m for m in members if views[m].result is not None and views[m].result.outer_step > decided_step}
        heard = set(reported) | posted
        if now - min(reported.values()) < report_grace_s and not heard | set(gone) >= set(members):
            return Decision()
        alive = tuple(m for m in members if m in heard and m not in gone)
        silent = {m: "silent after a failed collective" for m in members if m not in heard}
        return _replace(current, alive, {**silent, **gone}, "collective failed", now)
    if gone:
        return _replace(current, tuple(m for m in members if m not in gone), gone, "departed", now)
    return Decision()


def _replace(current: Epoch, alive: tuple[str, ...], left: dict[str, str], reason: str, now: float) -> Decision:
    """The epoch after `current` loses `left`, or the end of the run when nobody is left."""
    if alive:
        return Decision(epoch=successor(current, alive, reason, now), left=left)
    return Decision(left=left, ended="; ".join(f"{i}: {why}" for i, why in left.items()))


def successor(current: Epoch, members: tuple[str, ...], reason: str, now: float) -> Epoch:
    """The next epoch: number + 1, the given members in that order."""
    return Epoch(current.number + 1, members, current.local_ranks, reason, now)
