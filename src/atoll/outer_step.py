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
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import torch

from atoll import errors
from atoll.config import JobConfig
from atoll.digest import digest_to_tensor, tensor_digest
from atoll.epoch_entry import EpochEntry
from atoll.errors import ExpectedFailure
from atoll.faults import FaultInjector
from atoll.held_state import HeldState
from atoll.island import Island, all_ranks_ok
from atoll.mesh.member import COMMIT, RESYNC, MeshMember
from atoll.mesh.membership import Epoch
from atoll.validation import Decision, average_accepted

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
    all-gather over the island's default group when it has more than one rank)."""
    if island.world == 1:
        return shard_digest
    mine = digest_to_tensor(shard_digest).to(island.device)
    everyone = [torch.empty_like(mine) for _ in range(island.world)]
    torch.distributed.all_gather(everyone, mine)
    return tensor_digest((str(rank), t) for rank, t in enumerate(everyone))


@dataclass
class Averaged:
    """One attempt's average: the decision on contributions, or the error that ended it."""

    decision: Decision | None
    error: str
    ring_s: float


@dataclass
class Flight:
    """An outer step between `begin` and `land`."""

    outer_step: int
    fresh: bool
    averaged: Averaged


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

    def run(self, outer_step: int, fresh: bool = False) -> Landed:
        """Outer step `outer_step` from barrier to commit, blocking. `fresh`: this island joined at
        this boundary and contributes nothing."""
        return self.land(self.begin(outer_step, fresh))

    def begin(self, outer_step: int, fresh: bool) -> Flight:
        """Phase 1 and 2 of the first attempt: pass the boundary barrier (entering new epochs
        while it fails), then average."""
        self._pass_barrier(outer_step)
        return Flight(outer_step, fresh, self._average(outer_step, fresh))

    def land(self, flight: Flight) -> Landed:
        """Phases 3 and 4: agree on the average, apply it, and redo failed attempts among the survivors."""
        outer_step, averaged = flight.outer_step, flight.averaged
        attempts, round_, ring_s = 0, 0, 0.0
        while True:
            ring_s += averaged.ring_s
            ok = all_ranks_ok(not averaged.error, self.island)
            check = island_digest(self.diloco.agreement_digest(), self.island) if ok else ""
            outcome = self.member.outcome(
                outer_step, round_, ok, check, averaged.error, blamed_peer(averaged.error, self.member.epoch),
            )
            attempts += 1
            epoch = self.member.epoch
            if outcome.kind == COMMIT:
                decision = averaged.decision  # set on every island: all posted ok
                with self.held.changing():
                    shard_digest = self.diloco.apply() if decision.applies else self.diloco.restore_inner()
                    self.held.outer_steps = outer_step  # before entering: a joiner receives it
                digest = island_digest(shard_digest, self.island)
                self.skipped_in_a_row = 0
                if outcome.next_epoch != epoch.number:
                    self.entry.enter(outcome.next_epoch)
                return Landed(outer_step, decision.skip, digest, attempts, epoch, ring_s, decision)
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
            averaged = self._average(outer_step, flight.fresh)

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

    def _skip(self, outer_step: int, attempts: int, epoch: Epoch, ring_s: float) -> Landed:
        """Out of attempts: every survivor skips the step alike (outer weights unchanged), then
        enters the next epoch; too many skipped steps in a row stop the run."""
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
