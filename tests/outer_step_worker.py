"""One island of the outer-step tests (started by test_outer_step.py, one process per island).

argv[1] is the mode:
- "buckets": average the same per-island buffer in per-layer buckets three ways over two streams
  (mean_ per bucket, mean_buckets_, mean_buckets_ with an `abandoned` check) and print the digests.
- "memory": a 1-process DiLoCo over a 200 MB model; print the peak memory (VmHWM) growth of one
  average (1-member group), agreement digest and apply, and the buffer size.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from torch import nn

from atoll.comm.allreduce import GlobalMean
from atoll.comm.codecs import get_codec
from atoll.diloco import DiLoCo
from atoll.digest import tensor_digest

MB = 2**20


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def buckets_mode() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    groups = [dist.new_group(backend="gloo") for _ in range(2)]
    sizes = [1, 7, 1009, 100_003, 64, 0, 4097]
    values = 1e-3 * torch.randn(sum(sizes), generator=torch.Generator().manual_seed(rank))
    edges = torch.tensor([0, *sizes]).cumsum(0).tolist()
    buckets = [slice(a, b) for a, b in zip(edges, edges[1:])]
    digests = {}
    for way in ("per-bucket", "buckets", "abandonable"):
        mean = GlobalMean(groups, get_codec("int8"), 30.0, 4096, abandoned=(lambda: False) if way == "abandonable" else None)
        out = values.clone()
        if way == "per-bucket":
            for bucket in buckets:
                mean.mean_(out[bucket])
        else:
            mean.mean_buckets_(out, buckets)
        digests[way] = tensor_digest([("out", out)])
        digests[f"{way} calls"] = mean.calls
        digests[f"{way} bytes"] = mean.wire.bytes_sent
    digests["changed"] = not torch.equal(out, values)
    print(json.dumps(digests))
    dist.destroy_process_group()


class Blocks(nn.Module):
    def __init__(self, numel: int, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.ParameterDict({"w": nn.Parameter(torch.randn(numel // layers))}) for _ in range(layers))


def memory_mode() -> None:
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    model = Blocks(50 * MB, 8)  # 200 MB of fp32
    diloco = DiLoCo(model, lr=0.7, momentum=0.9, nesterov=True)
    mean = GlobalMean([dist.new_group([0], backend="gloo")], get_codec("int8"), 30.0, 2**22, abandoned=lambda: False)
    diloco.optimizer.step()  # creates the momentum buffer: state, not a temporary
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    before = peak_rss_bytes()
    diloco.average(mean)
    diloco.agreement_digest()
    diloco.apply()
    print(json.dumps({"grown": peak_rss_bytes() - before, "buffer": diloco.outer.numel() * 4,
                      "pseudo_grad_mean": diloco.pseudo_grad.mean().item()}))


if __name__ == "__main__":
    {"buckets": buckets_mode, "memory": memory_mode}[sys.argv[1]]()
