"""Members' protocol latency at the coordinator, calm and while outsiders hammer its port, side by side.

    python benchmarks/protocol.py                     # 10k-connection burst, 1000-connection slowloris
    python benchmarks/protocol.py --burst 20000 --calls 400

A coordinator runs as `atoll coordinator` (its own process, as in a real run) with a token. Two
members register and beat from this process, and one of them times `latest` requests (a round
trip through authentication, the lock and the answer's MAC) on its open connection:

- calm: nothing else happens;
- burst: --burst connections opened and closed as fast as 4 processes can (an outsider without
  the token; `atoll.mesh.service` caps them per source and in all before reading a byte);
- slowloris: --slowloris connections held open, each trickling a byte of a request line every
  second (they fill the per-source cap; the rest are turned away).

Outsiders run in processes of their own, so their CPU competes with the coordinator's as an
attacker's would on the same host (on loopback: the worst case, the attacker shares the cores).
Shown: median, p99 and max latency per phase, and the ratio of each median to the calm one
(target: <= 2x); the load average before and after. Figures, not pass/fail.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from multiprocessing import Process
from pathlib import Path

from atoll.mesh.client import CoordinatorClient, Heartbeat, new_incarnation, register, wait_for_admission

REPO = Path(__file__).resolve().parents[1]
TOKEN = "protocol-benchmark-token"
LOOPBACK = "127.0.0.1"
BURST_PROCESSES = 4


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def start_coordinator(port: int) -> subprocess.Popen:
    env = {**os.environ, "ATOLL_RUN_TOKEN": TOKEN, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "atoll.cli", "coordinator", "--port", str(port), "--islands", "2", "--stay"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )


def members(address: str) -> tuple[CoordinatorClient, list[Heartbeat]]:
    """Two registered, beating members; the first one's main client times requests."""
    beats, mains = [], []
    for name in ("a", "b"):
        incarnation = new_incarnation()
        main = CoordinatorClient(address, name, incarnation, TOKEN, 30.0, 60.0, "main", lambda line: None)
        register(main, 1, {})
        beats.append(Heartbeat(CoordinatorClient(address, name, incarnation, TOKEN, 30.0, 60.0, "beat", lambda line: None), 2.0))
        mains.append(main)
    wait_for_admission(mains[0], -1, lambda line: None)
    return mains[0], beats


def burst(port: int, count: int, deadline: float) -> None:
    for _ in range(count):
        if time.monotonic() > deadline:
            return
        try:
            socket.create_connection((LOOPBACK, port), timeout=5).close()
        except OSError:
            pass


def slowloris(port: int, count: int, seconds: float) -> None:
    held = []
    for _ in range(count):
        try:
            held.append(socket.create_connection((LOOPBACK, port), timeout=5))
        except OSError:
            pass
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for sock in list(held):
            try:
                sock.send(b"G")
            except OSError:
                held.remove(sock)
        time.sleep(1.0)
    for sock in held:
        sock.close()


def timed(main: CoordinatorClient, calls: int, pause_s: float, while_alive: list[Process] = ()) -> list[float]:
    """Latencies (ms) of `calls` requests (fewer if every process in `while_alive` has ended)."""
    latencies = []
    for _ in range(calls):
        if while_alive and not any(p.is_alive() for p in while_alive):
            break
        start = time.perf_counter()
        main.call("latest", {})
        latencies.append((time.perf_counter() - start) * 1000)
        time.sleep(pause_s)
    return latencies


def row(name: str, latencies: list[float], calm: float | None) -> str:
    ordered = sorted(latencies)
    median = statistics.median(ordered)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    ratio = f"{median / calm:5.2f}x" if calm else "   1x"
    return f"{name:<10} {len(ordered):>6} {median:>9.2f} {p99:>9.2f} {max(ordered):>9.2f} {ratio:>9}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--burst", type=int, default=10_000, help="connections of the burst (default 10000)")
    parser.add_argument("--slowloris", type=int, default=1000, help="connections the slowloris tries to hold (default 1000)")
    parser.add_argument("--calls", type=int, default=300, help="timed requests per phase (default 300)")
    parser.add_argument("--pause-ms", type=float, default=20.0, help="pause between timed requests (default 20 ms)")
    args = parser.parse_args()

    port = free_port()
    coordinator = start_coordinator(port)
    address = f"{LOOPBACK}:{port}"
    beats: list[Heartbeat] = []
    try:
        main_client, beats = members(address)
        load_before = os.getloadavg()
        pause = args.pause_ms / 1000
        calm = timed(main_client, args.calls, pause)
        deadline = time.monotonic() + 120
        bursters = [Process(target=burst, args=(port, args.burst // BURST_PROCESSES, deadline)) for _ in range(BURST_PROCESSES)]
        for process in bursters:
            process.start()
        under_burst = timed(main_client, args.calls, pause, bursters)
        for process in bursters:
            process.join()
        seconds = args.calls * (pause + 0.005) + 5
        loris = Process(target=slowloris, args=(port, args.slowloris, seconds))
        loris.start()
        time.sleep(3.0)  # its connections are open
        under_loris = timed(main_client, args.calls, pause, [loris])
        loris.join()
        load_after = os.getloadavg()
    finally:
        for beat in beats:
            beat.stop()
        coordinator.terminate()
        coordinator.wait(timeout=10)
    calm_median = statistics.median(calm)
    print(f"members' `latest` round trip at an `atoll coordinator` on loopback, ms ({os.cpu_count()} CPUs)")
    print(f"{'phase':<10} {'calls':>6} {'median':>9} {'p99':>9} {'max':>9} {'vs calm':>9}")
    print(row("calm", calm, None))
    print(row("burst", under_burst, calm_median) + f"   ({args.burst} connections by {BURST_PROCESSES} processes)")
    print(row("slowloris", under_loris, calm_median) + f"   ({args.slowloris} connections trickling a byte a second)")
    print(f"load average (1 min) before {load_before[0]:.2f}, after {load_after[0]:.2f}")


if __name__ == "__main__":
    main()
