"""Ring all-reduce time by ring order on an emulated WAN of per-pair links (`--wan-topology`).

    python benchmarks/topology.py                                   # configs/wan/two-regions.toml, 4 islands (needs root)
    python benchmarks/topology.py --topology FILE --islands 5 --mib 8 --repeats 3

Builds the emulated WAN of the topology (`atoll.wan`: a namespace per island, each directed pair
paced at its rate and delayed by the delay line), a TCPStore in the coordinator's namespace and
one worker per island in its namespace. The workers first measure their links as islands do on
entering an epoch (`atoll.mesh.link_probe`, over a group in id order), publish them, and each
solves the ring order from all of them (`atoll.mesh.ring_order.best_ring`, as the coordinator does).
Then they time atoll's int8 ring (`comm/ring.py`) on a `--mib` MiB fp32 payload in every ring
order (every cycle with island 0 first, so both directions), each on its own gloo group whose rank
order is that cycle, repeats interleaved. Rows: id order, the measured order, and the best and
worst cycles by median time; columns: the cycle, its slowest configured link, the median seconds
of the slowest island (and the range), and the ratio to the best. The measured links and the
probe's cost are printed above. Timings on a shared machine vary; compare rows of one run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_TOPOLOGY = REPO / "configs" / "wan" / "two-regions.toml"
GROUP_TIMEOUT = timedelta(seconds=120)
RING_DEADLINE_S = 120.0
WORKER_TIMEOUT_S = 1200
LINKS_KEY = "links/{rank}"
RESULT_KEY = "result/{rank}"


def cycles(islands: int) -> list[tuple[int, ...]]:
    """Every ring order of `islands` islands with island 0 first (both directions of each cycle)."""
    return [(0, *rest) for rest in itertools.permutations(range(1, islands))]


def worker(args: argparse.Namespace) -> None:
    """One island: measure its links, solve the order, time the ring in every order; publish."""
    import torch
    import torch.distributed as dist

    from atoll.comm.codecs import get_codec
    from atoll.comm.ring import ring_all_reduce_mean_
    from atoll.mesh.link_probe import probe_links
    from atoll.mesh.ring_order import Link, best_ring

    host, port = args.store.rsplit(":", 1)
    store = dist.TCPStore(host, int(port), is_master=False, wait_for_workers=False, timeout=GROUP_TIMEOUT)
    names = [str(i) for i in range(args.world)]
    id_group = dist.ProcessGroupGloo(dist.PrefixStore("id", store), args.rank, args.world, GROUP_TIMEOUT)
    start = time.perf_counter()
    mine = probe_links(id_group, tuple(names), args.rank)
    probe_s = time.perf_counter() - start
    store.set(LINKS_KEY.format(rank=args.rank), json.dumps({peer: link.to_dict() for peer, link in mine.items()}))
    links = {}
    for rank in range(args.world):
        for peer, raw in json.loads(store.get(LINKS_KEY.format(rank=rank))).items():
            links[(names[rank], peer)] = Link.from_dict(raw)
    measured = tuple(int(i) for i in best_ring(names, links))

    orders = cycles(args.world)
    groups = {
        order: dist.ProcessGroupGloo(dist.PrefixStore(f"order/{k}", store), order.index(args.rank), args.world, GROUP_TIMEOUT)
        for k, order in enumerate(orders)
    }
    payload = torch.randn(args.mib * 2**20 // 4, generator=torch.Generator().manual_seed(args.rank))
    codec = get_codec("int8")
    seconds: dict[str, list[float]] = {str(order): [] for order in orders}
    sequence = 0
    for repeat in range(args.repeats):
        for order in orders if repeat % 2 == 0 else reversed(orders):  # a cycle's place in the round alternates
            tensor, group = payload.clone(), groups[order]
            group.barrier().wait()
            start = time.perf_counter()
            ring_all_reduce_mean_(tensor, group, codec, RING_DEADLINE_S, int(4e6), sequence)
            seconds[str(order)].append(time.perf_counter() - start)
            sequence += 1
    store.set(RESULT_KEY.format(rank=args.rank), json.dumps({
        "seconds": seconds, "measured": measured, "probe_s": probe_s,
        "links": {peer: link.to_dict() for peer, link in mine.items()},
    }))


def run(args: argparse.Namespace) -> list[dict]:
    """The workers' results, one per island, on a fresh emulated WAN of the topology."""
    import torch.distributed as dist

    from atoll.wan.namespaces import run_in_namespace
    from atoll.wan.network import EmulatedWan
    from atoll.wan.topology import load_topology

    topology = load_topology(args.topology, args.islands)
    with EmulatedWan(args.islands, None, 0.0, topology) as wan:
        store = run_in_namespace(
            wan.coordinator_namespace,
            lambda: dist.TCPStore(wan.coordinator_host, 0, is_master=True, wait_for_workers=False, timeout=GROUP_TIMEOUT),
        )
        env = {**os.environ, **wan.island_env(), "OMP_NUM_THREADS": "1"}
        workers = [
            subprocess.Popen(
                wan.island_command(rank, [
                    sys.executable, __file__, "--worker", "--rank", str(rank), "--world", str(args.islands),
                    "--store", f"{wan.coordinator_host}:{store.port}", "--mib", str(args.mib), "--repeats", str(args.repeats),
                ]),
                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            )
            for rank in range(args.islands)
        ]
        try:
            outputs = [w.communicate(timeout=WORKER_TIMEOUT_S)[0] for w in workers]
        finally:
            for w in workers:
                if w.poll() is None:
                    w.kill()
                    w.wait()
        for rank, (w, output) in enumerate(zip(workers, outputs)):
            if w.returncode != 0:
                sys.exit(f"island {rank} failed (exit {w.returncode}):\n{output}")
        return topology, [json.loads(store.get(RESULT_KEY.format(rank=rank))) for rank in range(args.islands)]


def report(topology, results: list[dict], args: argparse.Namespace) -> None:
    from atoll.mesh.ring_order import edges

    islands = args.islands
    print(f"topology {args.topology}, {islands} islands, int8 ring of {args.mib} MiB fp32, {args.repeats} repeats, "
          f"load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    for rank, result in enumerate(results):
        row = ", ".join(f"-> {peer}: {link['throughput'] * 8 / 1e6:.1f} Mbit/s {link['rtt'] * 1e3:.0f} ms" for peer, link in result["links"].items())
        print(f"  island {rank} measured ({result['probe_s']:.1f} s): {row}")
    measured = {tuple(r["measured"]) for r in results}
    assert len(measured) == 1, f"islands solved different orders: {measured}"
    measured_order = measured.pop()

    def slowest_configured(order: tuple[int, ...]) -> float:
        return min(topology.rates_bps[a][b] for a, b in edges(order)) / 1e6

    # the slowest island's time per repeat, then the median over repeats
    per_order = {}
    for order in cycles(islands):
        rounds = [max(r["seconds"][str(order)][k] for r in results) for k in range(args.repeats)]
        per_order[order] = (statistics.median(rounds), min(rounds), max(rounds))
    best = min(per_order, key=lambda o: per_order[o][0])
    worst = max(per_order, key=lambda o: per_order[o][0])
    rows = [("id order", tuple(range(islands))), ("measured", measured_order), ("best", best), ("worst", worst)]
    print(f"{'order':<10} {'cycle':<16} {'slowest link':>13} {'seconds':>8} {'range':>13} {'vs best':>8}")
    for name, order in rows:
        median, low, high = per_order[order]
        print(f"{name:<10} {'-'.join(map(str, order)):<16} {slowest_configured(order):>8.0f} Mbit {median:>8.2f} "
              f"{low:>6.2f}-{high:<6.2f} {median / per_order[best][0]:>7.2f}x")
    print(f"worst / measured: {per_order[worst][0] / per_order[measured_order][0]:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--topology", type=Path, default=DEFAULT_TOPOLOGY)
    parser.add_argument("--islands", type=int, default=4)
    parser.add_argument("--mib", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    topology, results = run(args)
    report(topology, results, args)


if __name__ == "__main__":
    main()
