"""Starting an island's local ranks: `atoll train --nproc N` runs torchrun for you.

The launcher resolves the run directory once, so every rank writes into the same one, and passes
the user's arguments through unchanged. Under torchrun each rank reads RANK/WORLD_SIZE itself.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from datetime import datetime, timezone
from pathlib import Path

from atoll.island import RANK_ENV


def under_torchrun() -> bool:
    """True inside a process that torchrun (or `atoll train --nproc`) started."""
    return RANK_ENV in os.environ


def default_run_dir(run_name: str, island_id: str | None = None) -> Path:
    """runs/<run_name>-<UTC timestamp>, plus -<island id> for an island of a mesh, under the
    current directory: two islands started in the same second never share a directory."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return Path("runs") / (f"{run_name}-{stamp}" + (f"-{island_id}" if island_id else ""))


def generated_island_id() -> str:
    """hostname-<8 random hex digits>: the island id of an island that was not given one."""
    return f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"


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
