"""Whole runs with topk (`comm.codec = "topk"`, error feedback on) and a peer that dies or hangs
inside the sparse all-gather: survived as in the ring (tests/test_elastic.py runs the same
scenarios on the int8 ring). Each is a 3-island `atoll simulate` run with a hard timeout; slow."""

from __future__ import annotations

import pytest
from test_elastic import TIMEOUT_S, assert_live_islands_agree, cache_dir, simulate  # noqa: F401 (cache_dir is a fixture)

TOPK = ["--comm.codec", "topk", "--comm.error_feedback", "true"]


@pytest.mark.slow
@pytest.mark.timeout(2 * TIMEOUT_S)
def test_a_kill_during_the_sparse_all_gather_drops_the_dead_and_the_survivors_redo_the_step(tmp_path, cache_dir):
    outer = simulate(tmp_path / "run", cache_dir, 3, 16, faults=["island-1=kill@allreduce:2"], extra=TOPK)

    steps = assert_live_islands_agree(outer)  # the same outer digests on both survivors at every step
    assert [steps[s]["world_size"] for s in (1, 2, 3, 4)] == [3, 2, 2, 2]
    assert steps[2]["attempts"] == 2 and not steps[2]["skipped"]  # the failed all-gather, then the two's


@pytest.mark.slow
@pytest.mark.timeout(2 * TIMEOUT_S)
def test_a_peer_hung_inside_the_sparse_all_gather_is_left_at_the_heartbeat_timeout_not_the_deadline(tmp_path, cache_dir):
    outer = simulate(tmp_path / "run", cache_dir, 3, 16, faults=["island-1=stop@allreduce:2"],
                     extra=[*TOPK, "--mesh.collective_timeout_s", "100"])

    steps = assert_live_islands_agree(outer)
    assert [steps[s]["world_size"] for s in (1, 2, 3, 4)] == [3, 2, 2, 2]
    assert steps[2]["attempts"] == 2
    # abandoned once the coordinator dropped the hung island (3 s heartbeat timeout), not at the 100 s deadline
    assert max(r["sync_s"] for name in ("island-0", "island-2") for r in outer[name] if r["outer_step"] == 2) < 50
