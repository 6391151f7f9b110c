"""The utilization atoll would reach at INTELLECT-1's scale, from costs measured here, next to INTELLECT-1's.

    python benchmarks/projection.py                      # codec costs measured on 64 MiB here
    python benchmarks/projection.py --islands 4 8 14 --rates 0.5 1 2 4 --rtts 100 300
    python benchmarks/projection.py --codec-gbps 20      # codecs as fast as a GPU would run them

INTELLECT-1 (10B, H = 100, a 38-minute inner phase on 8 H100s per island, int8 ring) measured
95.7% (US), 85.6% (transatlantic) and 83.0% (worldwide) compute utilization, with median
all-reduces of 103, 382 and 469 s. This script projects atoll's utilization on that setting, per
island count, link rate, round trip, codec and mode (blocking, or overlapped by tau inner steps),
from a model of one outer step for one local rank (each of an island's `--ranks` ranks syncs its
own 1/ranks shard over its own ring, all of them sharing the island's link):

- ring (int8, int4, fp32): reduce-scatter then all-gather, each rank sends 2(N-1)/N of its shard's
  payload; the island's link carries every rank's at the ring's measured share of it, capped by what
  ranks x streams TCP flows can carry at this round trip (a flow carries at most a window per round
  trip); each of the 2(N-1) ring steps adds a one-way delay. The codec's work (each rank encodes its
  segment N times and decodes 2(N-1) times, 1/N of its shard each) runs on other chunks while one
  is on the wire: the ring takes the longer of the two, plus the latency;
- topk: an all-gather, each island's payload sent straight to the N-1 others and decoded by each
  (one latency);
- the outer step's local work (pseudo-gradient, agreement digest, apply) at its measured s/GB;
- the protocol: the boundary barrier and the landing's outcome, one round trip each to the
  coordinator, and the validation statistics' exchange ((N-1) one-way delays).
Blocking: all of it stops training. Overlapped by tau: the barrier, the statistics, the ring and
the outcome run behind tau inner steps, and only the local work and what does not fit stays
blocked (eager, `diloco.eager`, is tau = H - 1).
utilization = compute / (compute + blocked).

Measured here (printed with the machine's load): the codecs' encode and decode (into a buffer)
rates and the outer step's local work, on `--mib` MiB, with this machine's intra-op threads.
Measured elsewhere and passed in (defaults from the README's runs): the ring's share of the link
(`--link-share`, benchmarks/allreduce.py: 95-96% for int8 on the emulated WAN). Assumed: the TCP
window per flow (`--tcp-window-mib`, Linux's default tcp_rmem maximum), ranks per island, the
coordinator as far as a peer, the codec on the host at this machine's per-rank rate (an H100
host has more cores; `--codec-gbps` overrides), no straggler: islands reach the barrier together.
The check section runs the same model on settings of benchmarks/overlap.py and allreduce.py and
prints what those runs measured beside it. Figures only; it never fails on time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from atoll.comm.allreduce import GlobalMean
from atoll.comm.codecs import get_codec
from atoll.config import CommConfig
from atoll.diloco import DiLoCo

GB = 1e9
MIB = 2**20
CODECS = ("fp32", "int8", "int4", "topk")
INTELLECT_1 = {"US": (0.957, 103.0), "transatlantic": (0.856, 382.0), "worldwide": (0.830, 469.0)}
"""INTELLECT-1's measured utilization and median all-reduce seconds per setting (its report)."""


@dataclass(frozen=True)
class Costs:
    """Per GB of fp32 input on one rank: the codec's encode and decode seconds and its payload's
    share of the fp32 bytes; the outer step's local work (pseudo-gradient, digest, apply)."""

    encode_s_per_gb: float
    decode_s_per_gb: float
    payload_ratio: float
    local_s_per_gb: float


@dataclass(frozen=True)
class Setting:
    """One run's shape: parameters, islands, ranks and ring streams per island, H and the seconds
    of one inner step, the link (bytes/s each way per island, round trip in s), what share of it
    the ring fills, and the TCP window per flow."""

    params: float
    islands: int
    ranks: int
    streams: int
    inner_steps: int
    step_s: float
    rate: float
    rtt: float
    link_share: float
    window: float


def island_throughput(s: Setting) -> float:
    """Bytes/s the island's rings move: the link at the ring's share, or what ranks x streams
    flows of one window per round trip carry, whichever is less."""
    return min(s.rate * s.link_share, s.ranks * s.streams * s.window / s.rtt)


def allreduce_s(s: Setting, codec: str, c: Costs) -> float:
    """Seconds of one rank's all-reduce of its shard (see the module doc)."""
    n, shard_gb = s.islands, 4 * s.params / s.ranks / GB
    if n == 1:
        return 0.0
    if codec == "topk":  # all-gather: own payload to every peer, every peer's decoded
        wire = s.ranks * (n - 1) * shard_gb * GB * c.payload_ratio / island_throughput(s)
        work = shard_gb * (c.encode_s_per_gb + (n - 1) * c.decode_s_per_gb)
        return max(wire, work) + s.rtt / 2
    wire = s.ranks * 2 * (n - 1) / n * shard_gb * GB * c.payload_ratio / island_throughput(s)
    work = shard_gb / n * (n * c.encode_s_per_gb + 2 * (n - 1) * c.decode_s_per_gb)
    return max(wire, work) + 2 * (n - 1) * s.rtt / 2


def blocked_s(s: Setting, codec: str, c: Costs, tau: int) -> float:
    """Seconds one outer step stops training: the local work, and whatever of the barrier and
    outcome round trips, the statistics' exchange and the ring does not fit behind tau inner steps."""
    local = c.local_s_per_gb * 4 * s.params / s.ranks / GB
    protocol = 2 * s.rtt + (s.islands - 1) * s.rtt / 2 + allreduce_s(s, codec, c)
    return local + max(0.0, protocol - tau * s.step_s)


def utilization(s: Setting, codec: str, c: Costs, tau: int = 0) -> float:
    """compute / (compute + blocked) per outer step."""
    compute = s.inner_steps * s.step_s
    return compute / (compute + blocked_s(s, codec, c, tau))


class _Blocks(nn.Module):
    """A model of `layers` fp32 blocks of `numel` values in all: DiLoCo's per-layer buckets."""

    def __init__(self, numel: int, layers: int = 8) -> None:
        super().__init__()
        self.blocks = nn.ParameterList(nn.Parameter(torch.randn(numel // layers) * 0.02) for _ in range(layers))


def _median_s(fn, repeats: int) -> float:
    fn()  # warm-up: allocator, threads
    laps = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        laps.append(time.perf_counter() - start)
    return statistics.median(laps)


def measure_costs(mib: int, repeats: int) -> dict[str, Costs]:
    """Each codec's Costs, measured here on a Gaussian of `mib` MiB (decode into a preallocated
    tensor, as the ring does), with the outer step's local work measured on a model of that size."""
    values = torch.randn(mib * MIB // 4, generator=torch.Generator().manual_seed(0))
    gb = values.numel() * 4 / GB
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        diloco = DiLoCo(_Blocks(values.numel()), lr=0.7, momentum=0.8, nesterov=True)
        mean = GlobalMean([dist.new_group([0], backend="gloo")], get_codec("int8"), deadline_s=60,
                          chunk_bytes=int(CommConfig().chunk_mb * 1e6))
        local = _median_s(lambda: (diloco.average(mean), diloco.agreement_digest(), diloco.apply()), repeats) / gb
    finally:
        dist.destroy_process_group()
    out, costs = torch.empty_like(values), {}
    for name in CODECS:
        codec = get_codec(name)
        payload = codec.encode(values)
        encode, decode = (0.0, 0.0) if name == "fp32" else (
            _median_s(lambda c=codec: c.encode(values), repeats), _median_s(lambda c=codec, p=payload: c.decode_into(p, out), repeats))
        costs[name] = Costs(encode / gb, decode / gb, payload.numel() * payload.element_size() / (values.numel() * 4), local)
    return costs


def with_codec_rate(costs: dict[str, Costs], gbps: float) -> dict[str, Costs]:
    """The same costs with every codec's encode and decode at `gbps` GB/s."""
    return {name: Costs(0.0 if name == "fp32" else 1 / gbps, 0.0 if name == "fp32" else 1 / gbps, c.payload_ratio,
                        c.local_s_per_gb) for name, c in costs.items()}


def check(costs: dict[str, Costs], link_share: float, window: float) -> None:
    """The model on the emulated-WAN runs it can reproduce, beside what they measured."""
    print("\ncheck against the emulated WAN (same model, those runs' settings; measured on this VM under load):")
    overlap = {"params": 164_160, "islands": 2, "ranks": 1, "streams": 1, "inner_steps": 200, "rate": 2e6 / 8,
               "rtt": 0.02, "link_share": link_share, "window": window}
    print(f"  {'run':<58}{'model':>10}{'measured':>10}")
    # `python benchmarks/overlap.py --steps 1600 --inner-steps 200 --rate 2mbit --delay 10ms --taus 1 50 100
    # --fragments 2`, load 2.0: its "steady" utilization and s/step per mode
    for tau, measured, step_s in ((0, 0.793, 0.021), (1, 0.786, 0.020), (50, 0.958, 0.017), (100, 0.999, 0.017)):
        s = Setting(**{**overlap, "step_s": step_s})
        print(f"  {f'overlap.py: 2 islands, debug, 2 Mbit/s, 20 ms rtt, H=200, tau {tau}':<58}"
              f"{utilization(s, 'int8', costs['int8'], tau):>10.1%}{measured:>10.1%}")
    ring = Setting(params=64 * MIB / 4, islands=3, ranks=1, streams=1, inner_steps=1, step_s=1.0, rate=100e6 / 8, rtt=0.04,
                   link_share=link_share, window=window)
    # `python benchmarks/allreduce.py --islands 3 --repeats 3`, load 0.5-0.8 (topk after its numpy selection)
    for codec, measured in (("int8", 1.93), ("int4", 1.10), ("topk", 0.30)):
        run = f"allreduce.py: {codec}, 3 islands, 64 MiB, 100 Mbit/s, 40 ms rtt (s)"
        print(f"  {run:<58}{allreduce_s(ring, codec, costs[codec]):>10.2f}{measured:>10.2f}")
    print("  (the emulated islands share this VM's 2 cores with each other and the delay line: what the model leaves\n"
          "   out there is CPU contention and islands drifting apart at the barrier, which real islands do not share)")

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=10.2e9, help="parameters (INTELLECT-1: 10.2e9)")
    parser.add_argument("--inner-steps", type=int, default=100, help="H (INTELLECT-1: 100)")
    parser.add_argument("--inner-phase-min", type=float, default=38.0, help="minutes of one inner phase (INTELLECT-1: 38)")
    parser.add_argument("--ranks", type=int, default=8, help="ranks per island, each with its own ring (INTELLECT-1: 8 H100s)")
    parser.add_argument("--streams", type=int, default=1, help="comm.streams: rings per rank")
    parser.add_argument("--islands", type=int, nargs="+", default=[4, 8, 14])
    parser.add_argument("--rates", type=float, nargs="+", default=[0.5, 1, 2, 4], help="Gbit/s per island, each way")
    parser.add_argument("--rtts", type=float, nargs="+", default=[100, 300], help="round trips in ms")
    parser.add_argument("--taus", type=int, nargs="+", default=[0, 25, 50, 99], help="overlap_steps (0: blocking)")
    parser.add_argument("--link-share", type=float, default=0.95, help="ring's share of the link (measured: benchmarks/allreduce.py)")
    parser.add_argument("--tcp-window-mib", type=float, default=6.0, help="TCP window per flow (Linux's default tcp_rmem max: 6 MiB)")
    parser.add_argument("--codec-gbps", type=float, default=None, help="override the measured codec rate (GB/s of fp32)")
    parser.add_argument("--mib", type=int, default=64, help="tensor size the costs are measured on")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    costs = measure_costs(args.mib, args.repeats)
    print(f"measured on {args.mib} MiB, {torch.get_num_threads()} intra-op threads, load average {os.getloadavg()[0]:.2f}: "
          f"outer step local work {costs['int8'].local_s_per_gb:.2f} s/GB")
    for name, c in costs.items():
        if name != "fp32":
            print(f"  {name:<5} encode {1 / c.encode_s_per_gb:5.2f} GB/s  decode into {1 / c.decode_s_per_gb:5.2f} GB/s  "
                  f"payload {c.payload_ratio:.4f} of fp32")
    if args.codec_gbps is not None:
        costs = with_codec_rate(costs, args.codec_gbps)
        print(f"  (codecs set to {args.codec_gbps} GB/s by --codec-gbps)")
    window = args.tcp_window_mib * MIB
    step_s = args.inner_phase_min * 60 / args.inner_steps
    print(f"\n{args.params / 1e9:.1f}B params, H={args.inner_steps}, {args.inner_phase_min:.0f}-minute inner phase, "
          f"{args.ranks} ranks x {args.streams} stream(s) per island, ring share {args.link_share:.0%}, "
          f"TCP window {args.tcp_window_mib:g} MiB per flow")
    print("INTELLECT-1 measured (int8, blocking): " + ", ".join(f"{k} {u:.1%} ({s:.0f} s all-reduce)" for k, (u, s) in INTELLECT_1.items()))
    modes = [(codec, tau) for codec in CODECS for tau in args.taus]
    print(f"\n{'islands':>7}{'Gbit/s':>7}{'rtt ms':>7}  " + "".join(f"{c + (' b' if t == 0 else f' t{t}'):>10}" for c, t in modes))
    for islands in args.islands:
        for rate in args.rates:
            for rtt in args.rtts:
                s = Setting(args.params, islands, args.ranks, args.streams, args.inner_steps, step_s, rate * 1e9 / 8, rtt / 1e3,
                            args.link_share, window)
                print(f"{islands:>7}{rate:>7g}{rtt:>7g}  " + "".join(f"{utilization(s, c, costs[c], t):>10.1%}" for c, t in modes))
    print("\n(b: blocking; tN: diloco.overlap_steps = N; tH-1 is also diloco.eager's timing, whose all-reduce lands H - 1 "
          "steps later. The all-reduce seconds behind each figure are allreduce_s.)")
    check(costs, args.link_share, window)


if __name__ == "__main__":
    main()
