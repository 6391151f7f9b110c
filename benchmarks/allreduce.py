"""All-reduce of a 64 MiB fp32 payload across islands on emulated WAN links: gloo against atoll's ring.

    python benchmarks/allreduce.py                   # 100mbit links, 20 ms one-way, 2 and 3 islands (needs root)
    python benchmarks/allreduce.py --islands 2 3 4   # the int4 and int8 rings' errors at 2, 3 and 4 islands too
    python benchmarks/allreduce.py --islands 2 --rate 1gbit --delay 5ms --mib 16 --repeats 1
    python benchmarks/allreduce.py --mac --islands 2 3 --mib 64 --repeats 7   # the ring's MAC: cost on WAN and loopback
    python benchmarks/allreduce.py --buckets 42 --islands 3                     # many buckets: one ring after another vs pipelined
    python benchmarks/allreduce.py --islands 3 --sysctl net.ipv4.tcp_congestion_control=reno  # the WAN's TCP settings

For each island count the script builds an emulated WAN (`atoll.wan`: one network namespace per
island, tbf-shaped links, a userspace delay line), a TCPStore in the coordinator's namespace, and one
worker process per island inside its namespace (gloo bound to the emulated link). Every worker runs
every method `--repeats` times on its own random payload (fixed per island), each run between two
barriers: gloo's own fp32 `all_reduce` (the group's allreduce, then a division), and atoll's
pipelined ring (`comm/ring.py`) with the fp32, int8, int4 and codebook8 codecs, and int4 once more
writing what each island's encodings lost (`dropped`, what error feedback costs the ring), and the
sparse all-gather (`comm/allgather.py`) of topk payloads (`comm.codec = "topk"` at its default
density and bits), with and without `dropped`. topk's relative error is large by design (it sends
1/64 of the values; error feedback sends the rest in later outer steps). All rows of a table
come from one run, and repeats are interleaved (every method once per round, later rounds in a
seeded shuffle of the first's order) so that noise from other work on the machine hits every
method alike.

`--buckets N` measures instead the payload cut into N equal buckets, as DiLoCo averages its
per-layer buckets, in `--codec`: one `ring_all_reduce_mean_` after another (each ring drains
before the next starts, as atoll did before) against `ring_all_reduce_means_` (each bucket's ring
starts as the previous one begins its second step), interleaved as above.

`--mac` measures instead what authenticating the ring costs: the ring in `--codec` (int8, the
default `comm.codec`) without a key and with an epoch key (every payload carries an HMAC-SHA256
tag, checked before it is decoded), interleaved as above, on the emulated WAN and on plain
loopback (all islands in one namespace of their own, on its `lo`, so other traffic on the machine
is neither shaped nor counted). It prints both rows per link, the ratio MAC / no MAC of the
median times and the median of the per-round ratios, and the load average at the start and end.

Columns: seconds (median over repeats of the slowest island; the range over repeats beside it),
MB each island put on its link (the link device's tx_bytes after a closing barrier, i.e. IP
packets including headers; on loopback the namespace's total divided by the islands), link
utilization = those bytes / seconds / rate, speedup against the first row (gloo fp32; with --mac
the ring without MAC) on the same islands, and the relative L2 error of the result against the
first row's. The delay line's CPU use over the whole run is printed below.
Timings on a shared machine vary by several percent; compare rows of the same run.

Timing: after a barrier every island starts each run at one moment of the machine's monotonic
clock, published by rank 0 (`common_start`), and is timed from it; a row's time is its slowest
island's. (Timed from each island's own exit from the barrier, the barrier's release skew was
added; on this machine the int4 ring read 1.065-1.067 s either way.) `--sysctl KEY=VALUE` sets a
kernel setting in every namespace of the WAN; the TCP congestion control and slow start after
idle in force are printed (the host's: BBR here). When rounds ran in a fixed order (reversed every
other round), BBR made one row slow round after round: the int4 ring read 1.28-1.30 s in two of
three rounds in two runs, the int4 + EF row beside it 1.06-1.08 s, and under Reno
(`--sysctl net.ipv4.tcp_congestion_control=reno`) every round read 1.06-1.07 s. BBR's ProbeRTT
(it drains a connection for 200 ms when its minimum RTT is 10 s old) fits that, which is why later
rounds are shuffled. `--methods` runs some rows only (names as printed, comma-separated).

Floor: a pipelined ring keeps every link busy as long as one step's segment takes longer on the
wire than a chunk plus the one-way delay (int4, 3 islands, 64 MiB: 250 ms against 62 ms), so a
ring takes at least bytes / rate plus two one-way delays: gloo sends a message only once the
receiver's notice that it posted the receive has arrived (gloo/transport/tcp/pair.cc: a send with
no announced receive waits for NOTIFY_RECV_READY), so the first byte leaves one delay after the
start, and the last byte arrives one delay after it leaves. For int4 at 3 islands on the defaults
that is 12.7 MB / 100 Mbit/s = 1.016 s + 40 ms = 1.056 s, 96.2% of the link. Measured (this
session's machine, load 0.1-0.3, `--repeats 5`, BBR): int4 1.062 s, 95.4% of the link, 7.14x
gloo fp32 (range 1.06-1.29 s); int8 1.91 s, 97.2%, 3.97x. Under Reno (3 rounds, reversed order):
int4 1.058 s, 95.7%, 6.93x. At one-way delays of 5 / 20 / 40 ms (`--methods "atoll ring int8,atoll
ring int4" --repeats 5`) int4 read 1.036 / 1.063 / 1.104 s: two delays per ring plus 10 ms.
Chunks of 1, 2, 4 or 8 MB and `net.ipv4.tcp_slow_start_after_idle=0` changed nothing. DiLoCo
hides the first delay of all but one ring per outer step: each bucket's ring posts its first step
while the previous one runs (`ring_all_reduce_means_`). The rounds where the int4 ring runs right
after gloo's fp32 all-reduce are slower (1.17-1.23 s under Reno, with or without slow start after
idle): with `--methods "gloo fp32,atoll ring int4,atoll ring int8"` its median was 1.057-1.089 s
(93.0-95.9%).

The topk all-gather moves 1.0 MB per island at 3 islands (the int4 ring 12.7 MB). With the
encode of `TopkCodec` before its numpy selection it took 1.86-1.87 s over two runs (4.0-4.1x gloo
fp32, load average 7-9), bound by that encode; after it, 0.30 s (25.3x gloo fp32, int4 6.8x in the
same run, load average 0.5-0.8), 0.41 s writing `dropped` (the page faults of the fresh `dropped`
tensor each run takes here).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported inside the functions that use it
    from torch.distributed import Store

REPO = Path(__file__).resolve().parents[1]
GLOO = "gloo fp32"
RING = "atoll ring "
MAC = " + MAC"
EF = " + EF"
GATHER = "atoll gather "
METHODS = (GLOO, "atoll ring fp32", "atoll ring int8", "atoll ring int4", "atoll ring int4" + EF, "atoll ring codebook8",
           GATHER + "topk", GATHER + "topk" + EF)
ONE_BY_ONE = " buckets one by one"
PIPELINED = " buckets pipelined"
"""A method is gloo's all_reduce, RING + codec name or GATHER + sparse codec name, with MAC appended
when payloads are tagged and EF when the ring or all-gather writes what it dropped."""
TX_BYTES = "/sys/class/net/{device}/statistics/tx_bytes"
LOOPBACK = "lo"
LOOPBACK_HOST = "127.0.0.1"
GROUP_TIMEOUT = timedelta(minutes=10)
RING_DEADLINE_S = 120.0
WORKER_TIMEOUT_S = 1200
RESULT_KEY = "result/{rank}"
TCP_SETTINGS = ("net.ipv4.tcp_congestion_control", "net.ipv4.tcp_slow_start_after_idle")
START_LEAD_S = 0.3
"""How far ahead rank 0 sets the common start of a run: several store round trips over the WAN."""


def worker(args: argparse.Namespace) -> None:
    """One island: run every method on the payload and publish its timings under RESULT_KEY."""
    import torch
    import torch.distributed as dist

    from atoll.comm.allgather import sparse_all_gather_mean_
    from atoll.comm.codecs import get_codec
    from atoll.comm.ring import ring_all_reduce_mean_, ring_all_reduce_means_

    host, port = args.store.rsplit(":", 1)
    store = dist.TCPStore(host, int(port), is_master=False, wait_for_workers=False, timeout=GROUP_TIMEOUT)
    group = dist.ProcessGroupGloo(dist.PrefixStore("bench", store), args.rank, args.world, GROUP_TIMEOUT)
    payload = torch.randn(args.mib * 2**20 // 4, generator=torch.Generator().manual_seed(args.rank))
    tx_bytes = Path(TX_BYTES.format(device=args.device))
    key = bytes.fromhex(args.key)
    methods = args.methods.split(",")
    reference = None
    sequence = 0
    results = []
    for repeat in range(args.repeats):
        for method in round_order(methods, repeat):
            tensor = payload.clone()
            dropped = torch.empty_like(tensor) if method.endswith(EF) else None
            group.barrier().wait()
            sent_before = int(tx_bytes.read_text())
            start = common_start(store, args.rank, len(results))
            if method == GLOO:
                opts = dist.AllreduceOptions()
                opts.reduceOp = dist.ReduceOp.SUM
                group.allreduce([tensor], opts).wait()
                tensor.div_(args.world)
            elif method.endswith((ONE_BY_ONE, PIPELINED)):
                codec, buckets = get_codec(method.removeprefix(RING).split()[0]), tensor.tensor_split(args.buckets)
                if method.endswith(PIPELINED):
                    ring_all_reduce_means_(buckets.__getitem__, len(buckets), group, codec, RING_DEADLINE_S, int(args.chunk_mb * 1e6), sequence)
                else:
                    for i, bucket in enumerate(buckets):
                        ring_all_reduce_mean_(bucket, group, codec, RING_DEADLINE_S, int(args.chunk_mb * 1e6), sequence + i)
                sequence += len(buckets)
            elif method.startswith(GATHER):
                codec = get_codec(method.removeprefix(GATHER).removesuffix(EF))
                sparse_all_gather_mean_(tensor, group, codec, RING_DEADLINE_S, int(args.chunk_mb * 1e6), sequence, None, dropped)
                sequence += 1
            else:
                codec = method.removeprefix(RING).removesuffix(MAC).removesuffix(EF)
                ring_all_reduce_mean_(tensor, group, get_codec(codec), RING_DEADLINE_S, int(args.chunk_mb * 1e6), sequence,
                                      key if method.endswith(MAC) else None, dropped)
                sequence += 1
            seconds = time.monotonic() - start
            group.barrier().wait()  # our last sends may still be queued until every peer has them
            wire = (int(tx_bytes.read_text()) - sent_before) // args.sharing_link
            if reference is None:  # round 0 runs methods[0] first: every error is against its result
                reference = tensor
            error = ((tensor - reference).norm() / reference.norm()).item()
            results.append({"method": method, "repeat": repeat, "seconds": seconds, "wire_bytes": wire, "error": error})
    store.set(RESULT_KEY.format(rank=args.rank), json.dumps(results))


def round_order(methods: list[str], repeat: int) -> list[str]:
    """The methods in the order round `repeat` runs them, the same on every island: round 0 in the
    given order (its first method's result is every error's reference), later rounds shuffled
    (seeded by the round), so that anything periodic (another job's bursts, BBR's ProbeRTT) does
    not land on the same method round after round, as it did with a fixed or reversed order."""
    if repeat == 0:
        return list(methods)
    return random.Random(repeat).sample(methods, len(methods))


def common_start(store: Store, rank: int, run: int) -> float:
    """The moment (time.monotonic) at which every island starts its `run`-th all-reduce, slept until.

    Rank 0 picks it START_LEAD_S ahead and publishes it in the store; the others wait for it
    (bounded by the store's timeout). The islands are processes of one machine in network
    namespaces, which share its monotonic clock, so they start within a scheduler tick of each
    other. Timing each island from its own exit from a barrier instead can add the barrier's
    release skew (up to a one-way delay: 20 ms on the defaults, 2% of an int4 ring) to the
    slowest island's time (on this machine it did not move the int4 ring measurably). An island
    that reads the moment late (unlikely at this lead: a store round trip on the defaults is
    40 ms) starts late and is still timed from it.
    """
    key = f"start/{run}"
    if rank == 0:
        store.set(key, repr(time.monotonic() + START_LEAD_S))
    start = float(store.get(key))
    time.sleep(max(0.0, start - time.monotonic()))
    return start


@dataclass(frozen=True)
class Network:
    """Where the islands of one table run: the namespaces, the store's address and the counted link."""

    name: str
    store_namespace: str
    store_host: str
    namespaces: list[str]
    """Island rank i runs inside namespaces[i]."""
    env: dict[str, str]
    device: str
    """The link device whose tx_bytes a worker reads."""
    sharing_link: int
    """How many islands' traffic that device counts (the loopback is one device for all)."""
    rate_bps: int | None
    delay_line_pid: int | None
    tcp: str | None = None
    """The islands' TCP settings that shape a ring's time (TCP_SETTINGS), as set or inherited."""


@contextmanager
def emulated_wan(islands: int, rate_bps: int, delay_s: float, name: str, sysctls: list[str]) -> Iterator[Network]:
    """A fresh emulated WAN (`atoll.wan`) for `islands` islands, torn down on exit, with `sysctls`
    (KEY=VALUE) set in each of its namespaces (new namespaces otherwise take the kernel's defaults)."""
    from atoll.wan.network import EmulatedWan

    with EmulatedWan(islands, rate_bps, delay_s) as wan:
        spaces = [*wan.island_namespaces, wan.coordinator_namespace]
        for namespace in spaces:
            for setting in sysctls:
                set_sysctl(namespace, setting)
        tcp = ", ".join(f"{key.rsplit('.', 1)[1]} {read_sysctl(spaces[0], key)}" for key in TCP_SETTINGS)
        yield Network(name, wan.coordinator_namespace, wan.coordinator_host, wan.island_namespaces, wan.island_env(), "wan0", 1,
                      rate_bps, wan.delay_line.pid, tcp)


def set_sysctl(namespace: str, setting: str) -> None:
    """Write KEY=VALUE to /proc/sys inside `namespace`; exits 2, saying why, where the kernel refuses it."""
    from atoll.wan.namespaces import run_in_namespace

    key, _, value = setting.partition("=")
    try:
        run_in_namespace(namespace, lambda: sysctl_path(key).write_text(value))
    except OSError as err:
        print(f"allreduce benchmark: --sysctl {setting}: {err.strerror or err} (KEY=VALUE, e.g. net.ipv4.tcp_congestion_control=reno, "
              "one of net.ipv4.tcp_allowed_congestion_control)", file=sys.stderr)
        sys.exit(2)


def read_sysctl(namespace: str, key: str) -> str:
    from atoll.wan.namespaces import run_in_namespace

    return run_in_namespace(namespace, lambda: sysctl_path(key).read_text().strip())


def sysctl_path(key: str) -> Path:
    """A kernel setting's file; under /proc/sys/net it is the opening thread's network namespace's."""
    return Path("/proc/sys") / key.strip().replace(".", "/")


@contextmanager
def loopback(islands: int) -> Iterator[Network]:
    """One fresh namespace whose `lo` all islands share: plain loopback, apart from the machine's other traffic."""
    from atoll.wan import namespaces
    from atoll.wan.network import GLOO_SOCKET_IFNAME_ENV

    namespaces.remove_stale_namespaces()
    name = namespaces.namespace_name(0, "loopback")
    namespaces.create_namespace(name)
    try:
        yield Network("loopback", name, LOOPBACK_HOST, [name] * islands, {GLOO_SOCKET_IFNAME_ENV: LOOPBACK}, LOOPBACK, islands, None, None)
    finally:
        namespaces.delete_namespace(name)  # also kills any worker still inside


def run_islands(network: Network, args: argparse.Namespace, methods: tuple[str, ...], key: bytes) -> tuple[list[list[dict]], float | None]:
    """One worker per island of `network`; returns (results per rank, delay-line CPU share or None)."""
    import torch.distributed as dist

    from atoll.wan.namespaces import run_in_namespace

    islands = len(network.namespaces)
    store = run_in_namespace(
        network.store_namespace,
        lambda: dist.TCPStore(network.store_host, 0, is_master=True, wait_for_workers=False, timeout=GROUP_TIMEOUT),
    )
    env = {**os.environ, **network.env, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // islands))}
    delay_line = network.delay_line_pid
    cpu_before, clock_before = (cpu_seconds(delay_line) if delay_line else 0.0), time.monotonic()
    workers = [
        subprocess.Popen(
            ["ip", "netns", "exec", namespace,
             sys.executable, __file__, "--worker", "--rank", str(rank), "--world", str(islands),
             "--store", f"{network.store_host}:{store.port}", "--mib", str(args.mib),
             "--repeats", str(args.repeats), "--chunk-mb", str(args.chunk_mb), "--methods", ",".join(methods),
             "--buckets", str(args.buckets),
             "--key", key.hex(), "--device", network.device, "--sharing-link", str(network.sharing_link)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank, namespace in enumerate(network.namespaces)
    ]
    try:
        outputs = [w.communicate(timeout=WORKER_TIMEOUT_S)[0] for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()
    cpu_share = (cpu_seconds(delay_line) - cpu_before) / (time.monotonic() - clock_before) if delay_line else None
    for rank, (w, output) in enumerate(zip(workers, outputs)):
        if w.returncode != 0:
            sys.exit(f"island {rank} of {islands} failed (exit {w.returncode}):\n{output}")
    return [json.loads(store.get(RESULT_KEY.format(rank=rank))) for rank in range(islands)], cpu_share


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def round_seconds(per_rank: list[list[dict]], method: str) -> list[float]:
    """The slowest island's seconds for `method`, one per round (repeat)."""
    runs = [[r for r in results if r["method"] == method] for results in per_rank]
    return [max(rank_runs[i]["seconds"] for rank_runs in runs) for i in range(len(runs[0]))]


def rows(network: Network, islands: int, per_rank: list[list[dict]], methods: tuple[str, ...]) -> list[dict]:
    """One row per method: median over repeats of the slowest island's time, mean bytes per island."""
    table = []
    for method in methods:
        runs = [[r for r in results if r["method"] == method] for results in per_rank]
        seconds = round_seconds(per_rank, method)
        wire = [statistics.mean(rank_runs[i]["wire_bytes"] for rank_runs in runs) for i in range(len(seconds))]
        pick = seconds.index(statistics.median_low(seconds))
        table.append({
            "link": network.name, "islands": islands, "method": method, "seconds": seconds[pick], "fastest": min(seconds),
            "slowest": max(seconds), "wire_bytes": wire[pick],
            "utilization": wire[pick] * 8 / seconds[pick] / network.rate_bps if network.rate_bps else None,
            "error": max(rank_runs[pick]["error"] for rank_runs in runs),
        })
    base = table[0]["seconds"]
    for row in table:
        row["speedup"] = base / row["seconds"]
    return table


def mac_cost(network: Network, islands: int, per_rank: list[list[dict]], plain: str) -> str:
    """One line: the ring's median time without and with the MAC, their ratio and the per-round ratios'."""
    without, with_mac = round_seconds(per_rank, plain), round_seconds(per_rank, plain + MAC)
    paired = [m / p for m, p in zip(with_mac, without)]  # one round's two runs saw the same machine
    ratio = statistics.median_low(with_mac) / statistics.median_low(without)  # the rows' medians
    return (f"MAC cost, {network.name}, {islands} islands: {statistics.median_low(without):.3f} s without, "
            f"{statistics.median_low(with_mac):.3f} s with the MAC per all-reduce; MAC / no MAC = {ratio:.3f} "
            f"(per round: median {statistics.median(paired):.3f}, range {min(paired):.3f}-{max(paired):.3f})")


def load_average() -> str:
    return "load average " + " ".join(f"{load:.2f}" for load in os.getloadavg()) + " (1, 5, 15 min)"


def main() -> None:
    from atoll.comm.codecs import CODECS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--islands", type=int, nargs="+", default=[2, 3], help="island counts to measure (default 2 3)")
    parser.add_argument("--rate", default="100mbit", help="link rate per island (default 100mbit)")
    parser.add_argument("--delay", default="20ms", help="one-way delay between islands (default 20ms: 40 ms round trip)")
    parser.add_argument("--mib", type=int, default=64, help="payload in MiB of fp32 (default 64)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each method; the median is shown (default 3)")
    parser.add_argument("--chunk-mb", type=float, default=4.0, help="ring pipelining chunk in MB of fp32, as comm.chunk_mb (default 4)")
    parser.add_argument("--mac", action="store_true",
                        help="measure the ring's MAC instead: --codec with and without it, on the WAN and on loopback")
    parser.add_argument("--codec", default="int8", choices=CODECS, help="the ring's codec with --mac or --buckets (default int8, as comm.codec)")
    parser.add_argument("--buckets", type=int, default=0, help="cut the payload into this many buckets: one ring after another vs pipelined")
    parser.add_argument("--sysctl", action="append", default=[], metavar="KEY=VALUE",
                        help="set this in every namespace of the emulated WAN (repeatable), e.g. net.ipv4.tcp_congestion_control=reno")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--methods", help="run these rows only: method names as printed, comma-separated (default: every row)")
    parser.add_argument("--key", help=argparse.SUPPRESS)
    parser.add_argument("--device", help=argparse.SUPPRESS)
    parser.add_argument("--sharing-link", type=int, help=argparse.SUPPRESS)
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

    wan_name = f"{args.rate} WAN"
    methods = (RING + args.codec, RING + args.codec + MAC) if args.mac else METHODS
    if args.methods:
        methods = tuple(name.strip() for name in args.methods.split(","))
        unknown = [name for name in methods if name not in METHODS]
        problem = (f"unknown {', '.join(map(repr, unknown))}; choose from {', '.join(METHODS)}" if unknown
                   else "it does not combine with --mac or --buckets" if args.mac or args.buckets else None)
        if problem:
            print(f"allreduce benchmark: --methods {args.methods!r}: {problem}", file=sys.stderr)
            sys.exit(2)
    if args.buckets:
        methods = tuple(f"{RING}{args.codec} x {args.buckets}{how}" for how in (ONE_BY_ONE, PIPELINED))
    key = secrets.token_bytes(32)  # stands in for an epoch key: same length, same HMAC work
    networks = [lambda n: emulated_wan(n, rate_bps, delay_s, wan_name, args.sysctl)] + ([loopback] if args.mac else [])
    print(f"{args.mib} MiB fp32 all-reduce ({args.mib * 2**20 // 4:,} values) over {wan_name}: {args.delay} one-way "
          f"({2 * delay_s * 1e3:.0f} ms round trip){' and over loopback' if args.mac else ''}; median of {args.repeats} "
          f"interleaved rounds; ring chunks of {args.chunk_mb} MB")
    print(f"at the start: {load_average()}")
    table, cpu, costs = [], {}, []
    for network_of in networks:
        for islands in args.islands:
            with network_of(islands) as network:
                if network.tcp is not None:
                    print(f"{network.name}, {islands} islands: TCP {network.tcp}")
                per_rank, share = run_islands(network, args, methods, key)
            if share is not None:
                cpu[islands] = share
            table += rows(network, islands, per_rank, methods)
            if args.mac:
                costs.append(mac_cost(network, islands, per_rank, methods[0]))
    print(f"{'link':<15}{'islands':>7}  {'method':<28}{'seconds':>9}{'(range)':>13}{'MB/island':>11}{'link util':>11}"
          f"{'vs first':>9}{'rel err':>10}")
    for row in table:
        spread = f"({row['fastest']:.2f}-{row['slowest']:.2f})"
        utilization = f"{row['utilization']:.1%}" if row["utilization"] is not None else "-"
        print(f"{row['link']:<15}{row['islands']:>7}  {row['method']:<28}{row['seconds']:>9.3f}{spread:>13}"
              f"{row['wire_bytes'] / 1e6:>11.1f}{utilization:>11}{row['speedup']:>8.3f}x{row['error']:>10.2e}")
    for line in costs:
        print(line)
    for islands, share in cpu.items():
        print(f"delay line CPU, {islands} islands: {share:.1%} of one core on average over the run")
    print(f"at the end: {load_average()}")


if __name__ == "__main__":
    main()
