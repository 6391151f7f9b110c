"""Quality and bytes of DiLoCo against data-parallel, on the same islands, data and token budget,
over several seeds.

    python benchmarks/convergence.py                          # the defaults below, 3 seeds
    python benchmarks/convergence.py --seeds 5 --rows ddp,int8
    python benchmarks/convergence.py --model demo --steps 300 --seq-len 128
    python benchmarks/convergence.py --beta2 0.95               # every row at AdamW's large-model beta2
    python benchmarks/convergence.py --diloco-decay-shape sqrt  # DiLoCo's decay as data-parallel's (the table before)
    python benchmarks/convergence.py --diloco-beta1 0.95        # DiLoCo's islands at other settings
    python benchmarks/convergence.py --plain-average-fraction 0  # Nesterov outer steps from the start (before)
    python benchmarks/convergence.py --rows topk-ef --inner-steps 30 --topk-density 0.03125 --outer-lr 1 --outer-momentum 0

Runs `atoll simulate` once per row and seed (`--train.seed`: weight init and data order):
  ddp           data-parallel (`--mesh.mode ddp`): fp32 gradients averaged across islands every step
  fp32          DiLoCo with fp32 pseudo-gradients every H inner steps
  int8          the same DiLoCo with int8 pseudo-gradients (atoll's ring)
  int8-2h       int8 DiLoCo syncing half as often (H doubled)
  int8-m09      int8 DiLoCo with DiLoCo's outer momentum 0.9 (atoll's default before it became 0.8)
  int8-early    int8 DiLoCo taking the Nesterov step from the first outer step (no plain-average
                start: `diloco.plain_average_fraction` 0, atoll's default before it became 0.2)
  no-anneal     DiLoCo fp32 whose outer step does not anneal with the inner LR schedule
  int8-lr       int8 DiLoCo at sqrt(islands) x the inner lr (its islands each see 1/islands of the
                data-parallel batch; on the defaults this is DiLoCo's better lr, not data-parallel's)
  int8-coupled  int8 DiLoCo whose outer momentum also multiplies the inner weight decay (as before
                diloco.decouple_weight_decay)
  int8-ef       int8 DiLoCo with error feedback (`comm.error_feedback`)
  int4          DiLoCo with int4 (FP4) pseudo-gradients
  int4-ef       int4 DiLoCo with error feedback
  topk-ef       DiLoCo with topk pseudo-gradients and error feedback
  int8-overlap  int8 DiLoCo whose all-reduce runs behind H/5 inner steps (`diloco.overlap_steps`,
                landed with the default `diloco.overlap_merge`, "delta")
  int8-p2       int8 DiLoCo in 2 fragments (`diloco.fragments`: half the model every H/2 steps)
  int8-p2-overlap  the same, each fragment's all-reduce behind H/5 inner steps
  int8-overlap-mix, int8-p2-overlap-mix  the overlapped rows with `diloco.overlap_merge` "mix"
                (Streaming DiLoCo's, `diloco.merge_weight` 0.5)
  int8-eager    int8 DiLoCo with eager outer steps (`diloco.eager`: each all-reduce behind the whole next phase)
All rows of one seed see the same samples in the same order (islands read disjoint slices of one
seeded stream) and the same inner optimizer and schedule but for the shape of the LR decay, where
each method takes its better one: data-parallel sqrt, DiLoCo linear (the demo config's;
`--decay-shape`, `--diloco-decay-shape`; why and by how much: `schedule.decay_shape`'s docstring).
`--diloco-beta1` gives the DiLoCo rows their own beta1, to measure it.
Beyond that the rows differ only in how the islands synchronise.
Each run prints as it finishes; the table then gives, per row, the mean and sample standard
deviation of the final validation loss over seeds, the mean and worst per-seed gap to
data-parallel (each seed against data-parallel on that seed), and the bytes each island put on the
wire. A difference between rows smaller than their spreads is noise, not a result. The final loss
is taken over the whole validation split (`--eval-batches 0`): the first 16 batches, a couple of
files, moved one seed's gap by 1.2% against the whole split's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from atoll.config import OptimConfig

REPO = Path(__file__).resolve().parents[1]


def betas(beta1: float, beta2: float) -> str:
    """An --optim.betas value."""
    return f"[{beta1}, {beta2}]"


def run(run_dir: Path, args: argparse.Namespace, seed: int, extra: list[str]) -> dict:
    """One `atoll simulate` run; returns island-0's final val loss and bytes sent."""
    cmd = [
        sys.executable, "-m", "atoll.cli", "simulate", "--islands", str(args.islands), "--run-dir", str(run_dir),
        str(REPO / "configs" / "demo.toml"), "--model.name", args.model, "--train.seed", str(seed),
        "--train.steps", str(args.steps), "--train.global_batch", str(args.batch), "--train.seq_len", str(args.seq_len),
        "--optim.lr", str(args.lr), "--schedule.warmup_steps", str(args.steps // 10), "--schedule.decay_shape", args.decay_shape,
        "--eval.every", str(args.steps), "--eval.batches", str(args.eval_batches), "--metrics.log_every", "50",
        "--checkpoint.at_end", "false", "--optim.betas", betas(OptimConfig().betas[0], args.beta2), *extra,
    ]
    start = time.perf_counter()
    result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, check=False)
    if result.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "island-0" / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    return {"val_loss": last["val_loss"], "bytes": last["bytes_sent"], "wall_s": time.perf_counter() - start}


def diloco_overrides(args: argparse.Namespace) -> list[str]:
    """The simulate arguments every DiLoCo row adds for the settings given on the command line."""
    own = {
        "--optim.betas": betas(args.diloco_beta1, args.beta2) if args.diloco_beta1 is not None else None,
        "--schedule.decay_shape": args.diloco_decay_shape,
        "--diloco.outer_lr": args.outer_lr,
        "--diloco.outer_momentum": args.outer_momentum,
        "--diloco.plain_average_fraction": args.plain_average_fraction,
    }
    return [arg for key, value in own.items() if value is not None for arg in (key, str(value))]


def row_settings(args: argparse.Namespace) -> dict[str, tuple[str, list[str]]]:
    """Row key -> (label, extra simulate arguments)."""
    own_args = diloco_overrides(args)

    def diloco(h: int) -> list[str]:
        return ["--mesh.mode", "diloco", "--diloco.inner_steps", str(h), *own_args]

    h = args.inner_steps
    return {
        "ddp": ("data-parallel fp32, every step", ["--mesh.mode", "ddp", "--comm.codec", "fp32"]),
        "fp32": (f"DiLoCo fp32, H={h}", [*diloco(h), "--comm.codec", "fp32"]),
        "int8": (f"DiLoCo int8, H={h}", [*diloco(h), "--comm.codec", "int8"]),
        "int8-m09": (f"DiLoCo int8, H={h}, momentum 0.9", [*diloco(h), "--comm.codec", "int8",
                                                        "--diloco.outer_momentum", "0.9"]),
        "int8-2h": (f"DiLoCo int8, H={2 * h}", [*diloco(2 * h), "--comm.codec", "int8"]),
        "int8-early": (f"DiLoCo int8, H={h}, Nesterov from the start", [*diloco(h), "--comm.codec", "int8",
                                                                         "--diloco.plain_average_fraction", "0"]),
        "no-anneal": (f"DiLoCo fp32, H={h}, no anneal", [*diloco(h), "--comm.codec", "fp32",
                                                         "--diloco.anneal_with_schedule", "false"]),
        "int8-lr": (f"DiLoCo int8, H={h}, inner lr x{args.islands ** 0.5:.2f}",
                    [*diloco(h), "--comm.codec", "int8", "--optim.lr", str(args.lr * args.islands ** 0.5)]),
        "int8-coupled": (f"DiLoCo int8, H={h}, coupled decay", [*diloco(h), "--comm.codec", "int8",
                                                                "--diloco.decouple_weight_decay", "false"]),
        "int8-ef": (f"DiLoCo int8 + EF, H={h}", [*diloco(h), "--comm.codec", "int8", "--comm.error_feedback", "true"]),
        "int4": (f"DiLoCo int4, H={h}", [*diloco(h), "--comm.codec", "int4"]),
        "int4-ef": (f"DiLoCo int4 + EF, H={h}", [*diloco(h), "--comm.codec", "int4", "--comm.error_feedback", "true"]),
        "topk-ef": (f"DiLoCo topk 1/{round(1 / args.topk_density)} at {args.topk_bits} bits + EF, H={h}",
                    [*diloco(h), "--comm.codec", "topk", "--comm.error_feedback", "true",
                     "--comm.topk_density", repr(args.topk_density), "--comm.topk_bits", str(args.topk_bits)]),
        "int8-overlap": (f"DiLoCo int8, H={h}, overlap tau={h // 5}", [*diloco(h), "--comm.codec", "int8",
                                                                       "--diloco.overlap_steps", str(h // 5)]),
        "int8-overlap-mix": (f"DiLoCo int8, H={h}, overlap tau={h // 5}, mix merge",
                             [*diloco(h), "--comm.codec", "int8", "--diloco.overlap_steps", str(h // 5), "--diloco.overlap_merge", "mix"]),
        "int8-p2": (f"DiLoCo int8, H={h}, 2 fragments", [*diloco(h), "--comm.codec", "int8", "--diloco.fragments", "2"]),
        "int8-p2-overlap": (f"DiLoCo int8, H={h}, 2 fragments, overlap tau={h // 5}",
                            [*diloco(h), "--comm.codec", "int8", "--diloco.fragments", "2", "--diloco.overlap_steps", str(h // 5)]),
        "int8-p2-overlap-mix": (f"DiLoCo int8, H={h}, 2 fragments, overlap tau={h // 5}, mix merge",
                                [*diloco(h), "--comm.codec", "int8", "--diloco.fragments", "2", "--diloco.overlap_steps", str(h // 5),
                                 "--diloco.overlap_merge", "mix"]),
        "int8-eager": (f"DiLoCo int8, H={h}, eager", [*diloco(h), "--comm.codec", "int8", "--diloco.eager", "true"]),
    }


def spread(values: list[float]) -> float:
    """Sample standard deviation (0 for a single value)."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="debug", help="named model size (atoll model-info)")
    parser.add_argument("--islands", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3000, help="inner steps (the same token budget for every row)")
    parser.add_argument("--inner-steps", type=int, default=50, help="DiLoCo H")
    parser.add_argument("--outer-lr", type=float, default=None, help="DiLoCo outer learning rate (default: the config's)")
    parser.add_argument("--outer-momentum", type=float, default=None, help="DiLoCo outer momentum (default: the config's)")
    parser.add_argument("--topk-density", type=float, default=1 / 64, help="the topk-ef row's comm.topk_density (default 1/64)")
    parser.add_argument("--topk-bits", type=int, default=2, choices=[1, 2, 4], help="the topk-ef row's comm.topk_bits (default 2)")
    parser.add_argument("--plain-average-fraction", type=float, default=None,
                        help="share of the run whose outer steps are plain averages (default: the config's, 0.2)")
    parser.add_argument("--batch", type=int, default=8, help="sequences per island per step")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3, help="inner AdamW peak learning rate (every row)")
    parser.add_argument("--beta2", type=float, default=0.999,
                        help="inner AdamW beta2 for every row (0.95, the config default, with --eval-batches 16 gives the figures before it became 0.999 here)")
    parser.add_argument("--diloco-beta1", type=float, default=None,
                        help="inner AdamW beta1 of the DiLoCo rows only (default: data-parallel's, the config's 0.9)")
    parser.add_argument("--decay-shape", default="sqrt", choices=["linear", "sqrt", "cosine"],
                        help="WSD decay shape of every row, unless --diloco-decay-shape gives the DiLoCo rows theirs "
                             "(sqrt: data-parallel's better one)")
    parser.add_argument("--diloco-decay-shape", default="linear", choices=["linear", "sqrt", "cosine"],
                        help="WSD decay shape of the DiLoCo rows (linear: theirs; sqrt gives the table before, every row "
                             "at the same schedule)")
    parser.add_argument("--eval-batches", type=int, default=0,
                        help="validation batches for the final loss (0, the default: the whole validation split, 1.2M tokens; "
                             "16, the figures before: the split's first 8192 tokens, whose gaps between rows differ from the "
                             "whole split's by up to 1.8%%)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1, each run for every row")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at once (each is deterministic, so the figures do not change; the wall times do)")
    parser.add_argument("--rows", default="ddp,fp32,int8,int8-2h",
                        help="comma-separated rows: ddp, fp32, int8, int8-2h, int8-early, int8-m09, int8-lr, no-anneal, int8-coupled, int8-ef, int4, int4-ef, "
                             "topk-ef, int8-overlap, int8-overlap-mix, int8-p2, int8-p2-overlap, int8-p2-overlap-mix, int8-eager "
                             "(ddp is always run)")
    args = parser.parse_args()

    settings = row_settings(args)
    keys = ["ddp", *[k for k in args.rows.split(",") if k and k != "ddp"]]
    if unknown := [k for k in keys if k not in settings]:
        sys.exit(f"--rows: unknown row(s) {', '.join(unknown)}; choose from {', '.join(settings)}")
    tokens = args.steps * args.batch * args.seq_len * args.islands
    evaluated = "the whole validation split" if args.eval_batches == 0 else f"{args.eval_batches} validation batches"
    own = " ".join(diloco_overrides(args))
    print(f"{args.model} model, {args.islands} islands, {args.steps} steps x {args.batch}x{args.seq_len} tokens "
          f"per island = {tokens / 1e6:.2f}M tokens per run; seeds 0..{args.seeds - 1}; final loss on {evaluated}; "
          f"AdamW beta2 {args.beta2}" + (f"; DiLoCo rows add {own}" if own else ""), flush=True)
    runs = [(seed, key) for seed in range(args.seeds) for key in keys]
    width = max(len(settings[key][0]) for key in keys)
    done: dict[tuple[int, str], dict] = {}
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(run, Path(tmp) / f"{key}-{seed}", args, seed, settings[key][1]): (seed, key)
                   for seed, key in runs}
        for future in as_completed(futures):
            seed, key = futures[future]
            done[seed, key] = result = future.result()
            print(f"  seed {seed}  {settings[key][0]:<{width}} val_loss {result['val_loss']:.4f}  "
                  f"({result['wall_s']:.0f} s)", flush=True)
    results = {key: [done[seed, key] for seed in range(args.seeds)] for key in keys}

    ddp_bytes = statistics.mean(r["bytes"] for r in results["ddp"])
    print(f"\n{'run':<{width + 2}}{'val_loss mean':>14}{'± sd':>8}{'gap mean':>10}{'± sd':>8}{'worst':>8}"
          f"{'MB sent/island':>16}{'fewer vs ddp':>14}")
    for key in keys:
        label = settings[key][0]
        losses = [r["val_loss"] for r in results[key]]
        gaps = [r["val_loss"] / d["val_loss"] - 1 for r, d in zip(results[key], results["ddp"])]
        sent = statistics.mean(r["bytes"] for r in results[key])
        print(f"{label:<{width + 2}}{statistics.mean(losses):>14.4f}{spread(losses):>8.4f}{statistics.mean(gaps):>+10.2%}"
              f"{spread(gaps):>8.2%}{max(gaps):>+8.2%}{sent / 1e6:>16.2f}{ddp_bytes / max(sent, 1):>13.1f}x")


if __name__ == "__main__":
    main()
