"""The training loop of one island: build everything, then step, log, evaluate and checkpoint.

Reads top to bottom: `train()` assembles the pieces (island, model, optimizer, data, checkpoints,
metrics) and runs `train_step()` until `train.steps`. Everything it keeps across a restart is a
`Stateful` in `checkpoint_state()`, so a resumed run continues bit-for-bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.stateful import Stateful

from atoll.atomic import atomic_write
from atoll.comm.transfer import ServedState, StateServer
from atoll.checkpoint import Checkpointer, ModelOptimizerState, SaveReport
from atoll.config import JobConfig, dump_config
from atoll.data import BatchSource, TrainingData, iter_eval_batches, load_training_data, weighted_mean
from atoll.digest import model_digest
from atoll.errors import ExpectedFailure, UserError, say
from atoll.faults import FaultInjector
from atoll.guard import InnerGuard
from atoll.hf import load_hf_weights
from atoll.island import (
    Island,
    all_reduce_mean,
    broadcast_text,
    check_same_on_all_ranks,
    gather_ints,
    shard_model,
    start_island,
    stop_island,
)
from atoll.fingerprint import job_fingerprint
from atoll.launch import default_run_dir, exit_with_launcher, generated_island_id
from atoll.logs import heartbeat, set_island
from atoll.logs import info as log_line
from atoll.mesh.addresses import listening
from atoll.mesh.member import MeshMember, join_mesh, preflight
from atoll.metrics import MetricsLog, abandon_metrics_after, check_sinks, detect_peak_flops, flops_per_token, open_sinks
from atoll.model import Llama, ModelArgs, count_params, get_size
from atoll.model.llama import apply_activation_checkpointing
from atoll.optim import (
    build_optimizer,
    clip_grad_norm,
    describe_new_horizon,
    lr_factor,
    outer_anneal_weight,
    set_lr,
    weight_kept,
)
from atoll.resume import claim_run_dir, open_checkpoints, recorded_config
from atoll.sync import IslandSync


@dataclass
class TrainState(Stateful):
    """Island-wide progress: identical on every local rank."""

    step: int = 0
    tokens: int = 0
    """Tokens this island trained on (a joiner counts from when it joined)."""
    samples: int = 0
    """The run-wide sample cursor: samples all islands together consumed before the next step."""

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.step = int(state_dict["step"])
        self.tokens = int(state_dict["tokens"])
        self.samples = int(state_dict["samples"])


class RankState(Stateful):
    """What differs per local rank: its data position and its RNG streams."""

    def __init__(self, loader: BatchSource, device: torch.device) -> None:
        self.loader = loader
        self.device = device

    def state_dict(self) -> dict[str, Any]:
        state = {"loader": self.loader.state_dict(), "rng": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.loader.load_state_dict(state_dict["loader"])
        torch.set_rng_state(state_dict["rng"])
        if "cuda_rng" in state_dict:
            torch.cuda.set_rng_state(state_dict["cuda_rng"], self.device)


class OuterProgress(Stateful):
    """The outer-step count, so a resumed island's outer steps continue instead of restarting at 1.

    Contract with `IslandSync`: it keeps the count of committed or skipped outer steps in the
    integer attribute `outer_steps` (0 when the island trains alone).
    """

    def __init__(self, sync: IslandSync) -> None:
        self.sync = sync

    def state_dict(self) -> dict[str, Any]:
        return {"outer_steps": int(getattr(self.sync, "outer_steps", 0))}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.sync.outer_steps = int(state_dict["outer_steps"])


def checkpoint_facts(sync: IslandSync, outer_digest: str | None) -> dict[str, Any]:
    """The manifest's mesh fields: outer step, epoch, members and the digest of the outer weights.

    Contract with `IslandSync`: `outer_steps` (int) and, in a mesh, `member.epoch` with
    `number` (int) and `members` (island ids); an island alone reports epoch None and no members.
    """
    epoch = getattr(getattr(sync, "member", None), "epoch", None)
    return {
        "outer_step": int(getattr(sync, "outer_steps", 0)),
        "epoch": epoch.number if epoch is not None else None,
        "members": list(epoch.members) if epoch is not None else [],
        "outer_digest": outer_digest,
    }


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


def model_args(cfg: JobConfig, tokenizer_vocab: int) -> ModelArgs:
    """The named size with the config's overrides applied, checked against the tokenizer."""
    try:
        args = get_size(cfg.model.name)
    except (KeyError, ValueError) as err:
        raise UserError(f"model.name {cfg.model.name!r}: {err.args[0]}") from None
    changes: dict[str, Any] = {}
    if cfg.model.vocab_size is not None:
        changes["vocab_size"] = cfg.model.vocab_size
    if cfg.model.rope_theta is not None:
        changes["rope_theta"] = cfg.model.rope_theta
    changes["max_seq_len"] = max(sequence_length(cfg), args.max_seq_len)
    args = dataclasses.replace(args, **changes)
    if tokenizer_vocab > args.vocab_size:
        raise UserError(
            f"model.vocab_size {args.vocab_size} is smaller than the tokenizer's {tokenizer_vocab} ids: "
            f"set --model.vocab_size {tokenizer_vocab} or more"
        )
    return args


def sequence_length(cfg: JobConfig) -> int:
    """Tokens per training sequence: train.seq_len, or the model size's max_seq_len."""
    return cfg.train.seq_len or get_size(cfg.model.name).max_seq_len


def accumulation_steps(cfg: JobConfig, island: Island) -> int:
    """Micro-batches per optimizer step on each rank, so the island's ranks cover the global batch."""
    per_rank, rem = divmod(cfg.train.global_batch, island.world)
    if rem:
        raise UserError(f"train.global_batch {cfg.train.global_batch} is not divisible by {island.world} local ranks")
    micro = min(cfg.train.micro_batch or per_rank, per_rank)
    if per_rank % micro:
        raise UserError(
            f"train.micro_batch {micro} does not divide the {per_rank} sequences per rank "
            f"(global_batch {cfg.train.global_batch} / {island.world} ranks)"
        )
    return per_rank // micro


def build_model(args: ModelArgs, cfg: JobConfig, island: Island) -> tuple[nn.Module, str]:
    """Build on the meta device, apply AC, compile and FSDP2, then initialise each rank's shard in place.

    Start-up memory per rank is O(shard) on host and device. The weights depend only on
    train.seed (the same full weights for any number of local ranks), and so does the returned
    digest of the full initial weights, computed from the shards (`model_digest`). With
    model.init_from the weights come from a Hugging Face directory, loaded into a full model on
    CPU before sharding (so that path costs the full model's memory once per rank).
    """
    torch.manual_seed(cfg.train.seed)
    if cfg.model.init_from:  # a full model on CPU, filled from the HF files, then sharded
        model = Llama(args)
        load_hf_weights(model, Path(cfg.model.init_from))
    else:
        with torch.device("meta"):
            model = Llama(args)
    if cfg.model.activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.model.compile:
        for block in model.layers:
            block.compile()
    model = shard_model(model, island)
    if cfg.model.init_from:
        model.to(island.device)
    else:
        model.to_empty(device=island.device)
        model.init_weights()
    return model, model_digest(model)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    accum: int,
    cfg: JobConfig,
    island: Island,
    after_backward: Callable[[], None],
    guard: InnerGuard,
    step: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over this rank's share of the global batch, in `accum` micro-batches.

    Under FSDP2 every micro-batch's gradients are reduce-scattered at once, so a rank only ever
    holds sharded gradients (skipping the sync would keep unsharded fp32 gradients of the whole
    model between micro-batches). The loss is chunked over the vocabulary inside the model's
    forward. `after_backward` runs once the island's gradients are complete and before anything
    changes the weights (the ddp baseline averages gradients across islands there; a checkpoint
    still copying the weights finishes there); `guard` skips the optimizer step of inner step `step`
    (1-based) on a non-finite loss or gradient norm. Returns the rank's mean loss (cross-entropy, before
    z-loss) and the global gradient norm, both device tensors: reading them is the caller's host sync,
    done only when it logs (the guard's one flag per step aside).
    """
    if island.device.type == "cuda":  # page-locked, so the copies below are really asynchronous
        inputs, targets = inputs.pin_memory(), targets.pin_memory()
    ce_sum = torch.zeros((), device=island.device)
    for inp, tgt in zip(inputs.chunk(accum), targets.chunk(accum)):
        with autocast(island):
            total, ce, _ = model(inp.to(island.device, non_blocking=True), tgt.to(island.device, non_blocking=True),
                                 z_loss_weight=cfg.train.z_loss_weight)
        (total / accum).backward()
        ce_sum += ce.detach()
    after_backward()
    grad_norm = clip_grad_norm(model, cfg.optim.grad_clip)
    if guard.allows_step(step, ce_sum, grad_norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return ce_sum / accum, grad_norm


def autocast(island: Island) -> torch.autocast:
    """bf16 autocast for an unsharded CUDA model (FSDP2's policy does this when sharded)."""
    enabled = island.mixed_precision and island.world == 1
    return torch.autocast(device_type=island.device.type, dtype=torch.bfloat16, enabled=enabled)


@torch.no_grad()
def evaluate(model: nn.Module, data: TrainingData, seq_len: int, cfg: JobConfig, island: Island) -> dict[str, float]:
    """Mean validation cross-entropy of each validation set, over the same `eval.batches` global batches every time.

    The loss is chunked inside the model's forward, as in train_step: no [batch, seq, vocab] logits are held.
    """
    model.eval()
    result = {}
    for name, val_tokens in data.val.items():
        losses = []
        for inp, tgt in iter_eval_batches(val_tokens, seq_len, cfg.train.global_batch, island.rank, island.world, cfg.eval.batches):
            with autocast(island):
                losses.append(model(inp.to(island.device), tgt.to(island.device))[1])
        result[name] = float(all_reduce_mean(torch.stack(losses).mean()))
    model.train()
    return result


def set_outer_weight_decay(sync: IslandSync, cfg: JobConfig, step: int, trained_phase: bool) -> None:
    """Before the outer step at `step`: the inner phase's weight decay, which the outer step takes
    out of the pseudo-gradient and applies once (diloco.decouple_weight_decay). The phase began at
    the last multiple of H before `step`; an island that did not train it (a joiner) kept all of it."""
    if not cfg.diloco.decouple_weight_decay:
        return
    start = (step - 1) // cfg.diloco.inner_steps * cfg.diloco.inner_steps
    run = weight_kept(start, step, cfg.train.steps, cfg.optim.lr, cfg.optim.weight_decay, cfg.schedule)
    sync.diloco.set_weight_kept(own=run if trained_phase else 1.0, run=run)


def island_id(cfg: JobConfig, island: Island) -> str:
    """The configured island id, or hostname-<random> chosen by local rank 0 for every local rank."""
    chosen = cfg.mesh.island_id or generated_island_id()
    return broadcast_text(chosen, island)


def write_run_info(path: Path, info: dict[str, Any]) -> None:
    """run.json: facts about the run that are not per step (init digest, sizes, ranks)."""
    atomic_write(path, lambda f: f.write(json.dumps(info, indent=2).encode()))


class Deathrattle:
    """Tells the coordinator why this island leaves, however it leaves (once it has joined)."""

    def __init__(self) -> None:
        self.member: MeshMember | None = None

    def __call__(self, reason: str) -> None:
        if self.member is not None:
            self.member.leave(reason)


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


def serve_state(cfg: JobConfig, island: Island) -> StateServer | None:
    """This local rank's server of the run's state to joiners (a DiLoCo island in a mesh), listening
    where mesh.serve_host / interface / port_range say and reached at mesh.advertise_host
    (`atoll.mesh.addresses`); None otherwise."""
    if not cfg.mesh.coordinator:
        return None
    where = listening(cfg.mesh)  # resolved now in ddp too: a wrong interface or an unroutable coordinator is said at start
    if cfg.mesh.mode != "diloco":
        return None
    faults = FaultInjector(island.is_leader)  # fires only the `serve` point
    return StateServer(where, ServedState(int(cfg.mesh.transfer_chunk_mb * 1e6)), lambda n: faults.at("serve", n))


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
    doing("preparing the data")
    data = load_training_data(cfg.data, say_line)
    args = model_args(cfg, data.tokenizer.vocab_size)
    seq_len = sequence_length(cfg)
    accum = accumulation_steps(cfg, island)
    loader = data.loader(seq_len, cfg.train.global_batch, island.rank, island.world, cfg.train.seed)
    if cfg.eval.every:  # checks now that each validation split holds a global batch, not at the first eval
        data.check_val(seq_len, cfg.train.global_batch, island.rank, island.world, cfg.eval.batches)

    doing(f"building the {cfg.model.name} model")
    model, init_digest = build_model(args, cfg, island)
    check_same_on_all_ranks(init_digest, island, "initial weights digest")
    member = None
    if cfg.mesh.coordinator:  # registers only now: a joiner never makes the run wait for its model to build
        fingerprint = job_fingerprint(cfg, args, data.tokenizer, seq_len)
        ports = gather_ints(server.advertised[1] if server is not None else 0, island)
        doing(f"joining the run at {cfg.mesh.coordinator}")
        member = join_mesh(
            cfg.mesh, ident, island, fingerprint, say_line,
            ports if server is not None else None, server.advertised[0] if server is not None else "",
        )
        deathrattle.member = member
        if server is not None:
            server.key = member.client.key
    optimizer = build_optimizer(model, cfg.optim)
    state = TrainState()
    sync = IslandSync(cfg, model, member, island, state, FaultInjector(island.is_leader, model), server.state if server is not None else None)
    stateful = {
        "model_optimizer": ModelOptimizerState(model, optimizer),
        "train": state,
        "outer_progress": OuterProgress(sync),
        f"rank{island.rank}": RankState(loader, island.device),
        **sync.stateful(),
    }
    doing("opening the checkpoints")
    resumed = open_checkpoints(checkpointer, resume, cfg, ident, island)
    outer_digest = None
    if resumed is not None:
        checkpointer.load(resumed.path, stateful)
        outer_digest = resumed.outer_digest
        if state.step >= cfg.train.steps:
            say_line(f"atoll: the run is complete: {resumed.path} is at step {state.step} of train.steps {cfg.train.steps}; nothing to do")
            return TrainResult(run_dir, state.step, float("nan"), None, init_digest)
        if island.is_leader:
            abandon_metrics_after(run_dir / "metrics.jsonl", state.step, resumed.timeline)
            horizon = describe_new_horizon(state.step, resumed.steps, cfg.train.steps, cfg.schedule, cfg.optim.lr) if resumed.steps else None
            if horizon is not None:
                log_line(f"atoll: {horizon}")
    sync.start()
    if resumed is not None and not sync.inner_state_valid:
        optimizer.state.clear()  # AdamW's moments were of the checkpoint's weights, not the run's
        say_line(f"atoll: the run is past this island's checkpoint (outer step {sync.outer_steps}): it takes the run's state "
                 "and starts its AdamW afresh")

    params = count_params(args)
    if island.is_leader:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, run_dir / "config.toml")
        write_run_info(run_dir / "run.json", {
            "init_digest": init_digest,
            "params": params,
            "local_ranks": island.world,
            "device": island.device.type,
            "start_step": state.step,
            "run_id": checkpointer.identity.run_id,
            "timeline": checkpointer.timeline,
            "island_id": member.island_id if member else None,
            "islands": list(member.epoch.members) if member else None,
            "mode": sync.mode,
        })
    flops_tok = flops_per_token(args, params["non_embedding"], seq_len)
    peak = cfg.metrics.peak_flops or detect_peak_flops(island.device)
    sinks = open_sinks(cfg.metrics, run_dir, ident or run_dir.name, checkpointer.identity.run_id, recorded_config(cfg)) if island.is_leader else []
    log = MetricsLog(run_dir / "metrics.jsonl", cfg.train.steps, state.step, cfg.metrics.progress, island.is_leader, sinks)
    guard = InnerGuard(cfg.train.max_skipped_inner, island, sync.diloco, log.info)
    if sync.owes_outer_step:  # a joiner admitted at a boundary: the outer step being averaged there
        set_outer_weight_decay(sync, cfg, state.step, trained_phase=False)
        record = sync.join_outer_step(outer_anneal_weight(state.step - 1, cfg.train.steps, cfg.schedule))
        outer_digest = record["outer_digest"]
        for note in sync.drain_notes():
            log.info(f"atoll: {note}")
        log.log({"step": state.step, "tokens": state.tokens, **sync.log_fields(), **record})
    log.info(
        f"atoll: {cfg.model.name} model ({params['total'] / 1e6:.2f}M params, init sha256 {init_digest[:12]}) "
        f"on {island.world} local rank(s), {island.device.type}; batch {cfg.train.global_batch}x{seq_len} tokens "
        f"({accum} accumulation step(s)); run dir {run_dir}"
        + (f"; resumed at step {state.step} from {resumed.path} (timeline {resumed.timeline})" if resumed is not None else "")
    )
    for line in data.summaries:
        log.info(f"atoll: data: {line}")

    loss_value = float("nan")
    val_loss = None
    window_start, window_tokens = time.perf_counter(), 0
    blocked = 0.0  # by checkpoints since the last metrics row

    def outside_training(seconds: float, checkpoint: bool = False) -> None:
        """Exclude `seconds` (evaluation, or training blocked by a checkpoint) from throughput and compute_s."""
        nonlocal window_start, blocked
        window_start += seconds
        blocked += seconds if checkpoint else 0.0
        sync.pause(seconds)

    def staged(everything: bool = False) -> None:
        """Let the save in flight finish copying what training is about to change."""
        outside_training(checkpointer.staged(everything), checkpoint=True)

    def after_backward() -> None:
        sync.after_backward()
        staged()

    while state.step < cfg.train.steps:
        doing(f"training: inner step {state.step + 1} of {cfg.train.steps}")
        lr = cfg.optim.lr * lr_factor(state.step, cfg.train.steps, cfg.schedule)
        set_lr(optimizer, lr)
        inputs, targets = sync.next_batch(loader)
        loss, grad_norm = train_step(model, optimizer, inputs, targets, accum, cfg, island, after_backward, guard, state.step + 1)
        state.step += 1
        state.tokens += cfg.train.global_batch * seq_len
        window_tokens += cfg.train.global_batch * seq_len

        is_last = state.step == cfg.train.steps
        if sync.outer_step_due(state.step, is_last):
            staged(everything=True)  # the outer step changes the outer weights and momentum
            set_outer_weight_decay(sync, cfg, state.step, trained_phase=True)
        record = sync.after_step(state.step, is_last, outer_anneal_weight(state.step - 1, cfg.train.steps, cfg.schedule))
        outer_digest = record.get("outer_digest", outer_digest)
        for note in [*sync.drain_notes(), *loader.drain_notes()]:
            log.info(f"atoll: {note}")
        if cfg.eval.every and (state.step % cfg.eval.every == 0 or is_last):
            doing(f"evaluating after inner step {state.step}")
            eval_start = time.perf_counter()
            val_losses = evaluate(model, data, seq_len, cfg, island)
            val_loss = weighted_mean(val_losses, data.names, data.weights)
            record["val_loss"] = val_loss
            if data.mixture:
                record["val_loss_by_source"] = val_losses
            outside_training(time.perf_counter() - eval_start)
        saving = (cfg.checkpoint.every and state.step % cfg.checkpoint.every == 0) or (is_last and cfg.checkpoint.at_end)
        if saving:
            started = checkpointer.save(state.step, stateful, checkpoint_facts(sync, outer_digest), later=sync.stateful().keys())
            if started.waited_s > 0.01:
                log.info(f"atoll: checkpoint: the previous save was still being written; training waited {started.waited_s:.2f}s "
                         "for it (a save takes longer than checkpoint.every steps)")
            outside_training(started.blocked_s, checkpoint=True)
            if is_last:
                staged(everything=True)
                checkpointer.wait()  # the last record reports the last save's times
        if is_last:  # and how the last remote copy went
            checkpointer.wait_remote(cfg.checkpoint.remote_final_wait_s)
        if state.step % cfg.metrics.log_every == 0 or is_last or record or saving:
            for done in checkpointer.completed():  # leader-local: never decides whether to log
                log.info(describe_save(done))
                record.update(checkpoint_step=done.step, checkpoint_s=done.total_s)
            for event in checkpointer.remote_events():
                log.info(f"atoll: {event.line}")
                record.update(event.fields)
            if blocked:
                record["checkpoint_blocked_s"], blocked = blocked, 0.0
            loss_value = float(all_reduce_mean(loss))
            tokens_per_s = window_tokens / (time.perf_counter() - window_start)
            row = {
                "step": state.step,
                "loss": loss_value,
                "lr": lr,
                "grad_norm": float(grad_norm),
                "skipped_inner": guard.skipped,
                "tokens": state.tokens,
                "tokens_per_s": tokens_per_s,
                "mfu": flops_tok * tokens_per_s / (peak * island.world) if peak else None,
                **sync.log_fields(),
                **loader.log_fields(),
                **record,  # an outer step's own epoch and world size win over the current ones
            }
            log.log(row)
            sync.report_numbers(row)
            window_start, window_tokens = time.perf_counter(), 0
    doing("finishing the last checkpoint")
    for done in checkpointer.close():
        log.info(describe_save(done))
    log.info(f"atoll: done: {state.step} steps, loss {loss_value:.4f}"
             + (f", val_loss {val_loss:.4f}" if val_loss is not None else "") + f"; run dir {run_dir}")
    log.close()
    return TrainResult(run_dir, state.step, loss_value, val_loss, init_digest)
