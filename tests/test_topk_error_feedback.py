"""Error feedback with topk (`comm.codec = "topk"`, which requires `comm.error_feedback`): what the
sparse codec leaves out comes back in later pseudo-gradients and the residual resumes exactly. A
whole run stopped and resumed with error feedback is tests/test_error_feedback.py's (int4): what
it saves and restores is the same residual whichever codec filled it."""

from __future__ import annotations

import pytest
import torch
from test_error_feedback import NUMEL, Flat, LossyMean, island, move

from atoll.config import load_config
from atoll.errors import UserError

STEPS = 200


def test_topk_without_error_feedback_is_refused_in_one_line():
    with pytest.raises(UserError, match='comm.codec = "topk" .* needs comm.error_feedback = true') as refused:
        load_config("configs/debug.toml", {"comm.codec": "topk"})
    assert "\n" not in str(refused.value)
    assert load_config("configs/debug.toml", {"comm.codec": "topk", "comm.error_feedback": True}).comm.topk_density == 1 / 64


def test_with_topk_everything_is_applied_but_the_last_residual_which_stays_bounded():
    # lr 1, no momentum: the outer weights move by exactly what was averaged; topk sends 1/64 of
    # each step's values, error feedback sends the rest later
    gaps, residuals = {}, []
    for error_feedback in (False, True):
        model, diloco = island(error_feedback)
        start, total, mean = diloco.outer.clone(), torch.zeros(NUMEL, dtype=torch.float64), LossyMean("topk")
        for step in range(STEPS):
            total += move(model, step).double()
            diloco.average(mean)
            diloco.apply()
            if error_feedback and step + 1 in (STEPS // 2, STEPS):
                residuals.append(diloco.residual.norm().item())
        applied = (start - diloco.outer).double()
        gaps[error_feedback] = ((applied - total).norm() / total.norm()).item()
        if error_feedback:  # up to the fp32 rounding of the updates of weights ~1 (ulp 1.2e-7)
            assert (applied + diloco.residual.double() - total).abs().max() < 2e-5
    assert gaps[False] > 0.85 and gaps[True] < 0.2, gaps  # measured 90% and 14%
    # the residual saturates (1.69 then 1.77) while the total grows linearly (6.4 then 12.8)
    assert residuals[1] < 1.15 * residuals[0], residuals


def test_the_topk_residual_resumes_exactly():
    def steps(model: Flat, diloco, first: int, last: int) -> None:
        for step in range(first, last):
            move(model, step)
            diloco.average(LossyMean("topk"))
            diloco.apply()

    model, diloco = island(True)
    steps(model, diloco, 0, 3)
    saved = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in diloco.state_dict().items()}
    assert saved["error_feedback"].abs().max() > 0
    steps(model, diloco, 3, 6)
    resumed_model, resumed = island(True)
    resumed.load_state_dict(saved)
    with torch.no_grad():
        resumed_model.weight.copy_(resumed.outer)  # a resume starts the inner weights at the outer ones
    steps(resumed_model, resumed, 3, 6)
    for name in ("outer", "residual"):
        assert torch.equal(getattr(resumed, name).view(torch.int32), getattr(diloco, name).view(torch.int32)), name
