"""Error feedback (`comm.error_feedback`): what the codec lost comes back in the next pseudo-gradient,
its life through rejected, fresh and skipped contributions, checkpoints and joiners, and a whole
run stopped and resumed with it (the one multi-process test, hard timeout)."""

from __future__ import annotations

import warnings
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from conftest import losses_by_step, run_atoll
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from atoll.checkpoint import Checkpointer
from atoll.comm.allreduce import GlobalMean
from atoll.comm.codecs import get_codec
from atoll.config import CommConfig
from atoll.diloco import DiLoCo
from atoll.errors import UserError

NUMEL = 4099  # a partial int4 block at the end
TIMEOUT = 180


class LossyMean:
    """A one-island stand-in for the ring with a lossy codec: the mean of one is its own value,
    encoded and decoded once, and `dropped` gets what that lost (as `GlobalMean.mean_buckets_`)."""

    def __init__(self, codec: str = "int4") -> None:
        self.codec = get_codec(codec)
        self.sent: list[torch.Tensor] = []

    def mean_buckets_(self, tensor: torch.Tensor, buckets: list[slice], dropped: torch.Tensor | None = None) -> None:
        for bucket in buckets:
            values = tensor[bucket]
            decoded = self.codec.decode(self.codec.encode(values.contiguous()), values.numel())
            if dropped is not None:
                torch.sub(values, decoded, out=dropped[bucket])
            values.copy_(decoded)
        self.sent.append(tensor.clone())


class Flat(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(NUMEL, generator=torch.Generator().manual_seed(0)))


def island(error_feedback: bool) -> tuple[Flat, DiLoCo]:
    model = Flat()
    return model, DiLoCo(model, lr=1.0, momentum=0.0, nesterov=False, error_feedback=error_feedback)


def move(model: Flat, step: int) -> torch.Tensor:
    """An inner phase's stand-in: a change of the weights, mostly the same direction every phase
    (as pseudo-gradients are), plus a step-specific part; returns the pseudo-gradient it makes."""
    common = torch.randn(NUMEL, generator=torch.Generator().manual_seed(99))
    delta = 1e-3 * (common + 0.5 * torch.randn(NUMEL, generator=torch.Generator().manual_seed(100 + step)))
    with torch.no_grad():
        model.weight.sub_(delta)
    return delta


def test_error_feedback_is_off_by_default_and_costs_nothing_then():
    assert CommConfig().error_feedback is False
    _, diloco = island(False)
    assert diloco.residual is None and diloco.dropped is None and "error_feedback" not in diloco.state_dict()


def test_what_was_applied_over_many_steps_misses_only_the_last_residual():
    # lr 1, no momentum: the outer weights move by exactly what was averaged, so with error
    # feedback the total applied is the total of the pseudo-gradients less the residual left
    applied, total = {}, torch.zeros(NUMEL, dtype=torch.float64)
    for error_feedback in (False, True):
        model, diloco = island(error_feedback)
        start = diloco.outer.clone()
        mean = LossyMean()
        total.zero_()
        for step in range(20):
            total += move(model, step).double()
            diloco.average(mean)
            diloco.apply()
        applied[error_feedback] = (start - diloco.outer).double()
        if error_feedback:
            # up to the fp32 rounding of 20 updates of weights ~1 (ulp 1.2e-7); the residual is ~1e-4
            assert (applied[True] + diloco.residual.double() - total).abs().max() < 5e-6
    without = (applied[False] - total).norm() / total.norm()
    with_feedback = (applied[True] - total).norm() / total.norm()
    assert without > 0.02 and with_feedback < without / 4, (without, with_feedback)  # measured 2.6% and 0.56%


def test_an_applied_step_keeps_what_the_ring_dropped_in_pseudo_gradient_units():
    model, diloco = island(True)
    move(model, 0)
    diloco.pseudo_gradient()
    diloco.scale_contribution(1.5)  # 3 islands, 2 accepted
    mean = LossyMean()
    diloco.mean_pseudo_gradient(mean, accepted_factor=1.5)
    dropped = diloco.dropped.clone()
    diloco.apply()
    assert torch.equal(diloco.residual, dropped * (1 / 1.5))
    # the next pseudo-gradient carries it
    delta = move(model, 1)
    assert torch.allclose(diloco.pseudo_gradient(), delta + diloco.residual, atol=1e-6)  # weights ~1: their fp32 ulp


def test_a_rejected_or_fresh_island_keeps_only_what_its_encodings_of_the_others_lost():
    model, diloco = island(True)
    with torch.no_grad():
        diloco.residual.fill_(1.0)  # an old residual, discarded with the rejected pseudo-gradient
    move(model, 0)
    diloco.pseudo_gradient()
    diloco.scale_contribution(0.0)
    with torch.no_grad():
        diloco.pseudo_grad.copy_(torch.randn(NUMEL, generator=torch.Generator().manual_seed(5)))  # the others' sum reaching it
    diloco.mean_pseudo_gradient(LossyMean(), accepted_factor=2.0)
    want = diloco.dropped * 0.5
    diloco.apply()
    assert torch.equal(diloco.residual, want) and want.abs().max() < 0.5


def test_a_skipped_step_and_a_failed_attempt_leave_the_residual_as_it_was():
    model, diloco = island(True)
    move(model, 0)
    diloco.average(LossyMean())
    diloco.apply()
    kept = diloco.residual.clone()
    assert kept.abs().max() > 0
    move(model, 1)

    class Broken:
        def mean_buckets_(self, tensor, buckets, dropped=None):
            dropped.fill_(float("nan"))
            raise RuntimeError("ring all-reduce failed (a peer died)")

    with pytest.raises(RuntimeError):
        diloco.average(Broken())  # a failed attempt: the caller tries again or skips
    assert torch.equal(diloco.residual, kept)
    diloco.scale_contribution(0.0)  # skipped: nobody contributes, no ring, nothing applied
    diloco.restore_inner()
    assert torch.equal(diloco.residual, kept)
    assert torch.equal(model.weight.detach(), diloco.outer)  # the phase's work is discarded, not added to the residual


def test_the_residual_is_saved_and_restored_exactly_and_a_run_without_it_ignores_it():
    model, diloco = island(True)
    for step in range(2):
        move(model, step)
        diloco.average(LossyMean())
        diloco.apply()
    state = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in diloco.state_dict().items()}
    assert torch.equal(state["error_feedback"], diloco.residual) and state["error_feedback"].abs().max() > 0
    _, resumed = island(True)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.residual.view(torch.int32), diloco.residual.view(torch.int32))
    _, plain = island(False)
    plain.load_state_dict(state)  # error feedback turned off on a resume: the residual is dropped
    assert torch.equal(plain.outer, diloco.outer)


def test_a_checkpoint_saved_without_error_feedback_is_refused_in_one_line_with_it_on(tmp_path):
    _, plain = island(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # DCP in one process without a group says so
        dcp.save({"diloco.rank0": plain}, checkpoint_id=tmp_path / "step-1")
        _, with_feedback = island(True)
        with pytest.raises(UserError, match="does not fit this run.*Missing key.*error_feedback"):
            Checkpointer(tmp_path, keep=2, is_leader=True).load(tmp_path / "step-1", {"diloco.rank0": with_feedback})


def test_a_joiner_starts_at_zero_and_no_island_serves_or_broadcasts_its_residual():
    model, member = island(True)
    move(model, 0)
    member.average(LossyMean())
    member.apply()
    assert set(member.served_buffers()) == {"outer"}  # what a state server hands a joiner
    _, joiner = island(True)
    assert torch.equal(joiner.residual, torch.zeros(NUMEL))
    for name, buffer in joiner.transfer_buffers().items():
        buffer.copy_(member.served_buffers().get(name, buffer))
    joiner.took_state(False)
    assert torch.equal(joiner.residual, torch.zeros(NUMEL)) and torch.equal(joiner.outer, member.outer)
    group = dist.ProcessGroupGloo(dist.HashStore(), 0, 1, timedelta(seconds=10))
    kept = member.residual.clone()
    member.broadcast_state(GlobalMean([group], get_codec("int4"), 10.0, 1 << 20), 0)  # the broadcast carries outer state only
    assert torch.equal(member.residual, kept)


def simulate_args(run_dir: Path, cache_dir: str, *extra: str) -> list[str]:
    return [
        "simulate", "configs/debug.toml", "--islands", "2", "--run-dir", str(run_dir),
        "--train.steps", "12", "--diloco.inner_steps", "4", "--schedule.warmup_steps", "2", "--eval.every", "0",
        "--metrics.log_every", "1", "--checkpoint.every", "4", "--checkpoint.at_end", "false", "--data.cache_dir", cache_dir,
        "--mesh.heartbeat_interval_s", "0.5", "--mesh.heartbeat_timeout_s", "3",
        "--comm.codec", "int4", "--comm.error_feedback", "true", *extra,
    ]


@pytest.mark.timeout(3 * TIMEOUT)
def test_a_whole_run_stopped_and_resumed_with_error_feedback_reproduces_the_uninterrupted_run(tmp_path):
    # both islands stop at inner step 10 (after the checkpoint of step 8, outer step 2) and
    # `simulate --resume` continues: the residuals of outer step 2 must come back bit for bit,
    # or the pseudo-gradients of outer step 3, and the outer digests after it, would differ
    cache_dir = str(tmp_path / "cache")
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    result = run_atoll(simulate_args(whole, cache_dir), TIMEOUT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    faults = ["--fault", "island-0=term@inner:10", "--fault", "island-1=term@inner:10"]
    run_atoll(simulate_args(stopped, cache_dir, *faults), TIMEOUT)
    assert max(losses_by_step(stopped)["island-0"]) < 12  # it did stop
    saved = tmp_path / "saved.pt"
    dcp_to_torch_save(next((stopped / "island-0" / "checkpoints").glob("step-00000008*")), saved)
    residual = torch.load(saved)["diloco.rank0"]["error_feedback"]
    assert residual.abs().max() > 0  # the checkpoint holds a residual worth restoring
    result = run_atoll(simulate_args(stopped, cache_dir, "--resume"), TIMEOUT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "resumed at step 8" in result.stdout
    expected, got = losses_by_step(whole), losses_by_step(stopped)
    for name in ("island-0", "island-1"):
        assert sorted(got[name]) == list(range(1, 13))
        assert got[name] == expected[name], name  # bit-identical losses and outer digests
