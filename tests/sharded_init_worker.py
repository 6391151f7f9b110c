"""One local rank of the sharded-init tests (started by test_sharded_init.py, one process per rank).

argv[1] is JSON: {"args": ModelArgs fields, "seed": int, "accum": [int, ...] (optional)}. Prints
one JSON line: the full-model digest from build_model, the rank's peak host memory (VmHWM) before
and after build_model, the bytes of its fp32 shard and, for each `accum`, the full weights after
one train_step with SGD(lr=1) (initial weights minus the gradient) from the same initial weights.
"""

from __future__ import annotations

import json
import sys

import torch

from atoll.config import JobConfig
from atoll.guard import InnerGuard
from atoll.island import Island, local_rows, start_island, stop_island
from atoll.model import ModelArgs
from atoll.inner_step import train_step
from atoll.model_setup import build_model


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (VmHWM)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def stepped_weights(args: ModelArgs, cfg: JobConfig, island: Island, accum: int) -> list[float]:
    """The full weights (a strided sample) after one SGD(lr=1) step on a fixed batch of 8 sequences."""
    cfg = cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"grad_clip": 0.0})})
    model, _ = build_model(args, cfg, island)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    tokens = torch.randint(0, args.vocab_size, (8, 33), generator=torch.Generator().manual_seed(5))
    mine = tokens.chunk(island.world)[island.rank]
    guard = InnerGuard(cfg.train.max_skipped_inner, island, None, print)
    train_step(model, optimizer, mine[:, :-1], mine[:, 1:], accum, cfg, island, lambda: None, guard, 1)
    full = torch.cat([p.full_tensor().reshape(-1) if hasattr(p, "full_tensor") else p.reshape(-1) for p in model.parameters()])
    return full[::97].tolist()


def main() -> None:
    spec = json.loads(sys.argv[1])
    island = start_island("cpu")
    cfg = JobConfig.model_validate({"train": {"seed": spec["seed"]}})
    before = peak_rss_bytes()
    model, digest = build_model(ModelArgs(**spec["args"]), cfg, island)
    after = peak_rss_bytes()
    shard = sum(local_rows(p)[0].numel() * p.element_size() for p in model.parameters())
    result = {"rank": island.rank, "digest": digest, "peak_before": before, "peak_after": after, "shard_bytes": shard}
    result["stepped"] = [stepped_weights(ModelArgs(**spec["args"]), cfg, island, accum) for accum in spec.get("accum", [])]
    print(json.dumps(result))
    stop_island()


if __name__ == "__main__":
    main()
