"""Membership epochs: which islands train together, decided by the coordinator.

An epoch is one fixed membership of the run. Process groups are never resized: every change of
membership makes a new epoch with new groups. Pure data and decisions, no I/O: the coordinator
feeds `decide` its view of the islands and publishes what it returns; tests drive it directly.

Under `comm.ring_order = "measured"` the coordinator reorders each epoch's members into the ring
order it measured (`in_ring_order`) before anyone hears of the epoch, so the rank order is still one
decision, the same on every island (and journalled with the epoch).

Every process start is a new **incarnation** of its island id (a random nonce chosen at start),
so a restarted island is never mistaken for the process it replaces. Members are ordered by
island id, not by arrival, so the same membership always gives every island the same global rank
and data slot (runs are reproducible whatever order the islands start in).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field, replace


@dataclass(frozen=True)
class Epoch:
    """One fixed membership of the run."""

    number: int
    """Epochs count up from 0; each has its own process groups."""
    members: tuple[str, ...]
    """Island ids in global-rank order, which is the ring's order: sorted by id, or as the
    coordinator measured it (`comm.ring_order`, `atoll.mesh.ring_order`)."""
    local_ranks: int
    """Local ranks per island; global group k joins local rank k of every member."""
    reason: str = "start"
    """Why this epoch began (for the event log)."""
    incarnations: tuple[str, ...] = ()
    """Each member's incarnation, in member order: a process enters only an epoch naming its own."""
    started_at: float = field(default=0.0, compare=False)
    """Coordinator's clock when it formed the epoch (islands do not share a clock)."""

    @property
    def world(self) -> int:
        return len(self.members)

    def index_of(self, island_id: str) -> int:
        """This island's rank in the global groups; ValueError if it is not a member."""
        return self.members.index(island_id)

    def has(self, island_id: str, incarnation: str) -> bool:
        """Whether this very process (id and incarnation) is a member."""
        return island_id in self.members and self.incarnations[self.index_of(island_id)] == incarnation

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(raw: dict) -> Epoch:
        return Epoch(
            int(raw["number"]), tuple(raw["members"]), int(raw["local_ranks"]), str(raw["reason"]),
            tuple(raw["incarnations"]), float(raw["started_at"]),
        )


@dataclass(frozen=True)
class Registration:
    """What an island's process tells the coordinator when it arrives."""

    island_id: str
    incarnation: str = ""
    local_ranks: int = 1
    fingerprint: dict = field(default_factory=dict, compare=False)
    """Everything that must agree across the run's islands (see `fingerprint_mismatch`)."""
    serve: dict = field(default_factory=dict, compare=False)
    """Where its local ranks serve the run's state to joiners: {"host", "ports"} (`atoll.comm.transfer`)."""

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(raw: dict) -> Registration:
        return Registration(
            str(raw["island_id"]), str(raw["incarnation"]), int(raw["local_ranks"]), dict(raw.get("fingerprint", {})), dict(raw.get("serve", {})),
        )


def fingerprint_mismatch(run: dict, island: dict) -> list[str]:
    """The keys on which an island's job differs from the run's, each as 'key: run's vs island's'."""
    keys = sorted(set(run) | set(island))
    return [f"{k}: run has {run.get(k)!r}, island has {island.get(k)!r}" for k in keys if run.get(k) != island.get(k)]


def first_epoch(registered: list[Registration], min_islands: int, now: float) -> Epoch | None:
    """Epoch 0 once `min_islands` islands have registered, members sorted by id.

    Raises ValueError if the islands disagree on their number of local ranks (their global groups
    could not pair up).
    """
    if len(registered) < min_islands:
        return None
    chosen = sorted(registered[:min_islands], key=lambda r: r.island_id)
    ranks = {r.local_ranks for r in chosen}
    if len(ranks) != 1:
        detail = ", ".join(f"{r.island_id}: {r.local_ranks}" for r in chosen)
        raise ValueError(f"islands must run the same number of local ranks; got {detail}")
    return Epoch(0, tuple(r.island_id for r in chosen), ranks.pop(), "start", tuple(r.incarnation for r in chosen), now)


# --- the elastic decisions: who is gone, what an outer step's outcome is, who forms the next epoch --


@dataclass(frozen=True)
class StepResult:
    """What an island posted after its attempt at averaging one outer step in the current epoch."""

    outer_step: int
    ok: bool
    digest: str = ""
    """With ok: digest of the island's outer weights before the step and the averaged pseudo-gradient."""
    round: int = 0
    """Counts the outcomes already decided for this step in this epoch (a resync makes a new round)."""

    @property
    def key(self) -> tuple[int, int]:
        return (self.outer_step, self.round)


@dataclass
class IslandView:
    """The coordinator's view of one registered incarnation. Times are the coordinator's own clock."""

    registration: Registration
    heard_at: float
    """When the island's last heartbeat arrived (or it registered)."""
    lost_at: float | None = None
    """When its control connection closed without a deathrattle, until the same incarnation beats
    again on a new one: a process that does not within `reconnect_grace_s` is gone."""
    leaving: str | None = None
    """The island's deathrattle (why it left), once written."""
    failed_at: float | None = None
    """When its failure report for the current epoch was first seen."""
    blamed: str | None = None
    """The island its failure report points at (the ring neighbour that broke), if it knows."""
    origin: bool = False
    """Its reported failure was its own (not rings abandoned because the epoch ended)."""
    result: StepResult | None = None
    """Its latest result posted in the current epoch."""
    admitted: int = 0
    """Number of the epoch that admitted it (the most recent joiner has the highest)."""
    beat_interval_s: float = 2.0
    """How often the island says it beats (it is presumed gone after missing two)."""
    ready: int | None = None
    """A joiner that holds the state of this outer step, fetched from the members (-1: it could
    not fetch and takes the state by broadcast on entering); None: not ready to enter."""
    # What the status page shows (`atoll.mesh.status`); no decision reads these.
    address: str = ""
    """Where its requests last came from."""
    numbers: dict = field(default_factory=dict)
    """Its latest metrics record's few numbers (`atoll.mesh.status.island_numbers`), sent at outer-step barriers."""
    outer_step: int = 0
    """The outer step whose boundary barrier it last reached."""
    fetching: bool = False
    """A joiner told where to fetch the run's state, until it is ready."""


@dataclass(frozen=True)
class Decision:
    """What the coordinator publishes after one look at the islands (nothing, when all are None)."""

    outcome: str | None = None
    """For `step`: "commit" (apply the averaged update) or "resync" (digests differ: every
    island takes the outer state of member `source`, then the step is averaged again)."""
    step: tuple[int, int] | None = None
    """(outer step, round) the outcome is for."""
    source: int = 0
    """With resync: the member whose state the others take (it holds the majority digest)."""
    digests: dict[str, str] = field(default_factory=dict)
    """With resync: each member's digest, for the event log."""
    epoch: Epoch | None = None
    """The next epoch, replacing the current one."""
    left: dict[str, str] = field(default_factory=dict)
    """Islands dropped by `epoch`, with why."""
    joined: tuple[str, ...] = ()
    """Islands admitted by `epoch`."""
    ended: str | None = None
    """Every member is gone (why): the run is over, and islands still waiting to join are told so."""
    repeated_failure: bool = False
    """The epoch failed and the next one has the same members (a livelock in the making)."""


@dataclass(frozen=True)
class Rules:
    """The coordinator's thresholds (mesh.* settings)."""

    heartbeat_timeout_s: float = 10.0
    report_grace_s: float = 0.5
    evict_after: int = 3
    """Failed epochs in a row with unchanged members before the culprit is evicted."""


RECONNECT_SLACK_S = 1.0


def reconnect_grace_s(view: IslandView) -> float:
    """How long a closed control connection waits for its incarnation to beat again on a new one
    before the process counts as gone. A live island's client reconnects at its next beat (it
    closes its connection itself when a request of its own times out, e.g. while the coordinator
    was stopped), so two beat intervals and a second of slack tell a live process from a dead one."""
    return 2 * view.beat_interval_s + RECONNECT_SLACK_S


def reconnecting(members: tuple[str, ...], views: dict[str, IslandView], now: float) -> tuple[str, ...]:
    """Members whose control connection closed within its grace: alive or dead, it is not known yet."""
    return tuple(
        m for m in members
        if views[m].leaving is None and views[m].lost_at is not None and now - views[m].lost_at <= reconnect_grace_s(views[m])
    )


def departures(members: tuple[str, ...], views: dict[str, IslandView], now: float, heartbeat_timeout_s: float) -> dict[str, str]:
    """Members gone for good: a deathrattle, a control connection closed for longer than its
    reconnect grace (see `reconnect_grace_s`) or closed with a stale heartbeat, or a stale heartbeat.

    Times are judged on the coordinator's clock: `now - heard_at`, where heard_at is when the
    coordinator last heard from the island (islands share no clock).
    """
    gone = {}
    for island in members:
        view = views[island]
        if view.leaving is not None:
            gone[island] = f"left ({view.leaving})"
        elif view.lost_at is not None and (now - view.lost_at > reconnect_grace_s(view) or now - view.heard_at > heartbeat_timeout_s):
            gone[island] = "its control connection closed (process gone)"  # and no beat on a new one since
        elif now - view.heard_at > heartbeat_timeout_s:
            gone[island] = f"no heartbeat for {now - view.heard_at:.1f}s"
    return gone


def blamed_and_closed(members: tuple[str, ...], views: dict[str, IslandView], now: float) -> dict[str, str]:
    """Members whose control connection closed (within its grace: no beat on a new one yet) while
    a peer reports a failed collective that blames it or names nobody (gloo's error on a plain
    collective names an address, not a member): two signs of a dead process that a live one does
    not give together (one whose own request timed out reconnects, and its collectives go on), so
    it is gone at once instead of at the end of its grace. A report that blames another member
    points elsewhere."""
    unsure = reconnecting(members, views, now)
    blamed = {views[m].blamed for m in members if views[m].failed_at is not None and m not in unsure}
    return {m: "its control connection closed (process gone)" for m in unsure if m in blamed or None in blamed}


def pending_joiners(current: Epoch, views: dict[str, IslandView], now: float, heartbeat_timeout_s: float) -> tuple[str, ...]:
    """Registered islands outside the epoch that are alive (and connected), sorted by id."""
    outside = tuple(sorted(i for i in views if i not in current.members))
    unsure = reconnecting(outside, views, now)
    return tuple(i for i in outside if i not in unsure and not departures((i,), views, now, heartbeat_timeout_s))


def majority_source(members: tuple[str, ...], digests: dict[str, str]) -> int:
    """Index of the member whose state the others take: the first holder of the most common digest
    (on a tie between digests, the one the first member holds among the tied)."""
    counts = Counter(digests[m] for m in members)
    top = max(counts.values())
    for index, member in enumerate(members):
        if counts[digests[member]] == top:
            return index
    raise AssertionError("members is not empty")


def culprit(members: tuple[str, ...], views: dict[str, IslandView]) -> str:
    """The island to evict when the same members keep failing together: the one the failure
    reports point at most (a report blaming a peer points at the peer; one of the island's own
    failure that names nobody points at the reporter); ties go to the most recently admitted,
    then the last in member order."""
    score = Counter(views[m].blamed for m in members if views[m].blamed in members)
    score.update(m for m in members if views[m].origin and views[m].blamed is None)
    top = max(score.values(), default=0)
    return max((m for m in members if score[m] == top), key=lambda m: (views[m].admitted, m))


def decide(
    current: Epoch, views: dict[str, IslandView], decided: tuple[int, int], now: float, rules: Rules,
    failures_in_a_row: int = 0, at_boundary: bool = False,
) -> Decision:
    """The coordinator's decision for the current epoch, given its view of the islands.

    `at_boundary`: some member waits at an outer step's boundary barrier that has not passed (the
    step's averaging has not begun).

    Rules, in order:
    1. Every member posted an ok result for the same (outer step, round) after `decided`: the step
       commits, or, if their digests differ, resyncs from the majority's holder.
    2. Some member reported a failed collective: once `report_grace_s` has passed since the first
       report, or every member is accounted for, the next epoch is the members minus those that
       are gone (deathrattle, closed connection not reopened within its grace or blamed by a
       peer's report, stale heartbeat); while a member's connection is closed but its grace runs
       and no report blames it, the decision waits. An island
       that is alive but silent (busy in its ring, or slow) is never dropped for it. When the next epoch would have
       the same members for the `evict_after`-th time in a row (`failures_in_a_row` counts the
       earlier ones), the culprit (see `culprit`) is evicted instead: a pair that cannot connect
       must not livelock the run.
    3. Some member departed: the next epoch is the members minus the departed.
    4. Alive joiners that are ready (`IslandView.ready`) are admitted `at_boundary`: a new epoch
       with members and joiners, which the members enter from the barrier, so a joiner's first
       outer step is the one about to be averaged (it contributes nothing to it: it has not
       trained). Never at a commit: the state a joiner fetched is then one step old, nor while a
       member's closed connection is within its grace.
    When no member is left the run has ended (joiners cannot restart it: nobody holds its state).
    """
    members = current.members
    gone = departures(members, views, now, rules.heartbeat_timeout_s)
    results = [views[m].result for m in members]
    in_flight = [r for r in results if r is not None and r.key > decided]
    if len(in_flight) == len(members) and all(r.ok for r in in_flight) and len({r.key for r in in_flight}) == 1:
        step = in_flight[0].key
        digests = {m: views[m].result.digest for m in members}
        if len(set(digests.values())) > 1:
            return Decision(outcome="resync", step=step, source=majority_source(members, digests), digests=digests)
        return Decision(outcome="commit", step=step)
    reported = {m: views[m].failed_at for m in members if views[m].failed_at is not None}
    if reported:
        posted = {m for m in members if views[m].result is not None and views[m].result.key > decided}
        heard = set(reported) | posted
        gone.update(blamed_and_closed(members, views, now))
        if now - min(reported.values()) < rules.report_grace_s and not heard | set(gone) >= set(members):
            return Decision()
        if set(reconnecting(members, views, now)) - set(gone):
            return Decision()
        if not gone:
            if failures_in_a_row + 1 >= rules.evict_after and len(members) > 1:
                evicted = culprit(members, views)
                why = f"evicted after {failures_in_a_row + 1} failed epochs in a row with the same members (the culprit)"
                return without(current, views, {evicted: why}, "collective failed repeatedly", now)
            return Decision(epoch=successor(current, members, views, "collective failed", now), repeated_failure=True)
        return without(current, views, gone, "collective failed", now)
    if gone:
        return without(current, views, gone, "departed", now)
    ready = tuple(j for j in pending_joiners(current, views, now, rules.heartbeat_timeout_s) if views[j].ready is not None)
    if ready and at_boundary and not reconnecting(members, views, now):
        return Decision(epoch=successor(current, members + ready, views, "joined", now), joined=ready)
    return Decision()


def without(current: Epoch, views: dict[str, IslandView], left: dict[str, str], reason: str, now: float) -> Decision:
    """The epoch after `current` loses `left` (with why), or the end of the run when nobody is left."""
    alive = tuple(m for m in current.members if m not in left)
    if alive:
        return Decision(epoch=successor(current, alive, views, reason, now), left=left)
    return Decision(left=left, ended="; ".join(f"{i}: {why}" for i, why in left.items()))


def successor(current: Epoch, members: tuple[str, ...], views: dict[str, IslandView], reason: str, now: float) -> Epoch:
    """The next epoch: number + 1, the given members (sorted) with their current incarnations."""
    ordered = tuple(sorted(members))
    return Epoch(current.number + 1, ordered, current.local_ranks, reason, tuple(views[m].registration.incarnation for m in ordered), now)


def in_ring_order(epoch: Epoch, ring: tuple[str, ...]) -> Epoch:
    """`epoch` with its members (and their incarnations) in the order of `ring`, a permutation of them."""
    if sorted(ring) != sorted(epoch.members):
        raise ValueError(f"ring order {list(ring)} is not a permutation of the members {list(epoch.members)}")
    incarnation = dict(zip(epoch.members, epoch.incarnations))
    return replace(epoch, members=ring, incarnations=tuple(incarnation[m] for m in ring))
