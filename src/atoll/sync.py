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
   outer momentum, averaged pseudo-gradient), or fail.
3. Outcome, decided once per step, epoch and round by the coordinator: "commit" when every member
   posted ok with the same digest; "abort" when the epoch was dissolved first. Only a commit
   applies the outer step, so no island ever applies an update the others did not (and equal
   digests before the step mean equal outer weights and momentum after it). "resync" when the digests
   differ: every island takes the outer state of the member holding the majority digest, and
   the step is averaged again in a new round.
4. Abort: enter the next epoch (its members are the survivors, see `membership.decide`) and
   redo from 1; the ring then divides by the new world size. After `mesh.outer_attempts` aborted
   attempts every island skips the step: all survivors saw the same aborts, so all skip it.
   mesh.max_skipped_in_a_row skipped steps in a row stop the run (islands training alone are
   not a run); mesh.enter_attempts bounds the epochs in a row an island fails to enter.

Joining a running run (`start`): the joiner has built its model before it registered. The
coordinator tells it where the members serve their state; it fetches the outer weights, momentum
and progress of the last committed outer step from all of them at once, in the background of
their training (`atoll.comm.transfer`: chunked, sha256-checked, token holders only), tells the
coordinator it is ready, and is admitted when a member reaches the next boundary barrier: the
members enter the new epoch from there, and the joiner takes part in that outer step with a zero
contribution (it has not trained; `atoll.validation` leaves it out of the mean). A fetch that
fails `mesh.transfer_attempts` times falls back to a broadcast on entering.

Entering an epoch: barrier "enter", build its global groups (new store prefix; the old ones are
dropped), then every member says whether it holds the run's state and at which outer step; if
one does not, or holds an older one (an island resumed from an older checkpoint, a joiner whose
fetch failed), the holder with the most progress broadcasts the outer weights, the outer
momentum and the progress (inner step, outer step, run-wide sample cursor) over the new global
group, raw tensors only; a joiner that fetched the state receives only the progress (three
integers). An epoch in which nobody holds the state after the run has started stops with one
line: it never silently restarts the run from the initial weights.
The joiner's inner weights become the outer weights, and its AdamW starts fresh: the inner
optimizer's state is each island's own in DiLoCo (islands' AdamW states differ anyway), and
sending it would triple the transfer. A failure while entering is reported like a failed step.

Data stays disjoint however membership changes: all members agree on a run-wide sample cursor
(inner steps advance it by world x train.global_batch), island i of the epoch reads the
global_batch samples from cursor + i x global_batch, and a joiner receives the cursor.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from atoll import errors
from atoll.comm.allreduce import GlobalMean, WireStats
from atoll.comm.codecs import get_codec
from atoll.comm.transfer import ServedState, Source, TransferError, fetch_state
from atoll.config import JobConfig
from atoll.data import PackedLoader
from atoll.digest import digest_to_tensor, tensor_digest
from atoll.diloco import DiLoCo, average_gradients
from atoll.errors import ExpectedFailure
from atoll.faults import FaultInjector
from atoll.island import Island, all_ranks_ok, broadcast_ints
from atoll.mesh.groups import gloo_device, global_groups
from atoll.mesh.member import COMMIT, NOT_ADMITTED, RESYNC, MeshMember
from atoll.mesh.membership import Epoch
from atoll.mesh.rendezvous import EpochStore
from atoll.mesh.status import island_numbers
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
FETCH_RETRY_S = 0.2
"""A joiner's pause before it fetches again after a failed fetch: long enough for the sources to
finish applying an outer step (they withdraw their state for the milliseconds that takes), short
against an inner phase, whose commit would make the next fetch stale."""


def island_first_sample(run_samples: int, island_index: int, global_batch: int) -> int:
    """The first run-wide sample island `island_index` reads in the inner step at `run_samples`."""
    return run_samples + island_index * global_batch


class IslandSync:
    """Cross-island synchronisation for one local rank; inert when `member` is None.

    `start()` enters the member's epoch (a joiner first fetches the run's state): call it after
    restoring a checkpoint, so that the live state wins over a resumed island's older one. Then,
    if `owes_outer_step`, call `join_outer_step` before training. `served` is what this rank's
    state server serves to joiners (kept current here), or None.
    """

    def __init__(
        self, cfg: JobConfig, model: nn.Module, member: MeshMember | None, island: Island, state: TrainState, faults: FaultInjector,
        served: ServedState | None = None,
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
            DiLoCo(model, cfg.diloco.outer_lr, cfg.diloco.outer_momentum, cfg.diloco.nesterov, cfg.comm.error_feedback)
            if self.mode == "diloco" else None
        )
        if self.diloco is not None:
            faults.outer = self.diloco.outer
        self.outer_steps = 0
        self.skipped_in_a_row = 0
        self.ring_s = 0.0
        """Seconds of the last outer step spent in the rings themselves (the rest is protocol and waiting)."""
        self.validation: Decision | None = None
        """The last committed outer step's decision on contributions (None: it ran out of attempts)."""
        self.notes: list[str] = []
        self.served = served
        self.fresh = False
        """This island joined at the current boundary and has not trained since it took the state."""
        self.owes_outer_step = False
        self.inner_state_valid = True
        """False when a joiner took the run's state of another outer step than the one its checkpoint
        held: its inner optimizer's state (AdamW moments) belongs to other weights."""
        self._phase_start = time.perf_counter()
        self._sync_s = 0.0
        if member is not None:
            self.has_state = member.epoch.number == 0  # epoch 0 is formed by islands that start the run

    def start(self) -> None:
        """Enter the member's epoch (nothing when alone). In epoch 0 every island holds a state
        (its checkpoint's, or the seeded initial weights) and the newest wins; a joiner fetches the
        live state first (even when it resumed from a checkpoint), and owes the outer step being
        averaged at the boundary where it was admitted."""
        if self.member is None:
            return
        joining, held = self.member.epoch.number == NOT_ADMITTED, self.outer_steps
        if joining:
            self._fetch_until_admitted()
        self._enter(self.member.epoch.number)
        self.fresh = self.owes_outer_step = joining and self.diloco is not None
        self.inner_state_valid = not joining or held == self.outer_steps
        self._publish()

    def join_outer_step(self, anneal_weight: float = 1.0) -> dict[str, Any]:
        """A joiner's first outer step: the one being averaged where it entered, with no contribution."""
        self.owes_outer_step = False
        self._phase_start = time.perf_counter()  # it trained nothing for this step
        return self._outer_record(anneal_weight)

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
        if not self.outer_step_due(step, is_last):
            return {}
        return self._outer_record(anneal_weight)

    def outer_step_due(self, step: int, is_last: bool) -> bool:
        """Whether `after_step(step, is_last)` runs an outer step."""
        return self.diloco is not None and (step % self.inner_steps == 0 or is_last)

    def _outer_record(self, anneal_weight: float) -> dict[str, Any]:
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

    def report_numbers(self, record: dict[str, Any]) -> None:
        """Keep a metrics record's few numbers (loss, tokens/s, ...) for the coordinator's status
        page: the next outer step's boundary barrier carries them (`atoll.mesh.status`)."""
        if self.member is not None:
            self.member.numbers = {**self.member.numbers, **island_numbers(record)}

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
                if self.faults.ring_broken:
                    raise RuntimeError("this island's ring cannot reach its peers (injected fault: break)")
                decision = average_accepted(self.diloco, self.mean, self.island, self.cfg.diloco, self.member.epoch.members, self.fresh)
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
                with self._changing():
                    shard_digest = self.diloco.apply() if decision.applies else self.diloco.restore_inner()
                    self.outer_steps = outer_step  # before entering: a joiner receives it
                digest = self.island_digest(shard_digest)
                self.skipped_in_a_row, self.fresh = 0, False
                if outcome.next_epoch != epoch.number:
                    self._enter(outcome.next_epoch)
                return decision.skip, digest, attempts, epoch
            if outcome.kind == RESYNC:
                self._resync(outer_step, outcome.source)
                round_ += 1
                continue
            self.notes.append(f"outer step {outer_step} attempt {attempts} aborted in epoch {epoch.number}" + (f": {error}" if error else ""))
            if attempts >= self.cfg.mesh.outer_attempts:
                with self._changing():
                    self.outer_steps, self.fresh = outer_step, False
            self._enter(self.member.next_epoch())
            round_ = 0
            if attempts >= self.cfg.mesh.outer_attempts:
                self.skipped_in_a_row += 1
                if self.skipped_in_a_row >= self.cfg.mesh.max_skipped_in_a_row:
                    raise ExpectedFailure(
                        f"{self.skipped_in_a_row} outer steps in a row were skipped (the islands cannot average): islands "
                        "training alone are not a run; see membership.jsonl for who failed (mesh.max_skipped_in_a_row)",
                        errors.SKIPPED_STEPS,
                    )
                return True, self.island_digest(self.diloco.state_digest()), attempts, epoch

    def _resync(self, outer_step: int, source: int) -> None:
        """The islands' digests differed: every island takes member `source`'s outer weights and
        momentum (the majority's), then the step is averaged again. A failure here is a failed
        collective like any other: the island reports it and the next attempt follows."""
        holder = self.member.epoch.members[source]
        self.notes.append(f"outer step {outer_step}: outer weights differed across islands; taking island {holder!r}'s state")
        try:
            with self._changing():
                self.diloco.broadcast_state(self.mean, source)
        except RuntimeError as err:
            self.member.report_failure(f"resync from {holder!r} failed: {str(err).splitlines()[0]}")

    def _enter(self, number: int) -> None:
        """Move to epoch `number` (or a newer one, if it fails too): barrier, groups, state.

        Raises ExpectedFailure if this island is not a member (DROPPED: the coordinator dropped it,
        e.g. after it hung past the heartbeat timeout): it must be restarted to join again; and
        after mesh.enter_attempts epochs in a row that could not be entered (CANNOT_ENTER).
        """
        for _ in range(self.cfg.mesh.enter_attempts):
            tried, epoch = number, self.member.epoch_named(number)
            if not epoch.has(self.member.island_id, self.member.incarnation):
                raise ExpectedFailure(
                    f"island {self.member.island_id!r} was dropped from the run in epoch {number} ({epoch.reason}); "
                    "restart it to join again", errors.DROPPED,
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
                rendezvous = lambda prefix: EpochStore(self.member.client, epoch.number, prefix, timedelta(seconds=timeout))  # noqa: E731
                groups = global_groups(
                    rendezvous, epoch, self.member.island_id, self.island.rank, self.cfg.comm.streams, timedelta(seconds=timeout),
                    lambda: gloo_device(self.cfg.mesh),
                )
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
        raise ExpectedFailure(
            f"could not enter an epoch in {self.cfg.mesh.enter_attempts} attempts in a row (mesh.enter_attempts); last: epoch "
            f"{tried}; see membership.jsonl for who failed", errors.CANNOT_ENTER,
        )

    def _share_state(self) -> None:
        """Every member ends with the newest state any member holds (raw tensors over the group,
        MAC-checked: `GlobalMean.all_gather` and `broadcast_`).

        Members share (holds the run's state?, outer step, inner step, sample cursor). The source
        is the holder with the most progress (lowest index on a tie); members that do not hold the
        state or hold one of an older outer step (an island resumed from an older checkpoint, a
        joiner whose fetch failed) receive its outer weights and momentum; members whose progress
        differs receive the progress. A joiner that fetched the state of the current outer step
        thus receives three integers; a whole run resumed from checkpoints continues from the
        newest of them. An epoch in which nobody holds the state after the run has started raises.
        """
        mine = torch.tensor([int(self.has_state), self.outer_steps, self.state.step, self.state.samples], dtype=torch.int64)
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
        whole = any(not holds or outer != table[source][1] for holds, outer, *_ in table)
        if whole:
            with self._changing():
                self.diloco.broadcast_state(self.mean, source)
        if (self.state.step, self.outer_steps, self.state.samples) != tuple(int(v) for v in progress.tolist()):
            self.state.step, self.outer_steps, self.state.samples = (int(v) for v in progress.tolist())
            what = "state (weights and momentum by broadcast)" if whole else "progress"
            self.notes.append(
                f"took the run's {what} at inner step {self.state.step}, outer step {self.outer_steps} "
                f"from island {self.member.epoch.members[source]!r}"
            )
        self.has_state = True

    # --- serving and fetching the run's state -------------------------------------------------------

    @contextlib.contextmanager
    def _changing(self) -> Iterator[None]:
        """Change the outer state (and `outer_steps`) with this rank's state server withdrawn, then serve the new version."""
        if self.served is None:
            yield
            return
        with self.served.changing():
            yield
        self._publish()

    def _publish(self) -> None:
        """Serve this rank's outer state as of `outer_steps` (when it holds the run's state)."""
        if self.served is not None and self.diloco is not None and self.has_state:
            self.served.publish(self.outer_steps, self.diloco.served_buffers(), self.state.step, self.state.samples)

    def _fetch_until_admitted(self) -> None:
        """A joiner's way in: fetch the state where the coordinator says, say it is ready, wait for
        admission; again while the state it fetched goes stale (a step was committed meanwhile).
        A failed fetch (say, every source was applying an outer step and withdrew its state) is
        tried again after FETCH_RETRY_S, with the sources the coordinator names then. After
        mesh.transfer_attempts fetches that failed or went stale it says it is ready without a
        state and takes it by broadcast on entering. Waits for admission are unbounded while the
        run lives."""
        if self.diloco is None:
            raise RuntimeError("ddp mode has a fixed membership: an island cannot join a running ddp run (restart the whole run)")
        attempts = 0
        while self.member.fetch is not None:
            step = -1
            if attempts < self.cfg.mesh.transfer_attempts:
                attempts += 1
                step = self._fetch(self.member.fetch)
                if step < 0 and attempts < self.cfg.mesh.transfer_attempts:
                    time.sleep(FETCH_RETRY_S)
                    self.member.admit()  # answered at once: where to fetch now
                    continue
            self.member.post_ready(step)
            self.member.admit()  # admitted; or, the state being stale, where to fetch now

    def _fetch(self, where: dict[str, Any]) -> int:
        """Every local rank fetches its shard of the state from the same local rank of every source
        (`atoll.comm.transfer.fetch_state`); the outer step it is of, or -1 if any rank failed or the
        ranks got different versions (the buffers are then not used: `has_state` stays False)."""
        sources = [Source(s["island"], s["host"], int(s["ports"][self.island.rank])) for s in where["sources"]]
        version, report, error = -1, None, "no island serves the state"
        if sources:
            try:
                report = fetch_state(sources, self.member.client.key, self.member.island_id, self.diloco.transfer_buffers(), self.cfg.mesh.collective_timeout_s)
                version = report.manifest.version
            except TransferError as err:
                error = str(err)
        leader_version = broadcast_ints([version], self.island)[0]
        if not all_ranks_ok(version >= 0 and version == leader_version, self.island):
            self.notes.append(f"fetching the run's state failed: {error if report is None else 'another local rank failed'}")
            self.has_state = False  # the buffers are partly overwritten
            return -1
        manifest = report.manifest
        self.diloco.took_state(any(name == "momentum" for name, _ in manifest.tensors))
        self.has_state, self.outer_steps = True, manifest.version
        self.state.step, self.state.samples = manifest.step, manifest.samples
        self.notes.append(report.describe())
        return version
