"""Error feedback with topk (`comm.codec = "topk"`, which requires `comm.error_feedback`): what the
sparse codec leaves out comes back in later pseudo-gradients, the residual resumes exactly, and a
whole 2-island run through the sparse all-gather, stopped and resumed, reproduces the
uninterrupted run (the one multi-process test, hard timeout, marked slow)."""

from __future__ import annotations

import pytest
import torch
from conftest import losses_by_step, run_atoll
from test_error_feedback import NUMEL, TIMEOUT, Flat, LossyMean, island, move, simulate_args
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

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


@pytest.mark.slow
@pytest.mark.timeout(3 * TIMEOUT)
def test_a_whole_topk_run_stopped_and_resumed_reproduces_the_uninterrupted_run(tmp_path):
    # as the int4 test in test_error_feedback: both islands stop at inner step 10 (after the
    # checkpoint of outer step 2) and resume; the sparse all-gather's residuals must come back bit
    # for bit, or the outer digests of step 3 would differ
    cache_dir, topk = str(tmp_path / "cache"), ["--comm.codec", "topk"]
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    result = run_atoll(simulate_args(whole, cache_dir, *topk), TIMEOUT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    faults = ["--fault", "island-0=term@inner:10", "--fault", "island-1=term@inner:10"]
    run_atoll(simulate_args(stopped, cache_dir, *topk, *faults), TIMEOUT)
    assert max(losses_by_step(stopped)["island-0"]) < 12
    saved = tmp_path / "saved.pt"
    dcp_to_torch_save(next((stopped / "island-0" / "checkpoints").glob("step-00000008*")), saved)
    assert torch.load(saved)["diloco.rank0"]["error_feedback"].abs().max() > 0
    result = run_atoll(simulate_args(stopped, cache_dir, *topk, "--resume"), TIMEOUT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "resumed at step 8" in result.stdout
    expected, got = losses_by_step(whole), losses_by_step(stopped)
    for name in ("island-0", "island-1"):
        assert sorted(got[name]) == list(range(1, 13))
        assert got[name] == expected[name], name
