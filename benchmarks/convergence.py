"""Quality and bytes of DiLoCo against data-parallel, on the same islands, data and token budget.

    python benchmarks/convergence.py                          # the defaults below
    python benchmarks/convergence.py --model demo --steps 300 --seq-len 128

Runs `atoll simulate` once per row: (a) data-parallel (`--mesh.mode ddp`: fp32 gradients averaged
across islands every step), (b) DiLoCo with fp32 pseudo-gradients every H inner steps, (c) the
same DiLoCo with int8 pseudo-gradients (atoll's ring), (d) DiLoCo fp32 whose outer step does not
anneal with the inner LR schedule (`diloco.anneal_with_schedule = false`). All rows see the same samples in the same
order (islands read disjoint slices of one seeded stream) and the same inner optimizer and
schedule, so the only difference is how the islands synchronise. Prints final validation loss,
bytes each island put on the wire, and the ratios against data-parallel and against DiLoCo fp32.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(name: str, run_dir: Path, args: argparse.Namespace, extra: list[str]) -> dict:
    """One `atoll simulate` run; returns island-0's final val loss and bytes sent."""
    cmd = [
        sys.executable, "-m", "atoll.cli", "simulate", "--islands", str(args.islands), "--run-dir", str(run_dir),
        str(REPO / "configs" / "demo.toml"), "--model.name", args.model,
        "--train.steps", str(args.steps), "--train.global_batch", str(args.batch), "--train.seq_len", str(args.seq_len),
        "--optim.lr", str(args.lr), "--schedule.warmup_steps", str(args.steps // 10),
        "--eval.every", str(args.steps), "--eval.batches", str(args.eval_batches), "--metrics.log_every", "50",
        "--checkpoint.at_end", "false", *extra,
    ]
    start = time.perf_counter()
    result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    if result.returncode != 0:
        sys.exit(f"{name} failed:\n{result.stdout[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "island-0" / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    return {"name": name, "val_loss": last["val_loss"], "bytes": last["bytes_sent"], "wall_s": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="debug", help="named model size (atoll model-info)")
    parser.add_argument("--islands", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3000, help="inner steps (the same token budget for every row)")
    parser.add_argument("--inner-steps", type=int, default=50, help="DiLoCo H")
    parser.add_argument("--outer-lr", type=float, default=0.7, help="DiLoCo outer learning rate")
    parser.add_argument("--outer-momentum", type=float, default=0.9, help="DiLoCo outer Nesterov momentum")
    parser.add_argument("--batch", type=int, default=8, help="sequences per island per step")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3, help="inner AdamW peak learning rate (every row)")
    parser.add_argument("--eval-batches", type=int, default=16, help="validation batches for the final loss")
    args = parser.parse_args()

    tokens = args.steps * args.batch * args.seq_len * args.islands
    print(f"{args.model} model, {args.islands} islands, {args.steps} steps x {args.batch}x{args.seq_len} tokens "
          f"per island = {tokens / 1e6:.2f}M tokens per run; DiLoCo H={args.inner_steps}, "
          f"outer lr {args.outer_lr}, momentum {args.outer_momentum}", flush=True)
    diloco = ["--mesh.mode", "diloco", "--diloco.inner_steps", str(args.inner_steps),
              "--diloco.outer_lr", str(args.outer_lr), "--diloco.outer_momentum", str(args.outer_momentum)]
    with tempfile.TemporaryDirectory() as tmp:
        rows = [
            run("data-parallel fp32, every step", Path(tmp) / "ddp", args, ["--mesh.mode", "ddp", "--comm.codec", "fp32"]),
            run(f"DiLoCo fp32, H={args.inner_steps}", Path(tmp) / "diloco-fp32", args, [*diloco, "--comm.codec", "fp32"]),
            run(f"DiLoCo int8, H={args.inner_steps}", Path(tmp) / "diloco-int8", args, [*diloco, "--comm.codec", "int8"]),
            run(f"DiLoCo fp32, H={args.inner_steps}, no anneal", Path(tmp) / "diloco-fp32-no-anneal", args,
                [*diloco, "--comm.codec", "fp32", "--diloco.anneal_with_schedule", "false"]),
        ]
    ddp, fp32 = rows[0], rows[1]
    print(f"{'run':<42}{'val_loss':>10}{'vs ddp':>9}{'vs fp32':>9}{'MB sent/island':>16}"
          f"{'fewer vs ddp':>14}{'fewer vs fp32':>15}{'wall s':>8}")
    for row in rows:
        print(f"{row['name']:<42}{row['val_loss']:>10.4f}{row['val_loss'] / ddp['val_loss'] - 1:>+9.2%}"
              f"{row['val_loss'] / fp32['val_loss'] - 1:>+9.2%}{row['bytes'] / 1e6:>16.2f}"
              f"{ddp['bytes'] / max(row['bytes'], 1):>13.1f}x{fp32['bytes'] / max(row['bytes'], 1):>14.2f}x"
              f"{row['wall_s']:>8.0f}")


if __name__ == "__main__":
    main()
