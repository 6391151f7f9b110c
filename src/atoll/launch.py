"""Starting an island's local ranks: `atoll train --nproc N` runs torchrun for you.

The launcher resolves the run directory once, so every rank writes into the same one, and passes
the user's arguments through unchanged. Under torchrun each rank reads RANK/WORLD_SIZE itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

from atoll.island import RANK_ENV


def under_torchrun() -> bool:
    """True inside a process that torchrun (or `atoll train --nproc`) started."""
    return RANK_ENV in os.environ


def default_run_dir(run_name: str) -> Path:
    """runs/<run_name>-<UTC timestamp> under the current directory."""
    stamp = datetime.utcnow().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{run_name}-{stamp}"


def run_torchrun(nproc: int, train_args: list[str]) -> int:
    """Run `atoll train <train_args>` as `nproc` local ranks under torchrun; returns its exit code.

    Standalone rendezvous on a free local port, so several islands can share a machine.
    """
    command = [
        sys.executable, "-m", "torch.distributed.run",
        "--standalone", f"--nproc-per-node={nproc}",
        "-m", "atoll.cli", "train", *train_args,
    ]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return subprocess.run(command, env=env).returncode
