"""The training loop of one island: build everything, then step, log, evaluate and checkpoint.

Reads top to bottom: `train()` assembles the pieces (island, model, optimizer, data, checkpoints,
metrics) and runs `train_step()` until `train.steps`. Everything it keeps across a restart is a
`Stateful` in `checkpoint_state()`, so a resumed run continues bit-for-bit.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import socket
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint.stateful import Stateful

from atoll.atomic import atomic_write
from atoll.checkpoint import Checkpointer, ModelOptimizerState
from atoll.config import JobConfig, dump_config
from atoll.data import (
    PackedLoader,
    Tokenizer,
    iter_eval_batches,
    load_split_tokens,
    load_tokenizer,
)
from atoll.digest import tensor_digest
from atoll.errors import UserError
from atoll.faults import FaultInjector
from atoll.guard import InnerGuard
from atoll.island import (
    Island,
    all_reduce_mean,
    broadcast_ints,
    broadcast_text,
    check_same_on_all_ranks,
    shard_model,
    start_island,
    stop_island,
)
from atoll.launch import default_run_dir
from atoll.mesh.client import MeshMember, join_mesh
from atoll.metrics import MetricsLog, detect_peak_flops, flops_per_token
from atoll.model import Llama, ModelArgs, count_params, get_size, lm_loss
from atoll.model.llama import apply_activation_checkpointing
from atoll.optim import build_optimizer, clip_grad_norm, lr_factor, outer_anneal_weight, set_lr
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

    def __init__(self, loader: PackedLoader, device: torch.device) -> None:
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
    """Seeded init on CPU (same weights on every process), then AC, compile, device and FSDP2.

    Returns the model and the sha256 digest of its initial weights.
    """
    torch.manual_seed(cfg.train.seed)
    model = Llama(args)
    digest = tensor_digest(model.state_dict().items())
    if cfg.model.activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.model.compile:
        for block in model.layers:
            block.compile()
    model.to(island.device)
    return shard_model(model, island), digest


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
) -> tuple[torch.Tensor, float]:
    """One optimizer step over this rank's share of the global batch, in `accum` micro-batches.

    `after_backward` runs once the island's gradients are complete (the ddp baseline averages
    them across islands there); `guard` skips the optimizer step of inner step `step` (1-based)
    on a non-finite loss or gradient norm. Returns the rank's mean loss (cross-entropy, before
    z-loss) and the global gradient norm.
    """
    sharded = island.world > 1
    ce_sum = torch.zeros((), device=island.device)
    for i, (inp, tgt) in enumerate(zip(inputs.chunk(accum), targets.chunk(accum))):
        if sharded:  # reduce-scatter gradients only once, after the last micro-batch
            model.set_requires_gradient_sync(i == accum - 1)
        with autocast(island):
            logits = model(inp.to(island.device, non_blocking=True))
        total, ce, _ = lm_loss(logits, tgt.to(island.device, non_blocking=True), cfg.train.z_loss_weight)
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
def evaluate(model: nn.Module, val_tokens: np.ndarray, seq_len: int, cfg: JobConfig, island: Island) -> float:
    """Mean validation cross-entropy over the same `eval.batches` global batches every time."""
    model.eval()
    losses = []
    for inp, tgt in iter_eval_batches(val_tokens, seq_len, cfg.train.global_batch, island.rank, island.world, cfg.eval.batches):
        with autocast(island):
            logits = model(inp.to(island.device))
        losses.append(lm_loss(logits, tgt.to(island.device))[1])
    model.train()
    return float(all_reduce_mean(torch.stack(losses).mean()))


def island_id(cfg: JobConfig, island: Island) -> str:
    """The configured island id, or hostname-<random> chosen by local rank 0 for every local rank."""
    chosen = cfg.mesh.island_id or f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
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

    run_dir None means runs/<train.run_name>-<timestamp>, with local rank 0's timestamp.
    An island in a mesh leaves with a deathrattle when it finishes, raises or gets SIGTERM
    (turned into SystemExit here), so the coordinator drops it at once; only SIGKILL, a hang or a
    lost machine go unannounced (the peers' broken collectives or the heartbeat timeout tell).
    """
    island = start_island(cfg.train.device)
    deathrattle = Deathrattle()
    if cfg.mesh.coordinator:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        run_dir = Path(broadcast_text(str(run_dir or default_run_dir(cfg.train.run_name)), island))
        result = _train(cfg, run_dir, resume, island, deathrattle)
    except BaseException as err:
        deathrattle(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}".rstrip(": "))
        raise
    finally:
        stop_island()
    deathrattle("finished")
    return result


def load_data(cfg: JobConfig) -> tuple[Tokenizer, np.ndarray, np.ndarray]:
    """The tokenizer and the tokenized train and validation splits (cached on disk)."""
    cache_dir = str(Path(cfg.data.cache_dir).expanduser()) if cfg.data.cache_dir else None
    try:
        tokenizer = load_tokenizer(cfg.data.tokenizer)
        splits = [
            load_split_tokens(cfg.data.source, split, cfg.data.val_fraction, tokenizer, cache_dir)
            for split in ("train", "val")
        ]
    except (FileNotFoundError, ValueError) as err:
        raise UserError(f"data: {err}") from None
    return tokenizer, *splits


def _train(cfg: JobConfig, run_dir: Path, resume: str | None, island: Island, deathrattle: Deathrattle) -> TrainResult:
    tokenizer, train_tokens, val_tokens = load_data(cfg)
    args = model_args(cfg, tokenizer.vocab_size)
    seq_len = sequence_length(cfg)
    accum = accumulation_steps(cfg, island)
    member = None
    if cfg.mesh.coordinator:
        member = join_mesh(cfg.mesh, island_id(cfg, island), island.rank, island.world, lambda n: broadcast_ints([n], island)[0])
        deathrattle.member = member
    try:
        loader = PackedLoader(train_tokens, seq_len, cfg.train.global_batch, island.rank, island.world, cfg.train.seed)
        if cfg.eval.every:  # checks now that the validation split holds a global batch, not at the first eval
            iter_eval_batches(val_tokens, seq_len, cfg.train.global_batch, island.rank, island.world, cfg.eval.batches)
    except ValueError as err:
        raise UserError(f"data.source {cfg.data.source!r}: {err}") from None

    model, init_digest = build_model(args, cfg, island)
    check_same_on_all_ranks(init_digest, island, "initial weights digest")
    optimizer = build_optimizer(model, cfg.optim)
    state = TrainState()
    sync = IslandSync(cfg, model, member, island, state, FaultInjector(island.is_leader, model))
    checkpointer = Checkpointer(run_dir / "checkpoints", cfg.checkpoint.keep, island.is_leader)
    stateful = {
        "model_optimizer": ModelOptimizerState(model, optimizer),
        "train": state,
        f"rank{island.rank}": RankState(loader, island.device),
        **sync.stateful(),
    }
    if resume is not None:
        checkpointer.load(checkpointer.resolve(resume), stateful)

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
            "island_id": member.island_id if member else None,
            "islands": list(member.epoch.members) if member else None,
            "mode": sync.mode,
        })
    flops_tok = flops_per_token(args, params["non_embedding"], seq_len)
    peak = cfg.metrics.peak_flops or detect_peak_flops(island.device)
    log = MetricsLog(run_dir / "metrics.jsonl", cfg.train.steps, state.step, cfg.metrics.progress, island.is_leader)
    guard = InnerGuard(cfg.train.max_skipped_inner, island, sync.diloco, log.info)
    log.info(
        f"atoll: {cfg.model.name} model ({params['total'] / 1e6:.2f}M params, init sha256 {init_digest[:12]}) "
        f"on {island.world} local rank(s), {island.device.type}; batch {cfg.train.global_batch}x{seq_len} tokens "
        f"({accum} accumulation step(s)); run dir {run_dir}"
        + (f"; resumed at step {state.step}" if resume is not None else "")
    )

    loss_value = float("nan")
    val_loss = None
    window_start, window_tokens = time.perf_counter(), 0
    while state.step < cfg.train.steps:
        lr = cfg.optim.lr * lr_factor(state.step, cfg.train.steps, cfg.schedule)
        set_lr(optimizer, lr)
        inputs, targets = sync.next_batch(loader)
        loss, grad_norm = train_step(model, optimizer, inputs, targets, accum, cfg, island, sync.after_backward, guard, state.step + 1)
        state.step += 1
        state.tokens += cfg.train.global_batch * seq_len
        window_tokens += cfg.train.global_batch * seq_len

        is_last = state.step == cfg.train.steps
        record = sync.after_step(state.step, is_last, outer_anneal_weight(state.step - 1, cfg.train.steps, cfg.schedule))
        for note in sync.drain_notes():
            log.info(f"atoll: {note}")
        if cfg.eval.every and (state.step % cfg.eval.every == 0 or is_last):
            eval_start = time.perf_counter()
            val_loss = evaluate(model, val_tokens, seq_len, cfg, island)
            record["val_loss"] = val_loss
            paused = time.perf_counter() - eval_start  # throughput and compute_s count training only
            window_start += paused
            sync.pause(paused)
        if state.step % cfg.metrics.log_every == 0 or is_last or record:
            loss_value = float(all_reduce_mean(loss))
            tokens_per_s = window_tokens / (time.perf_counter() - window_start)
            log.log({
                "step": state.step,
                "loss": loss_value,
                "lr": lr,
                "grad_norm": grad_norm,
                "skipped_inner": guard.skipped,
                "tokens": state.tokens,
                "tokens_per_s": tokens_per_s,
                "mfu": flops_tok * tokens_per_s / (peak * island.world) if peak else None,
                **sync.log_fields(),
                **record,  # an outer step's own epoch and world size win over the current ones
            })
            window_start, window_tokens = time.perf_counter(), 0
        if (cfg.checkpoint.every and state.step % cfg.checkpoint.every == 0) or (is_last and cfg.checkpoint.at_end):
            save_start = time.perf_counter()
            log.info(f"checkpoint saved: {checkpointer.save(state.step, stateful)}")
            paused = time.perf_counter() - save_start
            window_start += paused
            sync.pause(paused)
    log.info(f"atoll: done: {state.step} steps, loss {loss_value:.4f}"
             + (f", val_loss {val_loss:.4f}" if val_loss is not None else "") + f"; run dir {run_dir}")
    log.close()
    return TrainResult(run_dir, state.step, loss_value, val_loss, init_digest)
