"""Eager outer steps (`diloco.eager`): the eager estimate and the phase's start without processes,
the config's bounds, and real `atoll simulate` runs (hard timeouts, no process left behind): the
islands' digests agree at every outer step, and a whole run stopped with an eager all-reduce in
flight resumes exactly."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import losses_by_step, read_metrics, run_atoll
from pydantic import ValidationError
from test_elastic import (
    assert_live_islands_agree,
    kill_leftovers,
    membership,
    simulate,
)

from atoll.config import JobConfig
from atoll.diloco import DiLoCo
from atoll.model import Llama, get_size

RUN_TIMEOUT_S = 150


def island(seed: int = 0) -> tuple[Llama, DiLoCo]:
    torch.manual_seed(seed)
    model = Llama(get_size("debug"))
    return model, DiLoCo(model, lr=0.7, momentum=0.8, nesterov=True, eager=True)


def train(model: Llama, seed: int) -> None:
    """Stand-in for an inner phase: move every weight a little."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator), alpha=1e-2)


def inner(model: Llama) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_with_one_island_the_eager_start_is_the_outer_step_itself_bit_for_bit():
    model, diloco = island()
    diloco.anneal(0.6)
    for phase in range(3):  # the first step (no momentum yet), then with momentum and decay
        train(model, phase)
        diloco.set_weight_kept(own=0.99, run=0.99)
        diloco.hold_contribution()
        diloco.eager_start(islands=1)
        eager = inner(model)
        diloco.pseudo_gradient()  # the held contribution; one island's average is itself
        diloco.apply(1.0)  # eager: the landing leaves the inner weights alone
        assert torch.equal(eager, diloco.outer), phase
        assert torch.equal(inner(model), eager)
        diloco.release_contribution()


def test_the_eager_estimate_is_this_islands_own_share_of_the_average():
    torch.manual_seed(0)
    model = Llama(get_size("debug"))
    diloco = DiLoCo(model, lr=1.0, momentum=0.0, nesterov=False, eager=True)  # the plain average: start = outer - estimate
    train(model, 2)
    held = diloco.hold_contribution().clone()
    diloco.eager_start(islands=3)
    assert torch.allclose(inner(model), diloco.outer - held / 3, atol=1e-6)
    assert torch.equal(diloco.start, inner(model))


def test_the_next_pseudo_gradient_is_the_phases_own_progress_from_its_eager_start():
    # measured from the outer weights instead, the estimate's error re-enters every average and the
    # outer step amplifies it (the debug model diverged that way)
    model, diloco = island()
    train(model, 1)
    diloco.hold_contribution()
    diloco.eager_start(islands=2)
    start = inner(model)
    assert not torch.equal(start, diloco.outer)  # the estimate moved it off the (unchanged) outer weights
    diloco.release_contribution()
    train(model, 2)  # the next phase
    assert torch.allclose(diloco.pseudo_gradient(), start - inner(model), atol=1e-6)
    diloco.restore_inner(whole=True)  # taking the outer weights makes them the next phase's start
    assert not diloco.pseudo_gradient().any()


def test_eager_needs_two_inner_steps_no_overlap_steps_and_one_fragment():
    for bad in ({"inner_steps": 1}, {"inner_steps": 4, "overlap_steps": 2}, {"inner_steps": 4, "fragments": 2}):
        with pytest.raises(ValidationError, match="diloco.eager overlaps each outer step with the whole next inner phase"):
            JobConfig.model_validate({"diloco": {"eager": True, **bad}})
    assert JobConfig.model_validate({"diloco": {"eager": True, "inner_steps": 4}}).diloco.eager


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("token-cache"))


def simulate_args(run_dir, cache_dir: str, *extra: str) -> list[str]:
    return [
        "simulate", "configs/debug.toml", "--islands", "2", "--run-dir", str(run_dir),
        "--train.steps", "12", "--diloco.inner_steps", "4", "--diloco.eager", "true", "--schedule.warmup_steps", "2",
        "--eval.every", "0", "--metrics.log_every", "1", "--checkpoint.every", "4", "--checkpoint.keep", "5",
        "--checkpoint.at_end", "false", "--data.cache_dir", cache_dir,
        "--mesh.heartbeat_interval_s", "0.5", "--mesh.heartbeat_timeout_s", "3", *extra,
    ]


@pytest.mark.timeout(3 * RUN_TIMEOUT_S + 30)
def test_eager_islands_agree_at_every_outer_step_and_a_whole_run_stopped_mid_phase_resumes_exactly(tmp_path, cache_dir):
    # outer steps begun at 4 and 8 land at 7 and 11 (H - 1 later), the one at 12 (the last) blocks.
    # Saves due at 4 and 8 fall while an all-reduce is in flight: they are taken at 7 and 11.
    # Both islands stop at inner step 9, outer step 2 in flight: the resumed run starts from step 7
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    try:
        result = run_atoll(simulate_args(whole, cache_dir), RUN_TIMEOUT_S)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert sorted(p.name for p in (whole / "island-0" / "checkpoints").glob("step-*")) == ["step-00000007", "step-00000011", "step-00000012"]
        stops = ["--fault", "island-0=term@inner:9", "--fault", "island-1=term@inner:9"]
        run_atoll(simulate_args(stopped, cache_dir, *stops), RUN_TIMEOUT_S)
        assert max(losses_by_step(stopped)["island-0"]) < 10  # it did stop
        result = run_atoll(simulate_args(stopped, cache_dir, "--resume"), RUN_TIMEOUT_S)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert "resumed at step 7" in result.stdout
    finally:
        assert kill_leftovers(whole, stopped) == []
    steps = {}
    for name in ("island-0", "island-1"):
        records = [r for r in read_metrics(whole / name) if "outer_step" in r]
        assert [(r["outer_step"], r["step"]) for r in records] == [(1, 7), (2, 11), (3, 12)]
        assert records[0]["overlap_s"] > 0 and records[1]["overlap_s"] > 0 and records[2]["overlap_s"] == 0
        steps[name] = [r["outer_digest"] for r in records]
    assert steps["island-0"] == steps["island-1"] and len(set(steps["island-0"])) == 3
    expected, got = losses_by_step(whole), losses_by_step(stopped)
    for name in ("island-0", "island-1"):
        assert sorted(got[name]) == list(range(1, 13))
        assert got[name] == expected[name], name  # bit-identical losses and outer digests


@pytest.mark.timeout(RUN_TIMEOUT_S + 30)
def test_eager_rejects_a_nan_island_alike_and_survives_a_kill_during_its_all_reduce(tmp_path, cache_dir):
    # 3 islands, H = 4: outer steps begun at 4, 8 and 12 land at 7, 11 and 15; 16 (the last) blocks.
    # island-1's weights turn NaN after inner step 6: its contribution to outer step 2 is rejected by
    # every island, and at that landing it takes the outer weights whole and contributes nothing to
    # outer step 3 (it has no phase of its own; the guard's reset is put out of reach). island-2 dies
    # as outer step 3's all-reduce starts behind training: the survivors' rings fail, and the landing
    # redoes the step among them, blocking, with the contributions they held
    outer = simulate(tmp_path / "run", cache_dir, 3, 16, faults=["island-1=nan@inner:6", "island-2=kill@allreduce:3"],
                     extra=["--diloco.eager", "true", "--eval.every", "16", "--train.max_skipped_inner", "10"])

    steps = assert_live_islands_agree(outer)  # digest, epoch, world size and landing step per outer step
    assert [steps[s]["step"] for s in (1, 2, 3, 4)] == [7, 11, 15, 16]
    assert [steps[s]["world_size"] for s in (1, 2, 3, 4)] == [3, 3, 2, 2]
    assert steps[3]["attempts"] == 2 and not steps[3]["skipped"]
    for name in ("island-0", "island-1"):
        assert [r["rejected"] for r in outer[name]] == [[], ["island-1"], [], []]
        assert all(r["overlap_s"] > 0 for r in outer[name][:2])
    assert [r["skipped_inner"] for r in outer["island-1"]] == [1, 5, 5, 5]  # steps 7-11, none after the landing at 11
    final = [outer[name][-1] for name in ("island-0", "island-1")]
    assert all(math.isfinite(r["val_loss"]) and r["val_loss"] == final[0]["val_loss"] for r in final)
    assert membership(tmp_path / "run")[1]["left"] == {"island-2": "its control connection closed (process gone)"}
