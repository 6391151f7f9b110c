"""Training metrics: FLOPs and MFU, and the metrics.jsonl / progress-bar / log-line sink.

MFU follows the PaLM appendix (Chowdhery et al. 2022): FLOPs per token = 6N + 12·layers·dim·seq,
N the parameters that take part in matmuls (all but the input embedding).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import torch
from tqdm import tqdm

from atoll.atomic import atomic_write
from atoll.model import ModelArgs

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


class MetricsLog:
    """Appends one JSON object per record to metrics.jsonl and shows progress to the user.

    Only the process that writes (local rank 0) should create one with `enabled=True`; the others
    get a silent instance so callers need no rank checks.
    """

    def __init__(self, path: Path, total_steps: int, start_step: int, progress: str, enabled: bool) -> None:
        self.enabled = enabled
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
        summary = _summary(record)
        if self._bar is not None:
            self._bar.n = record.get("step", self._bar.n)
            self._bar.set_postfix_str(summary, refresh=True)
        else:
            print(f"step {record.get('step')}: {summary}", flush=True)

    def info(self, message: str) -> None:
        """A human-readable line that does not garble the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
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
        parts.append(f"outer_step={record['outer_step']} sync={record['sync_s']:.2f}s "
                     f"utilization={record['utilization']:.1%} sent={record['bytes_sent'] / 1e6:.1f}MB")
    return " ".join(parts)
