"""Time training is blocked by a checkpoint: the asynchronous save against a synchronous one,
side by side in one run, plus what verifying a checkpoint on load costs.

    python benchmarks/checkpoint.py [--sizes 150m 1b] [--repeats 3] [--max-gb 3] [--dir DIR]

The state is one island's whole checkpoint at the size's real shapes: fp32 weights, AdamW's two
moments, the flat outer weights and the outer momentum (5 x 4 bytes per parameter). A size whose
state exceeds `--max-gb` is measured on its first K transformer blocks only (embedding and head
included) and printed as such: nothing is extrapolated. Each repeat saves once synchronously and
once asynchronously (blocked = time until training may go on; total = until the checkpoint is
published), interleaved so machine noise spreads over both; the table shows medians.

The target column is INTELLECT-1's ratio: a checkpoint every outer step, 38 minutes of compute
for 10.2B parameters, i.e. an interval of 38 min x params / 10.2B at the same compute per
parameter; the async save should block training for at most 2% of it. This prints figures
only; it never fails on time.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from atoll.checkpoint import Checkpointer, verify
from atoll.model import Llama, get_size

GB = 1e9
INTELLECT1_PARAMS = 10.2e9
INTELLECT1_OUTER_STEP_S = 38 * 60
BYTES_PER_PARAM = 5 * 4


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["150m", "1b"], help="named model sizes")
    parser.add_argument("--repeats", type=int, default=3, help="sync + async saves per size (the first async one also allocates the staging buffers)")
    parser.add_argument("--max-gb", type=float, default=3.0, help="largest state to allocate (the async save stages a second copy)")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp dir under ./runs)")
    return parser.parse_args()


def island_state(size: str, max_bytes: float) -> tuple[dict, int, str]:
    """(state dict, parameters, label) at the size's shapes, cut to whole blocks that fit max_bytes."""
    args = get_size(size)
    with torch.device("meta"):
        full = Llama(args)
    per_block = sum(p.numel() for p in full.layers[0].parameters())
    rest = sum(p.numel() for p in full.parameters()) - per_block * args.n_layers
    blocks = max(1, min(args.n_layers, int((max_bytes / BYTES_PER_PARAM - rest) // per_block)))
    if blocks < args.n_layers:
        with torch.device("meta"):
            full = Llama(dataclasses.replace(args, n_layers=blocks))
    shapes = {name: p.shape for name, p in full.named_parameters()}
    params = sum(s.numel() for s in shapes.values())
    weights = {n: torch.rand(s) for n, s in shapes.items()}
    adam = {n: {"exp_avg": torch.rand(s), "exp_avg_sq": torch.rand(s), "step": torch.tensor(100.0)} for n, s in shapes.items()}
    diloco = {"outer": torch.rand(params), "momentum": torch.rand(params), "has_momentum": 1}
    label = size if blocks == args.n_layers else f"{size} ({blocks} of {args.n_layers} blocks)"
    return {"model_optimizer": {"model": weights, "optimizer": {"state": adam}}, "diloco.rank0": diloco}, params, label


def one_save(checkpointer: Checkpointer, state: dict, step: int) -> tuple[float, float]:
    """(blocked s, total s) of one save, waiting for it to be published before returning."""
    report = checkpointer.save(step, state)
    checkpointer.wait()
    return report.blocked_s, report.total_s


def main() -> None:
    opts = parse_args()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    base = opts.dir or Path("runs")
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="checkpoint-bench-", dir=base))
    print(f"load average before: {os.getloadavg()[0]:.2f} ({os.cpu_count()} cores); writing under {work}")
    print(f"{'size':<24}{'state GB':>9}{'sync blocked':>14}{'sync total':>12}{'async blocked':>15}{'async total':>13}"
          f"{'blocked ratio':>15}{'interval s':>12}{'async blocked %':>17}{'verify GB/s':>13}")
    try:
        for size in opts.sizes:
            state, params, label = island_state(size, opts.max_gb * GB)
            savers = {}
            for asynchronous in (False, True):  # one each, as in a run: the stager's buffers are reused
                savers[asynchronous] = Checkpointer(work / f"{size}-{int(asynchronous)}", keep=1, is_leader=True, asynchronous=asynchronous)
                savers[asynchronous].start(None)
            timings: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
            for repeat in range(opts.repeats):
                for asynchronous in (False, True):
                    timings[asynchronous].append(one_save(savers[asynchronous], state, repeat + 1))
            for saver in savers.values():
                saver.close()
            directory = work / f"{size}-1"
            checkpoint = next(directory.glob("step-*"))
            start = time.perf_counter()
            manifest = verify(checkpoint)
            verify_s = time.perf_counter() - start
            nbytes = sum(f["bytes"] for f in manifest.files.values())
            sync_b, sync_t = (statistics.median(x) for x in zip(*timings[False]))
            async_b, async_t = (statistics.median(x) for x in zip(*timings[True]))
            interval = INTELLECT1_OUTER_STEP_S * params / INTELLECT1_PARAMS
            print(f"{label:<24}{nbytes / GB:>9.2f}{sync_b:>13.2f}s{sync_t:>11.2f}s{async_b:>14.3f}s{async_t:>12.2f}s"
                  f"{async_b / sync_b:>14.3f}x{interval:>12.0f}{100 * async_b / interval:>16.2f}%{nbytes / GB / verify_s:>13.2f}")
            del state
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir()
    finally:
        shutil.rmtree(work, ignore_errors=True)
        dist.destroy_process_group()
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
