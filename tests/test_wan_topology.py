"""Per-pair rates and delays of the emulated WAN (`--wan-topology`), without namespaces."""

from __future__ import annotations

import pytest
from test_wan import bulk_mbit_s, needs_namespaces

from atoll.errors import UserError
from atoll.wan.delay_line import DelayLine, Link
from atoll.wan.namespaces import list_namespaces
from atoll.wan.network import EmulatedWan
from atoll.wan.topology import parse_topology

TWO_REGIONS = {
    "regions": {"eu": [0, 2], "us": [1, 3]},
    "within": {"rate": "1gbit", "delay": "1ms"},
    "between": {"rate": "50mbit", "delay": "40ms"},
    "pair": [{"from": 0, "to": 3, "rate": "10mbit", "delay": "60ms"}],
}


def test_regions_give_fast_links_inside_and_slow_across_and_a_pair_overrides_one_direction():
    topology = parse_topology(TWO_REGIONS, 4)
    assert topology.rates_bps[0][2] == topology.rates_bps[3][1] == 10**9 and topology.delays_s[2][0] == pytest.approx(0.001)
    assert topology.rates_bps[0][1] == topology.rates_bps[2][3] == 50 * 10**6 and topology.delays_s[1][2] == pytest.approx(0.04)
    assert topology.rates_bps[0][3] == 10 * 10**6 and topology.delays_s[0][3] == pytest.approx(0.06)
    assert topology.rates_bps[3][0] == 50 * 10**6  # the other direction keeps the region's link


def test_without_regions_every_link_is_the_between_link():
    topology = parse_topology({"between": {"rate": "100mbit", "delay": "20ms"}}, 3)
    assert {r for i, row in enumerate(topology.rates_bps) for j, r in enumerate(row) if i != j} == {10**8}


@pytest.mark.parametrize("raw, says", [
    ({}, "between"),
    ({"between": {"rate": "1mbit", "delay": "1ms"}, "zones": {}}, "unknown keys"),
    ({**TWO_REGIONS, "regions": {"eu": [0, 2], "us": [1]}}, "in no region"),
    ({**TWO_REGIONS, "regions": {"eu": [0, 2], "us": [1, 3, 2]}}, "regions 'eu' and 'us'"),
    ({**TWO_REGIONS, "regions": {"eu": [0, 2], "us": [1, 7]}}, "not an index"),
    ({"regions": {"a": [0, 1, 2, 3]}, "between": {"rate": "1mbit", "delay": "1ms"}}, "within"),
    ({"between": {"rate": "fast", "delay": "1ms"}}, "not a link rate"),
    ({"between": {"rate": "1mbit", "delay": "1ms"}, "pair": [{"from": 1, "to": 1, "rate": "1mbit", "delay": "1ms"}]}, "to itself"),
    ({"between": {"rate": "1mbit", "delay": "1ms"}, "pair": [{"from": 1, "to": 2}]}, "exactly"),
])
def test_a_bad_topology_is_one_user_error_naming_what_to_fix(raw, says):
    with pytest.raises(UserError, match=says):
        parse_topology(raw, 4, "topo.toml")


def test_the_delay_line_paces_each_pair_at_its_rate_and_drops_what_overflows_its_queue():
    line = DelayLine([Link(10, "10.77.0.1"), Link(11, "10.77.0.2")], [[0.0, 0.01], [0.01, 0.0]], [[0, 8000], [0, 0]])
    # 1000 bytes at 8000 bit/s take 1 s on the wire, then 10 ms of delay
    assert line.release_time(0, 1, 1000, 0.0) == pytest.approx(1.01)
    assert line.release_time(1, 0, 1000, 0.0) == pytest.approx(0.01)  # unpaced direction: delay only
    # the next packet waits for the first to leave: 1 s of queue is over the 20 ms limit
    assert line.release_time(0, 1, 1000, 0.0) is None
    assert line.release_time(0, 1, 10, 0.995) == pytest.approx(1.0 + 0.01 + 0.01)


def test_the_coordinator_link_takes_the_smallest_delay_and_no_rate():
    wan = EmulatedWan(4, None, 0.0, parse_topology(TWO_REGIONS, 4))
    delays, rates = wan._pairs()
    assert len(delays) == 5 and delays[4][:4] == [pytest.approx(0.001)] * 4 and rates[0][4] == rates[4][0] == 0
    assert rates[0][1] == 50 * 10**6 and wan.rate_bps is None  # no tbf: the delay line paces each pair


# --- real namespaces -----------------------------------------------------------------------------


@needs_namespaces
@pytest.mark.timeout(60)
def test_each_pair_of_a_topology_runs_at_its_own_rate():
    topology = parse_topology({
        "between": {"rate": "10mbit", "delay": "5ms"},
        "pair": [{"from": 1, "to": 0, "rate": "40mbit", "delay": "5ms"}],
    }, 3)
    wan = EmulatedWan(3, None, 0.0, topology).start()
    try:
        fast, slow = bulk_mbit_s(wan, 1, 0, 5_000_000), bulk_mbit_s(wan, 2, 0, 2_000_000)
    finally:
        wan.close()
    print(f"island 1 -> 0 at 40 Mbit/s: {fast:.1f}; island 2 -> 0 at 10 Mbit/s: {slow:.1f}")
    assert slow <= 10 * 1.05 and fast <= 40 * 1.05  # the cap is the property; speed is the benchmarks' business
    assert fast > 1.5 * slow
    assert not set(wan.island_namespaces + [wan.coordinator_namespace]) & set(list_namespaces())
