"""The coordinator's ring order (`comm.ring_order = "measured"`): picked from the links islands
report, the same for every island, journalled and kept by a restarted coordinator."""

from __future__ import annotations

import time

import pytest
from conftest import free_port
from test_mesh import CONNECT_TIMEOUT_S, LOOPBACK, TOKEN, admitted, joined

from atoll.mesh.coordinator import Coordinator
from atoll.mesh.membership import Epoch, Rules, in_ring_order
from atoll.mesh.ring_order import MAX_REPORTED_PEERS, REORDER_GAIN, RING_ORDER_KEY, Link, better_ring, parse_report

FAST, SLOW = 125e6, 2.5e6
REGION = {"a": "eu", "b": "us", "c": "eu", "d": "us"}
"""Id order a, b, c, d crosses between regions on all four links; the best ring on two."""


def measured_by(island: str) -> dict[str, dict[str, float]]:
    """What `island` reports: fast to its own region, slow across."""
    return {
        peer: {"throughput": FAST if REGION[peer] == REGION[island] else SLOW, "rtt": 0.001 if REGION[peer] == REGION[island] else 0.08}
        for peer in REGION if peer != island
    }


def test_in_ring_order_permutes_members_with_their_incarnations():
    epoch = Epoch(3, ("a", "b", "c"), 1, "joined", ("ia", "ib", "ic"))
    ordered = in_ring_order(epoch, ("a", "c", "b"))
    assert ordered.members == ("a", "c", "b") and ordered.incarnations == ("ia", "ic", "ib")
    assert ordered.index_of("c") == 1 and ordered.has("b", "ib") and ordered.number == 3
    with pytest.raises(ValueError, match="not a permutation"):
        in_ring_order(epoch, ("a", "b"))


def test_a_running_epoch_is_reordered_only_for_a_gain_on_fully_measured_links():
    links = {(a, b): Link.from_dict(v) for a in REGION for b, v in measured_by(a).items()}
    # the bottleneck is the WAN for both orders: no gain, no new epoch
    assert better_ring(("a", "b", "c", "d"), links) is None
    slow_pair = dict(links)
    for pair in (("a", "b"), ("c", "d")):
        slow_pair[pair] = Link(SLOW / 2, 0.08)  # id order uses both; the best ring neither
    assert better_ring(("a", "b", "c", "d"), slow_pair) == ("a", "c", "b", "d")
    assert REORDER_GAIN <= 2
    del slow_pair[("b", "a")]
    assert better_ring(("a", "b", "c", "d"), slow_pair) is None  # unmeasured: nothing to act on


def test_a_reorder_needs_the_gain_in_the_last_two_measurements_not_in_one_noisy_round():
    links = {(a, b): Link.from_dict(v) for a in REGION for b, v in measured_by(a).items()}
    slow_pair = dict(links)
    for pair in (("a", "b"), ("c", "d")):
        slow_pair[pair] = Link(SLOW / 2, 0.08)  # id order uses both; the best ring neither
    # one round saw the two pairs slow, the one before it did not: noise, no reorder
    assert better_ring(("a", "b", "c", "d"), slow_pair, previous=links) is None
    # slow in both rounds: reorder
    assert better_ring(("a", "b", "c", "d"), slow_pair, previous=slow_pair) == ("a", "c", "b", "d")
    # the new order's links count at their lower figure: one slow round on them blocks the move
    flaky_best = {**slow_pair, ("a", "c"): Link(SLOW / 4, 0.08)}
    assert better_ring(("a", "b", "c", "d"), slow_pair, previous=flaky_best) is None


def test_the_coordinator_keeps_the_measurement_before_the_newest_of_each_pair(tmp_path):
    coordinator = Coordinator("127.0.0.1", 0, 3, Rules(), tmp_path / "membership.jsonl", "token")
    for island in ("a", "b", "c"):
        coordinator._member = lambda island, incarnation: True  # membership is not what this test is about
        coordinator.views[island] = None
    coordinator._op_links("a", "i", {"links": {"b": {"throughput": 1.0, "rtt": 0.1}}}, 0)
    assert coordinator.previous_links == {} and coordinator.links[("a", "b")].throughput == 1.0
    coordinator._op_links("a", "i", {"links": {"b": {"throughput": 2.0, "rtt": 0.1}, "c": {"throughput": 3.0, "rtt": 0.1}}}, 0)
    assert coordinator.previous_links == {("a", "b"): Link(1.0, 0.1)} and coordinator.links[("a", "b")].throughput == 2.0


@pytest.mark.parametrize("raw", [
    [], {"b": {"throughput": 0.0, "rtt": 0.0}}, {"b": {"throughput": float("nan"), "rtt": 0.0}},
    {"b": {"throughput": 1.0, "rtt": -1.0}}, {"b": {"throughput": 1.0}}, {"b": 5},
    {f"p{k}": {"throughput": 1.0, "rtt": 0.0} for k in range(MAX_REPORTED_PEERS + 1)},
])
def test_a_link_report_with_broken_figures_is_refused(raw):
    with pytest.raises((ValueError, KeyError, TypeError)):
        parse_report("a", raw, {"a", "b"})


def test_a_link_report_keeps_only_links_to_other_registered_islands():
    link = {"throughput": 1.0, "rtt": 0.0}
    assert parse_report("a", {"a": link, "b": link, "gone": link}, {"a", "b"}) == {("a", "b"): Link(1.0, 0.0)}


def report_all(clients: dict) -> None:
    for island, main in clients.items():
        assert main.call("links", {"links": measured_by(island)}) == {}


@pytest.mark.timeout(60)
def test_measured_ring_order_is_handed_to_every_island_and_kept_by_a_restarted_coordinator(tmp_path):
    port, journal = free_port(), tmp_path / "coordinator.journal"
    rules = Rules(heartbeat_timeout_s=5)
    first = Coordinator(LOOPBACK, port, 4, rules, token=TOKEN, journal_path=journal).start()
    fingerprint = {RING_ORDER_KEY: "measured"}
    clients, beats, second = {}, [], None
    try:
        for island in ("d", "b", "c", "a"):
            clients[island], beat = joined(first.address, island, fingerprint)
            beats.append(beat)
        assert {admitted(m).members for m in clients.values()} == {("a", "b", "c", "d")}  # nothing measured yet: id order
        report_all(clients)
        # no gain over the bottleneck (the WAN either way): the epoch stays as it is at a boundary
        assert clients["a"].call("barrier", {"epoch": 0, "name": "outer-1", "wait_s": 0}) == {}
        assert first.epoch.number == 0
        # one island leaves: the next epoch is ordered from the measured links, for everyone alike
        clients["b"].call("leave", {"reason": "test"})
        epochs = {island: admitted(m, after=0) for island, m in clients.items() if island != "b"}
        assert {e.members for e in epochs.values()} == {("a", "c", "d")}
        slow = {"throughput": SLOW / 4, "rtt": 0.2}
        clients["a"].call("links", {"links": {**measured_by("a"), "c": slow}})  # a -> c now slowest: the ring goes a -> d -> c
        assert clients["c"].call("barrier", {"epoch": 1, "name": "outer-2", "wait_s": 0}) == {}  # one round is not enough
        clients["a"].call("links", {"links": {**measured_by("a"), "c": slow}})  # the next round agrees
        assert clients["c"].call("barrier", {"epoch": 1, "name": "outer-3", "wait_s": 0}) == {"dissolved": True}
        epochs = {island: admitted(m, after=1) for island, m in clients.items() if island != "b"}
        assert {(e.number, e.members, e.reason) for e in epochs.values()} == {(2, ("a", "d", "c"), "ring reordered")}
        assert {e.incarnations for e in epochs.values()} == {tuple(clients[m].incarnation for m in ("a", "d", "c"))}

        first.stop()  # a crash: only the journal survives (stopping twice is harmless)
        time.sleep(0.5)
        second = Coordinator(LOOPBACK, port, 4, rules, token=TOKEN, journal_path=journal).start()
        assert second.epoch == first.epoch and second.epoch.members == ("a", "d", "c")
        assert second.links[("a", "c")] == Link(SLOW / 4, 0.2) and second.ring_policy == "measured"
        assert clients["d"].call("epoch", {"number": 2}, CONNECT_TIMEOUT_S)["epoch"]["members"] == ["a", "d", "c"]
    finally:
        for beat in beats:
            beat.stop()
        if second is not None:
            second.stop()
        else:
            first.stop()


@pytest.mark.timeout(60)
def test_id_ring_order_ignores_measured_links():
    coordinator = Coordinator(LOOPBACK, 0, 2, token=TOKEN).start()
    clients, beats = {}, []
    try:
        for island in ("b", "a"):
            clients[island], beat = joined(coordinator.address, island)
            beats.append(beat)
        assert admitted(clients["a"]).members == ("a", "b")
        assert clients["b"].call("links", {"links": {"a": {"throughput": 1.0, "rtt": 0.5}}}) == {}
        assert clients["a"].call("barrier", {"epoch": 0, "name": "outer-1", "wait_s": 0}) == {}
        assert coordinator.epoch.number == 0 and coordinator.ring_policy == "id"
    finally:
        for beat in beats:
            beat.stop()
        coordinator.stop()
