"""All-reduce of a 64 MiB fp32 payload across islands on emulated WAN links: gloo against atoll's ring.

    python benchmarks/allreduce.py                   # 100mbit links, 20 ms one-way, 2 and 3 islands (needs root)
    python benchmarks/allreduce.py --islands 2 --rate 1gbit --delay 5ms --mib 16 --repeats 1

For each island count the script builds an emulated WAN (`atoll.wan`: one network namespace per
island, tbf-shaped links, a userspace delay line), a TCPStore in the coordinator's namespace, and one
worker process per island inside its namespace (gloo bound to the emulated link). Every worker runs
every method `--repeats` times on its own random payload (fixed per island), each run between two
barriers: gloo's own fp32 `all_reduce` (the group's allreduce, then a division), and atoll's
pipelined ring (`comm/ring.py`) with the fp32, int8 and codebook8 codecs. All rows of a table
come from one run.

Columns: seconds (median over repeats of the slowest island; the range over repeats beside it),
MB each island put on its link (the TUN device's tx_bytes after a closing barrier, i.e. IP packets
including headers), link utilization = those bytes / seconds / rate, speedup against gloo fp32 on
the same islands, and the relative L2 error of the result against gloo's fp32 mean. The delay
line's CPU use over the whole run is printed below.
Timings on a shared machine vary by several percent; compare rows of the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = ("gloo fp32", "atoll ring fp32", "atoll ring int8", "atoll ring codebook8")
RING_CODECS = {"atoll ring fp32": "fp32", "atoll ring int8": "int8", "atoll ring codebook8": "codebook8"}
TX_BYTES = Path("/sys/class/net/wan0/statistics/tx_bytes")
GROUP_TIMEOUT = timedelta(minutes=10)
RING_DEADLINE_S = 120.0
WORKER_TIMEOUT_S = 1200
RESULT_KEY = "result/{rank}"


def worker(args: argparse.Namespace) -> None:
    """One island: run every method on the payload and publish its timings under RESULT_KEY."""
    import torch
    import torch.distributed as dist

    from atoll.comm.codecs import get_codec
    from atoll.comm.ring import ring_all_reduce_mean_

    host, port = args.store.rsplit(":", 1)
    store = dist.TCPStore(host, int(port), is_master=False, wait_for_workers=False, timeout=GROUP_TIMEOUT)
    group = dist.ProcessGroupGloo(dist.PrefixStore("bench", store), args.rank, args.world, GROUP_TIMEOUT)
    payload = torch.randn(args.mib * 2**20 // 4, generator=torch.Generator().manual_seed(args.rank))
    reference = None
    sequence = 0
    results = []
    for method in METHODS:
        for repeat in range(args.repeats):
            tensor = payload.clone()
            group.barrier().wait()
            sent_before = int(TX_BYTES.read_text())
            start = time.perf_counter()
            if method == "gloo fp32":
                opts = dist.AllreduceOptions()
                opts.reduceOp = dist.ReduceOp.SUM
                group.allreduce([tensor], opts).wait()
                tensor.div_(args.world)
            else:
                ring_all_reduce_mean_(tensor, group, get_codec(RING_CODECS[method]), RING_DEADLINE_S,
                                      int(args.chunk_mb * 1e6), sequence)
                sequence += 1
            seconds = time.perf_counter() - start
            group.barrier().wait()  # our last sends may still be queued until every peer has them
            wire = int(TX_BYTES.read_text()) - sent_before
            if reference is None:
                reference = tensor
            error = ((tensor - reference).norm() / reference.norm()).item()
            results.append({"method": method, "repeat": repeat, "seconds": seconds, "wire_bytes": wire, "error": error})
    store.set(RESULT_KEY.format(rank=args.rank), json.dumps(results))


def run_islands(islands: int, args: argparse.Namespace, rate_bps: int, delay_s: float) -> tuple[list[list[dict]], float]:
    """Workers for `islands` islands on a fresh emulated WAN; returns (results per rank, delay-line CPU share)."""
    import torch.distributed as dist

    from atoll.wan.namespaces import run_in_namespace
    from atoll.wan.network import EmulatedWan

    with EmulatedWan(islands, rate_bps, delay_s) as wan:
        store = run_in_namespace(
            wan.coordinator_namespace,
            lambda: dist.TCPStore(wan.coordinator_host, 0, is_master=True, wait_for_workers=False, timeout=GROUP_TIMEOUT),
        )
        env = {**os.environ, **wan.island_env(), "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // islands))}
        cpu_before, clock_before = cpu_seconds(wan.delay_line.pid), time.monotonic()
        workers = [
            subprocess.Popen(
                wan.island_command(rank, [
                    sys.executable, __file__, "--worker", "--rank", str(rank), "--world", str(islands),
                    "--store", f"{wan.coordinator_host}:{store.port}", "--mib", str(args.mib),
                    "--repeats", str(args.repeats), "--chunk-mb", str(args.chunk_mb),
                ]),
                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            )
            for rank in range(islands)
        ]
        try:
            outputs = [w.communicate(timeout=WORKER_TIMEOUT_S)[0] for w in workers]
        finally:
            for w in workers:
                if w.poll() is None:
                    w.kill()
                    w.wait()
        cpu_share = (cpu_seconds(wan.delay_line.pid) - cpu_before) / (time.monotonic() - clock_before)
        for rank, (w, output) in enumerate(zip(workers, outputs)):
            if w.returncode != 0:
                sys.exit(f"island {rank} of {islands} failed (exit {w.returncode}):\n{output}")
        return [json.loads(store.get(RESULT_KEY.format(rank=rank))) for rank in range(islands)], cpu_share


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rows(islands: int, per_rank: list[list[dict]], rate_bps: int) -> list[dict]:
    """One row per method: median over repeats of the slowest island's time, mean bytes per island."""
    table = []
    for method in METHODS:
        runs = [[r for r in results if r["method"] == method] for results in per_rank]
        repeats = len(runs[0])
        seconds = [max(rank_runs[i]["seconds"] for rank_runs in runs) for i in range(repeats)]
        wire = [statistics.mean(rank_runs[i]["wire_bytes"] for rank_runs in runs) for i in range(repeats)]
        pick = seconds.index(statistics.median_low(seconds))
        table.append({
            "islands": islands, "method": method, "seconds": seconds[pick], "fastest": min(seconds), "slowest": max(seconds),
            "wire_bytes": wire[pick],
            "utilization": wire[pick] * 8 / seconds[pick] / rate_bps,
            "error": max(rank_runs[pick]["error"] for rank_runs in runs),
        })
    base = table[0]["seconds"]
    for row in table:
        row["speedup"] = base / row["seconds"]
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--islands", type=int, nargs="+", default=[2, 3], help="island counts to measure (default 2 3)")
    parser.add_argument("--rate", default="100mbit", help="link rate per island (default 100mbit)")
    parser.add_argument("--delay", default="20ms", help="one-way delay between islands (default 20ms: 40 ms round trip)")
    parser.add_argument("--mib", type=int, default=64, help="payload in MiB of fp32 (default 64)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each method; the median is shown (default 3)")
    parser.add_argument("--chunk-mb", type=float, default=4.0, help="ring pipelining chunk in MB of fp32, as comm.chunk_mb (default 4)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    from atoll.errors import UserError
    from atoll.wan.namespaces import privilege_problem
    from atoll.wan.units import parse_delay, parse_rate

    problem = privilege_problem()
    if problem is not None:
        print(f"allreduce benchmark: {problem}", file=sys.stderr)
        sys.exit(2)
    try:
        rate_bps, delay_s = parse_rate(args.rate, "--rate"), parse_delay(args.delay, "--delay")
    except UserError as err:
        print(f"allreduce benchmark: {err}", file=sys.stderr)
        sys.exit(2)

    print(f"{args.mib} MiB fp32 all-reduce over emulated links: {args.rate} per island, {args.delay} one-way "
          f"({2 * delay_s * 1e3:.0f} ms round trip); median of {args.repeats}; ring chunks of {args.chunk_mb} MB")
    table, cpu = [], {}
    for islands in args.islands:
        per_rank, cpu[islands] = run_islands(islands, args, rate_bps, delay_s)
        table += rows(islands, per_rank, rate_bps)
    print(f"{'islands':>7}  {'method':<22}{'seconds':>9}{'(range)':>13}{'MB/island':>11}{'link util':>11}{'vs gloo':>9}{'rel err':>10}")
    for row in table:
        spread = f"({row['fastest']:.2f}-{row['slowest']:.2f})"
        print(f"{row['islands']:>7}  {row['method']:<22}{row['seconds']:>9.2f}{spread:>13}{row['wire_bytes'] / 1e6:>11.1f}"
              f"{row['utilization']:>11.1%}{row['speedup']:>8.2f}x{row['error']:>10.2e}")
    for islands, share in cpu.items():
        print(f"delay line CPU, {islands} islands: {share:.1%} of one core on average over the run")


if __name__ == "__main__":
    main()
