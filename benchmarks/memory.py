"""Peak host memory of each local rank at start-up and after the first training step, next to the
full fp32 model size.

    python benchmarks/memory.py [--sizes 150m 1b] [--nproc 2] [--seq-len 128] [--optimizer sgd|adamw]

For each named size it starts `--nproc` local ranks (gloo on CPU, one process each, like an island
under torchrun), which build the model with `train.build_model` (meta device, FSDP2, sharded
init, digest from shards) and then run one `train_step` on one random sequence per rank. Each
rank reports its peak resident memory (VmHWM) after importing torch and joining the group
(baseline), after start-up and after the first step. `--optimizer sgd` (the default) keeps
optimizer state out so that a 1b pair fits a small shared machine; AdamW adds 8 bytes per
parameter of the shard, printed as such. Sizes run one after another, never two pairs at once.
This prints figures only; it never fails on size or time.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys

GB = 1e9
TIMEOUT_S = 1800


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (VmHWM)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def worker(size: str, seq_len: int, optimizer_name: str) -> None:
    """One local rank: build, step once, print one JSON line of peaks."""
    import torch

    from atoll.config import JobConfig
    from atoll.guard import InnerGuard
    from atoll.island import local_rows, start_island, stop_island
    from atoll.model import get_size
    from atoll.optim import build_optimizer
    from atoll.inner_step import train_step
    from atoll.model_setup import build_model

    island = start_island("cpu")
    baseline = peak_rss_bytes()
    args = get_size(size)
    cfg = JobConfig.model_validate({"model": {"name": size}, "train": {"seq_len": seq_len}})
    model, _ = build_model(args, cfg, island)
    start_up = peak_rss_bytes()
    optimizer = build_optimizer(model, cfg.optim) if optimizer_name == "adamw" else torch.optim.SGD(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, args.vocab_size, (1, seq_len + 1))
    guard = InnerGuard(cfg.train.max_skipped_inner, island, None, print)
    train_step(model, optimizer, tokens[:, :-1], tokens[:, 1:], 1, cfg, island, lambda: None, guard, 1)
    stepped = peak_rss_bytes()
    shard = sum(local_rows(p)[0].numel() * 4 for p in model.parameters())
    print(json.dumps({"rank": island.rank, "baseline": baseline, "start_up": start_up, "step": stepped, "shard": shard}))
    stop_island()


def run_island(size: str, nproc: int, seq_len: int, optimizer_name: str) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(nproc):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen(
            [sys.executable, __file__, "--worker", size, "--seq-len", str(seq_len), "--optimizer", optimizer_name],
            env=env, stdout=subprocess.PIPE, text=True, start_new_session=True))
    try:
        return [json.loads(proc.communicate(timeout=TIMEOUT_S)[0].strip().splitlines()[-1]) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["150m", "1b"])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
    parser.add_argument("--worker", metavar="SIZE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.seq_len, args.optimizer)
        return

    from atoll.model import count_params, get_size

    print(f"peak host memory (VmHWM) per local rank, {args.nproc} ranks, gloo on CPU, 1 x {args.seq_len} tokens per rank, "
          f"{args.optimizer}; load average {os.getloadavg()[0]:.2f}")
    print(f"{'size':<6} {'full fp32':>9} {'rank':>4} {'shard':>6} {'baseline':>8} {'start-up':>8} {'(+)':>6} "
          f"{'1st step':>8} {'(+)':>6} {'AdamW adds':>10}  [GB]")
    for size in args.sizes:
        full = count_params(get_size(size))["total"] * 4
        for r in run_island(size, args.nproc, args.seq_len, args.optimizer):
            adamw = 0.0 if args.optimizer == "adamw" else 2 * r["shard"] / GB
            print(f"{size:<6} {full / GB:>9.2f} {r['rank']:>4} {r['shard'] / GB:>6.2f} {r['baseline'] / GB:>8.2f} "
                  f"{r['start_up'] / GB:>8.2f} {(r['start_up'] - r['baseline']) / GB:>6.2f} {r['step'] / GB:>8.2f} "
                  f"{(r['step'] - r['baseline']) / GB:>6.2f} {adamw:>10.2f}")


if __name__ == "__main__":
    main()
