"""`atoll report` on a 42-day run's metrics: 8 islands x 100k records, synthetic, timed end to end.

    python benchmarks/report.py                       # 8 x 100000 records, 2 repeats
    python benchmarks/report.py --islands 8 --records 100000 --repeats 3 --keep DIR

The files look like a real run's (`atoll.train` writes the same fields): a record every inner
step with loss, lr, grad norm, tokens, tokens/s, bytes and tokens_by_source (3 sources); every
100th (H = 100) an outer step's fields (utilization, sync_s, ring_s, digest, contribution norms of
8 islands, a rejected contribution or a skipped step now and then); every 250th a validation
loss; every 1000th a checkpoint save. The coordinator's membership.jsonl has a death and a
join each day. Shown: the files' size, then per repeat the wall time of `atoll report` as a user
runs it (a fresh process: imports, reading, series, plots, HTML) and, in this process, the split
between reading, building the series and rendering. Target: <= 15 s. Figures, not pass/fail:
the machine's other load (shown by `uptime`) adds to them.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from atoll.report import build_series, read_run, render

REPO = Path(__file__).resolve().parents[1]
DAYS = 42
H = 100
PARAMS = 10_000_000_000


def write_island(island_dir: Path, index: int, islands: int, records: int, rng: random.Random) -> None:
    island_dir.mkdir(parents=True)
    (island_dir / "run.json").write_text(json.dumps({"params": {"total": PARAMS}, "island_id": island_dir.name}))
    (island_dir / "config.toml").write_text(f"[diloco]\ninner_steps = {H}\n")
    t0, dt = 1_800_000_000.0, DAYS * 86400 / records
    sources = {"fineweb": 0, "stack": 0, "dclm": 0}
    sent = 0
    with (island_dir / "metrics.jsonl").open("w") as f:
        for step in range(1, records + 1):
            for name, share in zip(sources, (0.55, 0.25, 0.20)):
                sources[name] += int(1_048_576 * share)
            sent += 2_000_000 if step % H else 0
            record = {
                "time": round(t0 + step * dt, 3), "step": step, "loss": 2.0 + 8.0 / (1 + step / 500) + rng.gauss(0, 0.02),
                "lr": 7.5e-5, "grad_norm": rng.uniform(0.2, 0.6), "skipped_inner": 0, "tokens": step * 1_048_576,
                "tokens_per_s": 27_000 + rng.gauss(0, 300), "mfu": 0.38, "bytes_sent": sent, "bytes_recv": sent,
                "world_size": islands, "epoch": step // 2400, "tokens_by_source": dict(sources),
            }
            if step % H == 0:
                sent += 5_000_000_000
                record.update({
                    "bytes_sent": sent, "bytes_recv": sent, "outer_step": step // H, "compute_s": 2280.0, "sync_s": rng.uniform(100, 470),
                    "ring_s": rng.uniform(90, 400), "utilization": rng.uniform(0.83, 0.96), "outer_digest": f"{rng.getrandbits(256):064x}",
                    "attempts": 1, "skipped": step % (H * 97) == 0, "rejected": [f"island-{index}"] if step % (H * 53) == 0 else [],
                    "contribution_norms": {f"island-{i}": rng.uniform(1, 3) for i in range(islands)},
                })
            if step % 250 == 0:
                record["val_loss"] = record["loss"] + 0.05
            if step % 1000 == 0:
                record.update({"checkpoint_step": step, "checkpoint_s": rng.uniform(20, 60), "checkpoint_blocked_s": rng.uniform(0.5, 3)})
            f.write(json.dumps(record) + "\n")


def write_membership(path: Path, islands: int) -> None:
    t0, members = 1_800_000_000.0, [f"island-{i}" for i in range(islands)]
    events = [{"time": t0, "epoch": 0, "members": members, "joined": members, "left": {}, "reason": "start"}]
    for day in range(DAYS):
        gone = members[day % islands]
        rest = [m for m in members if m != gone]
        events.append({"time": t0 + day * 86400 + 3600, "epoch": len(events), "members": rest, "joined": [],
                       "left": {gone: "heartbeat timeout"}, "reason": "departed"})
        events.append({"time": t0 + day * 86400 + 7200, "epoch": len(events), "members": members, "joined": [gone],
                       "left": {}, "reason": "joined"})
    path.write_text("".join(json.dumps(e) + "\n" for e in events))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--islands", type=int, default=8)
    parser.add_argument("--records", type=int, default=100_000, help="records per island")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--keep", type=Path, help="write the run here and keep it (default: a temporary directory)")
    args = parser.parse_args()

    run_dir = args.keep or Path(tempfile.mkdtemp(prefix="atoll-report-bench-"))
    try:
        started = time.perf_counter()
        rng = random.Random(0)
        for i in range(args.islands):
            write_island(run_dir / f"island-{i}", i, args.islands, args.records, rng)
        write_membership(run_dir / "membership.jsonl", args.islands)
        size = sum(p.stat().st_size for p in run_dir.rglob("*.jsonl"))
        print(f"synthetic run: {args.islands} islands x {args.records:,} records, {size / 1e6:.0f} MB of JSONL "
              f"(written in {time.perf_counter() - started:.0f} s); load: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for repeat in range(1, args.repeats + 1):
            out = run_dir / "report.html"
            began = time.perf_counter()
            subprocess.run([sys.executable, "-m", "atoll.cli", "report", str(run_dir), "--out", str(out)],
                           check=True, cwd=REPO, env=env, stdout=subprocess.DEVNULL)
            wall = time.perf_counter() - began
            t = time.perf_counter()
            run = read_run(run_dir)
            read_s = time.perf_counter() - t
            t = time.perf_counter()
            series = build_series(run)
            series_s = time.perf_counter() - t
            t = time.perf_counter()
            render(series)
            render_s = time.perf_counter() - t
            print(f"repeat {repeat}: atoll report {wall:.1f} s end to end (target <= 15 s), report {out.stat().st_size / 1e6:.1f} MB; "
                  f"in-process: read {read_s:.1f} s, series {series_s:.1f} s, render {render_s:.1f} s; "
                  f"load {os.getloadavg()[0]:.2f}")
    finally:
        if args.keep is None:
            shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
