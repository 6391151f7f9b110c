"""A chaos run: islands killed (-9), restarted and joining at random, and the coordinator
restarted, while DiLoCo trains; against a calm run.

    python benchmarks/chaos.py                     # 4 islands, 20 events, seed 0 (several minutes on 2 cores)
    python benchmarks/chaos.py --seed 3 --events 24

Draws a seeded random scenario for `atoll simulate --scenario`: once a given outer step is
logged, the launcher SIGKILLs a random live island, or kills one and starts it again at once
under the same id (an operator's restart), or starts islands (a new id, or one killed earlier
coming back under its own id), or crashes the coordinator and starts it again from its
journal; at least two islands stay alive. Then runs
the same config without faults. Prints the events, the world size over the outer steps, whether
every island that finished holds the same outer weights (digests of every outer step compared
across islands), the tokens each run trained on and both final validation losses.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIRST_EVENT_OUTER = 3
"""No event before this outer step: every island has joined and trained a little."""
EVENT_SPACING = 4
"""Outer steps between two events, so a killed island is dropped before the next one."""
TAIL_OUTER_STEPS = 25
"""Outer steps after the last event: an island started last must still get in."""


def draw_scenario(rng: random.Random, islands: int, events: int) -> list[tuple[int, str, str]]:
    """(after_outer, action, island) events: kill a live island, restart one (kill and start
    under its id), start a dead or new one, or restart the coordinator.

    An island dies at most once (the launcher treats a returning island's exit as a failure,
    so its second life is never killed); at least two islands are always alive.
    """
    alive = [f"island-{i}" for i in range(islands)]
    dead: list[str] = []
    killed_once: set[str] = set()
    fresh = islands
    plan = []
    for n in range(events):
        outer = FIRST_EVENT_OUTER + n * EVENT_SPACING
        killable = [i for i in alive if i not in killed_once]
        roll = rng.random()
        if roll < 0.15:
            plan.append((outer, "restart", "coordinator"))
        elif roll < 0.35 and killable:
            island = rng.choice(killable)
            killed_once.add(island)
            plan.append((outer, "kill", island))
            plan.append((outer, "start", island))
        elif killable and len(alive) > 2 and (rng.random() < 0.5 or not dead):
            island = rng.choice(killable)
            alive.remove(island)
            dead.append(island)
            killed_once.add(island)
            plan.append((outer, "kill", island))
        elif dead and rng.random() < 0.6:
            island = dead.pop(rng.randrange(len(dead)))
            alive.append(island)
            plan.append((outer, "start", island))
        else:
            island = f"island-{fresh}"
            fresh += 1
            alive.append(island)
            plan.append((outer, "start", island))
    return plan


def scenario_toml(plan: list[tuple[int, str, str]]) -> str:
    # the plan keeps two islands alive once every start has been admitted; keep_alive holds a kill
    # until then (a started island takes seconds to join, and outer steps may take less)
    blocks = ["keep_alive = 2\n"]
    for outer, action, island in plan:
        if action in ("kill", "restart"):
            blocks.append(f'[[signal]]\nisland = "{island}"\naction = "{action}"\nafter_outer = {outer}\n')
        else:
            blocks.append(f'[[start]]\nisland = "{island}"\nafter_outer = {outer}\n')
    return "\n".join(blocks)


def simulate(run_dir: Path, args: argparse.Namespace, extra: list[str]) -> None:
    cmd = [
        sys.executable, "-m", "atoll.cli", "simulate", "--islands", str(args.islands), "--run-dir", str(run_dir),
        str(REPO / "configs" / "debug.toml"), "--train.steps", str(args.steps), "--diloco.inner_steps", str(args.inner_steps),
        "--eval.every", str(args.steps), "--eval.batches", "16", "--metrics.log_every", str(args.inner_steps),
        "--checkpoint.at_end", "false", "--mesh.heartbeat_timeout_s", "3", "--mesh.heartbeat_interval_s", "0.5",
        *extra,
    ]
    result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    if result.returncode != 0:
        sys.exit(f"simulate failed ({run_dir.name}):\n{result.stdout[-4000:]}")


def outcome(run_dir: Path, steps: int) -> dict:
    """World sizes per outer step, digest agreement, tokens trained and the final val loss."""
    digests: dict[int, set[str]] = defaultdict(set)
    world: dict[int, int] = {}
    tokens, finishers, val = 0, [], None
    for path in sorted(run_dir.glob("island-*/metrics.jsonl")):
        records = [json.loads(line) for line in path.read_text().splitlines()]
        previous = 0
        for record in records:
            if "outer_step" in record and not record.get("skipped"):
                digests[record["outer_step"]].add(record["outer_digest"])
                world[record["outer_step"]] = record["world_size"]
            if record["tokens"] < previous:  # a returning island starts its counter again
                tokens += previous
            previous = record["tokens"]
        tokens += previous
        if records and records[-1]["step"] == steps and "val_loss" in records[-1]:
            finishers.append(path.parent.name)
            val = records[-1]["val_loss"]
    return {
        "world": [world[s] for s in sorted(world)],
        "disagreeing_steps": [s for s, d in digests.items() if len(d) > 1],
        "finishers": finishers,
        "tokens": tokens,
        "val_loss": val,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--islands", type=int, default=4, help="islands at the start")
    parser.add_argument("--events", type=int, default=20, help="random kills, restarts and starts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--inner-steps", type=int, default=10, help="DiLoCo H")
    parser.add_argument("--steps", type=int, default=0, help="inner steps (default: room for every event and 25 outer steps after)")
    args = parser.parse_args()
    plan = draw_scenario(random.Random(args.seed), args.islands, args.events)
    # a started island needs its start-up (tens of seconds on a loaded machine), its fetch and a boundary
    args.steps = args.steps or (plan[-1][0] + TAIL_OUTER_STEPS) * args.inner_steps
    print(f"debug model, {args.islands} islands at the start, {args.steps} steps, H={args.inner_steps}; events:")
    for outer, action, island in plan:
        print(f"  after outer step {outer:>3}: {action} {island}")
    with tempfile.TemporaryDirectory() as tmp:
        scenario = Path(tmp) / "chaos.toml"
        scenario.write_text(scenario_toml(plan))
        simulate(Path(tmp) / "chaos", args, ["--scenario", str(scenario)])
        simulate(Path(tmp) / "calm", args, [])
        chaos, calm = outcome(Path(tmp) / "chaos", args.steps), outcome(Path(tmp) / "calm", args.steps)
    print(f"chaos world size per outer step: {' '.join(map(str, chaos['world']))}")
    print(f"outer steps whose digests differ across islands: chaos {chaos['disagreeing_steps'] or 'none'}, "
          f"calm {calm['disagreeing_steps'] or 'none'}")
    print(f"islands that finished: chaos {', '.join(chaos['finishers'])}; calm {', '.join(calm['finishers'])}")
    print(f"{'run':<8}{'tokens':>12}{'val_loss':>10}")
    for name, row in (("calm", calm), ("chaos", chaos)):
        print(f"{name:<8}{row['tokens']:>12,}{row['val_loss']:>10.4f}")
    print(f"chaos / calm: tokens {chaos['tokens'] / calm['tokens']:.2f}, val_loss {chaos['val_loss'] / calm['val_loss'] - 1:+.2%}")


if __name__ == "__main__":
    main()
