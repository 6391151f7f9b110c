"""A whole run under comm.ring_order = "measured": islands measure, the coordinator orders, all agree."""

from __future__ import annotations

import json

import pytest
from conftest import REPO, read_metrics
from test_elastic import TIMEOUT_S, assert_live_islands_agree, cache_dir, simulate  # noqa: F401 - cache_dir is a fixture
from test_simulate import run_simulate
from test_wan import DEBUG_CONFIG, needs_namespaces

from atoll.mesh.ring_order import edges

ISLANDS = ("island-0", "island-1", "island-2")
WAN_TIMEOUT_S = 240


@pytest.mark.timeout(TIMEOUT_S + 30)
def test_islands_measure_every_link_and_agree_on_every_outer_step_in_the_measured_order(tmp_path, cache_dir):  # noqa: F811
    run, output = tmp_path / "run", []
    outer = simulate(run, cache_dir, 3, 12, extra=["--comm.ring_order", "measured", "--comm.link_probe_every", "1"], output=output)

    steps = assert_live_islands_agree(outer)
    assert sorted(steps) == [1, 2, 3] and all(steps[s]["world_size"] == 3 for s in steps)
    records = [json.loads(line) for line in (run / "membership.journal").read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert epochs[0]["epoch"]["members"] == list(ISLANDS) and epochs[0]["links"] == {}  # nobody had measured yet
    # every later epoch (islands leaving as they finish, or a reorder if the loopback figures differ
    # by the gain) is ordered from the links the members measured among themselves, all of them
    for record in epochs[1:]:
        members = record["epoch"]["members"]
        assert {a: set(row) for a, row in record["links"].items()} == {a: set(members) - {a} for a in members if len(members) > 1}
    # measured on entering epoch 0, then re-measured behind training after outer steps 1 and 2 (not
    # after the last); a reorder's epoch adds its entry's measurement
    for island in ISLANDS:
        lines = [line for line in output[0].splitlines() if line.startswith(f"[{island}]") and "links of epoch" in line]
        assert len(lines) >= 3 and all("measured; slowest to" in line for line in lines), lines


@needs_namespaces
@pytest.mark.slow
@pytest.mark.timeout(WAN_TIMEOUT_S + 30)
def test_on_two_regions_the_run_reorders_its_ring_off_the_bad_pairs_and_islands_agree(tmp_path, cache_dir):  # noqa: F811
    # configs/wan/two-regions.toml: id order uses the two 10 Mbit/s pairs, the best rings none
    run = tmp_path / "run"
    result = run_simulate([
        "--islands", "4", "--run-dir", str(run), DEBUG_CONFIG, "--wan-topology", str(REPO / "configs" / "wan" / "two-regions.toml"),
        "--comm.ring_order", "measured", "--train.steps", "12", "--diloco.inner_steps", "4", "--schedule.warmup_steps", "2",
        "--eval.every", "0", "--checkpoint.at_end", "false", "--metrics.log_every", "4", "--data.cache_dir", cache_dir,
        "--mesh.heartbeat_interval_s", "0.5", "--mesh.collective_timeout_s", "60",
    ], WAN_TIMEOUT_S)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    outer = {d.name: [r for r in read_metrics(d) if "outer_step" in r] for d in sorted(run.glob("island-*"))}
    steps = assert_live_islands_agree(outer)
    assert sorted(steps) == [1, 2, 3] and all(steps[s]["world_size"] == 4 for s in steps)
    events = [json.loads(line) for line in (run / "membership.jsonl").read_text().splitlines()]
    assert events[0]["members"] == [f"island-{i}" for i in range(4)]
    reordered = events[1]
    assert reordered["reason"] == "ring reordered"
    bad = {("island-0", "island-1"), ("island-1", "island-0"), ("island-2", "island-3"), ("island-3", "island-2")}
    assert not bad & set(edges(tuple(reordered["members"])))
