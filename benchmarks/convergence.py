"""Quality and bytes of DiLoCo against data-parallel, on the same islands, data and token budget.

    python benchmarks/convergence.py                 # demo model, 2 islands, H=50 (about 10 minutes on 2 cores)
    python benchmarks/convergence.py --steps 200 --islands 3

Runs `atoll simulate` once per row: (a) data-parallel (`--mesh.mode ddp`: gradients averaged across
islands every step), (b) DiLoCo with fp32 pseudo-gradients every H inner steps. Both see the same
samples in the same order (islands read disjoint slices of one seeded stream), so the only
difference is how the islands synchronise. Prints final validation loss, bytes each island sent,
and the ratios against data-parallel.
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
    """One `atoll simulate` run; returns the final val loss and bytes sent by island-0."""
    cmd = [
        sys.executable, "-m", "atoll.cli", "simulate", "--islands", str(args.islands), "--run-dir", str(run_dir),
        str(REPO / "configs" / "demo.toml"),
        "--train.steps", str(args.steps), "--train.global_batch", str(args.batch), "--train.seq_len", str(args.seq_len),
        "--optim.lr", str(args.lr), "--schedule.warmup_steps", str(args.steps // 10),
        "--eval.every", str(args.steps), "--eval.batches", "8", "--metrics.log_every", "10",
        "--checkpoint.at_end", "false", *extra,
    ]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, cwd=REPO)
    records = [json.loads(line) for line in (run_dir / "island-0" / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    return {"name": name, "val_loss": last["val_loss"], "bytes": last["bytes_sent"], "wall_s": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--islands", type=int, default=2)
    parser.add_argument("--steps", type=int, default=300, help="inner steps (the same token budget for every row)")
    parser.add_argument("--inner-steps", type=int, default=50, help="DiLoCo H")
    parser.add_argument("--batch", type=int, default=8, help="sequences per island per step")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3, help="inner AdamW peak learning rate")
    args = parser.parse_args()

    tokens = args.steps * args.batch * args.seq_len * args.islands
    print(f"demo model, {args.islands} islands, {args.steps} steps x {args.batch}x{args.seq_len} tokens per island "
          f"= {tokens / 1e6:.2f}M tokens per run")
    with tempfile.TemporaryDirectory() as tmp:
        rows = [
            run("data-parallel (fp32, every step)", Path(tmp) / "ddp", args, ["--mesh.mode", "ddp"]),
            run(f"DiLoCo fp32, H={args.inner_steps}", Path(tmp) / "diloco", args,
                ["--mesh.mode", "diloco", "--diloco.inner_steps", str(args.inner_steps)]),
        ]
    base = rows[0]
    print(f"{'run':<36}{'val_loss':>10}{'vs ddp':>9}{'MB sent/island':>16}{'fewer bytes':>13}{'wall s':>8}")
    for row in rows:
        print(f"{row['name']:<36}{row['val_loss']:>10.4f}{row['val_loss'] / base['val_loss'] - 1:>+9.2%}"
              f"{row['bytes'] / 1e6:>16.1f}{base['bytes'] / max(row['bytes'], 1):>12.0f}x{row['wall_s']:>8.0f}")


if __name__ == "__main__":
    main()
