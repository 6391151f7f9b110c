"""The training loop of one island: build everything, then step, log, evaluate and checkpoint.

Reads top to bottom: `train()` claims the run directory and starts the island, `_train_in()`
assembles the pieces (`atoll.startup`: data, model, place in the run, optimizer, checkpoints,
metrics) and `_loop()` runs inner steps (`atoll.inner_step`) until `train.steps`, calling
`IslandSync` at outer boundaries (`atoll.sync`). Everything it keeps across a restart is a
`Stateful` in `Parts.stateful` (`atoll.train_state`), so a resumed run continues bit-for-bit.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from atoll.checkpoint import Checkpointer, SaveReport
from atoll.comm.transfer import StateServer
from atoll.config import JobConfig
from atoll.data import weighted_mean
from atoll.errors import ExpectedFailure, say
from atoll.fragments import last_averaged
from atoll.guard import InnerGuard
from atoll.inner_step import train_step
from atoll.island import (
    Island,
    all_reduce_mean,
    broadcast_text,
    start_island,
    stop_island,
)
from atoll.launch import default_run_dir, exit_with_launcher
from atoll.logs import heartbeat, set_island
from atoll.logs import info as log_line
from atoll.mesh.member import preflight
from atoll.metrics import MetricsLog, check_sinks
from atoll.model import count_params
from atoll.optim import lr_factor, outer_step_weight, set_lr, weight_kept
from atoll.resume import claim_run_dir
from atoll.startup import (
    Deathrattle,
    Metrics,
    Parts,
    assemble,
    enter_run,
    island_id,
    open_metrics,
    record_run,
    resume_from,
    serve_state,
)
from atoll.sync import IslandSync
from atoll.train_state import checkpoint_facts
from atoll.val_loss import evaluate


def describe_save(report: SaveReport) -> str:
    """The log line of a finished save."""
    return (f"checkpoint saved: {report.path} ({report.bytes / 1e6:.1f} MB in {report.total_s:.2f}s, "
            f"training blocked {report.blocked_s:.3f}s)")


@dataclass
class TrainResult:
    """What a finished run reports back to its caller (the CLI, benchmarks, tests)."""

    run_dir: Path
    steps: int
    final_loss: float
    final_val_loss: float | None
    init_digest: str


def set_outer_weight_decay(sync: IslandSync, cfg: JobConfig, step: int, trained_phase: bool) -> None:
    """Before the outer step at `step`: the inner phase's weight decay, which the outer step takes
    out of the pseudo-gradient and applies once (diloco.decouple_weight_decay). Each fragment's
    phase began where it was last averaged (`atoll.fragments.last_averaged`: the last multiple of H
    before `step` without fragments); an island that did not train it (a joiner) kept all of it."""
    if not cfg.diloco.decouple_weight_decay:
        return
    fragment = sync.fragment_at(step, step == cfg.train.steps)
    for f in range(cfg.diloco.fragments) if fragment is None else [fragment]:
        start = last_averaged(step, f, cfg.diloco.inner_steps, cfg.diloco.fragments)
        run = weight_kept(start, step, cfg.train.steps, cfg.optim.lr, cfg.optim.weight_decay, cfg.schedule)
        sync.diloco.set_weight_kept(own=run if trained_phase else 1.0, run=run, fragment=f)


def train(cfg: JobConfig, run_dir: Path | None = None, resume: str | None = None) -> TrainResult:
    """Train one island as configured, writing config, metrics and checkpoints into run_dir.

    run_dir None means runs/<train.run_name>-<timestamp>[-<island id>], with local rank 0's
    timestamp. A fresh run refuses a run_dir that holds another run, and any run refuses one that
    another live process holds (UserError).
    An island in a mesh leaves with a deathrattle when it finishes, raises or gets SIGTERM
    (turned into SystemExit here), so the coordinator drops it at once; only SIGKILL, a hang or a
    lost machine go unannounced (the peers' broken collectives or the heartbeat timeout tell).
    """
    exit_with_launcher()
    check_sinks(cfg.metrics)  # a missing extra is said before anything is built
    island = start_island(cfg.train.device)
    deathrattle = Deathrattle()
    if cfg.mesh.coordinator:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        ident = island_id(cfg, island) if cfg.mesh.coordinator else cfg.mesh.island_id
        set_island(ident, island.rank)
        run_dir = Path(broadcast_text(str(run_dir or default_run_dir(cfg.train.run_name, ident)), island))
        result = _train(cfg, run_dir, resume, island, ident, deathrattle)
    except BaseException as err:
        if isinstance(err, ExpectedFailure):
            say(err)  # now: the clean-up below can outlast torchrun's patience with this rank
        deathrattle(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}".rstrip(": "))
        raise
    finally:
        heartbeat.doing(None)
        stop_island()
    deathrattle("finished")
    return result


def _train(cfg: JobConfig, run_dir: Path, resume: str | None, island: Island, ident: str | None, deathrattle: Deathrattle) -> TrainResult:
    if cfg.mesh.coordinator:  # an unreachable coordinator, a wrong token or a duplicate id is said now, not after the model is built
        preflight(cfg.mesh, ident, island)
    lock = claim_run_dir(run_dir, resume, ident, island)
    checkpointer = Checkpointer(
        run_dir / "checkpoints", cfg.checkpoint.keep, island.is_leader,
        asynchronous=cfg.checkpoint.asynchronous, remote_url=cfg.checkpoint.remote,
        remote_attempts=cfg.checkpoint.remote_attempts, remote_backoff_s=cfg.checkpoint.remote_backoff_s,
    )
    server = serve_state(cfg, island)
    try:
        return _train_in(cfg, run_dir, resume, island, ident, deathrattle, checkpointer, server)
    except BaseException:
        with contextlib.suppress(Exception):  # finish the save in flight: nothing saved is lost
            checkpointer.close()
        raise
    finally:
        if server is not None:
            server.stop()
        if lock is not None:
            lock.release()


def _train_in(
    cfg: JobConfig, run_dir: Path, resume: str | None, island: Island, ident: str | None, deathrattle: Deathrattle, checkpointer: Checkpointer,
    server: StateServer | None,
) -> TrainResult:
    def doing(what: str | None) -> None:
        """What the island does now: the leader says it every logs.HEARTBEAT_S seconds of silence."""
        if island.is_leader:
            heartbeat.doing(what)

    say_line = log_line if island.is_leader else (lambda line: None)
    parts = assemble(cfg, island, ident, deathrattle, server, doing, say_line)
    state, sync = parts.state, parts.sync
    doing("opening the checkpoints")
    resumed = resume_from(parts, cfg, run_dir, resume, ident, island, checkpointer)
    if resumed is not None and state.step >= cfg.train.steps:
        say_line(f"atoll: the run is complete: {resumed.path} is at step {state.step} of train.steps {cfg.train.steps}; nothing to do")
        return TrainResult(run_dir, state.step, float("nan"), None, parts.init_digest)
    enter_run(parts, resumed, say_line)
    record_run(parts, cfg, run_dir, island, checkpointer)
    metrics = open_metrics(parts, cfg, run_dir, ident, island, checkpointer)
    log = metrics.log
    outer_digest = resumed.outer_digest if resumed is not None else None
    if sync.owes_outer_step:  # a joiner admitted at a barrier: the outer step being averaged there
        boundary = sync.began_at(state.step)
        set_outer_weight_decay(sync, cfg, boundary, trained_phase=False)
        record = sync.join_outer_step(outer_step_weight(boundary - 1, cfg.train.steps, cfg.schedule, cfg.diloco))
        outer_digest = record.get("outer_digest", outer_digest)
        for note in sync.drain_notes():
            log.info(f"atoll: {note}")
        if record:  # an overlapped one is logged where it lands
            log.log({"step": state.step, "tokens": state.tokens, **sync.log_fields(), **record})
    log.info(
        f"atoll: {cfg.model.name} model ({count_params(parts.args)['total'] / 1e6:.2f}M params, init sha256 {parts.init_digest[:12]}) "
        f"on {island.world} local rank(s), {island.device.type}; batch {cfg.train.global_batch}x{parts.seq_len} tokens "
        f"({parts.accum} accumulation step(s)); run dir {run_dir}"
        + (f"; resumed at step {state.step} from {resumed.path} (timeline {resumed.timeline})" if resumed is not None else "")
    )
    for line in parts.data.summaries:
        log.info(f"atoll: data: {line}")
    loss, val_loss = _loop(cfg, island, parts, checkpointer, metrics, outer_digest, doing)
    doing("finishing the last checkpoint")
    for done in checkpointer.close():
        log.info(describe_save(done))
    log.info(f"atoll: done: {state.step} steps, loss {loss:.4f}"
             + (f", val_loss {val_loss:.4f}" if val_loss is not None else "") + f"; run dir {run_dir}")
    log.close()
    return TrainResult(run_dir, state.step, loss, val_loss, parts.init_digest)


class Window:
    """Tokens and wall time since the last metrics row, less the time spent outside training."""

    def __init__(self, sync: IslandSync) -> None:
        self.sync = sync
        self.start, self.tokens = time.perf_counter(), 0
        self.checkpoint_blocked = 0.0
        """Seconds checkpoints blocked training since the last row."""

    def outside_training(self, seconds: float, checkpoint: bool = False) -> None:
        """Exclude `seconds` (evaluation, or training blocked by a checkpoint) from throughput and compute_s."""
        self.start += seconds
        self.checkpoint_blocked += seconds if checkpoint else 0.0
        self.sync.pause(seconds)

    def close(self) -> tuple[float, float]:
        """(tokens/s, seconds checkpoints blocked) since the last row; starts the next window."""
        rate, blocked = self.tokens / (time.perf_counter() - self.start), self.checkpoint_blocked
        self.start, self.tokens, self.checkpoint_blocked = time.perf_counter(), 0, 0.0
        return rate, blocked


def _loop(
    cfg: JobConfig, island: Island, parts: Parts, checkpointer: Checkpointer, metrics: Metrics, outer_digest: str | None,
    doing: Callable[[str], None],
) -> tuple[float, float | None]:
    """Inner steps until train.steps, with outer steps, evaluation, checkpoints and metrics rows
    where due; returns the last logged loss and validation loss."""
    state, sync, log = parts.state, parts.sync, metrics.log
    guard = InnerGuard(cfg.train.max_skipped_inner, island, sync.diloco, log.info)
    window = Window(sync)
    tokens_per_step = cfg.train.global_batch * parts.seq_len
    loss_value, val_loss = float("nan"), None
    schedule = SaveSchedule(cfg)

    def staged(everything: bool = False) -> None:
        """Let the save in flight finish copying what training is about to change."""
        window.outside_training(checkpointer.staged(everything), checkpoint=True)

    def after_backward() -> None:
        sync.after_backward()
        staged()

    while state.step < cfg.train.steps:
        doing(f"training: inner step {state.step + 1} of {cfg.train.steps}")
        lr = cfg.optim.lr * lr_factor(state.step, cfg.train.steps, cfg.schedule)
        set_lr(parts.optimizer, lr)
        inputs, targets = sync.next_batch(parts.loader)
        loss, grad_norm = train_step(parts.model, parts.optimizer, inputs, targets, parts.accum, cfg, island, after_backward, guard, state.step + 1)
        state.step += 1
        state.tokens += tokens_per_step
        window.tokens += tokens_per_step

        is_last = state.step == cfg.train.steps
        if sync.outer_state_changes(state.step, is_last):
            staged(everything=True)  # the outer step changes the outer weights and momentum
        if sync.outer_step_due(state.step, is_last):
            set_outer_weight_decay(sync, cfg, state.step, trained_phase=True)
        record = sync.after_step(state.step, is_last, outer_step_weight(state.step - 1, cfg.train.steps, cfg.schedule, cfg.diloco))
        outer_digest = record.get("outer_digest", outer_digest)
        for note in [*sync.drain_notes(), *parts.loader.drain_notes()]:
            log.info(f"atoll: {note}")
        if cfg.eval.every and (state.step % cfg.eval.every == 0 or is_last):
            val_loss = _evaluate(parts, cfg, island, record, window, doing)
        saving = _save_if_due(parts, cfg, checkpointer, outer_digest, is_last, window, log, staged, schedule)
        if state.step % cfg.metrics.log_every == 0 or is_last or record or saving:
            loss_value = float(all_reduce_mean(loss))
            _log_row(parts, checkpointer, window, metrics, island, record, loss_value, lr, float(grad_norm), guard.skipped)
    return loss_value, val_loss


def _evaluate(parts: Parts, cfg: JobConfig, island: Island, record: dict[str, Any], window: Window, doing: Callable[[str], None]) -> float:
    """The validation loss into `record` (per source for a mixture), its time left out of training's."""
    doing(f"evaluating after inner step {parts.state.step}")
    start = time.perf_counter()
    val_losses = evaluate(parts.model, parts.data, parts.seq_len, cfg, island)
    val_loss = weighted_mean(val_losses, parts.data.names, parts.data.weights)
    record["val_loss"] = val_loss
    if parts.data.mixture:
        record["val_loss_by_source"] = val_losses
    window.outside_training(time.perf_counter() - start)
    return val_loss


class SaveSchedule:
    """Checkpoints every checkpoint.every steps and at the end (checkpoint.at_end). A save due while
    an outer step's all-reduce runs behind training is taken when it lands (diloco.overlap_steps
    later): a checkpoint never holds half an outer step, so whole-run resume stays exact without
    saving what is in flight (the held contribution, the ring's partial sums, the decision)."""

    def __init__(self, cfg: JobConfig) -> None:
        self.cfg = cfg
        self.deferred = False

    def due(self, step: int, is_last: bool, in_flight: bool) -> bool:
        """Whether to save after inner step `step`."""
        every = self.cfg.checkpoint.every
        due = self.deferred or bool(every and step % every == 0) or (is_last and self.cfg.checkpoint.at_end)
        self.deferred = due and in_flight
        return due and not in_flight


def _save_if_due(
    parts: Parts, cfg: JobConfig, checkpointer: Checkpointer, outer_digest: str | None, is_last: bool, window: Window,
    log: MetricsLog, staged: Callable[[bool], None], schedule: SaveSchedule,
) -> bool:
    """Start a checkpoint save when `schedule` says; the last one is waited for, and so is the last
    remote copy (checkpoint.remote_final_wait_s). Whether a save started."""
    step = parts.state.step
    saving = schedule.due(step, is_last, parts.sync.in_flight)
    if saving:
        started = checkpointer.save(step, parts.stateful, checkpoint_facts(parts.sync, outer_digest), later=parts.sync.stateful().keys())
        if started.waited_s > 0.01:
            log.info(f"atoll: checkpoint: the previous save was still being written; training waited {started.waited_s:.2f}s "
                     "for it (a save takes longer than checkpoint.every steps)")
        window.outside_training(started.blocked_s, checkpoint=True)
        if is_last:
            staged(True)
            checkpointer.wait()  # the last record reports the last save's times
    if is_last:  # and how the last remote copy went
        checkpointer.wait_remote(cfg.checkpoint.remote_final_wait_s)
    return saving


def _log_row(
    parts: Parts, checkpointer: Checkpointer, window: Window, metrics: Metrics, island: Island, record: dict[str, Any],
    loss: float, lr: float, grad_norm: float, skipped_inner: int,
) -> None:
    """One metrics row: the step's numbers, finished saves and remote copies, and the outer step's record."""
    log = metrics.log
    for done in checkpointer.completed():  # leader-local: never decides whether to log
        log.info(describe_save(done))
        record.update(checkpoint_step=done.step, checkpoint_s=done.total_s)
    for event in checkpointer.remote_events():
        log.info(f"atoll: {event.line}")
        record.update(event.fields)
    tokens_per_s, blocked = window.close()
    if blocked:
        record["checkpoint_blocked_s"] = blocked
    row = {
        "step": parts.state.step,
        "loss": loss,
        "lr": lr,
        "grad_norm": grad_norm,
        "skipped_inner": skipped_inner,
        "tokens": parts.state.tokens,
        "tokens_per_s": tokens_per_s,
        "mfu": metrics.flops_per_token * tokens_per_s / (metrics.peak_flops * island.world) if metrics.peak_flops else None,
        **parts.sync.log_fields(),
        **parts.loader.log_fields(),
        **record,  # an outer step's own epoch and world size win over the current ones
    }
    log.log(row)
    parts.sync.report_numbers(row)
