"""Everything an island builds before its first inner step: its id, state server, data, model,
place in the run, optimizer, synchronisation, checkpoint state and metrics.

`assemble` builds the pieces (a joiner registers only once its model is built, so it never makes
the run wait for that); `resume_from` restores a checkpoint into them; `enter_run` takes the
island into the run's current epoch (the live state wins over an older checkpoint);
`record_run` writes config.toml and run.json; `open_metrics` opens the metrics log.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.stateful import Stateful

from atoll.atomic import atomic_write
from atoll.checkpoint import Checkpointer, ModelOptimizerState
from atoll.comm.transfer import ServedState, StateServer
from atoll.config import JobConfig, dump_config
from atoll.data import BatchSource, TrainingData, load_training_data, training_tokenizer
from atoll.faults import FaultInjector
from atoll.fingerprint import job_fingerprint
from atoll.island import Island, broadcast_text, check_same_on_all_ranks, gather_ints
from atoll.launch import generated_island_id
from atoll.logs import info as log_line
from atoll.mesh.addresses import listening
from atoll.mesh.member import MeshMember, join_mesh
from atoll.metrics import (
    MetricsLog,
    abandon_metrics_after,
    detect_peak_flops,
    flops_per_token,
    open_sinks,
)
from atoll.model import ModelArgs, count_params
from atoll.model_setup import (
    accumulation_steps,
    build_model,
    model_args,
    sequence_length,
)
from atoll.optim import build_optimizer, describe_new_horizon
from atoll.resume import ResumePoint, open_checkpoints, recorded_config
from atoll.sync import IslandSync
from atoll.train_state import OuterProgress, RankState, TrainState


class Deathrattle:
    """Tells the coordinator why this island leaves, however it leaves (once it has joined)."""

    def __init__(self) -> None:
        self.member: MeshMember | None = None

    def __call__(self, reason: str) -> None:
        if self.member is not None:
            self.member.leave(reason)


def island_id(cfg: JobConfig, island: Island) -> str:
    """The configured island id, or hostname-<random> chosen by local rank 0 for every local rank."""
    chosen = cfg.mesh.island_id or generated_island_id()
    return broadcast_text(chosen, island)


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


@dataclass
class Parts:
    """What `assemble` built for the loop."""

    data: TrainingData
    args: ModelArgs
    seq_len: int
    accum: int
    """Micro-batches per optimizer step on each rank."""
    loader: BatchSource
    model: nn.Module
    init_digest: str
    member: MeshMember | None
    optimizer: torch.optim.Optimizer
    state: TrainState
    sync: IslandSync
    stateful: dict[str, Stateful]
    """Everything a checkpoint saves, by key."""


def assemble(
    cfg: JobConfig, island: Island, ident: str | None, deathrattle: Deathrattle, server: StateServer | None,
    doing: Callable[[str], None], say_line: Callable[[str], None],
) -> Parts:
    """Data, model, registration with the coordinator (after the model is built), optimizer,
    synchronisation and the stateful pieces. A coordinator that refuses the island raises from
    `join_mesh` with one line (`atoll.mesh.member`)."""
    tokenizer = training_tokenizer(cfg.data)
    args = model_args(cfg, tokenizer.vocab_size)  # a tokenizer the model cannot hold fails before any tokenizing
    doing("preparing the data")
    data = load_training_data(cfg.data, say_line, tokenizer)
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
    return Parts(data, args, seq_len, accum, loader, model, init_digest, member, optimizer, state, sync, stateful)


def resume_from(
    parts: Parts, cfg: JobConfig, run_dir: Path, resume: str | None, ident: str | None, island: Island, checkpointer: Checkpointer,
) -> ResumePoint | None:
    """Load the checkpoint `resume` names into the parts (None: a fresh start); the leader drops
    metrics records past it and says how a changed train.steps moves the schedule."""
    resumed = open_checkpoints(checkpointer, resume, cfg, ident, island)
    if resumed is None:
        return None
    checkpointer.load(resumed.path, parts.stateful)
    if island.is_leader and parts.state.step < cfg.train.steps:
        abandon_metrics_after(run_dir / "metrics.jsonl", parts.state.step, resumed.timeline)
        horizon = describe_new_horizon(parts.state.step, resumed.steps, cfg.train.steps, cfg.schedule, cfg.optim.lr) if resumed.steps else None
        if horizon is not None:
            log_line(f"atoll: {horizon}")
    return resumed


def enter_run(parts: Parts, resumed: ResumePoint | None, say_line: Callable[[str], None]) -> None:
    """Enter the run's current epoch (`IslandSync.start`); a resumed island that took a newer
    state than its checkpoint's starts its AdamW afresh (its moments were of other weights)."""
    parts.sync.start()
    if resumed is not None and not parts.sync.inner_state_valid:
        parts.optimizer.state.clear()
        say_line(f"atoll: the run is past this island's checkpoint (outer step {parts.sync.outer_steps}): it takes the run's state "
                 "and starts its AdamW afresh")


def write_run_info(path: Path, info: dict[str, Any]) -> None:
    """run.json: facts about the run that are not per step (init digest, sizes, ranks)."""
    atomic_write(path, lambda f: f.write(json.dumps(info, indent=2).encode()))


def record_run(parts: Parts, cfg: JobConfig, run_dir: Path, island: Island, checkpointer: Checkpointer) -> None:
    """The leader writes config.toml and run.json into the run directory."""
    if not island.is_leader:
        return
    member = parts.member
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / "config.toml")
    write_run_info(run_dir / "run.json", {
        "init_digest": parts.init_digest,
        "params": count_params(parts.args),
        "local_ranks": island.world,
        "device": island.device.type,
        "start_step": parts.state.step,
        "run_id": checkpointer.identity.run_id,
        "timeline": checkpointer.timeline,
        "island_id": member.island_id if member else None,
        "islands": list(member.epoch.members) if member else None,
        "mode": parts.sync.mode,
    })


@dataclass
class Metrics:
    """The metrics log and what the loop needs to compute MFU."""

    log: MetricsLog
    flops_per_token: float
    peak_flops: float | None


def open_metrics(parts: Parts, cfg: JobConfig, run_dir: Path, ident: str | None, island: Island, checkpointer: Checkpointer) -> Metrics:
    """metrics.jsonl (appended to from the resumed step), the configured sinks (leader only), and the FLOPs MFU is measured against."""
    params = count_params(parts.args)
    sinks = open_sinks(cfg.metrics, run_dir, ident or run_dir.name, checkpointer.identity.run_id, recorded_config(cfg)) if island.is_leader else []
    log = MetricsLog(run_dir / "metrics.jsonl", cfg.train.steps, parts.state.step, cfg.metrics.progress, island.is_leader, sinks)
    return Metrics(log, flops_per_token(parts.args, params["non_embedding"], parts.seq_len), cfg.metrics.peak_flops or detect_peak_flops(island.device))

