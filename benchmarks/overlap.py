"""Overlapped outer steps on the emulated WAN: blocking DiLoCo against overlap with tau inner steps,
Streaming DiLoCo's fragments and eager outer steps.

    python benchmarks/overlap.py                                  # 2 islands, 20mbit, 10 ms one way, H = 20 (needs root)
    python benchmarks/overlap.py --islands 3 --rate 20mbit --delay 10ms --steps 160
    python benchmarks/overlap.py --taus 1 5 10 --merge-weight 0.5 --pin
    python benchmarks/overlap.py --steps 600 --inner-steps 100 --rate 2mbit --taus 1 25 50 --fragments 2   # fragments' peak

Each row is one `atoll simulate` of the model (`--model`, default debug) with the same seed, data
and number of inner steps: "no sync" (H = train.steps: the islands train alone until the one outer
step at the end, which is left out of the timing), "blocking" (`diloco.overlap_steps` 0), overlap
with each `--taus` value (`diloco.overlap_merge` from `--merge`), each `--fragments` P
(`diloco.fragments`) blocking and overlapped by H/(2P), and "eager" (`diloco.eager`). Printed
side by side, from the islands' metrics.jsonl:

- utilization: mean over islands and outer steps (the first left out: it includes the groups'
  warm-up) of compute / (compute + blocked), as the records log it; "steady": the same with the
  run's last outer step left out too (it averages the whole model, blocking, in every mode, so
  that every island ends on the same weights: one step in a few here, one in hundreds in a run);
- sync s and overlap s: median per outer step of the time training was blocked and of the time the
  all-reduce ran behind training;
- s/step: wall time per inner step (the island's first to last record, the first outer step's
  phase left out, the last outer step too), mean over islands, and its ratio to the "no sync" row;
- peak MB/s: the most bytes any island's link sent in a 1 s window before the run's last outer
  step (which averages the whole model in every mode), read off the tx counter of its emulated
  link (`ip -s link` in its namespace, sampled every 0.1 s): the link rate while a
  whole-model all-reduce is on the wire, whatever the mode; only sending less at a time (fragments)
  lowers it, and only where an outer step's bytes take under 1 s and outer steps are more than 1 s
  apart (the last example);
- MB sent per island, and the validation loss at the end (every island evaluates the same
  weights: the last outer step blocks and replaces them).

The rows run one after another on this machine's cores, with the delay line (a process) and the
islands competing for them: the s/step column of the "no sync" row is the same contention without
the links. With --pin, island i's processes are kept on CPU i mod (cores - 1) and the simulate
process on the last CPU (on 2 cores: the islands on CPU 0, simulate on CPU 1; the delay line stays
where the kernel puts it). Figures, not pass/fail.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from atoll.model import get_size
from atoll.wan.namespaces import LINK_NAME, NAME_PREFIX, list_namespaces

REPO = Path(__file__).resolve().parents[1]
SAMPLE_S = 0.1
WINDOW_S = 1.0


def pin_islands(run_dir: Path, islands: int, stop: threading.Event) -> None:
    """Keep moving each island's processes, and the simulate process, onto their CPUs (see the module doc)."""
    cpus = os.cpu_count() or 2
    while not stop.wait(0.5):
        for proc in Path("/proc").iterdir():
            try:
                if not proc.name.isdigit():
                    continue
                cmdline = (proc / "cmdline").read_bytes()
                if str(run_dir).encode() not in cmdline:
                    continue
                island = next((i for i in range(islands) if f"island-{i}".encode() in cmdline), None)
                target = {island % (cpus - 1)} if island is not None and cpus > 1 else {cpus - 1}
                for task in (proc / "task").iterdir():
                    os.sched_setaffinity(int(task.name), target)
            except (OSError, ValueError):
                continue


def link_bytes(namespace: str) -> int | None:
    """Bytes the emulated link of `namespace` has sent, or None once the namespace is gone."""
    out = subprocess.run(["ip", "-n", namespace, "-s", "-j", "link", "show", LINK_NAME], capture_output=True, text=True, timeout=5, check=False)
    if out.returncode != 0:
        return None
    return json.loads(out.stdout)[0]["stats64"]["tx"]["bytes"]


def sample_links(simulate_pid: int, islands: int, stop: threading.Event, samples: dict[int, list[tuple[float, int]]]) -> None:
    """Every SAMPLE_S until `stop`, append (time, bytes sent) of each island's link to samples[island].
    The namespaces are those `atoll simulate` (pid `simulate_pid`) creates: atoll-PID-RUN-islandI."""
    prefix = f"{NAME_PREFIX}-{simulate_pid}-"
    while not stop.wait(SAMPLE_S):
        names = {name.rsplit("-island", 1)[1]: name for name in list_namespaces() if name.startswith(prefix) and "-island" in name}
        for island in range(islands):
            sent = link_bytes(names[str(island)]) if str(island) in names else None
            if sent is not None:
                samples.setdefault(island, []).append((time.time(), sent))  # the clock metrics.jsonl's "time" is on


def peak_rate(samples: list[tuple[float, int]]) -> float:
    """The most bytes/s sent over any window of at least WINDOW_S between two samples."""
    best, first = 0.0, 0
    for last, (t, sent) in enumerate(samples):
        while first + 1 < last and t - samples[first + 1][0] >= WINDOW_S:
            first += 1
        if t - samples[first][0] >= WINDOW_S:
            best = max(best, (sent - samples[first][1]) / (t - samples[first][0]))
    return best


def run(name: str, args: argparse.Namespace, extra: list[str], workdir: Path) -> dict:
    """One simulate run; its row's numbers."""
    run_dir = workdir / name.replace(" ", "-")
    command = [
        sys.executable, "-m", "atoll.cli", "simulate", "--islands", str(args.islands), "--run-dir", str(run_dir),
        str(REPO / "configs" / "debug.toml"), "--model.name", args.model, "--train.steps", str(args.steps), "--diloco.inner_steps", str(args.inner_steps),
        "--eval.every", str(args.steps), "--checkpoint.at_end", "false", "--metrics.log_every", "1",
        "--data.cache_dir", str(workdir / "cache"), "--wan-rate", args.rate, "--wan-delay", args.delay,
        "--diloco.overlap_merge", args.merge, "--diloco.merge_weight", str(args.merge_weight), *extra,
    ]
    stop = threading.Event()
    pinner = threading.Thread(target=pin_islands, args=(run_dir, args.islands, stop), daemon=True)
    if args.pin:
        pinner.start()
    samples: dict[int, list[tuple[float, int]]] = {}
    with tempfile.TemporaryFile("w+") as log:
        simulate = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True, cwd=REPO)
        sampler = threading.Thread(target=sample_links, args=(simulate.pid, args.islands, stop, samples), daemon=True)
        sampler.start()
        try:
            returncode = simulate.wait(timeout=1800)
        except BaseException:
            simulate.send_signal(signal.SIGINT)  # as Ctrl-C: simulate stops its islands and deletes the namespaces
            simulate.wait(timeout=60)
            raise
        finally:
            stop.set()
            sampler.join()
        log.seek(0)
        if returncode != 0:
            raise SystemExit(f"{name}: simulate failed ({returncode}):\n{log.read()[-6000:]}")
    islands = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in sorted(run_dir.glob("island-*"))]
    outer = [r for records in islands for r in records if r.get("outer_step", 0) > 1]
    final = max(r["outer_step"] for r in outer) if outer else 0
    steady = [r for r in outer if r["outer_step"] < final]
    per_step = []
    for records in islands:
        timed = [r for r in records if "loss" in r and args.inner_steps < r["step"] < args.steps]
        if len(timed) > 1:
            per_step.append((timed[-1]["time"] - timed[0]["time"]) / (timed[-1]["step"] - timed[0]["step"]))
    last = [records[-1] for records in islands]
    # the run's last outer step averages the whole model in every mode: its bytes are left out of the peak
    before_last = min(r["time"] for records in islands for r in records if r.get("step") == args.steps - 1)
    return {
        "name": name,
        "utilization": statistics.mean(r["utilization"] for r in outer) if outer else None,
        "steady": statistics.mean(r["utilization"] for r in steady) if steady else None,
        "sync_s": statistics.median(r["sync_s"] for r in outer) if outer else None,
        "overlap_s": statistics.median(r.get("overlap_s", 0.0) for r in outer) if outer else None,
        "s_per_step": statistics.mean(per_step),
        "peak_mb_s": max((peak_rate([x for x in s if x[0] <= before_last]) for s in samples.values()), default=0.0) / 1e6,
        "mb_sent": statistics.mean(r["bytes_sent"] for r in last) / 1e6,
        "val_loss": statistics.mean(r["val_loss"] for r in last),
    }


def number(value: float | None, fmt: str) -> str:
    """`value` in `fmt`, or a dash as wide."""
    return format(value, fmt) if value is not None else format("—", ">" + fmt.split(".")[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--islands", type=int, default=2)
    parser.add_argument("--rate", default="20mbit", help="each island's link rate (default 20mbit)")
    parser.add_argument("--delay", default="10ms", help="one-way delay between islands (default 10ms)")
    parser.add_argument("--steps", type=int, default=120, help="inner steps per run (default 120)")
    parser.add_argument("--inner-steps", type=int, default=20, help="H (default 20)")
    parser.add_argument("--taus", type=int, nargs="+", help="overlap_steps values (default 1, H/4, H/2)")
    parser.add_argument("--fragments", type=int, nargs="*", default=[2, 4],
                        help="diloco.fragments values, each run blocking and overlapped by H/(2P) (default 2 4; "
                             "those above the model's blocks or not dividing H are left out, and said)")
    parser.add_argument("--model", default="debug", help="model size (default debug: 2 blocks, so at most 2 fragments)")
    parser.add_argument("--merge", choices=["delta", "mix"], default="delta", help="diloco.overlap_merge (default delta)")
    parser.add_argument("--merge-weight", type=float, default=0.5, help="diloco.merge_weight, for --merge mix")
    parser.add_argument("--pin", action="store_true", help="island i on CPU i mod (cores - 1), simulate on the last")
    args = parser.parse_args()
    taus = args.taus or sorted({1, args.inner_steps // 4, args.inner_steps // 2})
    blocks = get_size(args.model).n_layers
    fragments = [p for p in args.fragments if 1 < p <= blocks and args.inner_steps % p == 0]
    with tempfile.TemporaryDirectory(prefix="atoll-overlap-") as tmp:
        workdir = Path(tmp)
        started = time.time()
        rows = [run("no sync", args, ["--diloco.inner_steps", str(args.steps)], workdir), run("blocking", args, [], workdir)]
        rows += [run(f"overlap tau={tau}", args, ["--diloco.overlap_steps", str(tau)], workdir) for tau in taus]
        for count in fragments:
            tau = max(1, args.inner_steps // (2 * count))
            rows.append(run(f"P={count}", args, ["--diloco.fragments", str(count)], workdir))
            rows.append(run(f"P={count} tau={tau}", args, ["--diloco.fragments", str(count), "--diloco.overlap_steps", str(tau)], workdir))
        rows.append(run("eager", args, ["--diloco.eager", "true"], workdir))
    alone = rows[0]["s_per_step"]
    for count in sorted(set(args.fragments) - set(fragments)):
        print(f"P={count} left out: the {args.model} model has {blocks} blocks and H = {args.inner_steps}")
    print(f"{args.islands} islands, {args.model} model, {args.steps} inner steps, H = {args.inner_steps}, emulated WAN {args.rate}, "
          f"{args.delay} one way, overlap_merge {args.merge}" + (f", merge_weight {args.merge_weight}" if args.merge == "mix" else "") + (", pinned" if args.pin else "")
          + f"; {time.time() - started:.0f} s, load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"{'mode':<16} {'utilization':>11} {'steady':>7} {'sync s':>8} {'overlap s':>9} {'s/step':>7} {'vs no sync':>10} {'peak MB/s':>9} {'MB sent':>8} {'val_loss':>9}")
    for r in rows:
        print(f"{r['name']:<16} {number(r['utilization'], '11.1%')} {number(r['steady'], '7.1%')} {number(r['sync_s'], '8.3f')} {number(r['overlap_s'], '9.3f')} "
              f"{r['s_per_step']:7.3f} {r['s_per_step'] / alone:10.3f} {r['peak_mb_s']:9.2f} {r['mb_sent']:8.1f} {r['val_loss']:9.4f}")


if __name__ == "__main__":
    main()
