"""One local rank of the sharded-init tests (started by test_sharded_init.py, one process per rank).

argv[1] is JSON: {"args": ModelArgs fields, "seed": int}. Prints one JSON line: the full-model
digest from build_model, the rank's peak host memory (VmHWM) before and after build_model, and
the bytes of its fp32 shard.
"""

from __future__ import annotations

import json
import sys

from atoll.config import JobConfig
from atoll.island import local_rows, start_island, stop_island
from atoll.model import ModelArgs
from atoll.train import build_model


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (VmHWM)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def main() -> None:
    spec = json.loads(sys.argv[1])
    island = start_island("cpu")
    cfg = JobConfig.model_validate({"train": {"seed": spec["seed"]}})
    before = peak_rss_bytes()
    model, digest = build_model(ModelArgs(**spec["args"]), cfg, island)
    after = peak_rss_bytes()
    shard = sum(local_rows(p)[0].numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"rank": island.rank, "digest": digest, "peak_before": before, "peak_after": after, "shard_bytes": shard}))
    stop_island()


if __name__ == "__main__":
    main()
