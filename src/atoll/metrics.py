"""Training metrics: FLOPs and MFU, and the sinks of every record: metrics.jsonl, the progress
bar or per-step line, and optionally TensorBoard event files and Weights & Biases.

MFU follows the PaLM appendix (Chowdhery et al. 2022): FLOPs per token = 6N + 12·layers·dim·seq,
N the parameters that take part in matmuls (all but the input embedding).

TensorBoard and W&B receive the same scalars, `scalars(record)`, at the record's inner step:
every number of the record, nested ones as `name/key` (tokens_by_source/web,
val_loss_by_source/code, contribution_norms/island-1) and `rejected` as a count. Both are optional
extras (`pip install 'atoll[tensorboard]'`, `'atoll[wandb]'`); `check_sinks` says which one is
missing in one line before anything is built.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Protocol, TextIO

import torch
from tqdm import tqdm

from atoll import logs
from atoll.atomic import atomic_write
from atoll.config import MetricsConfig
from atoll.errors import UserError
from atoll.model import ModelArgs

TENSORBOARD_DIR = "tensorboard"
"""Where in the run directory metrics.tensorboard writes its event files."""
WANDB_DIR = "wandb"
"""Where in the run directory W&B keeps its files (offline runs: wandb/offline-run-*/)."""

# Dense bf16 tensor-core peak FLOP/s by device-name fragment, most specific first.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "GH200": 989e12,
    "A100": 312e12,
    "A10G": 125e12,
    "L40S": 362e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
    "MI300X": 1307e12,
}


def flops_per_token(args: ModelArgs, non_embedding_params: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls plus 12·L·d·T for attention scores."""
    return 6 * non_embedding_params + 12 * args.n_layers * args.dim * seq_len


def detect_peak_flops(device: torch.device) -> float | None:
    """Peak bf16 FLOP/s of a known GPU, or None (CPU, unknown GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, flops in PEAK_BF16_FLOPS.items():
        if fragment in name:
            return flops
    return None


ABANDONED_SUFFIX = ".abandoned.jsonl"


def abandon_metrics_after(path: Path, step: int, timeline: int) -> int:
    """Move the records past `step` out of metrics.jsonl, so a run resumed at `step` continues
    it without duplicated steps; returns how many moved.

    They are appended, tagged with `abandoned_by_timeline`, to metrics.abandoned.jsonl beside it
    (fsynced) before metrics.jsonl is atomically rewritten, so a crash in between duplicates
    records there, never loses one. Lines that are not JSON (a torn last line) are dropped.
    """
    if not path.is_file():
        return 0
    keep, moved = [], []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        (moved if record.get("step", 0) > step else keep).append(record)
    if not moved:
        return 0
    with path.with_name(path.name.removesuffix(".jsonl") + ABANDONED_SUFFIX).open("a") as f:
        f.writelines(json.dumps({**r, "abandoned_by_timeline": timeline}) + "\n" for r in moved)
        f.flush()
        os.fsync(f.fileno())
    atomic_write(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in keep).encode()))
    return len(moved)


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The record's numbers as flat scalar names (what TensorBoard and W&B get); `time` and `step`
    are the axes, not scalars; text (the outer digest) and missing values are left out."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if key in ("time", "step"):
            continue
        if isinstance(value, dict):
            out.update({f"{key}/{k}": float(v) for k, v in value.items() if _is_number(v)})
        elif key == "rejected" and isinstance(value, list):
            out[key] = float(len(value))
        elif _is_number(value):
            out[key] = float(value)
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and (isinstance(value, bool) or math.isfinite(value))


class ScalarSink(Protocol):
    """Where a record's scalars go besides metrics.jsonl."""

    def write(self, step: int, values: dict[str, float]) -> None: ...

    def close(self) -> None: ...


EXTRAS = {"tensorboard": ("tensorboard", "metrics.tensorboard"), "wandb": ("wandb", "metrics.wandb_project")}
"""extra name -> (module it installs, the config key that needs it)."""


def check_sinks(cfg: MetricsConfig) -> None:
    """One line naming the extra to install when a configured sink's package is missing (UserError)."""
    wanted = [extra for extra, on in (("tensorboard", cfg.tensorboard), ("wandb", cfg.wandb_project)) if on]
    for extra in wanted:
        module, key = EXTRAS[extra]
        if importlib.util.find_spec(module) is None:
            raise UserError(f"{key} needs the {module} package: pip install 'atoll[{extra}]' (or turn {key} off)")


class TensorBoardSink:
    """Event files in RUN_DIR/tensorboard (`tensorboard --logdir RUN_DIR` shows one run per island
    of a simulate directory), written by torch's SummaryWriter."""

    def __init__(self, run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR))

    def write(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """One W&B run per island (named by the island id, grouped by the run id, files under
    RUN_DIR/wandb); a restarted island continues its W&B run (same id). With WANDB_MODE=offline
    nothing leaves the machine (`wandb sync` uploads later). A failed start is a UserError."""

    def __init__(self, project: str, run_dir: Path, island: str, run_id: str, config: dict[str, Any]) -> None:
        import wandb

        (run_dir / WANDB_DIR).mkdir(parents=True, exist_ok=True)
        try:
            self.run = wandb.init(project=project, name=island, group=run_id, id=f"{run_id}-{island}"[:64], resume="allow",
                                  dir=str(run_dir), config=config, job_type="island")
        except Exception as err:  # wandb raises its own errors (no login, no network) from several layers
            raise UserError(f"metrics.wandb_project {project!r}: W&B did not start: {str(err).splitlines()[0]} "
                            "(log in with `wandb login`, or set WANDB_MODE=offline)") from None

    def write(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


def open_sinks(cfg: MetricsConfig, run_dir: Path, island: str, run_id: str, config: dict[str, Any]) -> list[ScalarSink]:
    """The configured TensorBoard and W&B sinks of one island (open only on its local rank 0)."""
    sinks: list[ScalarSink] = []
    if cfg.tensorboard:
        sinks.append(TensorBoardSink(run_dir))
    if cfg.wandb_project:
        sinks.append(WandbSink(cfg.wandb_project, run_dir, island, run_id, config))
    return sinks


class MetricsLog:
    """Appends one JSON object per record to metrics.jsonl, hands its scalars to the other sinks
    and shows progress to the user.

    Only the process that writes (local rank 0) should create one with `enabled=True`; the others
    get a silent instance so callers need no rank checks.
    """

    def __init__(self, path: Path, total_steps: int, start_step: int, progress: str, enabled: bool,
                 sinks: list[ScalarSink] | None = None) -> None:
        self.enabled = enabled
        self.sinks = sinks or []
        self._file: TextIO | None = None
        self._bar: tqdm | None = None
        if not enabled:
            return
        self._file = path.open("a")
        use_bar = progress == "bar" or (progress == "auto" and sys.stderr.isatty())
        if use_bar:
            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def log(self, record: dict[str, Any]) -> None:
        """Write a record (one line of JSON) and show its headline numbers."""
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.sinks:
            values = scalars(record)
            for sink in self.sinks:
                sink.write(int(record.get("step", 0)), values)
        summary = _summary(record)
        logs.heartbeat.spoke()
        if self._bar is not None:
            self._bar.n = record.get("step", self._bar.n)
            self._bar.set_postfix_str(summary, refresh=True)
        else:
            print(f"step {record.get('step')}: {summary}", flush=True)  # the progress line, for people: not a log line

    def info(self, message: str) -> None:
        """A log line (`atoll.logs`) that does not garble the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            with self._bar.external_write_mode():
                logs.info(message)
        else:
            logs.info(message)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        for sink in self.sinks:
            sink.close()
        if self._file is not None:
            self._file.close()


def _summary(record: dict[str, Any]) -> str:
    parts = []
    for key, fmt in (("loss", "{:.4f}"), ("val_loss", "{:.4f}"), ("lr", "{:.2e}"), ("tokens_per_s", "{:,.0f}")):
        if record.get(key) is not None:
            parts.append(f"{key}={fmt.format(record[key])}")
    if record.get("mfu") is not None:
        parts.append(f"mfu={record['mfu']:.1%}")
    if "outer_step" in record:
        overlap = f" overlap={record['overlap_s']:.2f}s" if record.get("overlap_s") else ""  # only behind training
        fragment = "" if "fragment" not in record else f" fragment={'all' if record['fragment'] is None else record['fragment']}"
        parts.append(f"outer_step={record['outer_step']}{fragment} sync={record['sync_s']:.2f}s{overlap} "
                     f"utilization={record['utilization']:.1%} sent={record['bytes_sent'] / 1e6:.1f}MB")
    return " ".join(parts)
