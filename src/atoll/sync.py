"""How an island keeps in step with the others, as the training loop sees it.

Three modes: alone (no coordinator: nothing to do), `diloco` (an outer step every H inner steps
and at the end, elastic: islands may die, hang and join) and `ddp` (gradients averaged across
islands every step, the baseline; fixed membership: a failure ends the run).

`IslandSync` is what the loop calls: `start` before training, `next_batch` and `after_backward`
in every inner step, `after_step` after it (which runs the outer step when one is due). Each
concern lives in its own module:

- `atoll.outer_step`: the elastic outer step (barrier, validated average, agreement, commit,
  resync, abort, skip), as phases `begin` and `land`;
- `atoll.epoch_entry`: entering an epoch (groups, the run's state shared among its members);
- `atoll.held_state`: what the island holds of the run and serves to joiners;
- `atoll.joining`: how a joiner fetches the run's state before it is admitted;
- `atoll.data.cursor`: the run-wide sample cursor that keeps the islands' data disjoint;
- `atoll.sync_clock`: compute_s, sync_s, overlap_s and utilization.

Joining a running run (`start`): the joiner fetches the state (`atoll.joining`), is admitted at a
member's next boundary barrier, enters that epoch with the members, and takes part in the outer
step being averaged there with a zero contribution (it has not trained; `atoll.validation`
leaves it out of the mean).

With `diloco.overlap_steps` = tau > 0 the outer step due at boundary b is begun there and landed
after inner step b + tau (`atoll.outer_step`), its record logged then; a joiner admitted at b does
the same with the members (it trains tau steps from the state it took). Outer steps that would
land after train.steps (the last boundary, train.steps itself) block: there is nothing for them
to train behind. Nothing else waits for a landing: the loop asks
`in_flight` before it saves a checkpoint (`atoll.train`).

With `diloco.fragments` = P > 1 an outer step is due every H/P inner steps and averages one
fragment (`atoll.fragments`, `DiLoCo.select`), the last one of the run every fragment; everything
above holds per outer step, and the protocol, validation, digests and retries are the same on
the fragment's part of the buffers. The fragment of an outer step is a function of its inner step,
so resumed and joining islands agree on it without a word.

With `diloco.eager` the outer step begun at boundary b lands after inner step b + H - 1, and
the island trains the phase from the step's eager estimate (`atoll.outer_step`); the last phase
blocks, as with overlap.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from atoll.comm.allreduce import GlobalMean, WireStats
from atoll.comm.transfer import ServedState
from atoll.config import JobConfig
from atoll.data import BatchSource
from atoll.data.cursor import next_batch
from atoll.diloco import DiLoCo, average_gradients
from atoll.epoch_entry import EpochEntry
from atoll.errors import UserError
from atoll.faults import FaultInjector
from atoll.fragments import fragment_at, period
from atoll.held_state import HeldState
from atoll.island import Island
from atoll.joining import fetch_run_state, fetch_until_admitted
from atoll.mesh.link_probe import BackgroundProbe
from atoll.mesh.member import NOT_ADMITTED, MeshMember
from atoll.mesh.status import island_numbers
from atoll.outer_step import Flight, Landed, OuterStep
from atoll.sync_clock import SyncClock
from atoll.validation import decision_fields

if TYPE_CHECKING:
    from atoll.train_state import TrainState


def links_due(outer_step: int, every: int, step_epoch: int, current_epoch: int) -> bool:
    """Whether the links are re-measured after committed outer step `outer_step`
    (`comm.link_probe_every` = `every`): every `every` steps, unless the step ended by entering a new
    epoch (`step_epoch` != `current_epoch`), which measured them on entering. The same on every
    member: they commit the same steps and enter the same epochs."""
    return every > 0 and outer_step % every == 0 and step_epoch == current_epoch


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
        self.model = model
        self.faults = faults
        self.mode = cfg.mesh.mode if member is not None else "alone"
        self.clock = SyncClock()
        self.wire = WireStats()
        self.diloco = self._diloco(cfg, model) if self.mode == "diloco" else None
        if self.diloco is not None:
            faults.outer = self.diloco.outer
        # epoch 0 is formed by islands that start the run: each holds a state (a checkpoint's or the seeded weights)
        self.held = HeldState(self.diloco, state, served, has_state=member is not None and member.epoch.number == 0)
        self.notes: list[str] = []
        self.entry = EpochEntry(cfg, member, island, self.held, self.notes, self.wire) if member is not None else None
        self.protocol = OuterStep(cfg, member, island, self.held, self.entry, faults, self.notes) if self.diloco is not None else None
        self.fresh = False
        """This island joined at the current boundary and has not trained since it took the state."""
        self.flight: Flight | None = None
        """The outer step whose all-reduce runs behind training, landing after inner step `lands_at`."""
        self.lands_at = 0
        self.fragment: int | None = None
        """The fragment of the outer step begun last (None: the whole model)."""
        self.probe: BackgroundProbe | None = None
        """Links being re-measured behind training (`comm.link_probe_every`), reported before the next outer step."""
        self.owes_outer_step = False
        self.inner_state_valid = True
        """False when a joiner took the run's state of another outer step than the one its checkpoint
        held: its inner optimizer's state (AdamW moments) belongs to other weights."""

    @staticmethod
    def _diloco(cfg: JobConfig, model: nn.Module) -> DiLoCo:
        try:
            return DiLoCo(
                model, cfg.diloco.outer_lr, cfg.diloco.outer_momentum, cfg.diloco.nesterov, cfg.comm.error_feedback, cfg.diloco.fragments,
                cfg.diloco.eager,
            )
        except ValueError as err:  # more fragments than blocks
            raise UserError(f"{err} with model.name {cfg.model.name!r}") from None

    @property
    def outer_steps(self) -> int:
        """Outer steps committed or skipped (0 when the island trains alone)."""
        return self.held.outer_steps

    @outer_steps.setter
    def outer_steps(self, value: int) -> None:
        self.held.outer_steps = value

    @property
    def mean(self) -> GlobalMean | None:
        """The current epoch's global all-reduce (None before the first epoch, or alone)."""
        return self.entry.mean if self.entry is not None else None

    def start(self) -> None:
        """Enter the member's epoch (nothing when alone). In epoch 0 every island holds a state
        (its checkpoint's, or the seeded initial weights) and the newest wins; a joiner fetches the
        live state first (even when it resumed from a checkpoint), and owes the outer step being
        averaged at the boundary where it was admitted."""
        if self.member is None:
            return
        joining, held = self.member.epoch.number == NOT_ADMITTED, self.outer_steps
        if joining:
            if self.diloco is None:
                raise RuntimeError("ddp mode has a fixed membership: an island cannot join a running ddp run (restart the whole run)")
            fetch_until_admitted(
                self.member, self.cfg.mesh.transfer_attempts,
                lambda where: fetch_run_state(where, self.held, self.member, self.island, self.cfg.mesh.collective_timeout_s, self.notes),
            )
        self.entry.enter(self.member.epoch.number)
        self.fresh = self.owes_outer_step = joining and self.diloco is not None
        self.inner_state_valid = not joining or held == self.outer_steps
        self.held.publish()

    def join_outer_step(self, anneal_weight: float = 1.0) -> dict[str, Any]:
        """A joiner's first outer step: the one being averaged where it entered, with no
        contribution; overlapped like the members' when it entered at a boundary (its record is
        then the landing's, {} here), blocking when it entered at a landing (the members redo the
        step there, blocking, with it)."""
        self.owes_outer_step = False
        self.clock.restart()  # it trained nothing for this step
        step = self.held.progress.step
        boundary = self.began_at(step)
        fragment = self.fragment_at(boundary, boundary >= self.cfg.train.steps)
        return self._measure_after(self._outer_record(anneal_weight, self._landing_step(step), fragment))

    def began_at(self, step: int) -> int:
        """The inner step after which the outer step being averaged at inner step `step` began:
        `step` at a boundary (and at the run's last step), else the boundary before it (an
        overlapped step lands tau < H/P steps after its boundary)."""
        return step if step >= self.cfg.train.steps else step - step % self.period

    # --- the training loop's side ----------------------------------------------------------------

    def next_batch(self, loader: BatchSource) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's batch of the next inner step; advances the run-wide sample cursor."""
        index, world = (self.member.index, self.member.world) if self.member is not None else (0, 1)
        return next_batch(loader, self.held.progress, index, world)

    def pause(self, seconds: float) -> None:
        """Exclude time spent outside training (evaluation, checkpoints) from compute_s."""
        self.clock.pause(seconds)

    def after_backward(self) -> None:
        """ddp: average this step's gradients across islands before the optimizer step."""
        if self.mode == "ddp":
            with self.clock.blocked():
                average_gradients(self.model, self.mean)

    def after_step(self, step: int, is_last: bool, anneal_weight: float = 1.0) -> dict[str, Any]:
        """diloco: the outer step, when due (every H steps and at the end); returns its metrics.

        `anneal_weight` (optim.outer_step_weight) scales the outer step's lr and momentum.
        """
        self.faults.at("inner", step)
        if self.flight is not None and step == self.lands_at:
            record = self._land()
        elif self.outer_step_due(step, is_last):
            record = self._outer_record(anneal_weight, self._landing_step(step), self.fragment_at(step, is_last))
        else:
            return {}
        return record if is_last else self._measure_after(record)

    def _measure_after(self, record: dict[str, Any]) -> dict[str, Any]:
        """After a committed outer step's `record` (not the run's last), start re-measuring the
        links behind training when they are due (`links_due`); the next outer step reports them."""
        if record and links_due(record["outer_step"], self.cfg.comm.link_probe_every, record["epoch"], self.member.epoch.number):
            self.probe = self.member.measure_links_behind(self.mean.groups, self.cfg.comm.ring_order)
        return record

    def _landing_step(self, step: int) -> int | None:
        """Where an outer step begun after inner step `step` lands: tau steps later if it begins at
        a boundary and lands before train.steps, else None (it blocks). A joiner admitted when a
        retry is redone at a landing step blocks too, so it commits with the members."""
        tau = self.cfg.diloco.inner_steps - 1 if self.cfg.diloco.eager else self.cfg.diloco.overlap_steps
        if tau and step % self.period == 0 and step + tau < self.cfg.train.steps:
            return step + tau
        return None

    @property
    def period(self) -> int:
        """Inner steps between outer steps: H, or H/P with fragments (`atoll.fragments`)."""
        return period(self.cfg.diloco.inner_steps, self.cfg.diloco.fragments)

    def fragment_at(self, step: int, is_last: bool) -> int | None:
        """The fragment the outer step after inner step `step` averages; None: the whole model."""
        return fragment_at(step, is_last, self.cfg.diloco.inner_steps, self.cfg.diloco.fragments)

    def outer_step_due(self, step: int, is_last: bool) -> bool:
        """Whether `after_step(step, is_last)` begins an outer step."""
        return self.diloco is not None and (step % self.period == 0 or is_last)

    def outer_state_changes(self, step: int, is_last: bool) -> bool:
        """Whether `after_step(step, is_last)` may change the outer weights and momentum: an outer
        step begins (and may block) or one lands."""
        return self.outer_step_due(step, is_last) or (self.flight is not None and step == self.lands_at)

    @property
    def in_flight(self) -> bool:
        """An outer step's all-reduce runs behind training (`diloco.overlap_steps`)."""
        return self.flight is not None

    def _outer_record(self, anneal_weight: float, lands_at: int | None = None, fragment: int | None = None) -> dict[str, Any]:
        """Run the next outer step, of `fragment` (None: the whole model), blocking; or, with
        `lands_at`, begin it and land it after that inner step (its record is then `_land`'s)."""
        self.diloco.anneal(anneal_weight)
        self.diloco.select(fragment)
        self.fragment = fragment
        with self.clock.blocked():
            if self.probe is not None:
                self.member.report_links(self.probe)
                self.probe = None
            flight = self.protocol.begin(self.outer_steps + 1, self.fresh, behind=lands_at is not None)
            landed = self.protocol.land(flight) if lands_at is None else None
            if landed is None and self.cfg.diloco.eager:
                self.diloco.eager_start(self.member.epoch.world)
        self.fresh = False
        if landed is None:
            self.flight, self.lands_at = flight, lands_at
            return {}
        return self._record(landed)

    def _land(self) -> dict[str, Any]:
        """Land the outer step in flight; the wait for its all-reduce is blocked time, the rest of its run overlap."""
        flight, self.flight = self.flight, None
        with self.clock.blocked():
            landing = time.perf_counter()
            landed = self.protocol.land(flight)
        self.clock.overlapped(flight.overlap_s(landing))
        if self.cfg.diloco.eager and landed.decision is not None and self.member.island_id in landed.decision.rejected:
            self.fresh = True  # reset to the outer weights: it has no phase of its own to contribute to the next step
        return self._record(landed)

    def _record(self, landed: Landed) -> dict[str, Any]:
        """The outer step's metrics record (and its notes for the log)."""
        if landed.skipped and landed.decision is None:
            self.notes.append(f"outer step {landed.outer_step} skipped after {landed.attempts} failed attempts")
        if landed.decision is not None and (note := landed.decision.note(landed.outer_step)):
            self.notes.append(note)
        return {
            "outer_step": landed.outer_step,
            **({"fragment": self.fragment} if self.cfg.diloco.fragments > 1 else {}),
            **self.clock.take(),
            "ring_s": landed.ring_s,
            "outer_digest": landed.digest,
            "epoch": landed.epoch.number,
            "world_size": landed.epoch.world,
            "attempts": landed.attempts,
            "skipped": landed.skipped,
            **decision_fields(landed.decision),
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
            times = self.clock.take()
            record.update(compute_s=times["compute_s"], sync_s=times["sync_s"], utilization=times["utilization"])
        return record

    def report_numbers(self, record: dict[str, Any]) -> None:
        """Keep a metrics record's few numbers (loss, tokens/s, ...) for the coordinator's status
        page: the next outer step's boundary barrier carries them (`atoll.mesh.status`)."""
        if self.member is not None:
            self.member.numbers = {**self.member.numbers, **island_numbers(record)}

    def drain_notes(self) -> list[str]:
        """Membership news since the last call, for the log."""
        notes = self.notes[:]
        self.notes.clear()  # the list is shared with the epoch entry and the outer step
        return notes

    def stateful(self) -> dict[str, Any]:
        """What must go into this rank's checkpoint (the outer weights and momentum)."""
        return {f"diloco.rank{self.island.rank}": self.diloco} if self.diloco is not None else {}
