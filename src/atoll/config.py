"""One typed config tree for a run: TOML files plus dotted command-line overrides.

    atoll train configs/debug.toml --optim.lr 3e-4 --train.steps 50

Every field is documented by the docstring under it; `atoll train --help` prints them all. An
unknown key, a wrong type or an out-of-range value raises `UserError` with one line naming the key.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from atoll.atomic import FILE_MODE, PRIVATE_MODE, atomic_write
from atoll.errors import UserError
from atoll.mesh.addresses import parse_port_range

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser from PyPI (a dependency there)
    import tomli as tomllib


class Section(BaseModel):
    """A config section: unknown keys are errors, field docstrings are the documentation.

    Every field is run-wide unless its section lists it in `per_island`: the islands of one run
    must agree on it, and the coordinator refuses an island that differs, naming the key
    (`atoll.fingerprint`). Per-island fields are where this machine keeps things, what it logs and
    saves, how it spends its own memory and time, and how it reaches the run.
    """

    model_config = ConfigDict(
        extra="forbid", use_attribute_docstrings=True, validate_assignment=True, allow_inf_nan=False
    )
    per_island: ClassVar[frozenset[str]] = frozenset()


class ModelConfig(Section):
    # init_from is a path on this machine: the files must hold the same weights on every island
    per_island = frozenset({"activation_checkpointing", "compile", "init_from"})
    name: str = "debug"
    """Named model size (see `atoll model-info`): debug, demo, 150m, 1b, 8b, intellect-1-10b."""
    vocab_size: int | None = Field(default=None, gt=0)
    """Override the size's vocabulary; must be at least the tokenizer's vocabulary. None keeps the size's."""
    rope_theta: float | None = Field(default=None, gt=0)
    """Override the RoPE base frequency (Llama-3 uses 500000). None keeps the size's."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass: less memory, about 1/3 more compute."""
    compile: bool = False
    """Compile each transformer block with torch.compile."""
    init_from: str | None = None
    """Start from the weights of this Hugging Face Llama directory (e.g. one `atoll export` wrote) instead of a
    random init; its config.json must match this model's shape (set by --init-from). A resume loads the checkpoint."""


class OptimConfig(Section):
    lr: float = Field(default=3e-4, gt=0)
    """Peak AdamW learning rate, reached at the end of warmup."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW (beta1, beta2). 0.95 is the large-model choice and suits short runs (the 200-step demo,
    then with a sqrt decay: val_loss 2.05 against 2.15 at 0.999). benchmarks/convergence.py runs
    every row at 0.999; on its whole validation split 0.95 and 0.999 leave DiLoCo's gap to
    data-parallel where it was (3 seeds, every row with the sqrt decay: +1.55% +- 2.80 against
    +1.53% +- 0.83), as does the islands' beta1 0.95 (README: How close DiLoCo comes to
    data-parallel)."""
    eps: float = Field(default=1e-8, gt=0)
    """AdamW epsilon."""
    weight_decay: float = Field(default=0.1, ge=0)
    """Decoupled weight decay, applied to matrices only (not norms)."""
    grad_clip: float = Field(default=1.0, ge=0)
    """Clip the global gradient norm to this value; 0 disables clipping."""


class ScheduleConfig(Section):
    kind: Literal["wsd", "cosine", "constant"] = "wsd"
    """LR schedule: wsd (warmup, stable, decay), cosine (warmup then cosine to min), constant (warmup then flat)."""
    warmup_steps: int = Field(default=0, ge=0)
    """Steps of linear warmup from 0 to optim.lr."""
    decay_fraction: float = Field(default=0.2, ge=0, le=1)
    """wsd only: the LR stays at optim.lr and decays only during this last fraction of train.steps."""
    decay_shape: Literal["linear", "sqrt", "cosine"] = "linear"
    """wsd only: shape of the final decay (sqrt is 1 - sqrt(progress), as in MiniCPM). For DiLoCo
    prefer linear: its outer step anneals with this LR (diloco.anneal_with_schedule), which already
    shortens its effective decay. On benchmarks/convergence.py linear beat sqrt on every DiLoCo run
    measured (fp32, int8 and int4 + error feedback, H 50 and 100, 3 seeds each: 12 runs of 12, by
    0.04-0.62%), where data-parallel was 0.13% better with sqrt."""
    min_lr_ratio: float = Field(default=0.0, ge=0, le=1)
    """LR at the end of decay, as a fraction of optim.lr (wsd and cosine)."""


class SourceConfig(Section):
    per_island = frozenset({"path", "format"})  # where this machine keeps the source, and how it is found there
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    """Short name of the source: names its shard directory and its entries in tokens_by_source / val_loss_by_source."""
    path: str
    """Local files (a file, a directory or a glob such as "data/*.jsonl.zst"), a directory written by
    datasets' save_to_disk, or a Hugging Face dataset name such as "HuggingFaceFW/fineweb-edu"."""
    weight: float = Field(default=1.0, gt=0)
    """Share of every global batch drawn from this source, relative to the other sources' weights."""
    format: Literal["auto", "parquet", "jsonl", "arrow", "text", "hf"] = "auto"
    """auto: from the file names (.parquet, .jsonl[.gz|.zst], .arrow, .txt/.md/.py), a saved dataset
    directory, else a Hub dataset name. jsonl may be gzip or zstd compressed; text is one document per file."""
    text_field: str = "text"
    """Column or JSON field holding each document's text (parquet, jsonl, arrow, hf)."""
    split: str = "train"
    """Split of a Hugging Face dataset to read (hf); atoll holds out its own validation documents."""
    subset: str | None = None
    """Configuration (subset) of a Hugging Face dataset, e.g. "sample-10BT" of FineWeb-Edu; None: the default."""


class DataConfig(Section):
    # the tokenizer is compared by what it is (kind, vocabulary, file name), not by where it lives
    per_island = frozenset({"tokenizer", "cache_dir", "mixture", "prepared", "workers"})
    source: str = "stdlib"
    """Corpus when data.sources is empty: "stdlib" (the running Python's standard library sources, always present) or a directory / text file."""
    tokenizer: str = "byte"
    """"byte" (UTF-8 bytes, 257 ids), a tokenizer.json, or a directory holding one (a saved HF tokenizer,
    e.g. Llama-3's, whose tokenizer_config.json names its eos); see `atoll tokenizer train`."""
    val_fraction: float = Field(default=0.05, gt=0, lt=1)
    """Fraction of documents held out for validation, chosen by a stable hash of their path (or, in a
    mixture, of their position in their source)."""
    cache_dir: str | None = "~/.cache/atoll"
    """Where tokenized corpora, sources tokenised for training and downloaded shards are cached; empty string disables the cache."""
    sources: list[SourceConfig] = []
    """A weighted mixture of sources ([[data.sources]] tables; see configs/data/); replaces data.source when given."""
    mixture: str | None = None
    """A TOML file whose [data] section (its [[data.sources]], tokenizer, prepared, ...) fills in every data key this
    config leaves unset, e.g. configs/data/intellect-1.toml; sources listed here win over the file's."""
    prepared: str | None = None
    """Directory or fsspec URL (s3://..., gs://...) of shards made by `atoll data prepare`; training reads
    them and refuses to start without them. None: training tokenises the sources itself into cache_dir."""
    shard_tokens: int = Field(default=1 << 25, gt=0)
    """Train tokens per shard written by `atoll data prepare` (2^25: 64 MB of uint16 or 128 MB of uint32)."""
    workers: int = Field(default=1, gt=0)
    """Worker processes of `atoll data prepare` (each tokenises whole pieces: input files or dataset shards)."""
    on_bad_file: Literal["error", "skip"] = "error"
    """A source file that is not text (binary, undecodable, unparsable): error stops with its name, skip leaves it out and counts it."""

    @model_validator(mode="before")
    @classmethod
    def _read_mixture(cls, data: Any) -> Any:
        """Fill what this [data] leaves unset from the [data] of the data.mixture file."""
        if not isinstance(data, dict) or not data.get("mixture"):
            return data
        included = dict(read_toml(data["mixture"]).get("data", {}))
        included.pop("mixture", None)
        if not included.get("sources"):
            raise ValueError(f"data.mixture {data['mixture']} lists no [[data.sources]]")
        own = {k: v for k, v in data.items() if k != "sources" or v}  # an empty list of sources takes the file's
        return {**included, **own}

    @model_validator(mode="after")
    def _check_sources(self) -> DataConfig:
        names = [s.name for s in self.sources]
        duplicate = next((n for n in names if names.count(n) > 1), None)
        if duplicate is not None:
            raise ValueError(f"data.sources names {duplicate!r} twice; give each source its own name")
        return self


class TrainConfig(Section):
    # micro_batch splits the same global batch to fit this machine's memory
    per_island = frozenset({"micro_batch", "device", "run_name", "max_skipped_inner"})
    steps: int = Field(default=100, gt=0)
    """Optimizer steps to train for (the schedule spans exactly this many)."""
    seq_len: int | None = Field(default=None, gt=0)
    """Tokens per sequence; None uses the model size's max_seq_len."""
    global_batch: int = Field(default=8, gt=0)
    """Sequences per optimizer step over the whole island (all local ranks, all accumulation steps)."""
    micro_batch: int | None = Field(default=None, gt=0)
    """Sequences per forward pass per local rank; the rest is gradient accumulation. None: no accumulation."""
    z_loss_weight: float = Field(default=0.0, ge=0)
    """Weight of the max-z-loss (mean max-logit squared); INTELLECT-1 used 2e-4."""
    seed: int = 0
    """Seed for weight init and data order; the same seed gives the same weights on every process."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto picks cuda when available (NCCL, bf16 mixed precision), else cpu (gloo, fp32)."""
    run_name: str = "atoll"
    """Name used in the default run directory runs/<run_name>-<timestamp>."""
    max_skipped_inner: int = Field(default=3, ge=0)
    """An inner step whose loss or gradient norm is NaN or infinite is skipped (no optimizer step;
    metrics count skipped_inner). More than this many in a row reset the island's weights to the
    outer weights (DiLoCo), or stop the run with one line when there are none (alone, ddp)."""


class EvalConfig(Section):
    per_island = frozenset({"every", "batches"})  # evaluation reads the model, never changes it
    every: int = Field(default=50, ge=0)
    """Compute validation loss every this many steps and at the end; 0 disables."""
    batches: int = Field(default=4, ge=0)
    """Global batches of validation data per evaluation (always the same ones: the first, unshuffled); 0 evaluates the
    whole validation split. The first few batches are a few contiguous files: they rank one run against another
    differently from the whole split (benchmarks/convergence.py measured gaps between runs that moved by 1.8% from
    one 16-batch stretch of the split to the next), so compare runs on 0."""


class CheckpointConfig(Section):
    per_island = frozenset({"every", "at_end", "keep", "asynchronous", "remote", "remote_attempts", "remote_backoff_s", "remote_final_wait_s"})
    every: int = Field(default=0, ge=0)
    """Save a checkpoint every this many steps; 0 saves only at the end (if at_end)."""
    at_end: bool = True
    """Save a checkpoint when training finishes."""
    keep: int = Field(default=2, gt=0)
    """How many of the newest checkpoints the current timeline wrote to keep on disk; checkpoints
    of other timelines (the one a rollback resumed from, abandoned ones) are never pruned."""
    asynchronous: bool = True
    """Stage the state to host memory and write it in the background (false: write before training goes on)."""
    remote: str | None = None
    """A fsspec URL (s3://bucket/run/island-0, file:///mnt/x, ...) that receives a copy of every checkpoint, manifest
    last, in the background: training never waits for it nor stops for it (a failure is a log line and the metrics
    field checkpoint_remote_error; the next checkpoint is copied again), and checkpoint.keep prunes regardless."""
    remote_attempts: int = Field(default=3, ge=1)
    """Tries of one checkpoint's remote copy before it is reported as failed."""
    remote_backoff_s: float = Field(default=5.0, ge=0)
    """Seconds before the second try of a remote copy, doubling before each later one."""
    remote_final_wait_s: float = Field(default=600.0, ge=0)
    """At the end of training, how long to wait for the last checkpoint's remote copy (retries included)."""


class MetricsConfig(Section):
    per_island = frozenset({"log_every", "peak_flops", "progress", "tensorboard", "wandb_project"})
    log_every: int = Field(default=1, gt=0)
    """Write a metrics.jsonl record (and a log line) every this many steps."""
    peak_flops: float | None = Field(default=None, gt=0)
    """Peak FLOP/s of one accelerator for MFU; None detects known GPUs and reports mfu null on CPU."""
    progress: Literal["auto", "bar", "plain"] = "auto"
    """auto: a progress bar on a terminal, plain log lines otherwise."""
    tensorboard: bool = False
    """Also write every record's numbers as TensorBoard event files into <run dir>/tensorboard, at
    the record's inner step (`tensorboard --logdir RUN_DIR`). Needs `pip install 'atoll[tensorboard]'`."""
    wandb_project: str | None = None
    """Also log every record's numbers to this Weights & Biases project: one W&B run per island,
    named by its island id and grouped by the run id, files under <run dir>/wandb. WANDB_MODE=offline
    keeps them on the machine (`wandb sync` uploads them later). Needs `pip install 'atoll[wandb]'`."""


class MeshConfig(Section):
    # how this island reaches the run and how long it waits; run-wide: mode, and outer_attempts (the
    # islands must give up on an outer step together to skip it alike). Settings read by the
    # coordinator (heartbeat_timeout_s, report_grace_s, evict_after) are per island: islands never use them.
    per_island = frozenset({
        "coordinator", "island_id", "connect_timeout_s", "coordinator_retry_s", "join_timeout_s", "collective_timeout_s",
        "heartbeat_interval_s", "heartbeat_timeout_s", "report_grace_s", "evict_after", "enter_attempts",
        "max_skipped_in_a_row", "token", "serve_host", "transfer_chunk_mb", "transfer_attempts",
        "interface", "advertise_host", "port_range", "advertise_port_range",
    })
    coordinator: str | None = None
    """host:port of the run's coordinator; None trains this island alone (set by --coordinator)."""
    island_id: str | None = None
    """This island's id in the run; None generates hostname-<random> (set by --island-id)."""
    mode: Literal["diloco", "ddp"] = "diloco"
    """diloco: average pseudo-gradients every diloco.inner_steps; ddp: average gradients every step (baseline)."""
    connect_timeout_s: float = Field(default=30.0, gt=0)
    """Seconds to wait for the coordinator to answer before giving up."""
    coordinator_retry_s: float = Field(default=300.0, gt=0)
    """Seconds an island keeps retrying a coordinator that stopped answering mid-run (paused,
    restarting, a network outage) before it exits as having lost it (exit code 3). A pause of the
    coordinator shorter than this costs the run its length and nothing else."""
    join_timeout_s: float = Field(default=600.0, gt=0)
    """Seconds to reach the coordinator and register. Waiting for admission afterwards (the run's
    start, or a running run's next outer step) is unbounded while the run is alive, with a line
    every 30 s saying where the run is."""
    collective_timeout_s: float = Field(default=300.0, gt=0)
    """Deadline of every collective on the global groups; a peer silent this long fails the step.
    A peer that hangs in the middle of an all-reduce is noticed after this long (a hang anywhere
    else after mesh.heartbeat_timeout_s), so keep it above the slowest expected transfer."""
    heartbeat_interval_s: float = Field(default=2.0, gt=0)
    """Seconds between the heartbeats an island's leader sends the coordinator (INTELLECT-1: 2 s)."""
    heartbeat_timeout_s: float = Field(default=10.0, gt=0)
    """The coordinator drops an island whose heartbeat has not changed for this long, on its own
    clock (a hung island, e.g. SIGSTOP); islands waiting for it at an outer step go on then.
    Read by the coordinator: set it for `atoll coordinator` and `atoll simulate`."""
    report_grace_s: float = Field(default=0.5, gt=0)
    """After the first report of a failed collective, the coordinator waits this long for the other
    members to report before forming the next epoch. Only islands that are gone (deathrattle,
    closed control connection, stale heartbeat) are left out: an island alive but busy in its
    ring is kept, so this is a latency knob, not an eviction rule. Read by the coordinator."""
    evict_after: int = Field(default=3, ge=1)
    """When this many epochs in a row fail with the same members (e.g. a pair of islands that
    cannot connect), the coordinator evicts the culprit: the island failure reports point at,
    else the most recent joiner. Read by the coordinator."""
    enter_attempts: int = Field(default=20, ge=1)
    """Epochs in a row an island may fail to enter before it gives up with an error."""
    max_skipped_in_a_row: int = Field(default=5, ge=1)
    """Outer steps skipped in a row (every attempt failed) that stop the run with one line."""
    token: str | None = None
    """The run's shared secret (see atoll.mesh.auth); None uses ATOLL_RUN_TOKEN, else the run is open.
    Prefer the environment variable: config values are written to the run directory."""
    outer_attempts: int = Field(default=3, ge=1)
    """Attempts at averaging one outer step (each among the survivors of the last); when all fail,
    every island skips the outer step identically (metrics say skipped) and training goes on."""
    serve_host: str | None = None
    """Address this island's state servers bind (see atoll.comm.transfer); 0.0.0.0 binds every
    address (then set advertise_host). None: the address of mesh.interface, else this host's
    address on the route to the coordinator. gloo's rings bind it too when neither mesh.interface
    nor GLOO_SOCKET_IFNAME is set (see atoll.mesh.addresses)."""
    interface: str | None = None
    """Network interface whose address this island listens on, e.g. an overlay's wg0 (WireGuard)
    or tailscale0: gloo's rings bind it (instead of GLOO_SOCKET_IFNAME) and the state servers its
    IPv4 address (unless serve_host is set), which is also what the island announces."""
    advertise_host: str | None = None
    """Address peers dial to reach this island's state servers, when it differs from the one they
    bind: a NAT's public address whose router forwards mesh.advertise_port_range (or the same
    ports) to serve_host's mesh.port_range. None: the bound address. gloo's rings cannot use it:
    torch's gloo announces the address it binds (see README, Runs across the internet)."""
    port_range: str | list[int] | None = None
    """Ports this island's state servers bind, "LOW-HIGH" or [LOW, HIGH]: each local rank takes
    the first free one, so give at least as many as local ranks. None: any free port. gloo's ring
    ports cannot be fixed: the kernel picks them from net.ipv4.ip_local_port_range."""
    advertise_port_range: str | list[int] | None = None
    """Ports peers dial, when a router forwards other ports than it receives: the n-th port of this
    range reaches the n-th of mesh.port_range (same length). None: the bound ports."""
    transfer_chunk_mb: float = Field(default=2.0, gt=0)
    """Size of a state transfer's chunks (each checked against its sha256; a dead source costs one
    chunk). Small enough that the streams of a transfer end together (the last chunks in flight are
    the tail the link idles through) and an outer step waits at most one chunk's hash."""
    transfer_attempts: int = Field(default=3, ge=1)
    """Fetches a joiner tries before it takes the run's state by broadcast on entering (stalling the members)."""

    @field_validator("port_range")
    @classmethod
    def _port_range(cls, value: str | list[int] | None) -> str | None:
        """Checked and written as "LOW-HIGH" (what the config file records)."""
        return None if value is None else str(parse_port_range(value))

    @field_validator("advertise_port_range")
    @classmethod
    def _advertise_port_range(cls, value: str | list[int] | None, info: ValidationInfo) -> str | None:
        """Checked against port_range (validated before it): as many ports, the n-th forwarded to the n-th."""
        if value is None:
            return None
        advertised = parse_port_range(value)
        if info.data.get("port_range") is None:
            raise ValueError("needs mesh.port_range, the ports it forwards to")
        bound = parse_port_range(info.data["port_range"])
        if len(bound) != len(advertised):
            raise ValueError(f"{len(advertised)} ports for the {len(bound)} of mesh.port_range {bound}: give as many, the n-th forwarded to the n-th")
        return str(advertised)


class DilocoConfig(Section):
    inner_steps: int = Field(default=50, gt=0)
    """H: inner (AdamW) steps between outer steps. INTELLECT-1 used 100."""
    outer_lr: float = Field(default=0.7, gt=0)
    """Learning rate of the outer SGD step on the averaged pseudo-gradient."""
    outer_momentum: float = Field(default=0.8, ge=0, lt=1)
    """Momentum of the outer SGD step; 0 makes it plain SGD. 0.8, not DiLoCo's 0.9: with two
    islands of the debug model at H=50 (benchmarks/convergence.py, 3 seeds) 0.9 ends 3.4% behind
    data-parallel and 0.8 about half that; at 0.9 momentum carries each outer step's
    pseudo-gradient ten outer steps on, and with few islands those are noisy (README: How close
    DiLoCo comes to data-parallel)."""
    nesterov: bool = True
    """Use Nesterov momentum in the outer step (DiLoCo's choice)."""
    anneal_with_schedule: bool = True
    """Anneal the outer step with the inner LR schedule: once warmup is over, with w the schedule's
    LR multiplier, the outer lr is 1 - (1 - outer_lr) * w and the momentum outer_momentum * w. A
    constant schedule (w = 1) keeps plain DiLoCo; in a WSD or cosine decay the outer step turns
    into a plain average of the islands' annealed weights, instead of momentum carrying large
    stale pseudo-gradients through the decay (benchmarks/convergence.py --rows no-anneal: +12.5%
    validation loss against data-parallel without it on one seed; the gap with it, over seeds, is
    in the README). Annealing during warmup too was measured worse at 600 steps (+2%), but the
    loss there does not predict the final one: a plain average through the run's first fifth ends
    better (plain_average_fraction)."""
    plain_average_fraction: float = Field(default=0.2, ge=0, lt=1)
    """For this first fraction of train.steps the outer step is a plain average of the islands'
    weights (outer lr 1, no momentum); the Nesterov step (outer_lr, outer_momentum) begins after it,
    its momentum built from that step on. Early pseudo-gradients are large and turn quickly, and
    momentum carries each one about five outer steps on. On benchmarks/convergence.py (int8, H=50,
    seeds 0-4 on two machines) 0.2 lowered the gap to data-parallel on 8 of 10 runs, by 0.7% on
    average, and the worst seed from +2.24% to +1.13%, at no cost in bytes. At H=100 (half as
    many outer steps) it was 0.6% worse on average (5 of 6 runs): set 0 there, which starts the
    Nesterov step at the first outer step (DiLoCo's recipe); at H=25 it was level within the
    seeds' spread. The switch is a function of the step and train.steps, so every island, joiner
    and resumed run agrees on it."""
    decouple_weight_decay: bool = True
    """Keep the inner AdamW's weight decay out of the outer step: each pseudo-gradient leaves out
    what the decay took from the weights during the inner phase, and the outer step applies that
    decay once, unscaled. Off, the decay is part of every pseudo-gradient, always pointing the same
    way, and Nesterov momentum multiplies it by outer_lr / (1 - outer_momentum): up to 7x the
    data-parallel run's decay at the defaults (see diloco.DiLoCo.set_weight_kept)."""
    max_norm_ratio: float = Field(default=5.0, gt=1)
    """Reject an island's pseudo-gradient when its norm, or one per-layer bucket's norm, exceeds this
    many times the median of the other islands' (non-finite ones are always rejected); rejected
    islands contribute zeros and the mean is over the accepted ones (see atoll.validation)."""
    min_accepted: int = Field(default=1, ge=1)
    """Fewer accepted contributions than this (capped at the number of islands) skip the outer step
    on every island alike: outer weights unchanged, inner weights reset to them."""
    overlap_steps: int = Field(default=0, ge=0)
    """tau: inner steps an outer step's all-reduce runs behind (Streaming DiLoCo's overlap,
    Douillard et al. 2025, arXiv:2501.18512). At a boundary the island computes its pseudo-gradient
    and starts the validated all-reduce in the background, trains tau more inner steps, then lands
    it: the agreement, the outer step, and the merge into the inner weights it has moved on to
    (`merge_weight`). 0 is the blocking outer step. Must be below inner_steps; an outer step that
    would land after train.steps (the last ones) blocks. Costs one more flat fp32 buffer on the
    host (4 bytes per parameter): the contribution is kept for retries among survivors. Run-wide;
    ddp mode has no outer steps and ignores it."""
    merge_weight: float = Field(default=0.5, ge=0, lt=1)
    """With overlap_steps > 0 and overlap_merge "mix": the share of its own newer inner weights an island keeps when an
    overlapped outer step lands, inner <- w * inner + (1 - w) * outer. 0 replaces them with the new
    outer weights as blocking DiLoCo does (dropping the tau steps trained meanwhile); Streaming
    DiLoCo mixes with 0.5. An island whose contribution was rejected, and every island of a skipped
    step, takes the outer weights whole."""
    overlap_merge: Literal["mix", "delta"] = "delta"
    """With overlap_steps > 0, how a landing outer step meets the inner weights that moved on:
    "delta" keeps the island's progress since the boundary on top of the new outer weights,
    inner <- outer + (inner - inner at the boundary), so that every island leaves the landing as
    close to the others as after a blocking step plus its own tau steps (the delay-corrected merge
    of local SGD with overlap); "mix" merges them with merge_weight (Streaming DiLoCo's), which
    leaves each island part of its own drift. "delta" is the default from
    benchmarks/convergence.py, 3 seeds, tau = 10 at H = 50: +2.44% +- 0.86 behind data-parallel
    against +2.88% +- 1.21 for "mix" (2 fragments: +2.34% +- 1.25 against +3.83% +- 1.44)."""
    fragments: int = Field(default=1, ge=1)
    """P: average the model in P fragments of consecutive transformer blocks (Streaming DiLoCo,
    Douillard et al. 2025, arXiv:2501.18512), each every inner_steps, staggered by inner_steps / P:
    an outer step every inner_steps / P inner steps carries one fragment, so the link carries 1/P of
    the model at a time (peak bandwidth / P), and with overlap_steps it hides behind fewer inner
    steps. The last outer step of the run averages every fragment. 1 averages the whole model at
    once. Must divide inner_steps and be at most the model's number of blocks; overlap_steps must be
    below inner_steps / P (one fragment in flight at a time). See atoll/fragments.py."""
    eager: bool = False
    """Eager outer steps (Kale, Douillard, Donchev 2025, arXiv:2502.12996): an outer step's all-reduce
    runs behind the whole next inner phase (it lands after inner_steps - 1 more steps, just before
    the next boundary), and meanwhile the island starts that phase from an eager estimate of the
    step: the outer Nesterov step on its own share of the average (its new pseudo-gradient /
    islands), the others' shares arriving with the landing. The landing applies the true
    average to the outer weights every island shares (the digests stay equal); the inner weights
    keep training, and the next pseudo-gradient is measured from the eager start (the phase's own
    progress). The last phase of the run blocks, so every island ends on the same weights.
    Needs inner_steps >= 2; overlap_steps (it overlaps the whole phase) and fragments do not apply.
    Costs two more flat fp32 buffers on the host (8 bytes per parameter: the held contribution and
    the phase's start, which checkpoints save)."""

    @model_validator(mode="after")
    def _check_overlap(self) -> DilocoConfig:
        if self.inner_steps % self.fragments:
            raise ValueError(
                f"diloco.fragments ({self.fragments}) must divide diloco.inner_steps ({self.inner_steps}): "
                "the fragments' outer steps are inner_steps / fragments apart"
            )
        if self.eager and (self.overlap_steps or self.fragments > 1 or self.inner_steps < 2):
            raise ValueError(
                "diloco.eager overlaps each outer step with the whole next inner phase: it needs diloco.inner_steps >= 2 "
                f"(got {self.inner_steps}), diloco.overlap_steps 0 (got {self.overlap_steps}) and diloco.fragments 1 (got {self.fragments})"
            )
        period = self.inner_steps // self.fragments
        if self.overlap_steps >= period:
            bound = "diloco.inner_steps" if self.fragments == 1 else "diloco.inner_steps / diloco.fragments"
            raise ValueError(
                f"diloco.overlap_steps ({self.overlap_steps}) must be below {bound} ({period}): "
                "an outer step's all-reduce lands before the next boundary"
            )
        return self


class CommConfig(Section):
    codec: Literal["fp32", "bf16", "fp16", "int8", "int4", "codebook8", "topk"] = "int8"
    """Wire format of everything averaged across islands: fp32 (exact), bf16, fp16, int8 (blockwise
    absmax: 64 values share one bf16 scale, 3.9x fewer bytes than fp32), int4 (blockwise FP4
    e2m1: 32 values share one bf16 scale, 7.1x fewer bytes than fp32, 10% relative error on
    Gaussian: pair it with `error_feedback`), codebook8 (PRIME's 256-entry codebook) or topk
    (SparseLoCo's sparse pseudo-gradients: the `topk_density` largest values of every 4096 at
    `topk_bits` bits with 12-bit offsets, 141x fewer bytes than fp32 at the defaults, gathered
    from every island instead of summed along the ring; needs `error_feedback`). int8 is
    the default: it beat codebook8 on Gaussian and heavy-tailed values (0.6% vs 1.6% relative
    error on Gaussian; see comm/codecs.py)."""
    topk_density: float = Field(default=1 / 64, gt=0, le=1)
    """topk only: the share of each chunk of 4096 values that is sent, rounded to a whole number of
    values (at least 1); 1/64 sends 64 of every 4096 (SparseLoCo sends 1-3%). The rest waits in
    the error-feedback residual."""
    topk_bits: Literal[1, 2, 4] = 2
    """topk only: bits per sent value, a sign and topk_bits - 1 bits choosing one of the chunk's
    2^(topk_bits - 1) mean magnitudes (SparseLoCo sends 2). The 12-bit offsets cost more than the
    values: 2 bits take 0.0283 bytes per value at density 1/64, 4 bits 0.0352."""
    error_feedback: bool = False
    """DiLoCo: each island keeps what the codec lost of its contributions in the last outer step
    (fp32, CPU, 8 more bytes per parameter) and adds it to its next pseudo-gradient, so what a
    lossy codec drops is sent late instead of lost (see atoll/diloco.py for rejected contributions, skipped
    steps, joiners and checkpoints). Run-wide; ddp mode has no pseudo-gradients and ignores it.
    A checkpoint saved without it cannot be resumed with it on."""
    streams: int = Field(default=1, ge=1, le=16)
    """Independent rings per local rank (one process group each, every bucket split between them);
    more than 1 lets one process fill a long fat link, as parallel TCP connections do."""
    chunk_mb: float = Field(default=4.0, gt=0)
    """Pipelining unit of the ring, in MB of fp32 values: one chunk is encoded while the previous
    one is on the wire."""
    ring_order: Literal["id", "measured"] = "id"
    """Order of the islands around the ring (and so their rank in the global groups): "id" sorts
    them by island id; "measured" has the coordinator pick the order whose slowest directed link
    is the fastest from the links the islands measure and report (atoll/mesh/ring_order.py), for
    each new epoch, and re-form the epoch at an outer-step boundary when a measured order's
    slowest link is `atoll.mesh.ring_order.REORDER_GAIN` times the current one's. Run-wide."""
    link_probe_every: int = Field(default=10, ge=0)
    """With ring_order = "measured": besides measuring when an epoch forms, re-measure the links
    after every this many committed outer steps, in a background thread while the next inner phase
    trains (2 MiB and a few round trips per peer), so that a link that slows down mid-run moves
    the ring at a later boundary; 0 measures only when an epoch forms. Run-wide: the members
    measure each other at the same outer step."""

    @model_validator(mode="after")
    def _check_topk(self) -> CommConfig:
        # without a residual, the values topk leaves out (98% of them at the default) are lost for good
        if self.codec == "topk" and not self.error_feedback:
            raise ValueError(
                'comm.codec = "topk" sends only the largest values of each chunk and needs comm.error_feedback = true '
                "to send the rest later: set it (--comm.error_feedback true) or choose another codec"
            )
        return self


class JobConfig(Section):
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    metrics: MetricsConfig = MetricsConfig()
    mesh: MeshConfig = MeshConfig()
    diloco: DilocoConfig = DilocoConfig()
    comm: CommConfig = CommConfig()

    @model_validator(mode="after")
    def _check_cross_fields(self) -> JobConfig:
        if self.schedule.warmup_steps > self.train.steps:
            raise ValueError(
                f"schedule.warmup_steps ({self.schedule.warmup_steps}) exceeds train.steps ({self.train.steps})"
            )
        stable_end = self.train.steps * (1 - self.schedule.decay_fraction)
        if self.schedule.kind == "wsd" and self.schedule.warmup_steps > stable_end:
            raise ValueError(
                f"schedule.warmup_steps ({self.schedule.warmup_steps}) runs into the decay phase, which starts at "
                f"step {stable_end:.0f} (train.steps x (1 - schedule.decay_fraction))"
            )
        if self.train.micro_batch is not None and self.train.micro_batch > self.train.global_batch:
            raise ValueError(
                f"train.micro_batch ({self.train.micro_batch}) exceeds train.global_batch ({self.train.global_batch})"
            )
        return self


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """Turn `--a.b value` / `--a.b=value` pairs into a flat {"a.b": value} dict.

    Values are read as TOML literals when they parse (numbers, booleans, arrays), else as strings.
    """
    overrides: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise UserError(
                f"unexpected argument {arg!r}: give the config file first, then overrides as --section.key value"
            )
        key, sep, value = arg[2:].partition("=")
        if not sep:
            if i + 1 >= len(args):
                raise UserError(f"--{key} needs a value, e.g. --{key} VALUE")
            value = args[i + 1]
            i += 1
        if "." not in key:
            raise UserError(f"unknown option --{key}: config overrides look like --section.key value")
        overrides[key] = _parse_value(key, value)
        i += 1
    return overrides


def _parse_value(key: str, text: str) -> Any:
    """A TOML literal, except that a text field keeps text that TOML would read as a number or date."""
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
    if not isinstance(value, str) and _accepts_text(key):
        return text
    return value


def _accepts_text(key: str) -> bool:
    node: Any = JobConfig
    for part in key.split("."):
        fields = getattr(node, "model_fields", {})
        if part not in fields:
            return False
        node = fields[part].annotation
    return node is str or str in get_args(node)


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = tree
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"cannot set --{key}: {part!r} is a value, not a section")
        node = child
    node[leaf] = value


def read_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file; a missing or malformed file is a UserError naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} not found: pass the path of a TOML file such as configs/debug.toml")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise UserError(f"config file {path} is not UTF-8 text (byte {err.start}): save it as UTF-8") from None
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"config file {path} is not valid TOML: {err}") from None


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> JobConfig:
    """Build the config from a TOML file (or the defaults when path is None) plus dotted overrides."""
    tree = read_toml(path) if path is not None else {}
    overrides = overrides or {}
    for key, value in overrides.items():
        _set_dotted(tree, key, value)
    try:
        return JobConfig.model_validate(tree)
    except ValidationError as err:
        raise UserError(_describe(err, path, overrides)) from None


def _describe(err: ValidationError, path: str | Path | None, overrides: dict[str, Any]) -> str:
    """One line for the first validation error: the dotted key, what is wrong, where it came from."""
    first = err.errors()[0]
    key = ".".join(str(part) for part in first["loc"] if not isinstance(part, int))
    from_cli = [k for k in overrides if k == key or k.startswith(key + ".")] if key else []
    origin = f"--{from_cli[0]}" if from_cli else (str(path) if path else "defaults")
    if first["type"] == "extra_forbidden":
        *parents, leaf = key.split(".")
        section: type[BaseModel] = JobConfig
        for part in parents:
            section = section.model_fields[part].annotation  # type: ignore[assignment]
        hint = difflib.get_close_matches(leaf, list(section.model_fields), n=1)
        fix = f"did you mean {'.'.join([*parents, hint[0]])}?" if hint else "see `atoll train --help`"
        return f"unknown config key {key!r} (in {origin}): {fix}"
    if not key:
        origin = " + ".join([str(path) if path else "defaults", *(f"--{k}" for k in overrides)])
        return f"invalid config (from {origin}): {first['msg'].removeprefix('Value error, ')}"
    return f"config key {key!r} (in {origin}): {first['msg'].removeprefix('Value error, ')}, got {first['input']!r}"


def dump_config(cfg: JobConfig, path: Path) -> None:
    """Write the resolved config as TOML (None fields omitted: they mean 'the default'); readable by
    the owner only when it holds mesh.token."""
    text = tomli_w.dumps(cfg.model_dump(exclude_none=True))
    atomic_write(path, lambda f: f.write(text.encode()), PRIVATE_MODE if cfg.mesh.token else FILE_MODE)


def describe_fields() -> str:
    """Every config key with its type, default, scope and description, for `--help`."""
    lines = ["Keys marked 'per island' may differ between the islands of a run; the others must agree."]
    for section_name, section_field in JobConfig.model_fields.items():
        section = section_field.annotation
        lines.append(f"[{section_name}]")
        for name, field in section.model_fields.items():  # type: ignore[union-attr]
            scope = " per island" if name in section.per_island else ""  # type: ignore[union-attr]
            lines.append(f"  --{section_name}.{name} (default {field.default!r}){scope}")
            lines.append(f"      {field.description}")
    return "\n".join(lines)

