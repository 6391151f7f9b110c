"""The elastic outer step, as phases the training loop drives: `begin` and `land`.

Outer step s, as every island runs it (local rank 0 talks to the coordinator and tells its other
local ranks what it saw, so the whole island moves as one):

1. Boundary barrier "outer-s" of the current epoch (`begin`). Waiting is unbounded while the
   peers are alive; a dead or hung peer is dropped by the coordinator (deathrattle at once,
   heartbeat timeout otherwise), which dissolves the epoch; the waiters then enter the next one
   (`atoll.epoch_entry`), and a joiner ready to enter is admitted here.
2. Average (`begin`): the pseudo-gradient and its statistics, shared and judged identically on
   every island (`atoll.validation`: non-finite or outlying contributions are rejected; too few
   accepted skips the step), then the ring over the rest.
   A RingError (dead peer at once; silent peer once the coordinator dissolves the epoch at the
   heartbeat timeout, or at the ring deadline) is reported to the coordinator in 3.
3. Agreement (`land`): the island posts its result: ok with a digest of (outer weights, outer
   momentum, averaged pseudo-gradient), or fail. The outcome is decided once per step, epoch and
   round by the coordinator: "commit" when every member posted ok with the same digest; "abort"
   when the epoch was dissolved first. Only a commit applies the outer step, so no island ever
   applies an update the others did not (and equal digests before the step mean equal outer
   weights and momentum after it). "resync" when the digests differ: every island takes the
   outer state of the member holding the majority digest, and the step is averaged again in a
   new round.
4. Abort: enter the next epoch (its members are the survivors, see `membership.decide`) and
   redo from 1; the ring then divides by the new world size. After `mesh.outer_attempts` aborted
   attempts every island skips the step: all survivors saw the same aborts, so all skip it.
   mesh.max_skipped_in_a_row skipped steps in a row stop the run (islands training alone are
   not a run).

Overlap (`diloco.overlap_steps` = tau > 0; Streaming DiLoCo, Douillard et al. 2025,
arXiv:2501.18512, whose recipe this follows for the whole model at once): `begin(behind=True)`
computes and keeps the pseudo-gradient (`DiLoCo.hold_contribution`) and its statistics on the
training thread (they involve the island's local ranks), then runs phases 1 to 3 of the first
attempt (the barrier, the cross-island half of the average: statistics all-gather, decision,
ring, `atoll.validation.average_validated`; and the agreement) in a background thread while the
island trains tau more inner steps, so that no island waits for a slower one on the training
thread: `land` finds the outcome decided and applies it. A barrier that fails there (a dead or
hung peer, a joiner to admit) leaves the rest to `land`, which enters the next epoch and averages
blocking, as `begin` would have; a failed ring was posted as failed, and `land` goes on as above.
The outer step's result is then merged into the inner weights the island has moved on to
(`diloco.overlap_merge`: its progress since the boundary on top of the new outer weights, or
Streaming DiLoCo's mixing, inner <- w * inner + (1 - w) * outer with w = `diloco.merge_weight`).
An island whose contribution was rejected takes the outer weights whole: its own weights are what
was rejected.

Eager (`diloco.eager`; Kale, Douillard, Donchev 2025, arXiv:2502.12996) is overlap with tau =
H - 1 (the landing just before the next boundary, so that checkpoints fall where nothing is in
flight) and no merge: after `begin`, the caller moves the inner weights to the eager estimate of
the step (`DiLoCo.eager_start`), and the landing applies the true average to the outer weights
only. A rejected island, and every island of a skipped step, takes the outer weights whole, as
with overlap.

Everything else is the blocking step's: the background thread's local-rank collectives use the
island's own `behind` group (never the training thread's), its coordinator calls are the
barrier, the result and the epoch's "dissolved?" check (the training thread makes none while it
runs), so a dead peer fails its ring at once (RingError, reported with the result), a hung one
is left at the heartbeat timeout (the ring is abandoned, `atoll.comm.allreduce`), and the ring
ends by its deadline (mesh.collective_timeout_s); the barrier and the result wait as they do
blocking, until the coordinator decides. A failed attempt is redone at landing, blocking, among
the survivors, with the held contribution: retries never see the inner weights trained after the
boundary. Epochs are entered (joins admitted, state broadcast) only on the training thread, at a
barrier or at the landing, never with an all-reduce in flight. The digests, the validation
decision and the commit are those of the blocking step on the same contributions.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field, replace

import torch

from atoll import errors
from atoll.config import JobConfig
from atoll.digest import digest_to_tensor, tensor_digest
from atoll.epoch_entry import EpochEntry
from atoll.errors import ExpectedFailure
from atoll.faults import WEIGHT_ACTIONS, FaultInjector
from atoll.held_state import HeldState
from atoll.island import Island, all_ranks_ok
from atoll.mesh.member import COMMIT, RESYNC, MeshMember, Outcome
from atoll.mesh.membership import Epoch
from atoll.validation import Decision, average_accepted, average_validated, island_stats

_PEER = re.compile(r"(?:from|to) rank (\d+)")


def blamed_peer(error: str, epoch: Epoch) -> str | None:
    """The member a ring error names ("... from rank 2" / "... to rank 2"), for the coordinator's
    culprit rule; None when the error names no peer."""
    match = _PEER.search(error)
    if match is None or int(match.group(1)) >= epoch.world:
        return None
    return epoch.members[int(match.group(1))]


def island_digest(shard_digest: str, island: Island) -> str:
    """Digest of the whole island's outer weights: over every local rank's shard digest (an
    all-gather over the island's control group when it has more than one rank)."""
    if island.world == 1:
        return shard_digest
    mine = digest_to_tensor(shard_digest)
    everyone = [torch.empty_like(mine) for _ in range(island.world)]
    torch.distributed.all_gather(everyone, mine, group=island.control)
    return tensor_digest((str(rank), t) for rank, t in enumerate(everyone))


@dataclass
class Averaged:
    """One attempt's average: the decision on contributions, or the error that ended it."""

    decision: Decision | None
    error: str
    ring_s: float


@dataclass
class Flight:
    """An outer step between `begin` and `land`; `behind`: its first average runs in `thread`."""

    outer_step: int
    fresh: bool
    averaged: Averaged | None = None
    """The first attempt's average (None while it runs behind training, or if its barrier failed there)."""
    outcome: Outcome | None = None
    """The first attempt's outcome, when it was agreed behind training."""
    behind: bool = False
    thread: threading.Thread | None = None
    failure: BaseException | None = None
    """An unexpected error in the background thread, raised again at landing."""
    started: float = field(default_factory=time.perf_counter)
    finished: float | None = None

    def overlap_s(self, landing: float) -> float:
        """Seconds the background average ran before `landing` (the rest, training waited for)."""
        if not self.behind or self.finished is None:
            return 0.0
        return max(0.0, min(self.finished, landing) - self.started)


@dataclass
class Landed:
    """What an outer step came to."""

    outer_step: int
    skipped: bool
    digest: str
    attempts: int
    epoch: Epoch
    ring_s: float
    """Seconds spent in the rings themselves (the rest is protocol and waiting)."""
    decision: Decision | None
    """The committed attempt's decision on contributions (None: it ran out of attempts)."""


class OuterStep:
    """The elastic outer step of one local rank (see the module doc)."""

    def __init__(
        self, cfg: JobConfig, member: MeshMember, island: Island, held: HeldState, entry: EpochEntry, faults: FaultInjector,
        notes: list[str],
    ) -> None:
        self.cfg = cfg
        self.member = member
        self.island = island
        self.held = held
        self.diloco = held.diloco
        self.entry = entry
        self.faults = faults
        self.notes = notes
        self.skipped_in_a_row = 0

    def begin(self, outer_step: int, fresh: bool, behind: bool = False) -> Flight:
        """Phases 1 and 2 of the first attempt: pass the boundary barrier (entering new epochs
        while it fails), then average; with `behind`, phases 1 to 3 run in a background thread
        (see the module doc). `fresh`: this island joined at this boundary and contributes nothing."""
        if behind:
            return self._average_behind(outer_step, fresh)
        self._pass_barrier(outer_step)
        return Flight(outer_step, fresh, self._average(outer_step, fresh))

    def land(self, flight: Flight) -> Landed:
        """Phases 3 and 4: wait for a background attempt to end (bounded by the ring deadline and
        the heartbeat timeout), agree on the average unless it was agreed behind training, apply
        it, and redo failed attempts among the survivors. A boundary barrier that failed behind
        training (a join, a dead or hung peer) is passed here, blocking, as `begin` would have."""
        if flight.thread is not None:
            flight.thread.join()
            if flight.failure is not None:
                raise flight.failure
        outer_step, averaged, outcome = flight.outer_step, flight.averaged, flight.outcome
        if averaged is None:  # the epoch was dissolved at the barrier behind training
            self._pass_barrier(outer_step)
            averaged = self._average(outer_step, flight.fresh)
        attempts, round_, ring_s = 0, 0, 0.0
        while True:
            ring_s += averaged.ring_s
            if outcome is None:
                outcome = self._agree(outer_step, round_, averaged, self.member)
            attempts += 1
            epoch = self.member.epoch
            if outcome.kind == COMMIT:
                digest = self._commit(flight, averaged.decision)  # set on every island: all posted ok
                if outcome.next_epoch != epoch.number:
                    self.entry.enter(outcome.next_epoch)
                return Landed(outer_step, averaged.decision.skip, digest, attempts, epoch, ring_s, averaged.decision)
            if outcome.kind == RESYNC:
                self._resync(outer_step, outcome.source)
                round_ += 1
            else:
                self.notes.append(
                    f"outer step {outer_step} attempt {attempts} aborted in epoch {epoch.number}"
                    + (f": {averaged.error}" if averaged.error else "")
                )
                if attempts >= self.cfg.mesh.outer_attempts:
                    return self._skip(outer_step, attempts, epoch, ring_s)
                self.entry.enter(self.member.next_epoch())
                round_ = 0
            if self._pass_barrier(outer_step):
                round_ = 0
            averaged, outcome = self._average(outer_step, flight.fresh), None

    def _agree(self, outer_step: int, round_: int, averaged: Averaged, member: MeshMember) -> Outcome:
        """Phase 3 for one attempt: post ok with the digest, or the failure, and wait for the
        coordinator's outcome (`member` as the calling thread sees it: the background thread's
        island uses its `behind` group). The wait lasts until the coordinator
        decides: a dead or hung member ends it as an abort once it is dropped; blips and restarts
        of the coordinator are retried by its client, a lost coordinator is an ExpectedFailure."""
        ok = all_ranks_ok(not averaged.error, member.island)
        check = island_digest(self.diloco.agreement_digest(), member.island) if ok else ""
        return member.outcome(outer_step, round_, ok, check, averaged.error, blamed_peer(averaged.error, member.epoch))

    def _commit(self, flight: Flight, decision: Decision) -> str:
        """Apply the committed step (or, skipped, reset to the outer weights) with the state server
        withdrawn; an overlapped one merges into the inner weights unless this island's contribution
        was rejected. Returns the island's digest of the new outer state."""
        keeps = flight.behind and self.member.island_id not in decision.rejected
        eager = flight.behind and self.cfg.diloco.eager
        with self.held.changing():
            if decision.applies:
                shard_digest = self._apply(keeps, eager)
            else:
                shard_digest = self.diloco.restore_inner()
            self.held.outer_steps = flight.outer_step  # before entering: a joiner receives it
        self.diloco.release_contribution()
        self.skipped_in_a_row = 0
        return island_digest(shard_digest, self.island)

    def _apply(self, keeps: bool, eager: bool) -> str:
        """The committed step's update of the outer weights, and of the inner ones: replaced (blocking,
        or this island's own contribution was rejected), left to train on (eager), or merged
        (overlap: `diloco.overlap_merge`)."""
        if not keeps:
            return self.diloco.apply(0.0)
        if eager:
            return self.diloco.apply(1.0)
        if self.cfg.diloco.overlap_merge == "delta":
            return self.diloco.apply(delta=True)
        return self.diloco.apply(self.cfg.diloco.merge_weight)

    def _pass_barrier(self, outer_step: int) -> bool:
        """Boundary barrier "outer-s", entering the next epoch each time the current one dissolves
        first; whether it entered one."""
        entered = False
        while not self.member.barrier(f"outer-{outer_step}"):
            self.entry.enter(self.member.next_epoch())
            entered = True
        return entered

    def _average(self, outer_step: int, fresh: bool) -> Averaged:
        """One attempt's validated average (`atoll.validation.average_accepted`); a failed
        collective is caught and returned as the attempt's error, to be reported in `land`."""
        if self.island.is_leader:
            self.faults.at("allreduce", outer_step)
        start, decision, error = time.perf_counter(), None, ""
        try:
            if self.faults.ring_broken:
                raise RuntimeError("this island's ring cannot reach its peers (injected fault: break)")
            decision = average_accepted(self.diloco, self.entry.mean, self.island, self.cfg.diloco, self.member.epoch.members, fresh)
        except RuntimeError as err:  # RingError, or gloo's own error on a broken group
            error = str(err).splitlines()[0]
        return Averaged(decision, error, time.perf_counter() - start)

    def _average_behind(self, outer_step: int, fresh: bool) -> Flight:
        """The first attempt in a background thread: the pseudo-gradient (kept for retries) and its
        statistics here; the boundary barrier, the cross-island average and the agreement behind
        training, on the island's `behind` group. A failed barrier leaves `averaged` None for
        `land` to enter the next epoch; a failed ring is agreed (posted) as failed, as `land` does."""
        if self.island.is_leader:
            self.faults.at("allreduce", outer_step, WEIGHT_ACTIONS)
        flight = Flight(outer_step, fresh, behind=True)
        try:
            mine = island_stats(self.diloco.hold_contribution(), self.diloco.buckets, self.island, fresh, self.diloco.residual)
        except RuntimeError as err:  # a local rank's collective failed: reported at landing
            flight.averaged, flight.finished = Averaged(None, str(err).splitlines()[0], 0.0), time.perf_counter()
            return flight
        mean, member = self.entry.mean, replace(self.member, island=self.island.behind_training())

        def attempt() -> None:
            if not member.barrier(f"outer-{outer_step}"):
                return
            if member.island.is_leader:
                self.faults.at("allreduce", outer_step)
            start, decision, error = time.perf_counter(), None, ""
            try:
                if self.faults.ring_broken:
                    raise RuntimeError("this island's ring cannot reach its peers (injected fault: break)")
                decision = average_validated(self.diloco, mean, self.cfg.diloco, member.epoch.members, mine)
            except RuntimeError as err:  # RingError, or gloo's own error on a broken group
                error = str(err).splitlines()[0]
            flight.averaged = Averaged(decision, error, time.perf_counter() - start)
            flight.outcome = self._agree(outer_step, 0, flight.averaged, member)

        def run() -> None:
            try:
                attempt()
            except BaseException as err:  # noqa: BLE001 - a bug or a lost coordinator: the training thread raises it at landing
                flight.failure = err
            flight.finished = time.perf_counter()

        flight.thread = threading.Thread(target=run, name=f"atoll-outer-step-{outer_step}", daemon=True)
        flight.thread.start()
        return flight

    def _skip(self, outer_step: int, attempts: int, epoch: Epoch, ring_s: float) -> Landed:
        """Out of attempts: every survivor skips the step alike (outer weights unchanged), then
        enters the next epoch; too many skipped steps in a row stop the run."""
        self.diloco.release_contribution()
        with self.held.changing():
            self.held.outer_steps = outer_step
        self.entry.enter(self.member.next_epoch())
        self.skipped_in_a_row += 1
        if self.skipped_in_a_row >= self.cfg.mesh.max_skipped_in_a_row:
            raise ExpectedFailure(
                f"{self.skipped_in_a_row} outer steps in a row were skipped (the islands cannot average): islands "
                "training alone are not a run; see membership.jsonl for who failed (mesh.max_skipped_in_a_row)",
                errors.SKIPPED_STEPS,
            )
        return Landed(outer_step, True, island_digest(self.diloco.state_digest(), self.island), attempts, epoch, ring_s, None)

    def _resync(self, outer_step: int, source: int) -> None:
        """The islands' digests differed: every island takes member `source`'s outer weights and
        momentum (the majority's), then the step is averaged again. A failure here is a failed
        collective like any other: the island reports it and the next attempt follows."""
        holder = self.member.epoch.members[source]
        self.notes.append(f"outer step {outer_step}: outer weights differed across islands; taking island {holder!r}'s state")
        try:
            with self.held.changing():
                self.diloco.broadcast_state(self.entry.mean, source)
        except RuntimeError as err:
            self.member.report_failure(f"resync from {holder!r} failed: {str(err).splitlines()[0]}")
