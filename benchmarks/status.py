"""The status page's cost: its answer time with 8 islands, and the protocol's overhead with and without it read.

    python benchmarks/status.py                 # 300 reads per path, 2 pairs of protocol runs
    python benchmarks/status.py --reads 1000 --pairs 3

1. Answer time: `atoll coordinator --islands 8` runs in its own process (as in a real run) with
   a token; 8 members register and beat from this process and each reaches an outer step's
   boundary barrier with its numbers (loss, tokens/s, ...), so every row of the page is full.
   Then --reads GETs of /status, /status.json and /metrics each, on one keep-alive connection
   (as a browser reloading the page). Shown: median, p99 and max per path (target: <= 50 ms).
2. Protocol overhead, side by side: `benchmarks/recovery.py`'s fault-free run (3 islands of the
   debug model, H = 4, 48 inner steps) and its measure (per outer step, the island that reached the
   boundary last spends `sync_s - ring_s` in barriers, results and digests; median over the outer
   steps), alternately without a reader and with one that GETs /status, /status.json and /metrics
   every --poll-s (default 0.1 s: 60 times what a browser showing the page asks). Shown: each
   run's median and the medians of both (target: unchanged within noise).

Figures, not pass/fail. The machine's other load shows in the spread between runs of one kind.
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from protocol import free_port  # noqa: E402  (benchmarks/protocol.py)
from recovery import REPO, protocol_overhead  # noqa: E402  (benchmarks/recovery.py)

from atoll.mesh.client import CoordinatorClient, Heartbeat, new_incarnation, register, wait_for_admission  # noqa: E402

TOKEN = "status-benchmark-token"
LOOPBACK = "127.0.0.1"
PATHS = ("/status", "/status.json", "/metrics")
ISLANDS = 8


def eight_islands(address: str) -> list[Heartbeat]:
    """8 registered, beating members, each at outer step 1's boundary with its numbers."""
    beats, mains = [], []
    for i in range(ISLANDS):
        incarnation = new_incarnation()
        main = CoordinatorClient(address, f"island-{i}", incarnation, TOKEN, 30, 30, "main", log=lambda line: None)
        register(main, 1, {})
        beats.append(Heartbeat(CoordinatorClient(address, f"island-{i}", incarnation, TOKEN, 30, 30, "beat"), 2.0))
        mains.append(main)
    for main in mains:
        wait_for_admission(main, -1, lambda line: None)
    threads = []
    for i, main in enumerate(mains):
        numbers = {"loss": 3.0 + i / 10, "val_loss": 3.1, "step": 400, "outer_step": 3, "tokens_per_s": 5000.0 + i,
                   "utilization": 0.9, "bytes_sent": 1.2e9}
        args = {"epoch": 0, "name": "outer-4", "numbers": numbers, "wait_s": 10}
        threads.append(threading.Thread(target=main.call, args=("barrier", args, 10)))
        threads[-1].start()
    for thread in threads:
        thread.join()
    return beats


def answer_times(port: int, reads: int) -> None:
    env = {**os.environ, "ATOLL_RUN_TOKEN": TOKEN, "OMP_NUM_THREADS": "1"}
    coordinator = subprocess.Popen(
        [sys.executable, "-m", "atoll.cli", "coordinator", "--port", str(port), "--islands", str(ISLANDS), "--stay"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    beats = []
    try:
        beats = eight_islands(f"{LOOPBACK}:{port}")
        conn = http.client.HTTPConnection(LOOPBACK, port, timeout=10)
        print(f"answer time with {ISLANDS} islands, {reads} reads per path on one keep-alive connection (target <= 50 ms)")
        print(f"{'path':<14}{'bytes':>8}{'median ms':>11}{'p99 ms':>9}{'max ms':>9}")
        for path in PATHS:
            times, size = [], 0
            for _ in range(reads):
                start = time.perf_counter()
                conn.request("GET", path)
                response = conn.getresponse()
                size = len(response.read())
                times.append(time.perf_counter() - start)
                assert response.status == 200, (path, response.status)
            times.sort()
            print(f"{path:<14}{size:>8}{1000 * statistics.median(times):>11.2f}{1000 * times[int(0.99 * (len(times) - 1))]:>9.2f}"
                  f"{1000 * times[-1]:>9.2f}")
        conn.close()
    finally:
        for beat in beats:
            beat.stop()
        coordinator.kill()
        coordinator.wait()


def read_pages(address: str, every_s: float, stop: threading.Event, counter: list[int]) -> None:
    """Read every status path every `every_s` until `stop` (a reconnect after any failure)."""
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    while not stop.wait(every_s):
        for path in PATHS:
            try:
                conn.request("GET", path)
                conn.getresponse().read()
                counter[0] += 1
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection(host, int(port), timeout=5)
    conn.close()


def calm_run(run_dir: Path, poll_s: float | None) -> tuple[list[float], int]:
    """recovery.py's fault-free run (48 inner steps), read every `poll_s` (None: never); (overheads, reads)."""
    command = [
        sys.executable, "-m", "atoll.cli", "simulate", "--islands", "3", "--run-dir", str(run_dir),
        str(REPO / "configs" / "debug.toml"), "--train.steps", "48", "--diloco.inner_steps", "4",
        "--eval.every", "0", "--checkpoint.at_end", "false", "--metrics.log_every", "4",
        "--mesh.heartbeat_interval_s", "0.5", "--mesh.heartbeat_timeout_s", "3", "--mesh.collective_timeout_s", "60",
    ]
    run = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    stop, counter, reader = threading.Event(), [0], None
    tail = []
    for line in run.stdout:
        tail = [*tail[-40:], line]
        found = re.search(r"status page http://(\S+)/status", line)
        if found and poll_s is not None and reader is None:
            reader = threading.Thread(target=read_pages, args=(found.group(1), poll_s, stop, counter), daemon=True)
            reader.start()
    stop.set()
    if reader is not None:
        reader.join(timeout=10)
    if run.wait() != 0:
        raise SystemExit("simulate failed:\n" + "".join(tail))
    return protocol_overhead(run_dir), counter[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reads", type=int, default=300, help="GETs per path for the answer time (default 300)")
    parser.add_argument("--pairs", type=int, default=2, help="protocol runs without and with a reader, alternately (default 2 of each)")
    parser.add_argument("--poll-s", type=float, default=0.1, help="the reader's interval between rounds of the three paths (default 0.1)")
    args = parser.parse_args()
    answer_times(free_port(), args.reads)
    print()
    print(f"protocol overhead per outer step (recovery.py's fault-free measure), 3 islands, debug model, H=4, 48 inner steps;"
          f" reader: the three paths every {args.poll_s:g} s")
    medians: dict[str, list[float]] = {"no reader": [], "reader": []}
    with tempfile.TemporaryDirectory() as tmp:
        for pair in range(args.pairs):
            for kind, poll in (("no reader", None), ("reader", args.poll_s)):
                overhead, reads = calm_run(Path(tmp) / f"{kind.replace(' ', '-')}-{pair}", poll)
                medians[kind].append(statistics.median(overhead))
                print(f"  {kind:<10} run {pair + 1}: median {1000 * medians[kind][-1]:.1f} ms (min {1000 * min(overhead):.1f}, "
                      f"max {1000 * max(overhead):.1f}) over {len(overhead)} outer steps" + (f"; {reads} status reads" if poll else ""))
    calm, read = statistics.median(medians["no reader"]), statistics.median(medians["reader"])
    print(f"median of medians: no reader {1000 * calm:.1f} ms, reader {1000 * read:.1f} ms ({read / calm:.2f}x)")


if __name__ == "__main__":
    main()
