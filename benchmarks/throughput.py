"""Training throughput of `atoll train` against a bare PyTorch loop, measured side by side.

    python benchmarks/throughput.py [--size demo] [--seq-len 256] [--batch 16] [--steps 30]

Both loops train the same seeded model on the same packed batches of the stdlib corpus with
AdamW, gradient clipping at 1.0 and (on CUDA) bf16 autocast. The bare loop is forward,
cross-entropy, backward, clip, step, zero_grad over batches fetched before timing, so it has no
data, logging or metrics overhead. atoll runs in-process through `atoll.train.train()`.

Both sides count tokens/s the same way: wall clock over the `--steps` steps after `--warmup`
(atoll: the `time` of its metrics.jsonl records of step `warmup` and of the last step; bare:
`time.perf_counter()`, after a device sync). Runs alternate atoll, bare, atoll, bare, ... to
spread machine noise over both, and each loop reports its median. The target is atoll >= 95% of
the bare loop. This prints figures only; it never fails on time.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from atoll.config import JobConfig, load_config
from atoll.data import ByteTokenizer, PackedLoader, load_split_tokens
from atoll.model import Llama, count_params, get_size
from atoll.train import train

TARGET_RATIO = 0.95
"""atoll's throughput should be at least this fraction of the bare loop's (the issue's target)."""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="demo", help="named model size (see `atoll model-info`)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--batch", type=int, default=16, help="sequences per optimizer step")
    parser.add_argument("--steps", type=int, default=30, help="measured steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="steps per run before timing starts")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each loop, alternated")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    return parser.parse_args()


def job_config(args: argparse.Namespace) -> JobConfig:
    """An atoll config for a plain timed run: no eval, no checkpoint, a record every step."""
    return load_config(None, {
        "model.name": args.size,
        "train.seq_len": args.seq_len,
        "train.global_batch": args.batch,
        "train.steps": args.warmup + args.steps,
        "train.device": args.device,
        "eval.every": 0,
        "checkpoint.at_end": False,
        "metrics.log_every": 1,
        "metrics.progress": "plain",
        "schedule.kind": "constant",
    })


def run_atoll(cfg: JobConfig, args: argparse.Namespace) -> tuple[float, float]:
    """One in-process `atoll train`; returns (wall-clock tokens/s, atoll's own median tokens_per_s)."""
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        run_dir = Path(tmp) / "run"
        train(cfg, run_dir=run_dir)
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r for r in records if "step" in r}
    last = args.warmup + args.steps
    seconds = by_step[last]["time"] - by_step[args.warmup]["time"]
    self_reported = statistics.median(by_step[s]["tokens_per_s"] for s in range(args.warmup + 1, last + 1))
    return args.batch * args.seq_len * args.steps / seconds, self_reported


def bare_batches(cfg: JobConfig, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first n batches atoll's loader would serve (same corpus, seq_len, batch and seed)."""
    cache = str(Path(cfg.data.cache_dir).expanduser()) if cfg.data.cache_dir else None
    tokens = load_split_tokens(cfg.data.source, "train", cfg.data.val_fraction, ByteTokenizer(), cache)
    loader = PackedLoader(tokens, cfg.train.seq_len, cfg.train.global_batch, 0, 1, cfg.train.seed)
    return [loader.next_batch() for _ in range(n)]


def run_bare(cfg: JobConfig, args: argparse.Namespace, device: torch.device,
             batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """One bare PyTorch training run; returns wall-clock tokens/s over the measured steps."""
    model_args = get_size(args.size)
    model_args = dataclasses.replace(model_args, max_seq_len=max(args.seq_len, model_args.max_seq_len))
    torch.manual_seed(cfg.train.seed)
    model = Llama(model_args).to(device)
    params = list(model.parameters())
    opt = cfg.optim
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in params if p.ndim >= 2], "weight_decay": opt.weight_decay},
         {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
        lr=opt.lr, betas=opt.betas, eps=opt.eps)
    batches = [(inp.to(device), tgt.to(device)) for inp, tgt in batches]

    def step(inp: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(inp)
        loss = F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, opt.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    for inp, tgt in batches[:args.warmup]:
        step(inp, tgt)
    sync(device)
    start = time.perf_counter()
    for inp, tgt in batches[args.warmup:]:
        loss = step(inp, tgt)
    loss.item()
    sync(device)
    return args.batch * args.seq_len * args.steps / (time.perf_counter() - start)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    args = parse_args()
    cfg = job_config(args)
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    batches = bare_batches(cfg, args.warmup + args.steps)
    params = count_params(get_size(args.size))["total"]
    print(f"size {args.size} ({params / 1e6:.2f}M params), seq {args.seq_len}, batch {args.batch}, "
          f"device {device.type}, torch threads {torch.get_num_threads()}; "
          f"{args.steps} measured steps after {args.warmup} warmup, {args.repeats} runs each (alternated)")

    atoll_runs, self_reported, bare_runs = [], [], []
    for _ in range(args.repeats):
        tok_s, reported = run_atoll(cfg, args)
        atoll_runs.append(tok_s)
        self_reported.append(reported)
        bare_runs.append(run_bare(cfg, args, device, batches))

    atoll_med, bare_med = statistics.median(atoll_runs), statistics.median(bare_runs)
    print(f"\n{'loop':<6} {'tokens/s (median)':>18}  {'runs':<24} atoll's own tokens_per_s (median)")
    print(f"{'atoll':<6} {atoll_med:>18,.0f}  {', '.join(f'{r:,.0f}' for r in atoll_runs):<24} "
          f"{', '.join(f'{r:,.0f}' for r in self_reported)}")
    print(f"{'bare':<6} {bare_med:>18,.0f}  {', '.join(f'{r:,.0f}' for r in bare_runs):<24} -")
    print(f"\natoll / bare = {atoll_med / bare_med:.3f} (target >= {TARGET_RATIO:.2f})")


if __name__ == "__main__":
    main()
