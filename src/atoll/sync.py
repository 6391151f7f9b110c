"""How an island keeps in step with the others, as the training loop sees it.

Three modes: alone (no coordinator: nothing to do), `diloco` (an outer step every H inner steps
and at the end, elastic: islands may die, hang and join) and `ddp` (gradients averaged across
islands every step, the baseline; fixed membership: a failure ends the run). This module also
keeps the clocks and byte counters that the outer-step metrics report: compute_s (inner phase
wall time), sync_s (wall time blocked in cross-island communication) and
utilization = compute_s / (compute_s + sync_s).

The elastic outer step s, as every island runs it (local rank 0 talks to the coordinator and
tells its other local ranks what it saw, so the whole island moves as one):

1. Boundary barrier "outer-s" of the current epoch. Waiting is unbounded while the peers are
   alive; a dead or hung peer is dropped by the coordinator (deathrattle at once, heartbeat
   timeout otherwise), which dissolves the epoch; the waiters then enter the next one.
2. Average: recompute the pseudo-gradient (the inner weights have not changed), share its
   statistics and reject non-finite or outlying contributions identically on every island
   (`atoll.validation`; too few accepted skips the step), and run the ring over the rest.
   A RingError (dead peer at once; silent peer once the coordinator dissolves the epoch at the
   heartbeat timeout, or at the ring deadline) is reported to the coordinator. Either way the island posts its result: ok with a digest of (outer weights,
   averaged pseudo-gradient), or fail.
3. Outcome, decided once per step, epoch and round by the coordinator: "commit" when every member
   posted ok with the same digest; "abort" when the epoch was dissolved first. Only a commit
   applies the outer step, so no island ever applies an update the others did not (and equal
   digests before the step mean equal outer weights after it). "resync" when the digests
   differ: every island takes the outer state of the member holding the majority digest, and
   the step is averaged again in a new round.
4. Abort: enter the next epoch (its members are the survivors, see `membership.decide`) and
   redo from 1; the ring then divides by the new world size. After `mesh.outer_attempts` aborted
   attempts every island skips the step: all survivors saw the same aborts, so all skip it.
   mesh.max_skipped_in_a_row skipped steps in a row stop the run (islands training alone are
   not a run); mesh.enter_attempts bounds the epochs in a row an island fails to enter.
5. A commit may name a new epoch that admits joiners: everyone enters it right away.

Entering an epoch: barrier "enter", build its global groups (new store prefix; the old ones are
dropped), then every member says whether it holds the run's state; if one does not (a joiner),
the first member that does broadcasts the outer weights, the outer momentum and the progress
(inner step, outer step, run-wide sample cursor) over the new global group, raw tensors only.
An epoch in which nobody holds the state after the run has started stops with one line: it
never silently restarts the run from the initial weights.
The joiner's inner weights become the outer weights, and its AdamW starts fresh: the inner
optimizer's state is each island's own in DiLoCo (islands' AdamW states differ anyway), and
sending it would triple the transfer. A failure while entering is reported like a failed step.

Data stays disjoint however membership changes: all members agree on a run-wide sample cursor
(inner steps advance it by world x train.global_batch), island i of the epoch reads the
global_batch samples from cursor + i x global_batch, and a joiner receives the cursor.
"""

from __future__ import annotations

import re
import time
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from atoll.comm.allreduce import GlobalMean, WireStats
from atoll.comm.codecs import get_codec
from atoll.config import JobConfig
from atoll.data import PackedLoader
from atoll.digest import digest_to_tensor, tensor_digest
from atoll.diloco import DiLoCo, average_gradients
from atoll.faults import FaultInjector
from atoll.island import Island, all_ranks_ok
from atoll.mesh.groups import global_groups
from atoll.mesh.member import COMMIT, RESYNC, MeshMember
from atoll.mesh.membership import Epoch
from atoll.validation import Decision, average_accepted, decision_fields

if TYPE_CHECKING:
    from atoll.train import TrainState



def blamed_peer(error: str, epoch: Epoch) -> str | None:
    """The member a ring error names ("... from rank 2" / "... to rank 2"), for the coordinator's
    culprit rule; None when the error names no peer."""
    match = _PEER.search(error)
    if match is None or int(match.group(1)) >= epoch.world:
        return None
    return epoch.members[int(match.group(1))]


_PEER = re.compile(r"(?:from|to) rank (\d+)")


def island_first_sample(run_samples: int, island_index: int, global_batch: int) -> int:
    """The first run-wide sample island `island_index` reads in the inner step at `run_samples`."""
    return run_samples + island_index * global_batch


class IslandSync:
    """Cross-island synchronisation for one local rank; inert when `member` is None.

    `start()` enters the member's epoch (a joiner receives the run's state there): call it after
    restoring a checkpoint, so that the live state wins over a resumed island's older one.
    """

    def __init__(
        self, cfg: JobConfig, model: nn.Module, member: MeshMember | None, island: Island, state: TrainState, faults: FaultInjector,
    ) -> None:
        self.cfg = cfg
        self.member = member
        self.island = island
        self.state = state
        self.faults = faults
        self.mode = cfg.mesh.mode if member is not None else "alone"
        self.inner_steps = cfg.diloco.inner_steps
        self.wire = WireStats()
        self.mean: GlobalMean | None = None
        self.model = model
        self.diloco = (
            DiLoCo(model, cfg.diloco.outer_lr, cfg.diloco.outer_momentum, cfg.diloco.nesterov)
            if self.mode == "diloco" else None
        )
        self.outer_steps = 0
        self.skipped_in_a_row = 0
        self.ring_s = 0.0
        """Seconds of the last outer step spent in the rings themselves (the rest is protocol and waiting)."""
        self.validation: Decision | None = None
        """The last committed outer step's decision on contributions (None: it ran out of attempts)."""
        self.notes: list[str] = []
        self._phase_start = time.perf_counter()
        self._sync_s = 0.0
        if member is not None:
            self.has_state = member.epoch.number == 0  # epoch 0 is formed by islands that start the run

    def start(self) -> None:
        """Enter the member's epoch (nothing when alone). In epoch 0 every island holds a state
        (its checkpoint's, or the seeded initial weights) and the newest wins; a later joiner takes
        the live state even when it resumed from a checkpoint."""
        if self.member is not None:
            self._enter(self.member.epoch.number)

    # --- the training loop's side ----------------------------------------------------------------

    def next_batch(self, loader: PackedLoader) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's batch of the next inner step; advances the run-wide sample cursor."""
        index, world = (self.member.index, self.member.world) if self.member is not None else (0, 1)
        first = island_first_sample(self.state.samples, index, loader.global_batch)
        self.state.samples += world * loader.global_batch
        return loader.batch_at(first)

    def pause(self, seconds: float) -> None:
        """Exclude time spent outside training (evaluation, checkpoints) from compute_s."""
        self._phase_start += seconds

    def after_backward(self) -> None:
        """ddp: average this step's gradients across islands before the optimizer step."""
        if self.mode == "ddp":
            start = time.perf_counter()
            average_gradients(self.model, self.mean)
            self._sync_s += time.perf_counter() - start

    def after_step(self, step: int, is_last: bool, anneal_weight: float = 1.0) -> dict[str, Any]:
        """diloco: the outer step, when due (every H steps and at the end); returns its metrics.

        `anneal_weight` (optim.outer_anneal_weight) scales the outer step when
        diloco.anneal_with_schedule is on.
        """
        self.faults.at("inner", step)
        if self.diloco is None or (step % self.inner_steps and not is_last):
            return {}
        if self.cfg.diloco.anneal_with_schedule:
            self.diloco.anneal(anneal_weight)
        compute_s = time.perf_counter() - self._phase_start
        start = time.perf_counter()
        outer_step = self.outer_steps + 1
        self.ring_s = 0.0
        self.validation = None
        skipped, digest, attempts, epoch = self._outer_step(outer_step)
        sync_s = time.perf_counter() - start
        self._phase_start = time.perf_counter()
        if skipped and self.validation is None:
            self.notes.append(f"outer step {outer_step} skipped after {attempts} failed attempts")
        if self.validation is not None and (note := self.validation.note(outer_step)):
            self.notes.append(note)
        return {
            "outer_step": outer_step,
            "compute_s": compute_s,
            "sync_s": sync_s,
            "ring_s": self.ring_s,
            "utilization": compute_s / (compute_s + sync_s),
            "outer_digest": digest,
            "epoch": epoch.number,
            "world_size": epoch.world,
            "attempts": attempts,
            "skipped": skipped,
            **decision_fields(self.validation),
        }

    def log_fields(self) -> dict[str, Any]:
        """Cumulative wire bytes, world size and epoch for every logged record; ddp adds its timings since the last log."""
        if self.member is None:
            return {}
        record: dict[str, Any] = {
            "bytes_sent": self.wire.bytes_sent,
            "bytes_recv": self.wire.bytes_recv,
            "world_size": self.member.world,
            "epoch": self.member.epoch.number,
        }
        if self.mode == "ddp":
            compute_s = time.perf_counter() - self._phase_start - self._sync_s
            record.update(compute_s=compute_s, sync_s=self._sync_s, utilization=compute_s / (compute_s + self._sync_s))
            self._phase_start, self._sync_s = time.perf_counter(), 0.0
        return record

    def drain_notes(self) -> list[str]:
        """Membership news since the last call, for the log."""
        notes, self.notes = self.notes, []
        return notes

    def island_digest(self, shard_digest: str) -> str:
        """Digest of the whole island's outer weights: over every local rank's shard digest."""
        if self.island.world == 1:
            return shard_digest
        mine = digest_to_tensor(shard_digest).to(self.island.device)
        everyone = [torch.empty_like(mine) for _ in range(self.island.world)]
        torch.distributed.all_gather(everyone, mine)
        return tensor_digest((str(rank), t) for rank, t in enumerate(everyone))

    def stateful(self) -> dict[str, Any]:
        """What must go into this rank's checkpoint (the outer weights and momentum)."""
        return {f"diloco.rank{self.island.rank}": self.diloco} if self.diloco is not None else {}

    # --- the elastic outer step ------------------------------------------------------------------

    def _outer_step(self, outer_step: int) -> tuple[bool, str, int, Epoch]:
        """Average and apply outer step `outer_step` among whoever is alive.

        Returns (skipped, outer digest, attempts, the epoch of the last attempt).
        """
        attempts, round_ = 0, 0
        while True:
            if not self.member.barrier(f"outer-{outer_step}"):
                self._enter(self.member.next_epoch())
                round_ = 0
                continue
            if self.island.is_leader:
                self.faults.at("allreduce", outer_step)
            error = ""
            ring_start = time.perf_counter()
            try:
                decision = average_accepted(self.diloco, self.mean, self.island, self.cfg.diloco, self.member.epoch.members)
            except RuntimeError as err:  # RingError, or gloo's own error on a broken group
                error = str(err).splitlines()[0]
            self.ring_s += time.perf_counter() - ring_start
            ok = all_ranks_ok(not error, self.island)
            check = self.island_digest(self.diloco.agreement_digest()) if ok else ""
            outcome = self.member.outcome(outer_step, round_, ok, check, error, blamed_peer(error, self.member.epoch))
            attempts += 1
            epoch = self.member.epoch
            if outcome.kind == COMMIT:
                self.validation = decision  # set on every island: all posted ok
                digest = self.island_digest(self.diloco.apply() if decision.applies else self.diloco.restore_inner())
                self.outer_steps = outer_step  # before entering: a joiner receives it
                self.skipped_in_a_row = 0
                if outcome.next_epoch != epoch.number:
                    self._enter(outcome.next_epoch)
                return decision.skip, digest, attempts, epoch
            if outcome.kind == RESYNC:
                self._resync(outer_step, outcome.source)
                round_ += 1
                continue
            self.notes.append(f"outer step {outer_step} attempt {attempts} aborted in epoch {epoch.number}" + (f": {error}" if error else ""))
            if attempts >= self.cfg.mesh.outer_attempts:
                self.outer_steps = outer_step
            self._enter(self.member.next_epoch())
            round_ = 0
            if attempts >= self.cfg.mesh.outer_attempts:
                self.skipped_in_a_row += 1
                if self.skipped_in_a_row >= self.cfg.mesh.max_skipped_in_a_row:
                    raise RuntimeError(
                        f"{self.skipped_in_a_row} outer steps in a row were skipped (the islands cannot average): islands "
                        "training alone are not a run; see membership.jsonl for who failed (mesh.max_skipped_in_a_row)"
                    )
                return True, self.island_digest(tensor_digest([("outer", self.diloco.outer)])), attempts, epoch

    def _resync(self, outer_step: int, source: int) -> None:
        """The islands' digests differed: every island takes member `source`'s outer weights and
        momentum (the majority's), then the step is averaged again. A failure here is a failed
        collective like any other: the island reports it and the next attempt follows."""
        holder = self.member.epoch.members[source]
        self.notes.append(f"outer step {outer_step}: outer weights differed across islands; taking island {holder!r}'s state")
        try:
            self.diloco.broadcast_state(self.mean, source)
        except RuntimeError as err:
            self.member.report_failure(f"resync from {holder!r} failed: {str(err).splitlines()[0]}")

    def _enter(self, number: int) -> None:
        """Move to epoch `number` (or a newer one, if it fails too): barrier, groups, state.

        Raises RuntimeError if this island is not a member (the coordinator dropped it, e.g.
        after it hung past the heartbeat timeout): it must be restarted to join again; and after
        mesh.enter_attempts epochs in a row that could not be entered.
        """
        for _ in range(self.cfg.mesh.enter_attempts):
            epoch = self.member.epoch_named(number)
            if not epoch.has(self.member.island_id, self.member.incarnation):
                raise RuntimeError(
                    f"island {self.member.island_id!r} was dropped from the run in epoch {number} ({epoch.reason}); "
                    "restart it to join again"
                )
            previous, self.member.epoch = self.member.epoch, epoch
            if previous.number != number:
                self.notes.append(f"epoch {number}: {epoch.world} islands {list(epoch.members)} ({epoch.reason})")
            if not self.member.barrier("enter"):
                number = self.member.next_epoch()
                continue
            error = ""
            try:
                timeout = self.cfg.mesh.collective_timeout_s
                groups = global_groups(self.member.store_address, epoch, self.member.island_id, self.island.rank, self.cfg.comm.streams, timedelta(seconds=timeout))
                self.mean = GlobalMean(
                    groups, get_codec(self.cfg.comm.codec), timeout, int(self.cfg.comm.chunk_mb * 1e6), self.wire,
                    abandoned=lambda number=epoch.number: self.member.dissolved(number), key=self.member.epoch_key(),
                )
                self._share_state()
            except RuntimeError as err:
                error = str(err).splitlines()[0]
            if all_ranks_ok(not error, self.island):
                return
            self.member.report_failure(error or "a local rank could not enter the epoch")
            number = self.member.next_epoch()
        raise RuntimeError(f"could not enter an epoch in {self.cfg.mesh.enter_attempts} attempts in a row (mesh.enter_attempts); last: epoch {number}")

    def _share_state(self) -> None:
        """Every member ends with the newest state any member holds (raw tensors over the group,
        MAC-checked: `GlobalMean.all_gather` and `broadcast_`).

        Members share (holds the run's state?, outer step, inner step). The source is the holder
        with the most progress (lowest index on a tie); members that do not hold the state (a
        joiner) or hold an older one (an island resumed from an older checkpoint) receive its outer
        weights, momentum and progress. A joiner resumed from its checkpoint thus takes the live
        state, and a whole run resumed from checkpoints continues from the newest of them. An
        epoch in which nobody holds the state after the run has started raises.
        """
        mine = torch.tensor([int(self.has_state), self.outer_steps, self.state.step], dtype=torch.int64)
        table = [tuple(int(v) for v in row.tolist()) for row in self.mean.all_gather(mine)]
        holders = [i for i, (holds, *_) in enumerate(table) if holds]
        if not holders:
            raise RuntimeError(
                f"no island of epoch {self.member.epoch.number} holds the run's state (every holder is gone): "
                "restart the islands with --resume to continue from their newest checkpoints"
            )
        source = max(holders, key=lambda i: (table[i][1], table[i][2], -i))
        if all(row == table[source] for row in table):
            return
        if self.diloco is None:
            raise RuntimeError("ddp mode has a fixed membership and cannot admit joiners")
        progress = torch.tensor([self.state.step, self.outer_steps, self.state.samples], dtype=torch.int64)
        self.mean.broadcast_([progress], source)
        self.diloco.broadcast_state(self.mean, source)
        if (self.state.step, self.outer_steps, self.state.samples) != tuple(int(v) for v in progress.tolist()):
            self.state.step, self.outer_steps, self.state.samples = (int(v) for v in progress.tolist())
            self.notes.append(
                f"took the run's state at inner step {self.state.step}, outer step {self.outer_steps} "
                f"from island {self.member.epoch.members[source]!r}"
            )
        self.has_state = True
