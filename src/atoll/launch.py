"""Starting an island's local ranks: `atoll train --nproc N` runs torchrun for you.

The launcher resolves the run directory once, so every rank writes into the same one, and passes
the user's arguments through unchanged. Under torchrun each rank reads RANK/WORLD_SIZE itself.
torchrun runs inside `python -m atoll.launch`, which ends with the exit code of the rank that
failed first (an expected failure's documented code, see `atoll.errors`) instead of torchrun's
traceback and failure table: the rank has said in one line what went wrong.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import uuid
from datetime import datetime, timezone
from pathlib import Path

from atoll.island import RANK_ENV
from atoll.logs import log

LAUNCHER_PID_ENV = "ATOLL_LAUNCHER_PID"
LAUNCHER_CHECK_S = 0.5


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
        sys.executable, "-m", "atoll.launch",
        "--standalone", f"--nproc-per-node={nproc}",
        "-m", "atoll.cli", "train", *train_args,
    ]
    env = {**os.environ, LAUNCHER_PID_ENV: str(os.getpid())}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return subprocess.run(command, env=env).returncode


def exit_with_launcher() -> None:
    """In a rank started by `atoll train --nproc N`: exit as soon as that launcher is gone.

    torchrun puts its workers in sessions of their own, so a launcher killed by any signal
    (even SIGKILL, which it cannot pass on) would leave them training as orphans. A daemon
    thread checks every LAUNCHER_CHECK_S that the launcher lives, and ends this process
    (exit 1, no clean-up: the peers treat it as a crash) when it does not.
    """
    launcher = os.environ.get(LAUNCHER_PID_ENV)
    if launcher is None:
        return

    def watch() -> None:
        while launcher_alive(int(launcher)):
            threading.Event().wait(LAUNCHER_CHECK_S)
        log.warning(f"atoll: the launcher (pid {launcher}) is gone; local rank exits")
        os._exit(1)

    threading.Thread(target=watch, name="atoll-launcher-watch", daemon=True).start()


def launcher_alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, dead but not yet reaped by its parent, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        return True  # no /proc to read: presume alive rather than kill a healthy rank


def torchrun(argv: list[str]) -> int:
    """torchrun's `run` on `argv`; the exit code of the first rank that failed (1 if it died by a
    signal), with torchrun's own traceback and log lines of the failure left out unless ATOLL_DEBUG."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    from atoll.errors import DEBUG_ENV

    if not os.environ.get(DEBUG_ENV):
        logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(parse_args(argv))
    except ChildFailedError as err:
        if os.environ.get(DEBUG_ENV):
            raise
        exitcode = err.get_first_failure()[1].exitcode
        return exitcode if exitcode > 0 else 1
    return 0


if __name__ == "__main__":
    sys.exit(torchrun(sys.argv[1:]))
