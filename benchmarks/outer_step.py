"""The outer step's local work on one rank's shard, phase by phase, next to a plain `clone()`.

    python benchmarks/outer_step.py [--gb 1] [--layers 42] [--repeats 3]

A stand-in model of `--layers` equal blocks holding `--gb` GB of fp32 parameters (the shard one
rank of an island holds: 5.1 GB at 10B on 8 ranks) goes through what `DiLoCo` does locally in one
outer step, with the network left out (a 1-member group, where the ring is a no-op):

- pseudo-gradient: `DiLoCo.average` (read the inner shards into the pseudo-gradient buffer,
  outer − inner in place, per-layer buckets through `GlobalMean`),
- digest: `agreement_digest()` (outer weights and pseudo-gradient) and the outer digest that
  `apply()` returns (three buffer passes),
- encode / decode: the int8 codec over every bucket once (the ring does this per hop),
- apply: the Nesterov step (`optimizer.step()`), copy back: outer weights into the inner shards.

Each phase prints seconds per GB of shard and GB/s; the total is what one outer step costs this
rank before and after the wire. Medians of `--repeats` rounds after one warm-up round. This
prints figures only; it never fails on time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from atoll.comm.allreduce import GlobalMean
from atoll.comm.codecs import get_codec
from atoll.diloco import DiLoCo
from atoll.digest import tensor_digest

GB = 1e9


class Blocks(nn.Module):
    """`layers` blocks of one fp32 parameter each: the per-layer buckets DiLoCo makes of a Llama."""

    def __init__(self, numel: int, layers: int) -> None:
        super().__init__()
        per = numel // layers
        self.layers = nn.ModuleList(nn.ParameterDict({"weight": nn.Parameter(torch.randn(per) * 0.02)}) for _ in range(layers))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=1.0, help="fp32 shard size in GB (1-4 is what the issue asks for)")
    parser.add_argument("--layers", type=int, default=42)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    model = Blocks(int(args.gb * GB / 4), args.layers)
    diloco = DiLoCo(model, lr=0.7, momentum=0.9, nesterov=True)
    codec = get_codec("int8")
    mean = GlobalMean([dist.new_group([0], backend="gloo")], codec, deadline_s=60, chunk_bytes=2**22)
    buckets = [diloco.pseudo_grad[b] for b in diloco.buckets]
    payloads: list[torch.Tensor] = []
    nbytes = diloco.outer.numel() * 4

    def encode() -> None:
        payloads[:] = [codec.encode(b) for b in buckets]

    def decode() -> None:
        for b, payload in zip(buckets, payloads):
            codec.decode(payload, b.numel())

    def digest() -> None:
        diloco.agreement_digest()
        tensor_digest([("outer", diloco.outer)])

    phases: dict[str, Callable[[], object]] = {
        "pseudo-gradient": lambda: diloco.average(mean),
        "digest (3 passes)": digest,
        "int8 encode": encode,
        "int8 decode": decode,
        "apply (Nesterov)": diloco._outer_sgd_step,
        "copy back": diloco._scatter_outer,
    }
    seconds: dict[str, list[float]] = {name: [] for name in [*phases, "clone (reference)"]}
    for round_index in range(args.repeats + 1):  # round 0 warms up allocator, threads, momentum
        for name, fn in [*phases.items(), ("clone (reference)", diloco.pseudo_grad.clone)]:
            start = time.perf_counter()
            fn()
            lap = time.perf_counter() - start
            if round_index:
                seconds[name].append(lap)
    load = os.getloadavg()
    print(f"outer step local work on a {nbytes / GB:.2f} GB fp32 shard ({args.layers} buckets), "
          f"{torch.get_num_threads()} intra-op threads, load average {load[0]:.2f}, median of {args.repeats} rounds")
    print(f"{'phase':<20} {'s/GB':>7} {'GB/s':>7}")
    total = 0.0
    for name, laps in seconds.items():
        s_per_gb = statistics.median(laps) / (nbytes / GB)
        if name in phases:
            total += s_per_gb
        print(f"{name:<20} {s_per_gb:>7.3f} {1 / s_per_gb:>7.2f}")
    print(f"{'total (phases)':<20} {total:>7.3f} {1 / total:>7.2f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
