"""Shared test helpers: running atoll as a user would, in its own process group with a hard timeout."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: a test that takes minutes by design (deselect with -m 'not slow')")


def run_atoll(args: list[str], timeout: float, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `python -m atoll.cli ARGS` and kill its whole process group if it outlives `timeout`."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "atoll.cli", *args],
        cwd=cwd or REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"atoll {' '.join(args)} did not finish in {timeout}s\n{out}\n{err}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def free_port(count: int = 1) -> int:
    """The first of `count` consecutive loopback ports nothing listens on, chosen below the kernel's
    ephemeral range (32768 and up on Linux), so that no outgoing connection of another process
    (an island's client, a gloo pair) can take it between this call and the bind that follows."""
    for _ in range(200):
        port = random.randrange(20000, 32000 - count)
        try:
            for offset in range(count):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port + offset))
        except OSError:
            continue
        return port
    raise RuntimeError("no free loopback port between 20000 and 32000")


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of a run's metrics.jsonl, in order."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses_by_step(run_dir: Path) -> dict[str, dict[int, tuple[float, str | None]]]:
    """Each island's (loss, outer digest) by step, from a simulate run directory."""
    return {
        d.name: {r["step"]: (r["loss"], r.get("outer_digest")) for r in read_metrics(d) if "loss" in r}
        for d in sorted(run_dir.glob("island-*"))
    }


def outer_step(diloco, mean) -> str:
    """One outer step on a fixed group: average, then apply; returns the new outer digest.

    (`atoll.sync` wraps the same two calls in the elastic agreement between islands.)
    """
    diloco.average(mean)
    return diloco.apply()
