"""The outer step anneals with the inner LR schedule (diloco.anneal_with_schedule) and is a plain
average through the run's first diloco.plain_average_fraction."""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from conftest import outer_step

from atoll.comm.allreduce import GlobalMean
from atoll.comm.codecs import get_codec
from atoll.config import DilocoConfig, ScheduleConfig
from atoll.diloco import DiLoCo
from atoll.model import Llama, get_size
from atoll.optim import lr_factor, outer_anneal_weight, outer_step_weight


def one_island_mean() -> GlobalMean:
    group = dist.ProcessGroupGloo(dist.HashStore(), 0, 1, timedelta(seconds=10))
    return GlobalMean([group], get_codec("fp32"), deadline_s=10.0, chunk_bytes=1 << 20)


def shifted(model: torch.nn.Module, seed: int) -> None:
    """Stand-in for an inner phase: move every weight by a seeded random step."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.01)


def test_weight_is_one_in_warmup_then_follows_the_schedule():
    wsd = ScheduleConfig(kind="wsd", warmup_steps=10, decay_fraction=0.2, decay_shape="linear")
    assert [outer_anneal_weight(s, 100, wsd) for s in (0, 5, 9)] == [1.0, 1.0, 1.0]
    assert outer_anneal_weight(50, 100, wsd) == 1.0  # stable phase: plain DiLoCo
    assert outer_anneal_weight(80, 100, wsd) == pytest.approx(0.95)  # first of 20 decay steps
    assert outer_anneal_weight(89, 100, wsd) == pytest.approx(0.5)
    assert outer_anneal_weight(99, 100, wsd) == 0.0  # last step: a plain average
    cosine = ScheduleConfig(kind="cosine", warmup_steps=10)
    assert outer_anneal_weight(55, 100, cosine) == lr_factor(55, 100, cosine) == pytest.approx(0.5)
    constant = ScheduleConfig(kind="constant", warmup_steps=10)
    assert {outer_anneal_weight(s, 100, constant) for s in range(100)} == {1.0}


def test_outer_step_is_a_plain_average_through_the_first_fraction_then_anneals():
    wsd = ScheduleConfig(kind="wsd", warmup_steps=10, decay_fraction=0.2, decay_shape="linear")
    early = DilocoConfig(plain_average_fraction=0.3)
    assert [outer_step_weight(s, 100, wsd, early) for s in (0, 9, 29)] == [0.0, 0.0, 0.0]
    assert [outer_step_weight(s, 100, wsd, early) for s in (30, 79)] == [1.0, 1.0]  # Nesterov from step 31 on
    assert outer_step_weight(89, 100, wsd, early) == pytest.approx(0.5)  # the decay anneals as before
    assert outer_step_weight(30, 200, wsd, early) == 0.0  # a fraction of train.steps: 60 of 200
    unannealed = DilocoConfig(plain_average_fraction=0.3, anneal_with_schedule=False)
    assert [outer_step_weight(s, 100, wsd, unannealed) for s in (29, 30, 99)] == [0.0, 1.0, 1.0]
    recipe = DilocoConfig(plain_average_fraction=0.0)
    assert [outer_step_weight(s, 100, wsd, recipe) for s in range(100)] == [outer_anneal_weight(s, 100, wsd) for s in range(100)]
    assert DilocoConfig().plain_average_fraction == 0.2


def test_plain_average_steps_build_no_momentum_and_the_first_nesterov_step_starts_it():
    torch.manual_seed(0)
    model = Llama(get_size("debug"))
    diloco = DiLoCo(model, lr=0.7, momentum=0.8, nesterov=True)
    mean = one_island_mean()
    for seed in range(2):  # plain averages: one island's average is its own inner weights
        shifted(model, seed)
        inner = [p.detach().clone() for p in model.parameters()]
        diloco.anneal(0.0)
        outer_step(diloco, mean)
        assert max((got.detach() - want).abs().max().item() for got, want in zip(model.parameters(), inner)) < 1e-6
    assert "momentum_buffer" not in diloco.optimizer.state[diloco.outer]
    before = diloco.outer.clone()
    shifted(model, 2)
    diloco.anneal(1.0)
    outer_step(diloco, mean)
    pseudo = diloco.pseudo_grad.clone()
    buffer = diloco.optimizer.state[diloco.outer]["momentum_buffer"]
    assert torch.equal(buffer, pseudo)  # momentum starts from this step's pseudo-gradient alone
    # Nesterov's first step: outer - lr * (1 + momentum) * pseudo-gradient
    assert torch.allclose(diloco.outer, before - 0.7 * 1.8 * pseudo, atol=1e-6)


def test_anneal_interpolates_lr_towards_one_and_momentum_towards_zero():
    torch.manual_seed(0)
    diloco = DiLoCo(Llama(get_size("debug")), lr=0.7, momentum=0.9, nesterov=True)
    diloco.anneal(0.5)
    group = diloco.optimizer.param_groups[0]
    assert group["lr"] == pytest.approx(0.85) and group["momentum"] == pytest.approx(0.45)
    diloco.anneal(1.0)
    assert (group["lr"], group["momentum"]) == (0.7, 0.9)


def test_fully_annealed_outer_step_takes_the_inner_weights_despite_momentum():
    torch.manual_seed(0)
    model = Llama(get_size("debug"))
    diloco = DiLoCo(model, lr=0.7, momentum=0.9, nesterov=True)
    mean = one_island_mean()
    for seed in range(3):  # build up a momentum buffer
        shifted(model, seed)
        outer_step(diloco, mean)
    shifted(model, 99)
    inner = [p.detach().clone() for p in model.parameters()]
    diloco.anneal(0.0)
    outer_step(diloco, mean)
    # one island's average is its own inner weights (up to outer - (outer - inner) rounding);
    # the momentum built up before must not move them
    drift = max((got.detach() - want).abs().max().item() for got, want in zip(model.parameters(), inner))
    assert drift < 1e-6
    assert diloco.optimizer.state[diloco.outer]["momentum_buffer"].abs().max() > 1e-3  # it was there
