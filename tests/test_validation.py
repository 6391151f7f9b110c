"""Validation of pseudo-gradients: the pure decision rule, the island's statistics, and the mean
over the accepted contributions across real processes (gloo)."""

from __future__ import annotations

import itertools
import multiprocessing as mp
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from atoll.comm.allreduce import GlobalMean
from atoll.comm.codecs import get_codec
from atoll.config import DilocoConfig
from atoll.diloco import DiLoCo
from atoll.island import Island
from atoll.validation import ContributionStats, average_accepted, decide, island_stats

PROCESS_TIMEOUT_S = 150
"""Spawning three processes that import torch takes over a minute on a loaded 2-core machine."""
ONE_RANK = Island(rank=0, world=1, device=torch.device("cpu"))


def stats(norm: float, buckets: tuple[float, ...] | None = None, finite: bool = True) -> ContributionStats:
    return ContributionStats(finite, norm, buckets if buckets is not None else (norm,))


# --- the decision rule -------------------------------------------------------------------------------


def test_a_norm_above_the_ratio_times_the_others_median_is_rejected():
    decision = decide({"a": stats(1.0), "b": stats(1.2), "c": stats(6.1)}, max_norm_ratio=5, min_accepted=1)
    assert decision.accepted == ("a", "b") and list(decision.rejected) == ["c"] and not decision.skip
    assert decision.factor("a") == decision.factor("b") == 1.5 and decision.factor("c") == 0.0
    assert decide({"a": stats(1.0), "b": stats(1.2), "c": stats(5.9)}, 5, 1).rejected == {}


def test_one_outlier_cannot_make_an_honest_island_look_large_and_two_are_both_rejected():
    # with two others the reference is the larger: a and b are judged against each other, not against c's 0.01
    decision = decide({"a": stats(1.0), "b": stats(1.2), "c": stats(0.01)}, 5, 1)
    assert decision.rejected == {}
    decision = decide({"a": stats(1.0), "b": stats(1.1), "c": stats(60.0), "d": stats(70.0)}, 5, 1)
    assert list(decision.rejected) == ["c", "d"] and decision.factor("a") == 2.0
    # two of three agreeing are the majority: the rule cannot tell which side is wrong, and accepts all
    assert decide({"a": stats(1.0), "b": stats(60.0), "c": stats(70.0)}, 5, 1).rejected == {}


def test_one_bucket_far_above_the_others_rejects_the_contribution():
    honest = stats(2.0, (1.0, 1.0))
    decision = decide({"a": honest, "b": honest, "c": stats(2.5, (0.1, 2.4))}, 2, 1)
    assert decision.rejected == {"c": "bucket 1 norm 2.4 > 2 x the others' median 1"}


def test_non_finite_contributions_are_always_rejected_and_none_left_skips():
    nan = stats(float("nan"), finite=False)
    decision = decide({"a": stats(1.0), "b": nan}, 5, 1)
    assert decision.rejected == {"b": "non-finite"} and decision.accepted == ("a",) and decision.factor("a") == 2.0
    assert decision.norms == {"a": 1.0, "b": None}
    alone = decide({"a": nan}, 5, 1)
    assert alone.skip and alone.factor("a") == 0.0
    assert decide({"a": stats(3.0)}, 5, 1).accepted == ("a",)  # one finite island has no yardstick


def test_too_few_accepted_skips_the_step_and_min_accepted_is_capped_at_the_islands():
    table = {"a": stats(1.0), "b": stats(1.0), "c": stats(100.0)}
    assert decide(table, 5, 3).skip and not decide(table, 5, 2).skip
    skipped = decide(table, 5, 3)
    assert {i: skipped.factor(i) for i in table} == {"a": 0.0, "b": 0.0, "c": 0.0}
    assert "skipped" in skipped.note(7)
    assert not decide({"a": stats(1.0), "b": stats(1.0)}, 5, 3).skip  # two islands left cannot be asked for three


def test_islands_that_did_not_move_are_no_yardstick():
    assert decide({"a": stats(0.0), "b": stats(0.0), "c": stats(1.0)}, 5, 1).rejected == {}


def test_the_decision_is_the_same_for_the_same_stats_in_any_order():
    table = {"a": stats(1.0, (0.5, 0.8)), "b": stats(float("inf"), finite=False), "c": stats(9.0, (1.0, 8.9)), "d": stats(1.1, (0.6, 0.9))}
    decisions = [decide(dict(order), 5, 2) for order in itertools.permutations(table.items())]
    assert all(d == decisions[0] for d in decisions)
    assert all(list(d.rejected) == ["b", "c"] and list(d.norms) == ["a", "b", "c", "d"] for d in decisions)


# --- statistics and scaling of one island's buffer --------------------------------------------------


def test_island_stats_measure_norms_per_bucket_and_see_any_non_finite_value():
    values = torch.arange(10, dtype=torch.float32)
    buckets = [slice(0, 4), slice(4, 10)]
    got = island_stats(values, buckets, ONE_RANK)
    assert got.finite and got.norm == pytest.approx(values.norm().item())
    assert got.bucket_norms == pytest.approx((values[:4].norm().item(), values[4:].norm().item()))
    huge = torch.full((4,), 3e38)  # finite in fp32, whose own norm would overflow
    assert island_stats(huge, [slice(0, 4)], ONE_RANK).finite
    for bad in (float("nan"), float("inf")):
        poisoned = values.clone()
        poisoned[7] = bad
        assert not island_stats(poisoned, buckets, ONE_RANK).finite
    assert ContributionStats.from_tensor(got.to_tensor()) == got


def test_error_feedback_residuals_are_left_out_of_the_norms_but_not_of_the_finiteness_check():
    """A veteran whose topk residual is most of its contribution beside a recent joiner (residual
    zero): both trained alike, so both are accepted; measured on the whole contributions the
    veteran would be rejected."""
    buckets = [slice(0, 4), slice(4, 10)]
    trained = torch.linspace(-1, 1, 10)
    residual = 8 * torch.linspace(1, -1, 10).roll(3)
    veteran = island_stats(trained + residual, buckets, ONE_RANK, residual=residual)
    joiner = island_stats(trained.clone(), buckets, ONE_RANK, residual=torch.zeros(10))
    assert veteran.norm == pytest.approx(trained.norm().item(), rel=1e-5)
    assert decide({"veteran": veteran, "joiner": joiner}, max_norm_ratio=5.0, min_accepted=1).accepted == ("joiner", "veteran")
    whole = island_stats(trained + residual, buckets, ONE_RANK)
    assert decide({"veteran": whole, "joiner": joiner}, max_norm_ratio=5.0, min_accepted=1).rejected.keys() == {"veteran"}
    poisoned = residual.clone()
    poisoned[5] = float("inf")
    assert not island_stats(trained + poisoned, buckets, ONE_RANK, residual=poisoned).finite


def test_a_rejected_contribution_becomes_zeros_even_when_it_held_nan():
    diloco = DiLoCo(torch.nn.Linear(4, 4), lr=0.7, momentum=0.9, nesterov=True)
    diloco.pseudo_grad.fill_(float("nan"))
    diloco.scale_contribution(0.0)
    assert torch.equal(diloco.pseudo_grad, torch.zeros_like(diloco.pseudo_grad))


# --- the mean over the accepted islands, across processes --------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _island(rank: int, world: int, port: int, results) -> None:
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, world, is_master=rank == 0, timeout=timedelta(seconds=30))
    group = dist.ProcessGroupGloo(dist.PrefixStore("test/", store), rank, world, timedelta(seconds=30))
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    diloco = DiLoCo(model, lr=0.7, momentum=0.9, nesterov=True)
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(torch.full_like(p, float(rank + 1)))  # pseudo-gradient: all rank + 1
            if rank == 1:
                p.view(-1)[0] = float("nan")
    mean = GlobalMean([group], get_codec("fp32"), deadline_s=30.0, chunk_bytes=1 << 20)
    decision = average_accepted(diloco, mean, ONE_RANK, DilocoConfig(), [f"island-{r}" for r in range(world)])
    results.put((rank, decision, diloco.pseudo_grad.tolist()))  # plain floats: a tensor would be shared through fds that die with this process


def test_the_mean_is_over_the_accepted_islands_and_the_same_on_every_island():
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_island, args=(r, 3, port, results)) for r in range(3)]
    for p in procs:
        p.start()
    try:
        out = sorted((results.get(timeout=PROCESS_TIMEOUT_S) for _ in procs), key=lambda r: r[0])
        for p in procs:
            p.join(timeout=30)
            assert p.exitcode == 0
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    decisions = [d for _, d, _ in out]
    assert all(d == decisions[0] for d in decisions) and decisions[0].rejected == {"island-1": "non-finite"}
    averaged = [g for _, _, g in out]
    assert all(g == averaged[0] for g in averaged)  # bit-identical, the rejected island's included
    assert averaged[0] == pytest.approx([2.0] * len(averaged[0]), rel=1e-6)  # (1 + 3) / 2: island-1 left out
