"""The outer step's local work on one rank's shard, phase by phase, next to two bandwidth references.

    python benchmarks/outer_step.py [--gb 1] [--layers 42] [--repeats 3]

A stand-in model of `--layers` equal blocks holding `--gb` GB of fp32 parameters (the shard one
rank of an island holds: 5.1 GB at 10B on 8 ranks) goes through what `DiLoCo` does locally in one
outer step, with the network left out (a 1-member group, where the ring is a no-op):

- pseudo-gradient: `DiLoCo.average` (read the inner shards into the pseudo-gradient buffer,
  outer − inner in place, per-layer buckets through `GlobalMean`),
- agreement digest: `agreement_digest()` as `atoll.sync` calls it after the average: it hashes
  the pseudo-gradient; the outer weights' digests are the ones kept from the previous `apply()`,
- encode / decode: the int8 codec over every bucket once, in the ring's chunks of
  `CommConfig.chunk_mb` (the ring does this per hop; it decodes each payload it receives and
  lets go of each payload it sent, so their memory is reused rather than faulted in anew),
- apply: `apply()`: the Nesterov step, the copy of the outer weights into the inner shards and
  the digest of the new outer weights.

References: `clone()` of the pseudo-gradient (a fresh allocation: its page faults are counted, as
they are for every fresh tensor) and `copy_` of it into a preallocated buffer (one read and one
write of the shard: the memory bandwidth floor of a pass). Each phase prints seconds per GB of
shard and GB/s, and how many copy_ passes it costs; the total is what one outer step costs this
rank before and after the wire. Medians of `--repeats` rounds after one warm-up round, the phases
and references interleaved so machine noise spreads over all of them. This prints figures only;
it never fails on time.
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
from atoll.config import CommConfig
from atoll.diloco import DiLoCo

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
    chunk_values = int(CommConfig().chunk_mb * 1e6) // 4
    mean = GlobalMean([dist.new_group([0], backend="gloo")], codec, deadline_s=60, chunk_bytes=chunk_values * 4)
    # the ring's chunks of each bucket (one segment per island: the whole bucket on one island)
    chunks = [c for b in diloco.buckets for c in diloco.pseudo_grad[b].tensor_split(max(1, -(-(b.stop - b.start) // chunk_values)))]
    payloads = [codec.encode(c) for c in chunks]  # what decode reads; their values do not change its time
    nbytes = diloco.outer.numel() * 4
    reference = torch.empty_like(diloco.pseudo_grad)

    def encode() -> None:
        for c in chunks:  # each payload is dropped once made, as the ring drops it once sent
            codec.encode(c)

    def decode() -> None:  # into the chunk, as the ring's all-gather does (the next round recomputes them)
        for c, payload in zip(chunks, payloads):
            codec.decode_into(payload, c)

    phases: dict[str, Callable[[], object]] = {
        "pseudo-gradient": lambda: diloco.average(mean),
        "agreement digest": diloco.agreement_digest,
        "int8 encode": encode,
        "int8 decode": decode,
        "apply (Nesterov, copy back, digest)": diloco.apply,
    }
    references: dict[str, Callable[[], object]] = {
        "clone (fresh memory)": diloco.pseudo_grad.clone,
        "copy_ (preallocated)": lambda: reference.copy_(diloco.pseudo_grad),
    }
    seconds: dict[str, list[float]] = {name: [] for name in [*phases, *references]}
    for round_index in range(args.repeats + 1):  # round 0 warms up allocator, threads, momentum, kept digest
        for name, fn in [*phases.items(), *references.items()]:
            start = time.perf_counter()
            fn()
            lap = time.perf_counter() - start
            if round_index:
                seconds[name].append(lap)
    load = os.getloadavg()
    print(f"outer step local work on a {nbytes / GB:.2f} GB fp32 shard ({args.layers} buckets, {len(chunks)} ring chunks), "
          f"{torch.get_num_threads()} intra-op threads, load average {load[0]:.2f}, median of {args.repeats} rounds")
    s_per_gb = {name: statistics.median(laps) / (nbytes / GB) for name, laps in seconds.items()}
    copy = s_per_gb["copy_ (preallocated)"]
    print(f"{'phase':<36} {'s/GB':>7} {'GB/s':>7} {'x copy_':>8}")
    for name, value in s_per_gb.items():
        print(f"{name:<36} {value:>7.3f} {1 / value:>7.2f} {value / copy:>8.2f}")
    total = sum(s_per_gb[name] for name in phases)
    print(f"{'total (phases)':<36} {total:>7.3f} {1 / total:>7.2f} {total / copy:>8.2f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
