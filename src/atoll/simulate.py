"""Several islands on this machine: `atoll simulate` and `atoll demo`.

Starts a coordinator in a thread and N islands as child processes (each an `atoll train
--coordinator ...`, itself torchrun for L > 1 local ranks), prefixes their output with the island
id, and stops everything if any island fails. Each island writes RUN_DIR/island-<i>/.

With an emulated WAN (`--wan-rate`/`--wan-delay`, see `atoll.wan`) each island runs in its own
network namespace, its gloo bound to the emulated link, and the coordinator listens in a namespace
of its own on the emulated network; the namespaces are deleted when the run ends, however it ends.
If the delay line itself dies, the islands fail at their store or collective timeouts.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO

from atoll.comm.allreduce import ring_bytes
from atoll.mesh.coordinator import Coordinator
from atoll.wan.namespaces import run_in_namespace
from atoll.wan.network import EmulatedWan

LOOPBACK = "127.0.0.1"


def island_command(config: str | None, overrides: list[str], address: str, island: str, run_dir: Path, procs: int) -> list[str]:
    """The `atoll train` command line of one simulated island."""
    return [
        sys.executable, "-m", "atoll.cli", "train", *([config] if config else []), *overrides,
        "--coordinator", address, "--island-id", island, "--run-dir", str(run_dir / island),
        "--nproc", str(procs), "--metrics.progress", "plain",
    ]


def _relay(stream: IO[str], prefix: str) -> None:
    for line in stream:
        sys.stdout.write(f"[{prefix}] {line}")
        sys.stdout.flush()


def simulate(
    config: str | None, overrides: list[str], islands: int, procs: int, run_dir: Path, wan: EmulatedWan | None = None,
) -> int:
    """Run `islands` islands of `procs` local ranks to completion; returns 0 if all succeeded.

    `wan`, when given (not yet started), is started here and closed before returning.
    """
    # SIGTERM must unwind through the finally below, or the islands (own sessions) outlive us.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    threads_per_rank = max(1, (os.cpu_count() or 1) // (islands * procs))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads_per_rank), "PYTHONUNBUFFERED": "1"}
    children: dict[str, subprocess.Popen] = {}
    relays = []
    coordinator = None
    try:
        if wan is not None:
            wan.start()
        coordinator = _start_coordinator(islands, wan)
        for i in range(islands):
            name = f"island-{i}"
            cmd = island_command(config, overrides, coordinator.address, name, run_dir, procs)
            child_env = env
            if wan is not None:
                cmd, child_env = wan.island_command(i, cmd), {**env, **wan.island_env()}
            child = subprocess.Popen(cmd, env=child_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
            children[name] = child
            relay = threading.Thread(target=_relay, args=(child.stdout, name), daemon=True)
            relay.start()
            relays.append(relay)
        failed = _wait_all(children)
    finally:
        for child in children.values():
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
        for relay in relays:
            relay.join(timeout=5)
        if coordinator is not None:
            coordinator.stop()
        if wan is not None:
            wan.close()
    if failed:
        print(f"atoll: {', '.join(failed)} failed; run dir {run_dir}", file=sys.stderr)
        return 1
    return 0


def _start_coordinator(islands: int, wan: EmulatedWan | None) -> Coordinator:
    """On loopback; or, with a WAN, listening inside its own namespace on the emulated network."""
    if wan is None:
        return Coordinator(LOOPBACK, 0, islands).start()
    return run_in_namespace(wan.coordinator_namespace, lambda: Coordinator(wan.coordinator_host, 0, islands)).start()


def _wait_all(children: dict[str, subprocess.Popen]) -> list[str]:
    """Wait for every island; on the first failure stop the others. Returns the failed ids."""
    pending = dict(children)
    while pending:
        for name, child in list(pending.items()):
            try:
                code = child.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                continue
            del pending[name]
            if code != 0:
                for other in pending.values():
                    os.killpg(other.pid, signal.SIGTERM)
                return [name]
    return []


def read_records(island_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (island_dir / "metrics.jsonl").read_text().splitlines()]


def summarize(run_dir: Path) -> str:
    """Final losses, bytes per island against data-parallel, sync time and utilization."""
    lines = []
    for island_dir in sorted(run_dir.glob("island-*")):
        records = read_records(island_dir)
        info = json.loads((island_dir / "run.json").read_text())
        last = records[-1]
        outer = [r for r in records if "outer_step" in r]
        islands = last["world_size"]
        params = info["params"]["total"]
        ddp_bytes = last["step"] * ring_bytes(params, 4, islands)
        val = [r["val_loss"] for r in records if "val_loss" in r]
        line = (
            f"{island_dir.name}: loss {last['loss']:.4f}"
            + (f", val_loss {val[-1]:.4f}" if val else "")
            + "; "
            f"sent {last['bytes_sent'] / 1e6:.1f} MB vs {ddp_bytes / 1e6:.1f} MB for data-parallel "
            f"({ddp_bytes / max(last['bytes_sent'], 1):.0f}x fewer)"
        )
        if outer:
            line += (
                f"; {len(outer)} outer steps, median sync {statistics.median(r['sync_s'] for r in outer):.3f} s, "
                f"utilization {statistics.mean(r['utilization'] for r in outer):.1%}"
            )
        lines.append(line)
    return "\n".join(lines)
