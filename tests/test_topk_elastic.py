"""A whole run with topk (`comm.codec = "topk"`, error feedback on) and a peer killed inside the
sparse all-gather: survived as in the ring (tests/test_elastic.py runs it on the int8 ring). A
3-island `atoll simulate` run with a hard timeout; slow. A peer that hangs inside the all-gather is
tests/test_sparse_allgather.py's (the dissolved epoch abandons the gather), then the outer step's
as with the ring."""

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
