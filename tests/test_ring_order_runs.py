"""A whole run under comm.ring_order = "measured": islands measure, the coordinator orders, all agree."""

from __future__ import annotations

import json

import pytest
from test_elastic import TIMEOUT_S, assert_live_islands_agree, cache_dir, simulate  # noqa: F401 - cache_dir is a fixture

ISLANDS = ("island-0", "island-1", "island-2")


@pytest.mark.timeout(TIMEOUT_S + 30)
def test_islands_measure_every_link_and_agree_on_every_outer_step_in_the_measured_order(tmp_path, cache_dir):  # noqa: F811
    run = tmp_path / "run"
    outer = simulate(run, cache_dir, 3, 12, extra=["--comm.ring_order", "measured"])

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
