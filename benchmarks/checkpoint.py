"""Time training is blocked by a checkpoint: the asynchronous save against a synchronous one,
side by side in one run, plus what verifying a checkpoint on load costs.

    python benchmarks/checkpoint.py [--sizes 150m 1b] [--repeats 3] [--max-gb 3] [--dir DIR]

The state is one island's whole checkpoint at the size's real shapes: fp32 weights, AdamW's two
moments, the flat outer weights and the outer momentum (5 x 4 bytes per parameter). A size whose
state exceeds `--max-gb` is measured on its first K transformer blocks only (embedding and head
included) and printed as such: nothing is extrapolated. Each repeat saves once synchronously and
once asynchronously, interleaved so machine noise spreads over both; the table shows medians.

The target column is INTELLECT-1's ratio: a checkpoint every outer step, 38 minutes of compute
for 10.2B parameters in H = 100 inner steps, i.e. an interval of 38 min x params / 10.2B at the
same compute per parameter and an inner step of a hundredth of it; the async save should block
training for at most 2% of the interval. The asynchronous save runs as in `atoll train`: after
it returns, --steps simulated inner steps follow, each a fixed amount of matrix multiplies timed
alone beforehand at the inner step's length (the forward and backward), then `staged()` (what the
optimizer step waits for), then an in-place update of the weights; then `staged(everything=True)`
(what the next outer step would wait for, 100 steps later in a real run) and the wait for the
write. Blocked = the save's own return time plus those waits. "steps slower" is how much longer
the simulated steps took than alone: on this CPU-only machine the copy and the write share the
cores with the compute, where a GPU's steps would not share them. This prints figures only; it
never fails on time.
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
INTELLECT1_INNER_STEPS = 100
BYTES_PER_PARAM = 5 * 4


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["150m", "1b"], help="named model sizes")
    parser.add_argument("--repeats", type=int, default=3, help="sync + async saves per size (the first async one also allocates the staging buffers)")
    parser.add_argument("--max-gb", type=float, default=3.0, help="largest state to allocate (the async save stages a second copy)")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp dir under ./runs)")
    parser.add_argument("--steps", type=int, default=4, help="simulated inner steps after each asynchronous save")
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
    """(blocked s, total s) of one synchronous save."""
    report = checkpointer.save(step, state)
    checkpointer.wait()
    return report.blocked_s, report.total_s


class InnerStep:
    """A stand-in for an inner step's forward and backward: matrix multiplies that take `seconds`
    when nothing else runs."""

    def __init__(self, seconds: float) -> None:
        self.a = torch.rand(384, 384)
        self.count = 1
        while self.run() < seconds / 2:
            self.count *= 2
        self.count = max(1, round(self.count * seconds / statistics.median(self.run() for _ in range(3))))
        self.alone_s = statistics.median(self.run() for _ in range(3))

    def run(self) -> float:
        start = time.perf_counter()
        for _ in range(self.count):
            self.a @ self.a
        return time.perf_counter() - start


def async_save(checkpointer: Checkpointer, state: dict, step: int, inner: InnerStep, steps: int) -> tuple[float, float, float]:
    """(blocked s, total s, steps slower s) of one asynchronous save followed by `steps` inner steps."""
    weights = state["model_optimizer"]["model"]
    report = checkpointer.save(step, state, later={"diloco.rank0"})
    slower = 0.0
    for _ in range(steps):
        slower += inner.run() - inner.alone_s
        checkpointer.staged()  # what the optimizer step waits for
        for tensor in weights.values():
            tensor.add_(1e-6)
    checkpointer.staged(everything=True)  # what the next outer step waits for
    checkpointer.wait()
    return report.blocked_s, report.total_s, slower


def main() -> None:
    opts = parse_args()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    base = opts.dir or Path("runs")
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="checkpoint-bench-", dir=base))
    print(f"load average before: {os.getloadavg()[0]:.2f} ({os.cpu_count()} cores); writing under {work}")
    print(f"{'size':<24}{'state GB':>9}{'sync blocked':>14}{'sync total':>12}{'async blocked':>15}{'async total':>13}"
          f"{'blocked ratio':>15}{'interval s':>12}{'async blocked %':>17}{'steps slower':>14}{'verify GB/s':>13}")
    try:
        for size in opts.sizes:
            state, params, label = island_state(size, opts.max_gb * GB)
            savers = {}
            for asynchronous in (False, True):  # one each, as in a run: the stager's buffers are reused
                savers[asynchronous] = Checkpointer(work / f"{size}-{int(asynchronous)}", keep=1, is_leader=True, asynchronous=asynchronous)
                savers[asynchronous].start(None)
            interval = INTELLECT1_OUTER_STEP_S * params / INTELLECT1_PARAMS
            inner = InnerStep(interval / INTELLECT1_INNER_STEPS)
            timings: dict[bool, list[tuple[float, ...]]] = {False: [], True: []}
            for repeat in range(opts.repeats):
                timings[False].append(one_save(savers[False], state, repeat + 1))
                timings[True].append(async_save(savers[True], state, repeat + 1, inner, opts.steps))
            for saver in savers.values():
                saver.close()
            directory = work / f"{size}-1"
            checkpoint = next(directory.glob("step-*"))
            start = time.perf_counter()
            manifest = verify(checkpoint)
            verify_s = time.perf_counter() - start
            nbytes = sum(f["bytes"] for f in manifest.files.values())
            sync_b, sync_t = (statistics.median(x) for x in zip(*timings[False]))
            async_b, async_t, slower = (statistics.median(x) for x in zip(*timings[True]))
            print(f"{label:<24}{nbytes / GB:>9.2f}{sync_b:>13.2f}s{sync_t:>11.2f}s{async_b:>14.3f}s{async_t:>12.2f}s"
                  f"{async_b / sync_b:>14.3f}x{interval:>12.0f}{100 * async_b / interval:>16.2f}%{slower:>13.2f}s{nbytes / GB / verify_s:>13.2f}")
            print(f"  inner step {inner.alone_s:.3f}s alone (interval / {INTELLECT1_INNER_STEPS}); {opts.steps} steps after each async save; "
                  f"blocked + steps slower = {100 * (async_b + slower) / interval:.2f}% of the interval")
            del state
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir()
    finally:
        shutil.rmtree(work, ignore_errors=True)
        dist.destroy_process_group()
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
