"""Several islands through `atoll simulate`: DiLoCo keeps them bit-identical, ddp equals one big island."""

from __future__ import annotations

import json

import pytest
from conftest import read_metrics, run_atoll

TIMEOUT = 300


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("token-cache"))


def common(cache_dir: str, steps: int) -> list[str]:
    return [
        "--train.steps", str(steps), "--train.seq_len", "64", "--schedule.warmup_steps", "2",
        "--metrics.log_every", "1", "--eval.every", "0", "--checkpoint.at_end", "false", "--data.cache_dir", cache_dir,
    ]


# 2 islands of 2 local ranks with overlapped outer steps of 2 fragments (every rank's ring runs behind
# training, over its shard of one fragment); blocking 2 x 2 islands agree in test_checkpoint_runs,
# 3 islands in test_ring_order_runs, 4 in test_elastic
def test_diloco_islands_hold_identical_outer_weights_after_every_outer_step(tmp_path, cache_dir):
    islands, procs = 2, 2
    run_dir = tmp_path / "run"
    args = ["simulate", "--islands", str(islands), "--procs-per-island", str(procs), "--run-dir", str(run_dir),
            "configs/debug.toml", *common(cache_dir, 8), "--diloco.inner_steps", "4", "--diloco.fragments", "2",
            "--diloco.overlap_steps", "1"]
    result = run_atoll(args, TIMEOUT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    outer = {}
    for i in range(islands):
        records = read_metrics(run_dir / f"island-{i}")
        assert [r["step"] for r in records] == list(range(1, 9))
        steps = [r for r in records if "outer_step" in r]
        # a fragment every H/P = 2 steps, landed 1 step late; the last step averages both, blocking
        assert [(r["outer_step"], r["step"], r["fragment"]) for r in steps] == [(1, 3, 0), (2, 5, 1), (3, 7, 0), (4, 8, None)]
        assert all(r["overlap_s"] > 0 for r in steps[:3]) and steps[3]["overlap_s"] == 0
        assert all(r["world_size"] == islands for r in records)
        assert all(0 < r["utilization"] <= 1 and r["compute_s"] > 0 and r["sync_s"] > 0 for r in steps)
        sent = [b - a for a, b in zip([0] + [r["bytes_sent"] for r in steps], [r["bytes_sent"] for r in steps])]
        assert 0.45 < sent[0] / sent[3] < 0.55 and 0.45 < sent[1] / sent[3] < 0.55  # a fragment is half the model
        outer[i] = [r["outer_digest"] for r in steps]
        info = json.loads((run_dir / f"island-{i}" / "run.json").read_text())
        assert info["local_ranks"] == procs and info["mode"] == "diloco"
    assert len({tuple(d) for d in outer.values()}) == 1
    assert len(set(outer[0])) == 4


def test_ddp_across_two_islands_equals_one_island_with_their_combined_batch(tmp_path, cache_dir):
    two = tmp_path / "two"
    one = tmp_path / "one"
    r2 = run_atoll(["simulate", "--islands", "2", "--run-dir", str(two), "configs/debug.toml",
                    *common(cache_dir, 6), "--train.global_batch", "4", "--mesh.mode", "ddp", "--comm.codec", "fp32"], TIMEOUT)
    assert r2.returncode == 0, r2.stdout[-3000:] + r2.stderr[-3000:]
    r1 = run_atoll(["train", "configs/debug.toml", "--run-dir", str(one), *common(cache_dir, 6),
                    "--train.global_batch", "8"], TIMEOUT)
    assert r1.returncode == 0, r1.stderr

    single = {r["step"]: r["loss"] for r in read_metrics(one)}
    islands = [read_metrics(two / f"island-{i}") for i in range(2)]
    for step in range(1, 7):
        # Each island logs the mean over its half of the batch; their mean is the one island's loss.
        mean = sum(recs[step - 1]["loss"] for recs in islands) / 2
        assert abs(mean - single[step]) < 1e-5, (step, mean, single[step])
    last = islands[0][-1]
    params = json.loads((two / "island-0" / "run.json").read_text())["params"]["total"]
    # ring: 2(n-1)/n = 1 x the fp32 gradient per step, plus a 32-byte MAC tag per ring transfer
    tags = last["bytes_sent"] - 6 * params * 4
    assert tags % 32 == 0 and 0 < tags < 0.01 * 6 * params * 4
    assert last["world_size"] == 2
