"""Overlapped outer steps (`diloco.overlap_steps`): the merge, the held contribution, the clocks
and the checkpoint schedule without processes; then real `atoll simulate` runs of the debug model
(H = 4, tau = 2, hard timeouts, no process left behind) that check states, not exit codes alone:
tau = 0 is the blocking step bit for bit, every island's outer digest agrees at every outer step
with a NaN island rejected alike, a kill -9 during an overlapped all-reduce is survived, and a whole
run stopped with an all-reduce in flight resumes exactly.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time

import pytest
import torch
from conftest import free_port, losses_by_step, read_metrics, run_atoll
from pydantic import ValidationError
from test_elastic import (
    JOIN_OUTER_STEPS,
    assert_live_islands_agree,
    kill_leftovers,
    membership,
    simulate,
)
from test_operations import (
    LOOPBACK,
    TIMEOUT_S,
    atoll,
    finish,
    island,
    logs,
    outer_steps,
    wait_for,
)
from test_simulate import write_island
from torch import nn

from atoll import sync_clock
from atoll.config import JobConfig
from atoll.diloco import DiLoCo
from atoll.outer_step import Flight
from atoll.simulate import summarize
from atoll.sync_clock import SyncClock
from atoll.train import SaveSchedule

OVERLAP = ["--diloco.overlap_steps", "2"]
RUN_TIMEOUT_S = 150


def diloco_on(weights: torch.Tensor) -> tuple[nn.Linear, DiLoCo]:
    model = nn.Linear(weights.shape[1], weights.shape[0], bias=False)
    with torch.no_grad():
        model.weight.copy_(weights)
    return model, DiLoCo(model, lr=0.7, momentum=0.9, nesterov=True)


# --- without processes ----------------------------------------------------------------------------


def test_a_landing_step_merges_the_islands_newer_weights_and_merge_weight_0_replaces_them():
    start, trained = torch.randn(8, 16, generator=torch.Generator().manual_seed(1)), torch.randn(8, 16)
    results = {}
    for weight in (0.0, 0.5):
        model, diloco = diloco_on(start)
        with torch.no_grad():
            model.weight.copy_(trained)  # the inner phase
        diloco.pseudo_gradient()
        with torch.no_grad():
            model.weight.add_(1.0)  # tau more inner steps while the all-reduce ran
        newer = model.weight.detach().clone()
        diloco.apply(weight)
        results[weight] = (diloco.outer.clone(), model.weight.detach().clone(), newer)
    (outer_0, inner_0, _), (outer_5, inner_5, newer) = results[0.0], results[0.5]
    assert torch.equal(outer_0, outer_5)  # the outer step does not depend on the merge
    assert torch.equal(inner_0.reshape(-1), outer_0)  # 0: the blocking step's copy
    assert torch.allclose(inner_5, 0.5 * newer + 0.5 * outer_5.view_as(newer), atol=1e-6)


@pytest.mark.parametrize("error_feedback", [False, True])
def test_a_delta_landing_keeps_the_progress_since_the_boundary_on_top_of_the_new_outer_weights(error_feedback):
    torch.manual_seed(0)
    model = nn.Linear(16, 8)
    diloco = DiLoCo(model, lr=0.7, momentum=0.9, nesterov=True, error_feedback=error_feedback)
    if error_feedback:
        diloco.residual.copy_(torch.randn(diloco.residual.shape))  # the codec's backlog rides in the held contribution
    with torch.no_grad():
        model.weight.add_(torch.randn(8, 16))  # the inner phase
    diloco.set_weight_kept(own=0.98, run=0.98)  # the weight is decayed: its pseudo-gradient leaves the decay out
    diloco.hold_contribution()
    with torch.no_grad():
        model.weight.add_(0.25)  # tau more inner steps while the all-reduce ran
    diloco.pseudo_gradient()  # one island: the average is its own contribution
    diloco.apply(delta=True)
    assert torch.allclose(model.weight, diloco.outer[: 8 * 16].view(8, 16) + 0.25, atol=1e-5)
    assert torch.allclose(model.bias, diloco.outer[128:] + 0.0, atol=1e-5)  # a bias that did not move on keeps no progress


def test_every_attempt_averages_the_held_contribution_though_the_inner_weights_moved_on():
    model, diloco = diloco_on(torch.zeros(4, 4))
    with torch.no_grad():
        model.weight.fill_(1.0)
    held = diloco.hold_contribution().clone()
    with torch.no_grad():
        model.weight.fill_(5.0)  # trained on behind the all-reduce
    diloco.pseudo_grad.fill_(123.0)  # a failed ring leaves the buffer undefined
    assert torch.equal(diloco.pseudo_gradient(), held) and torch.equal(held, torch.full((16,), -1.0))
    diloco.release_contribution()
    assert torch.equal(diloco.pseudo_gradient(), torch.full((16,), -5.0))  # the next boundary's is computed afresh


def test_a_save_due_while_an_all_reduce_is_in_flight_is_taken_when_it_lands():
    cfg = JobConfig.model_validate({"train": {"steps": 12}, "checkpoint": {"every": 4, "at_end": True}})
    schedule = SaveSchedule(cfg)
    in_flight = {4, 5, 8, 9}  # begun at boundaries 4 and 8, landed after steps 6 and 10
    saved = [step for step in range(1, 13) if schedule.due(step, step == 12, step in in_flight)]
    assert saved == [6, 10, 12]


def test_blocked_time_is_not_compute_and_overlap_is_neither(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(sync_clock.time, "perf_counter", lambda: now[0])
    clock = SyncClock()
    now[0] += 3.0  # training
    with clock.blocked():
        now[0] += 1.0  # waiting at the barrier
    clock.pause(0.5)
    now[0] += 0.5  # evaluation, paused out
    now[0] += 4.0
    clock.overlapped(2.5)
    assert clock.take() == {"compute_s": 7.0, "sync_s": 1.0, "overlap_s": 2.5, "utilization": 7.0 / 8.0}
    now[0] += 1.0
    assert clock.take()["sync_s"] == 0.0 and clock.take()["overlap_s"] == 0.0


def test_a_flights_overlap_is_what_its_average_ran_before_the_landing():
    flight = Flight(3, fresh=False, behind=True, started=10.0, finished=13.0)
    assert flight.overlap_s(landing=12.0) == 2.0  # training then waited 1 s for it
    assert flight.overlap_s(landing=15.0) == 3.0
    assert Flight(3, fresh=False, started=10.0, finished=13.0).overlap_s(15.0) == 0.0  # blocking


def test_the_simulate_summary_prints_the_median_overlap_only_when_there_was_one(tmp_path):
    write_island(tmp_path, "island-0", 12_000_000, [0.1, 0.5, 0.2], [0.9, 0.8, 0.85])
    records = [json.loads(line) for line in (tmp_path / "island-0" / "metrics.jsonl").read_text().splitlines()]
    blocking = summarize(tmp_path)
    assert "overlap" not in blocking
    for record, overlap in zip((r for r in records if "outer_step" in r), [1.5, 2.5, 0.0]):
        record["overlap_s"] = overlap
    (tmp_path / "island-0" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert summarize(tmp_path) == blocking.replace("median sync 0.200 s,", "median sync 0.200 s, overlap 1.500 s,")


def test_the_progress_line_shows_the_overlap_of_an_outer_step_that_had_one():
    from atoll.metrics import _summary

    record = {"step": 12, "loss": 2.5, "outer_step": 3, "sync_s": 0.14, "overlap_s": 0.0, "utilization": 0.9, "bytes_sent": 2e6}
    assert "overlap" not in _summary(record) and "sync=0.14s utilization=90.0%" in _summary(record)
    assert "sync=0.14s overlap=0.33s utilization=90.0%" in _summary({**record, "overlap_s": 0.33})


def test_overlap_steps_must_land_before_the_next_boundary():
    with pytest.raises(ValidationError, match="overlap_steps .4. must be below diloco.inner_steps .4."):
        JobConfig.model_validate({"diloco": {"inner_steps": 4, "overlap_steps": 4}})
    with pytest.raises(ValidationError):
        JobConfig.model_validate({"diloco": {"merge_weight": 1.0}})


# --- real runs ------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(2 * RUN_TIMEOUT_S + 30)
def test_overlap_0_is_the_blocking_outer_step_bit_for_bit_whatever_the_merge_weight(tmp_path, cache_dir):
    simulate(tmp_path / "blocking", cache_dir, 2, 12)
    simulate(tmp_path / "tau0", cache_dir, 2, 12, extra=["--diloco.overlap_steps", "0", "--diloco.merge_weight", "0.9"])
    expected, got = losses_by_step(tmp_path / "blocking"), losses_by_step(tmp_path / "tau0")
    assert got == expected  # every loss and outer digest of both islands


@pytest.mark.timeout(RUN_TIMEOUT_S + 30)
def test_overlapped_islands_agree_at_every_outer_step_and_reject_a_nan_island_alike(tmp_path, cache_dir):
    # island-1's weights turn NaN after inner step 6, as outer step 1 (begun at 4) lands there: its
    # contribution to outer step 2 (begun at 8, landed at 10) is rejected by every island, and
    # it takes the outer weights whole at that landing (merging would keep its NaN: the guard's
    # own reset is put out of reach with train.max_skipped_inner 10)
    outer = simulate(tmp_path / "run", cache_dir, 3, 16, faults=["island-1=nan@inner:6"],
                     extra=[*OVERLAP, "--eval.every", "16", "--train.max_skipped_inner", "10"])

    steps = assert_live_islands_agree(outer)  # digest, epoch, world size and landing step per outer step
    assert [steps[s]["step"] for s in (1, 2, 3, 4)] == [6, 10, 14, 16]  # landed tau steps late; the last one blocks
    for records in outer.values():
        assert [r["rejected"] for r in records] == [[], ["island-1"], [], []]
        assert all(r["overlap_s"] > 0 for r in records[:3]) and records[3]["overlap_s"] == 0
    assert [r["skipped_inner"] for r in outer["island-1"]] == [0, 4, 4, 4]  # steps 7-10, none after the landing
    final = [records[-1] for records in outer.values()]
    # the last (blocking) step leaves every island on the same finite weights
    assert all(math.isfinite(r["val_loss"]) and r["val_loss"] == final[0]["val_loss"] for r in final)


@pytest.mark.timeout(RUN_TIMEOUT_S + 30)
def test_islands_meet_behind_training_so_a_stall_inside_a_phase_blocks_no_landing_of_the_others(tmp_path, cache_dir):
    # island-1 stalls 4 s after inner step 5, with outer step 1 (begun at 4) in flight: its barrier,
    # ring and result go on behind the stall, so island-0 lands step 1 at 6 on a decided outcome.
    # The stall is more than tau steps, so island-0 waits for island-1 once, at step 2's landing
    # (10), where island-1's boundary barrier (8) only then passes. (Agreed on the training thread,
    # island-0 waited at step 1's landing for island-1's result, posted after the stall.)
    outer = simulate(tmp_path / "run", cache_dir, 2, 12, faults=["island-1=sleep@inner:5:4"], extra=OVERLAP)

    assert_live_islands_agree(outer)
    first, second = (r["sync_s"] for r in outer["island-0"][:2])
    assert first < 2.0 < second, (first, second)
    assert all(r["attempts"] == 1 for r in outer["island-0"])


@pytest.mark.timeout(RUN_TIMEOUT_S + 30)
def test_survivors_agree_after_a_kill_during_an_overlapped_all_reduce(tmp_path, cache_dir):
    # island-1 dies as outer step 2's all-reduce starts behind training: the survivors' background
    # rings fail, they report it when the step lands, enter the next epoch and average again
    # (blocking, with the contributions they held) without island-1
    outer = simulate(tmp_path / "run", cache_dir, 3, 16, faults=["island-1=kill@allreduce:2"], extra=OVERLAP)

    steps = assert_live_islands_agree(outer)
    assert [steps[s]["world_size"] for s in (1, 2, 3, 4)] == [3, 2, 2, 2]
    assert steps[2]["attempts"] == 2 and steps[2]["epoch"] == 1 and not steps[2]["skipped"]
    assert [r["outer_step"] for r in outer["island-0"]] == [1, 2, 3, 4] == [r["outer_step"] for r in outer["island-2"]]
    assert membership(tmp_path / "run")[1]["left"] == {"island-1": "its control connection closed (process gone)"}


@pytest.mark.timeout(RUN_TIMEOUT_S + 30)
def test_a_peer_hung_during_a_fragments_overlapped_all_reduce_is_left_at_the_heartbeat_timeout(tmp_path, cache_dir):
    # 2 fragments, a fragment's outer step every 2 inner steps, landing 1 step later: island-1 is
    # stopped (SIGSTOP) as outer step 2's all-reduce (fragment 1, begun at 4) starts: the
    # survivors' background rings stall on it while they train; once the coordinator drops it at
    # the 3 s heartbeat timeout they abandon those rings, and the landing (5) redoes the step among
    # the two, long before the 100 s ring deadline
    outer = simulate(tmp_path / "run", cache_dir, 3, 16, faults=["island-1=stop@allreduce:2"],
                     extra=["--diloco.fragments", "2", "--diloco.overlap_steps", "1", "--mesh.collective_timeout_s", "100"])

    steps = assert_live_islands_agree(outer)
    assert [steps[s]["world_size"] for s in range(1, 9)] == [3] + [2] * 7
    assert [steps[s]["fragment"] for s in range(1, 9)] == [0, 1, 0, 1, 0, 1, 0, None]
    assert steps[2]["attempts"] == 2 and steps[2]["step"] == 5
    assert max(r["sync_s"] for name in ("island-0", "island-2") for r in outer[name] if r["outer_step"] == 2) < 50
    assert "no heartbeat" in membership(tmp_path / "run")[1]["left"]["island-1"]


@pytest.mark.slow
@pytest.mark.timeout(RUN_TIMEOUT_S + 30)
def test_an_island_killed_during_an_overlapped_all_reduce_rejoins_under_its_id_where_the_step_is_redone_with_it(tmp_path, cache_dir):
    # island-1 is killed (-9) as outer step 2's all-reduce starts behind training (begun at 8): the
    # others' rings fail, and they redo the step among the two at its landing (10). island-1 is
    # restarted under its id: it fetches the state and is admitted at a boundary barrier, which the members pass behind
    # training: they enter the new epoch at the landing (never with an all-reduce in flight) and
    # redo the step there, blocking, with the joiner's empty contribution; the joiner's outer step
    # uses the boundary's weight decay, anneal and fragment, so every digest agrees at once.
    # island-0 stalls 8 s after inner step 40, so that the restart (seconds) finds the run going
    outer = simulate(tmp_path / "run", cache_dir, 3, 4 * JOIN_OUTER_STEPS, faults=["island-1=kill@allreduce:2", "island-0=sleep@inner:40:8"],
                     starts=["island-1@1"], extra=OVERLAP)

    steps = assert_live_islands_agree(outer)  # the returning island's records too: digest, epoch, world and step
    lives = [r["outer_step"] for r in outer["island-1"]]
    back, end = lives[1], JOIN_OUTER_STEPS + 1
    assert lives == [1, *range(back, end)] and back > 2
    assert [steps[s]["world_size"] for s in range(1, end)] == [3] + [2] * (back - 2) + [3] * (end - back)
    first = outer["island-1"][1]
    assert first["step"] % 4 == 2 and first["contribution_norms"]["island-1"] == 0.0 and first["overlap_s"] == 0
    assert steps[back]["attempts"] == 1  # a barrier passed again is no failed attempt
    events = membership(tmp_path / "run")
    assert events[1]["left"]["island-1"] == "its control connection closed (process gone)" and events[2]["joined"] == ["island-1"]


@pytest.mark.timeout(TIMEOUT_S + 60)
def test_a_coordinator_killed_and_restarted_during_an_overlapped_all_reduce_continues_the_run(tmp_path, cache_dir):
    # the coordinator dies as island a logs inner step 12, where outer step 3 began: its all-reduce
    # runs behind training (island to island, no coordinator needed) and its landing at step 14
    # meets no coordinator for 2 s, then the restarted one resumes the run from its journal
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    port = free_port()
    coordinator_args = ["coordinator", "--port", str(port), "--islands", "2", "--heartbeat-timeout", "3",
                        "--events", str(run_dir / "membership.jsonl")]
    coordinator = atoll(coordinator_args, run_dir / "coordinator-1.log")
    address = f"{LOOPBACK}:{port}"
    procs = [island(address, name, run_dir, 48, cache_dir, *OVERLAP) for name in ("a", "b")]
    restarted = None
    try:
        began = lambda: (run_dir / "a" / "metrics.jsonl").is_file() and any(r["step"] >= 12 for r in read_metrics(run_dir / "a"))
        wait_for(began, TIMEOUT_S, "inner step 12", [coordinator, *procs])
        os.killpg(coordinator.pid, signal.SIGKILL)
        coordinator.wait()
        time.sleep(2.0)
        restarted = atoll(coordinator_args, run_dir / "coordinator-2.log")
        codes = finish([*procs, restarted], run_dir)
    finally:
        finish([coordinator, *([restarted] if restarted else [])], run_dir)
    assert codes == [0, 0, 0], logs(run_dir)
    outer = {name: outer_steps(run_dir, name) for name in ("a", "b")}
    steps = assert_live_islands_agree(outer)
    assert sorted(steps) == list(range(1, 13)) and {s["world_size"] for s in steps.values()} == {2}
    assert [steps[s]["step"] for s in range(1, 13)] == [*range(6, 48, 4), 48]  # landed tau late, the last blocking
    assert "resumed run" in (run_dir / "coordinator-2.log").read_text()


def simulate_args(run_dir, cache_dir: str, *extra: str) -> list[str]:
    return [
        "simulate", "configs/debug.toml", "--islands", "2", "--run-dir", str(run_dir),
        "--train.steps", "12", "--diloco.inner_steps", "4", "--schedule.warmup_steps", "2", "--eval.every", "0",
        "--metrics.log_every", "1", "--checkpoint.every", "4", "--checkpoint.keep", "5", "--checkpoint.at_end", "false", "--data.cache_dir", cache_dir,
        "--mesh.heartbeat_interval_s", "0.5", "--mesh.heartbeat_timeout_s", "3", *OVERLAP, *extra,
    ]


@pytest.mark.slow
@pytest.mark.timeout(3 * RUN_TIMEOUT_S + 30)
def test_a_whole_run_stopped_with_an_all_reduce_in_flight_resumes_exactly(tmp_path, cache_dir):
    # 2 fragments (diloco.fragments): a fragment every 2 steps, its all-reduce landing 1 step later.
    # Saves due at steps 4 and 8 fall while one is in flight: they are taken at 5 and 9, where it
    # has landed (12, the last step, averages both fragments, blocking). Both islands stop at inner
    # step 9, fragment 1's outer step 4 in flight (begun at 8), before its landing and the save:
    # the resumed run starts from step 5 and must reproduce every loss and outer digest
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    fragments = ["--diloco.fragments", "2", "--diloco.overlap_steps", "1"]
    try:
        result = run_atoll(simulate_args(whole, cache_dir, *fragments), RUN_TIMEOUT_S)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert sorted(p.name for p in (whole / "island-0" / "checkpoints").glob("step-*")) == ["step-00000005", "step-00000009", "step-00000012"]
        stops = ["--fault", "island-0=term@inner:9", "--fault", "island-1=term@inner:9"]
        run_atoll(simulate_args(stopped, cache_dir, *fragments, *stops), RUN_TIMEOUT_S)
        assert max(losses_by_step(stopped)["island-0"]) < 10  # it did stop
        result = run_atoll(simulate_args(stopped, cache_dir, *fragments, "--resume"), RUN_TIMEOUT_S)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert "resumed at step 5" in result.stdout
    finally:
        assert kill_leftovers(whole, stopped) == []
    expected, got = losses_by_step(whole), losses_by_step(stopped)
    for name in ("island-0", "island-1"):
        assert sorted(got[name]) == list(range(1, 13))
        assert got[name] == expected[name], name  # bit-identical losses and outer digests


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("token-cache"))
