"""benchmarks/projection.py's model of an outer step, driven without measuring anything."""

import importlib.util
import sys
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("projection", Path(__file__).resolve().parents[1] / "benchmarks" / "projection.py")
projection = sys.modules["projection"] = importlib.util.module_from_spec(spec)  # dataclasses look their module up
spec.loader.exec_module(projection)

FREE = projection.Costs(encode_s_per_gb=0.0, decode_s_per_gb=0.0, payload_ratio=0.25, local_s_per_gb=0.0)
"""An int8-sized payload with codec and local work for free: only the link and its latency count."""


def setting(**changes) -> "projection.Setting":
    base = {"params": 1e9, "islands": 2, "ranks": 1, "streams": 1, "inner_steps": 100, "step_s": 1.0, "rate": 1e8, "rtt": 0.1,
            "link_share": 1.0, "window": 1e12}
    return projection.Setting(**{**base, **changes})


def test_the_ring_sends_2_n_minus_1_over_n_of_the_payload_and_pays_a_one_way_delay_per_step():
    # 4 GB fp32 -> 1 GB payload; 2 islands send 1/2 x 2 of it = 1 GB at 100 MB/s, plus 2 one-way delays
    assert projection.allreduce_s(setting(), "int8", FREE) == pytest.approx(10.0 + 2 * 0.05)
    # 4 islands: 2 x 3/4 = 1.5 GB, 6 steps
    assert projection.allreduce_s(setting(islands=4), "int8", FREE) == pytest.approx(15.0 + 6 * 0.05)
    assert projection.allreduce_s(setting(islands=1), "int8", FREE) == 0.0


def test_the_sparse_all_gather_sends_its_payload_to_every_peer_once():
    sparse = projection.Costs(0.0, 0.0, 0.01, 0.0)
    # 3 peers x 4 GB x 0.01 = 0.12 GB at 100 MB/s, one one-way delay
    assert projection.allreduce_s(setting(islands=4), "topk", sparse) == pytest.approx(1.2 + 0.05)


def test_the_longer_of_codec_work_and_wire_time_counts():
    slow = projection.Costs(encode_s_per_gb=10.0, decode_s_per_gb=10.0, payload_ratio=0.25, local_s_per_gb=0.0)
    # 2 islands, 4 GB: encode 4 GB x 10 s/GB, decode 2 x 1/2 x 4 GB x 10 s/GB = 80 s against 10 s of wire
    assert projection.allreduce_s(setting(), "int8", slow) == pytest.approx(80.0 + 0.1)


def test_a_long_round_trip_caps_what_the_flows_carry_at_a_window_per_round_trip():
    capped = setting(rtt=0.5, window=10e6, ranks=2, streams=2)  # 4 flows x 10 MB / 0.5 s = 80 MB/s < 100 MB/s
    assert projection.island_throughput(capped) == pytest.approx(80e6)
    assert projection.island_throughput(setting(link_share=0.9)) == pytest.approx(90e6)


def test_overlap_hides_what_fits_behind_tau_steps_with_the_protocol_but_never_local_work():
    s, costs = setting(), projection.Costs(0.0, 0.0, 0.25, local_s_per_gb=1.0)
    local = 4.0
    behind = 2 * 0.1 + 0.05 + projection.allreduce_s(s, "int8", costs)  # barrier and outcome + statistics' exchange + ring
    assert projection.blocked_s(s, "int8", costs, 0) == pytest.approx(local + behind)
    assert projection.blocked_s(s, "int8", costs, 5) == pytest.approx(local + behind - 5)
    assert projection.blocked_s(s, "int8", costs, 50) == pytest.approx(local)
    assert projection.utilization(s, "int8", costs, 50) == pytest.approx(100 / (100 + local))


def test_intellect_1s_figures_are_its_inner_phase_over_the_phase_plus_its_all_reduce():
    for measured, allreduce in projection.INTELLECT_1.values():
        assert 38 * 60 / (38 * 60 + allreduce) == pytest.approx(measured, abs=0.001)
