"""Recovery time of the elastic mesh: from an injected fault to the survivors' next completed outer step.

    python benchmarks/recovery.py                         # 3 islands, debug model, heartbeat timeout 3 s
    python benchmarks/recovery.py --heartbeat-timeout 10 --repeats 3
    python benchmarks/recovery.py --transfer-only --wan-rate 100mbit    # the state-transfer row alone

Each scenario runs `atoll simulate` with 3 islands of the debug model (H = 4 inner steps), and one
island gets a fault at outer step 2 (see `atoll.faults`):

- kill -9 during the all-reduce (`kill@allreduce:2`): the survivors' rings break at once, they
  report, the coordinator forms the next epoch once the dead island's control connection has
  stayed closed for its reconnect grace (two heartbeat intervals and a second: a live island whose
  own request timed out reconnects within it), and the survivors redo the averaging among
  themselves. Target: <= reconnect grace + 1 s.
- SIGSTOP at the outer-step boundary (`stop@inner:8`, right before outer step 2's barrier): the
  survivors wait at the barrier until the coordinator drops the silent island at the heartbeat
  timeout. Target: <= heartbeat timeout + 1 s.
- SIGSTOP during the all-reduce (`stop@allreduce:2`): the survivors' rings stall (a gloo wait
  cannot be interrupted); when the coordinator drops the silent island at the heartbeat timeout
  they abandon those rings and redo the averaging, long before the ring's 60 s deadline
  (`mesh.collective_timeout_s`). Target: <= heartbeat timeout + 1 s.

- kill -9 during the inner phase (`kill@inner:6`): the dead island's control connection closes,
  the coordinator drops it after its reconnect grace, and the survivors' outer step 2 runs among
  two. Shown: the survivors' outer step 2 time (from the boundary). Target: <= 1 s.

And, without faults, the protocol's own overhead per outer step: for each outer step, the island
that reached the boundary last (it waits for nobody) spends `sync_s - ring_s` in barriers,
results and digests. Median over the outer steps. Target: <= 10 ms on loopback.

And a joiner's state transfer (`atoll.comm.transfer`), with --wan-rate on the emulated WAN (root:
one namespace each for two serving islands and the joiner, every island's uplink shaped to the
rate; without it, on loopback): two serving processes train the debug model's inner steps without
pause while they serve --transfer-mb of outer state (weights and momentum, in `mesh.transfer_chunk_mb` chunks), and
the joiner fetches it from both at once, verifying every chunk; then, side by side, it reads the
same bytes raw over plain TCP from both (what the emulated links carry at best). Shown: both
throughputs and their ratio (target: >= 90% of the link), and the servers' median inner-step time
before, while serving and during the raw read (target: serving <= 5% slower). The delay line that
carries the emulated WAN is a process on this machine too: its CPU shares the 2 cores with the
servers' training, which the raw-TCP window shows on its own. With --pin, island0 runs alone on
CPU 0 and island1, the joiner and the delay line on the others: island0's inner-step time then
shows what serving costs the serving island itself, as on a host whose network and peers do not
share its cores (island1 shows the contended case).

Recovery = wall time at which the first survivor logs outer step 2 (its record's `time`, written
right after the step is applied) minus the wall time the faulty island printed just before it
signalled itself. Both clocks are this machine's. Medians over --repeats runs; every run's value
is listed. Figures, not pass/fail.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FAULT_LINE = re.compile(r"atoll: injecting (\S+) at ([0-9.]+)")
FAULT_STEP = 2
OVERLAP = ["--diloco.overlap_steps", "2"]
SCENARIOS = {
    "kill -9 during the all-reduce": (f"kill@allreduce:{FAULT_STEP}", []),
    "SIGSTOP at the outer-step boundary": ("stop@inner:8", []),
    "SIGSTOP during the all-reduce": (f"stop@allreduce:{FAULT_STEP}", []),
    "kill -9, overlapped all-reduce": (f"kill@allreduce:{FAULT_STEP}", OVERLAP),
    "SIGSTOP, overlapped all-reduce": (f"stop@allreduce:{FAULT_STEP}", OVERLAP),
}
"""Name: (island-1's fault, extra arguments). Overlapped (tau = 2), the survivors train on while
they recover: their outer step 2 is applied where it lands (inner step 10, none lost), and the
`blocked` column is the training time it cost them (its sync_s)."""


def run(fault: str, heartbeat_timeout: float, run_dir: Path, steps: int = 16, extra: list[str] = ()) -> tuple[float, dict]:
    """One simulated run with island-1 faulting (none if `fault` is empty); (recovery seconds, the
    survivors' outer-step-2 record)."""
    command = [
        sys.executable, "-m", "atoll.cli", "simulate", "--islands", "3", "--run-dir", str(run_dir),
        str(REPO / "configs" / "debug.toml"), "--train.steps", str(steps), "--diloco.inner_steps", "4",
        "--eval.every", "0", "--checkpoint.at_end", "false", "--metrics.log_every", "4",
        "--mesh.heartbeat_interval_s", "0.5", "--mesh.heartbeat_timeout_s", str(heartbeat_timeout),
        "--mesh.collective_timeout_s", "60", *(["--fault", f"island-1={fault}"] if fault else []), *extra,
    ]
    out = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)
    if out.returncode != 0:
        raise SystemExit(f"simulate failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    found = FAULT_LINE.search(out.stdout)
    fault_time = float(found.group(2)) if found else float("nan")
    records = []
    for island in ("island-0", "island-2"):
        lines = (run_dir / island / "metrics.jsonl").read_text().splitlines()
        records += [r for r in map(json.loads, lines) if r.get("outer_step") == FAULT_STEP]
    first = min(records, key=lambda r: r["time"])
    return first["time"] - fault_time, first


def protocol_overhead(run_dir: Path) -> list[float]:
    """Per outer step: min over islands of sync_s - ring_s (the last island at the barrier waits for nobody)."""
    by_step: dict[int, list[float]] = {}
    for path in run_dir.glob("island-*/metrics.jsonl"):
        for record in map(json.loads, path.read_text().splitlines()):
            if "outer_step" in record and record["outer_step"] > 1:  # the first includes the groups' warm-up
                by_step.setdefault(record["outer_step"], []).append(record["sync_s"] - record["ring_s"])
    return [min(v) for v in by_step.values()]


TRANSFER_KEY = "62" * 32
SERVED_VERSION = 12


def pin(pid: int, cpus: set[int] | None) -> None:
    """Every thread of process `pid` on `cpus` (None: leave it where it is)."""
    if cpus is None:
        return
    for task in Path(f"/proc/{pid}/task").iterdir():
        os.sched_setaffinity(int(task.name), cpus)


def serve_peer(state_mb: float, chunk_mb: float, host: str) -> None:
    """A serving island: trains the debug model's inner steps without pause, serves `state_mb` of
    outer state through a StateServer, and sends the same bytes raw to whoever connects to a plain
    TCP port (the link's own capacity, for comparison). Prints both ports, then (once stdin closes)
    a JSON list of (end time, step seconds)."""
    import socket
    import threading

    import torch

    from atoll.comm.transfer import ServedState, StateServer
    from atoll.model import Llama, get_size

    torch.manual_seed(0)
    half = int(state_mb * 1e6 / 8)
    outer, momentum = torch.randn(half), torch.randn(half)
    state = ServedState(int(chunk_mb * 1e6))
    state.publish(SERVED_VERSION, {"outer": outer, "momentum": momentum}, 240, 7680)
    server = StateServer(host, state)
    server.key = bytes.fromhex(TRANSFER_KEY)
    raw = socket.create_server((host, 0))

    def blast() -> None:  # half of the state from each of the two sources, as the transfer splits it
        connection, _ = raw.accept()
        with connection:
            connection.sendall(memoryview(outer.numpy()).cast("B"))

    threading.Thread(target=blast, daemon=True).start()
    args = get_size("debug")
    model = Llama(args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, args.vocab_size, (8, args.max_seq_len + 1))
    done = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
    print(server.port, raw.getsockname()[1], flush=True)
    steps = []
    while not done.is_set():
        start = time.perf_counter()
        loss = model(tokens[:, :-1], tokens[:, 1:])[1]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        steps.append((time.time(), time.perf_counter() - start))
    print(json.dumps(steps), flush=True)


def fetch_peer(state_mb: float, sources: list[str], raw_ports: list[str]) -> None:
    """The joiner: fetches the state from every `host:port` at once (atoll.comm.transfer), then reads
    the same number of bytes raw from every source's plain port; prints a JSON report of both."""
    import socket
    import threading

    import torch

    from atoll.comm.transfer import Source, fetch_state

    half = int(state_mb * 1e6 / 8)
    into = {"outer": torch.zeros(half), "momentum": torch.zeros(half)}
    peers = [Source(f"island{i}", host, int(port)) for i, (host, port) in enumerate(s.rsplit(":", 1) for s in sources)]
    quiet = time.time()  # the joiner has started up: the servers' steps from here on are the baseline
    time.sleep(4.0)
    start = time.time()
    report = fetch_state(peers, bytes.fromhex(TRANSFER_KEY), "joiner", into, timeout=60)
    end = time.time()
    time.sleep(2.0)  # the servers' steps settle between the two windows
    received = [0] * len(peers)

    def drain(index: int, peer: Source, port: int) -> None:
        with socket.create_connection((peer.host, port)) as connection:
            while chunk := connection.recv(1 << 20):
                received[index] += len(chunk)

    raw_start = time.time()
    threads = [threading.Thread(target=drain, args=(i, p, int(port))) for i, (p, port) in enumerate(zip(peers, raw_ports))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(json.dumps({
        "quiet": quiet, "start": start, "end": end, "bytes": report.manifest.total_bytes, "chunks": report.chunks_from, "manifest_s": report.manifest_s, "hashed_s": report.hashed_s,
        "raw_start": raw_start, "raw_end": time.time(), "raw_bytes": sum(received),
    }), flush=True)


def transfer_row(state_mb: float, chunk_mb: float, rate: str | None, delay: str, settle_s: float = 4.0, pinned: bool = False) -> None:
    """Two serving islands training, one joiner fetching from both (see the module docstring).

    `pinned`: island0 alone on CPU 0, island1, the joiner and the delay line on the other CPUs, so
    island0's inner-step time shows its own serving cost without the emulation's CPU on its core."""
    script = [sys.executable, str(Path(__file__).resolve())]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    rest = set(range(1, os.cpu_count() or 2)) if pinned else None
    cpus = ({0}, rest, rest) if pinned else (None, None, None)
    if rate is None:
        _transfer(script, env, state_mb, chunk_mb, lambda i, cmd: cmd, lambda i: "127.0.0.1", None, "loopback", settle_s, cpus)
        return
    from atoll.wan.network import EmulatedWan
    from atoll.wan.units import parse_delay, parse_rate

    rate_bps = parse_rate(rate)
    with EmulatedWan(3, rate_bps, parse_delay(delay)) as wan:
        if wan.delay_line is not None:
            pin(wan.delay_line.pid, rest)
        where = f"emulated WAN {rate}, {delay} one way" + (", island0 alone on CPU 0" if pinned else "")
        _transfer(script, {**env, **wan.island_env()}, state_mb, chunk_mb, wan.island_command, wan.island_address, rate_bps, where, settle_s, cpus)


def _transfer(script, env, state_mb, chunk_mb, command, address, rate_bps, where, settle_s, cpus) -> None:
    def on(i: int) -> list[str]:  # a peer pins itself before it starts a thread
        return ["--cpus", ",".join(map(str, sorted(cpus[i])))] if cpus[i] else []

    servers = [
        subprocess.Popen(command(i, [*script, "--peer", "serve", "--transfer-mb", str(state_mb), "--chunk-mb", str(chunk_mb),
                                     "--host", address(i), *on(i)]),
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        for i in range(2)
    ]
    try:
        ports = [server.stdout.readline().split() for server in servers]
        time.sleep(settle_s)  # the servers warm up
        sources = [f"{address(i)}:{state}" for i, (state, _) in enumerate(ports)]
        raw_ports = [raw for _, raw in ports]
        joiner = subprocess.run(
            command(2, [*script, "--peer", "fetch", "--transfer-mb", str(state_mb), *sources, "--raw-ports", *raw_ports, *on(2)]),
            capture_output=True, text=True, env=env, timeout=900,
        )
        if joiner.returncode != 0:
            raise SystemExit(f"the joiner failed:\n{joiner.stderr[-3000:]}")
        fetched = json.loads(joiner.stdout.splitlines()[-1])
        steps = []
        for server in servers:
            out, _ = server.communicate("", timeout=60)
            steps.append(json.loads(out.splitlines()[-1]))
    finally:
        for server in servers:
            server.kill()
            server.wait()

    def rate_line(what: str, seconds: float, size: int) -> str:
        mbit = size * 8 / seconds / 1e6
        share = f" = {100 * size * 8 / seconds / (2 * rate_bps):.0f}% of the two sources' uplinks" if rate_bps else ""
        return f"  {what:<34}{size / 1e6:6.0f} MB in {seconds:6.2f}s = {mbit:5.0f} Mbit/s{share}"

    seconds, raw_seconds = fetched["end"] - fetched["start"], fetched["raw_end"] - fetched["raw_start"]
    print(f"state transfer, {where}, from 2 serving islands training the debug model "
          f"({', '.join(f'{n} chunks from {i}' for i, n in fetched['chunks'].items())}):")
    print(rate_line("atoll.comm.transfer (verified)", seconds, fetched["bytes"]))
    print(f"  {'':<34}(manifest headers in {fetched['manifest_s']:.2f}s; the sources' sha256 of their state, "
          f"streamed alongside the chunks, complete at {fetched['hashed_s']:.2f}s)")
    print(rate_line("raw TCP, same bytes, same links", raw_seconds, fetched["raw_bytes"]))
    print(f"  transfer / raw TCP throughput: {raw_seconds / seconds:.2f}"
          + (f"  (target >= 90% of the link; links at {rate_bps / 1e6:.0f} Mbit/s each)" if rate_bps else ""))
    for index, records in enumerate(steps):
        windows = {
            "before": [s for t, s in records if fetched["quiet"] + 0.2 <= t < fetched["start"]],
            "serving": [s for t, s in records if fetched["start"] + 0.2 <= t <= fetched["end"]],
            "raw TCP": [s for t, s in records if fetched["raw_start"] + 0.2 <= t <= fetched["raw_end"]],
        }
        if not all(windows.values()):
            print(f"  island{index}: too few inner steps to compare ({ {k: len(v) for k, v in windows.items()} })")
            continue
        base = statistics.median(windows["before"])
        cells = [f"{name} {1000 * statistics.median(v):.1f} ms ({len(v)})" for name, v in windows.items()]
        growth = [f"{name} {100 * (statistics.median(v) / base - 1):+.1f}%" for name, v in windows.items() if name != "before"]
        print(f"  island{index} inner step, median (steps): {', '.join(cells)}; vs before: {', '.join(growth)} (target: serving <= +5%)")
    print(f"  load average after the row: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")


def main() -> None:
    from atoll.config import MeshConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heartbeat-timeout", type=float, default=3.0, help="mesh.heartbeat_timeout_s (default 3)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per scenario (default 3)")
    parser.add_argument("--wan-rate", help="measure the state transfer on the emulated WAN at this rate per island (root), e.g. 100mbit")
    parser.add_argument("--wan-delay", default="25ms", help="one-way delay of the emulated WAN (default 25ms)")
    parser.add_argument("--transfer-mb", type=float, default=200.0, help="outer state served to the joiner, MB (default 200)")
    parser.add_argument("--chunk-mb", type=float, default=MeshConfig().transfer_chunk_mb, help="state transfer chunk size, MB (mesh.transfer_chunk_mb)")
    parser.add_argument("--transfer-only", action="store_true", help="only the state-transfer row")
    parser.add_argument("--pin", action="store_true",
                        help="state-transfer row: island0 alone on CPU 0, everything else on the other CPUs (its serving cost alone)")
    parser.add_argument("--peer", choices=["serve", "fetch"], help=argparse.SUPPRESS)
    parser.add_argument("--cpus", help=argparse.SUPPRESS)
    parser.add_argument("--host", default="127.0.0.1", help=argparse.SUPPRESS)
    parser.add_argument("sources", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--raw-ports", nargs="*", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cpus:  # a peer of the transfer row, with --pin
        pin(os.getpid(), {int(c) for c in args.cpus.split(",")})
    if args.peer == "serve":
        serve_peer(args.transfer_mb, args.chunk_mb, args.host)
        return
    if args.peer == "fetch":
        fetch_peer(args.transfer_mb, args.sources, args.raw_ports)
        return
    if args.transfer_only:
        transfer_row(args.transfer_mb, args.chunk_mb, args.wan_rate, args.wan_delay, pinned=args.pin)
        return
    print(f"3 islands, debug model, H=4, heartbeat every 0.5 s, heartbeat timeout {args.heartbeat_timeout:g} s, report grace 0.5 s")
    print(f"{'fault':<38}{'recovery s (median)':>20}  {'runs':<28}{'blocked s':>10}{'at step':>8}{'world after':>12}{'attempts':>10}  target")
    hang = f"<= {args.heartbeat_timeout + 1:g} s"
    targets = {"kill -9 during the all-reduce": "<= 1 s", "SIGSTOP at the outer-step boundary": hang, "SIGSTOP during the all-reduce": hang,
               "kill -9, overlapped all-reduce": "<= 1 s", "SIGSTOP, overlapped all-reduce": hang}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, (fault, extra)) in enumerate(SCENARIOS.items()):
            results = [run(fault, args.heartbeat_timeout, Path(tmp) / f"{i}-{r}", extra=extra) for r in range(args.repeats)]
            seconds = [s for s, _ in results]
            last = results[-1][1]
            runs = ", ".join(f"{s:.2f}" for s in seconds)
            blocked = statistics.median(r["sync_s"] for _, r in results)
            print(f"{name:<38}{statistics.median(seconds):>20.2f}  {runs:<28}{blocked:>10.2f}{last['step']:>8}{last['world_size']:>12}"
                  f"{last['attempts']:>10}  {targets[name]}")
        inner = [run("kill@inner:6", args.heartbeat_timeout, Path(tmp) / f"inner-{r}")[1] for r in range(args.repeats)]
        runs = ", ".join(f"{r['sync_s']:.2f}" for r in inner)
        median = statistics.median(r["sync_s"] for r in inner)
        print(f"{'kill -9 in the inner phase (step time)':<38}{median:>20.2f}  {runs:<28}{inner[-1]['world_size']:>12}{inner[-1]['attempts']:>10}  <= 1 s")
        calm = Path(tmp) / "calm"
        run("", args.heartbeat_timeout, calm, steps=48)
        overhead = protocol_overhead(calm)
        print(f"fault-free protocol overhead per outer step: median {1000 * statistics.median(overhead):.1f} ms "
              f"(min {1000 * min(overhead):.1f}, max {1000 * max(overhead):.1f}) over {len(overhead)} outer steps; target <= 10 ms")
    transfer_row(args.transfer_mb, args.chunk_mb, args.wan_rate, args.wan_delay, pinned=args.pin)


if __name__ == "__main__":
    main()
