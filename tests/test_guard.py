"""The inner-loop guard: non-finite steps are skipped and counted; too many in a row reset the
island to the outer weights (or stop it, without outer weights)."""

from __future__ import annotations

import pytest
import torch

from atoll.config import JobConfig
from atoll.diloco import DiLoCo
from atoll.errors import UserError
from atoll.guard import InnerGuard
from atoll.island import Island
from atoll.model import Llama, get_size
from atoll.optim import build_optimizer
from atoll.inner_step import train_step

ONE_RANK = Island(rank=0, world=1, device=torch.device("cpu"))
FINE = torch.tensor(2.5)
NAN = torch.tensor(float("nan"))


def guard(max_in_row: int, diloco: DiLoCo | None = None, said: list[str] | None = None) -> InnerGuard:
    return InnerGuard(max_in_row, ONE_RANK, diloco, (said if said is not None else []).append)


def test_a_non_finite_loss_or_gradient_norm_is_skipped_and_counted():
    g = guard(3)
    assert g.allows_step(1, FINE, 0.7)
    assert not g.allows_step(2, NAN, 0.7)
    assert not g.allows_step(3, FINE, float("inf"))
    assert not g.allows_step(4, FINE, float("nan"))
    assert g.skipped == 3 and g.in_row == 3
    assert g.allows_step(5, FINE, 0.7) and g.in_row == 0 and g.skipped == 3


def test_more_than_the_allowed_non_finite_steps_in_a_row_reset_the_inner_weights_to_the_outer_weights():
    model = torch.nn.Linear(4, 4)
    diloco = DiLoCo(model, lr=0.7, momentum=0.9, nesterov=True)
    with torch.no_grad():
        model.weight.fill_(float("nan"))
    said: list[str] = []
    g = guard(2, diloco, said)
    for step in (1, 2):
        assert not g.allows_step(step, NAN, float("nan"))
    assert torch.isnan(model.weight).all()  # two in a row are tolerated
    assert not g.allows_step(3, NAN, float("nan"))
    assert torch.equal(torch.cat([model.weight.reshape(-1), model.bias]), diloco.outer)
    assert g.skipped == 3 and g.in_row == 0 and "reset to the outer weights" in said[-1]


def test_without_outer_weights_a_reset_stops_the_run_with_one_line():
    g = guard(0)
    with pytest.raises(UserError, match="training diverged"):
        g.allows_step(9, NAN, 1.0)


def test_train_step_does_not_step_the_optimizer_on_a_nan_loss():
    cfg = JobConfig()
    torch.manual_seed(0)
    model = Llama(get_size("debug"))
    optimizer = build_optimizer(model, cfg.optim)
    g = guard(3)
    tokens = torch.randint(0, 256, (2, 17))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    with torch.no_grad():
        model.output.weight[0, 0] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    loss, _ = train_step(model, optimizer, inputs, targets, 1, cfg, ONE_RANK, lambda: None, g, 1)
    assert torch.isnan(loss) and g.skipped == 1
    assert not optimizer.state  # AdamW never saw the NaN step
    for after, was in zip(model.parameters(), before):
        torch.testing.assert_close(after.detach(), was, rtol=0, atol=0, equal_nan=True)  # not one weight moved
    assert all(p.grad is None for p in model.parameters())
