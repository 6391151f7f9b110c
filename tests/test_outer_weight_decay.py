"""The outer step applies the inner AdamW's weight decay once (diloco.decouple_weight_decay)."""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from conftest import outer_step

from atoll.comm.allreduce import GlobalMean
from atoll.comm.codecs import get_codec
from atoll.config import OptimConfig, ScheduleConfig
from atoll.diloco import DiLoCo
from atoll.model import Llama, get_size
from atoll.optim import build_optimizer, decays_weight, lr_factor, set_lr, weight_kept

WSD = ScheduleConfig(kind="wsd", warmup_steps=10, decay_fraction=0.2, decay_shape="sqrt")


def one_island_mean() -> GlobalMean:
    group = dist.ProcessGroupGloo(dist.HashStore(), 0, 1, timedelta(seconds=10))
    return GlobalMean([group], get_codec("fp32"), deadline_s=10.0, chunk_bytes=1 << 20)


def decayed_only(model: torch.nn.Module, kept: float) -> None:
    """Stand-in for an inner phase whose only effect is AdamW's weight decay."""
    with torch.no_grad():
        for p in model.parameters():
            if decays_weight(p):
                p.mul_(kept)


def test_weight_kept_is_what_torch_adamw_keeps_of_a_weight_without_gradient():
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    optimizer = build_optimizer(model, OptimConfig(lr=3e-3, weight_decay=0.1))
    start = [p.detach().clone() for p in model.parameters()]
    for step in range(40, 90):  # a phase that crosses into the decay (80 of 100 steps)
        set_lr(optimizer, 3e-3 * lr_factor(step, 100, WSD))
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()
    kept = weight_kept(40, 90, 100, 3e-3, 0.1, WSD)
    assert 0.985 < kept < 0.99  # 50 steps of lr <= 3e-3 at decay 0.1
    weight, bias = model.parameters()
    torch.testing.assert_close(weight.detach(), start[0] * kept, rtol=1e-6, atol=0)
    torch.testing.assert_close(bias.detach(), start[1])  # vectors are not decayed


def nesterov_island() -> tuple[torch.nn.Module, DiLoCo, int]:
    """A debug model under DiLoCo's default outer step, and the index of a decayed parameter."""
    torch.manual_seed(0)
    model = Llama(get_size("debug"))
    diloco = DiLoCo(model, lr=0.7, momentum=0.9, nesterov=True)
    return model, diloco, next(i for i, p in enumerate(diloco.params) if decays_weight(p))


def test_decay_alone_is_applied_once_not_amplified_by_outer_momentum():
    model, diloco, matrix = nesterov_island()
    mean = one_island_mean()
    vector = next(i for i, p in enumerate(diloco.params) if not decays_weight(p))
    first = [chunk.clone() for chunk in diloco.outer.split(diloco.sizes)]
    kept = 0.98
    for _ in range(3):
        decayed_only(model, kept)
        diloco.set_weight_kept(own=kept, run=kept)
        outer_step(diloco, mean)
        assert diloco.pseudo_grad.abs().max().item() < 1e-6  # nothing but decay happened
    now = diloco.outer.split(diloco.sizes)
    torch.testing.assert_close(now[matrix], first[matrix] * kept**3, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(now[vector], first[vector])


def test_without_decoupling_outer_momentum_multiplies_the_decay():
    model, diloco, matrix = nesterov_island()
    mean = one_island_mean()
    first = diloco.outer.split(diloco.sizes)[matrix].clone()
    for _ in range(10):
        decayed_only(model, 0.98)
        outer_step(diloco, mean)  # kept 1 and 1: the plain DiLoCo step
    kept = (diloco.outer.split(diloco.sizes)[matrix] / first).median().item()
    # the islands kept 0.98**10 = 0.82; momentum heads for 0.7 / (1 - 0.9) = 7x their decay
    assert kept < 0.98 ** (10 * 3)


def test_plain_average_with_decoupled_decay_takes_the_inner_weights():
    torch.manual_seed(0)
    model = Llama(get_size("debug"))
    diloco = DiLoCo(model, lr=1.0, momentum=0.0, nesterov=False)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.97 if decays_weight(p) else 1.0).add_(torch.randn(p.shape, generator=gen) * 0.01)
    inner = [p.detach().clone() for p in model.parameters()]
    diloco.set_weight_kept(own=0.97, run=0.97)
    outer_step(diloco, one_island_mean())
    drift = max((got.detach() - want).abs().max().item() for got, want in zip(model.parameters(), inner))
    assert drift < 1e-6


def test_a_joiner_that_trained_nothing_contributes_no_pseudo_gradient():
    torch.manual_seed(0)
    diloco = DiLoCo(Llama(get_size("debug")), lr=0.7, momentum=0.9, nesterov=True)
    diloco.set_weight_kept(own=1.0, run=0.98)  # inner weights are the outer ones it fetched
    assert diloco.pseudo_gradient().abs().max().item() == 0.0


@pytest.mark.parametrize("kept", [1.0, 0.99])
def test_kept_one_is_the_plain_step_bit_for_bit(kept):
    torch.manual_seed(0)
    models = [Llama(get_size("debug")) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    dilocos = [DiLoCo(m, lr=0.7, momentum=0.9, nesterov=True) for m in models]
    for model in models:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01)
    dilocos[1].set_weight_kept(own=kept, run=kept)
    digests = [outer_step(d, one_island_mean()) for d in dilocos]
    assert (digests[0] == digests[1]) == (kept == 1.0)
