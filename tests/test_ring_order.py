"""The ring order solver (`atoll.mesh.ring_order`), without processes."""

from __future__ import annotations

import itertools
import random

from atoll.mesh.ring_order import EXACT_MAX_ISLANDS, Link, best_ring, bottleneck, canonical, edges

FAST, SLOW = 1e9 / 8, 20e6 / 8  # 1 Gbit/s inside a region, 20 Mbit/s across


def regions(assignment: dict[str, str], rtt_in: float = 0.001, rtt_across: float = 0.08) -> dict[tuple[str, str], Link]:
    """Every directed pair: fast within a region, slow across."""
    return {
        (a, b): Link(FAST, rtt_in) if assignment[a] == assignment[b] else Link(SLOW, rtt_across)
        for a in assignment for b in assignment if a != b
    }


def crossings(ring: tuple[str, ...], assignment: dict[str, str]) -> int:
    return sum(assignment[a] != assignment[b] for a, b in edges(ring))


def test_two_regions_measured_order_crosses_the_slow_link_once_each_way():
    # id order a, b, c, d alternates regions: every one of its four links crosses the WAN
    assignment = {"a": "eu", "b": "us", "c": "eu", "d": "us"}
    links = regions(assignment)
    assert crossings(("a", "b", "c", "d"), assignment) == 4
    ring = best_ring(["d", "c", "b", "a"], links)
    assert ring == ("a", "b", "d", "c")  # eu, us, us, eu: two crossings, the fewest a cycle can have
    assert crossings(ring, assignment) == 2
    # the bottleneck is the WAN either way; the tie goes to the least total RTT
    assert bottleneck(ring, links) == bottleneck(("a", "b", "c", "d"), links) == SLOW


def test_one_slow_pair_is_kept_out_of_the_ring():
    ids = ["i0", "i1", "i2", "i3"]
    links = {(a, b): Link(FAST, 0.01) for a in ids for b in ids if a != b}
    links[("i1", "i2")] = Link(SLOW, 0.01)  # a slow direction on id order's path
    ring = best_ring(ids, links)
    assert ("i1", "i2") not in edges(ring)
    assert bottleneck(ring, links) == FAST


def test_ties_are_broken_on_rtt_then_ids():
    ids = ["a", "b", "c", "d"]
    same = {(x, y): Link(FAST, 0.01) for x in ids for y in ids if x != y}
    assert best_ring(ids, same) == ("a", "b", "c", "d")  # all equal: the smallest ids
    quicker = dict(same)
    quicker[("a", "c")] = Link(FAST, 0.001)
    assert ("a", "c") in edges(best_ring(ids, quicker))


def test_missing_measurements_fall_back_to_id_order():
    assignment = {"a": "eu", "b": "us", "c": "eu", "d": "us"}
    links = regions(assignment)
    del links[("c", "b")]
    assert best_ring(["c", "a", "d", "b"], links) == ("a", "b", "c", "d")
    assert best_ring(["b", "a"], {}) == ("a", "b")
    assert best_ring(["a"], {}) == ("a",)


def test_the_answer_does_not_depend_on_the_order_of_the_inputs():
    rng = random.Random(3)
    ids = [f"island-{k}" for k in range(6)]
    links = {(a, b): Link(rng.choice([10e6, 50e6, 100e6]), rng.random() / 10) for a in ids for b in ids if a != b}
    answers = {best_ring(rng.sample(ids, len(ids)), dict(rng.sample(sorted(links.items()), len(links)))) for _ in range(5)}
    assert len(answers) == 1
    ring = answers.pop()
    assert ring == canonical(ring) and sorted(ring) == sorted(ids)


def test_exact_solver_finds_the_best_bottleneck_of_every_cycle():
    rng = random.Random(7)
    ids = [f"i{k}" for k in range(EXACT_MAX_ISLANDS)]
    links = {(a, b): Link(rng.uniform(1e6, 1e8), 0.01) for a in ids for b in ids if a != b}
    best = max(bottleneck(("i0", *p), links) for p in itertools.permutations(ids[1:]))
    assert bottleneck(best_ring(ids, links), links) == best


def test_heuristic_beyond_eight_islands_finds_the_regions():
    # 12 islands in 3 regions, ids interleaved so id order crosses regions on every link
    assignment = {f"i{k:02d}": ("eu", "us", "asia")[k % 3] for k in range(12)}
    links = regions(assignment)
    ring = best_ring(list(assignment), links)
    assert sorted(ring) == sorted(assignment) and ring == canonical(ring)
    assert crossings(ring, assignment) == 3  # each region visited once: the fewest crossings
    assert crossings(tuple(sorted(assignment)), assignment) == 12
    assert best_ring(list(assignment), links) == ring  # deterministic


def test_heuristic_keeps_a_bottleneck_free_cycle_when_one_exists():
    rng = random.Random(11)
    ids = [f"n{k:02d}" for k in range(10)]
    hidden = rng.sample(ids, len(ids))  # a fast cycle hidden among slow links
    links = {(a, b): Link(SLOW * rng.uniform(0.5, 1.0), 0.05) for a in ids for b in ids if a != b}
    for a, b in edges(hidden):
        links[(a, b)] = Link(FAST, 0.05)
    assert bottleneck(best_ring(ids, links), links) == FAST


def test_links_are_remeasured_every_n_committed_steps_but_not_where_an_epoch_was_just_entered():
    from atoll.sync import links_due

    assert [s for s in range(1, 11) if links_due(s, 3, 0, 0)] == [3, 6, 9]
    assert not links_due(6, 3, 0, 1)  # outer step 6 ended by entering epoch 1: entering measured them
    assert not any(links_due(s, 0, 0, 0) for s in range(1, 11))  # 0: only when an epoch forms
