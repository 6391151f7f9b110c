"""Checkpoint operations as an operator meets them, with real processes and hard timeouts:
rollback, a corrupt latest, a fresh run into a used directory, two islands in one directory,
and kill -9 during a background save."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import losses_by_step, read_metrics, run_atoll

from atoll.checkpoint import Checkpointer, newest_verified, read_manifest
from atoll.mesh.coordinator import Coordinator
from atoll.mesh.membership import Rules

TIMEOUT = 180


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("token-cache"))


def train_args(run_dir: Path, cache_dir: str, steps: int, *extra: str) -> list[str]:
    return [
        "train", "configs/debug.toml", "--run-dir", str(run_dir), "--train.steps", str(steps),
        "--train.global_batch", "8", "--train.seq_len", "64", "--schedule.warmup_steps", "2",
        "--eval.every", "0", "--metrics.log_every", "2", "--checkpoint.every", "4", "--checkpoint.keep", "3",
        "--data.cache_dir", cache_dir, *extra,
    ]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, cache_dir) -> Path:
    """A run of 12 steps with checkpoints at 4, 8 and 12; tests work on copies of it."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    result = run_atoll(train_args(run_dir, cache_dir, 12), TIMEOUT)
    assert result.returncode == 0, result.stderr
    return run_dir


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(run_dir, target)
    return target


def checkpoint_names(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step-"))


def test_rollback_keeps_the_checkpoint_it_came_from_and_metrics_continue_without_duplicates(finished_run, tmp_path, cache_dir):
    run_dir = copy_of(finished_run, tmp_path)
    result = run_atoll(train_args(run_dir, cache_dir, 24, "--resume", str(run_dir / "checkpoints" / "step-00000004")), TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert "resumed at step 4" in result.stdout and "(timeline 1)" in result.stdout
    # keep 3 pruned the new timeline's own 8-t1 and 12-t1, never the old timeline's checkpoints
    assert checkpoint_names(run_dir) == [
        "step-00000004", "step-00000008", "step-00000012", "step-00000016-t1", "step-00000020-t1", "step-00000024-t1",
    ]
    assert Checkpointer(run_dir / "checkpoints", 3, True).latest().name == "step-00000024-t1"
    steps = [r["step"] for r in read_metrics(run_dir)]
    assert steps == list(range(2, 25, 2))
    abandoned = [json.loads(line)["step"] for line in (run_dir / "metrics.abandoned.jsonl").read_text().splitlines()]
    assert abandoned == [6, 8, 10, 12]
    blocked = {r["step"]: r["checkpoint_blocked_s"] for r in read_metrics(run_dir) if "checkpoint_blocked_s" in r}
    assert {4, 8, 12, 16, 20, 24} <= set(blocked) and all(seconds > 0 for seconds in blocked.values())
    assert read_metrics(run_dir)[-1]["checkpoint_step"] == 24 and read_metrics(run_dir)[-1]["checkpoint_s"] > 0

    again = run_atoll(train_args(run_dir, cache_dir, 24, "--resume"), TIMEOUT)
    assert again.returncode == 0, again.stderr
    assert "the run is complete" in again.stdout and "step 24 of train.steps 24" in again.stdout
    assert [r["step"] for r in read_metrics(run_dir)] == steps


def test_extending_a_finished_run_names_the_changed_keys_and_what_its_lr_does(finished_run, tmp_path, cache_dir):
    run_dir = copy_of(finished_run, tmp_path)
    result = run_atoll(train_args(run_dir, cache_dir, 16, "--resume", "--train.z_loss_weight", "1e-4"), TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert "; note: the config differs from the checkpoint's: train.steps 12 -> 16, train.z_loss_weight 0.0 -> 0.0001\n" in result.stdout
    assert ("atoll: train.steps 12 -> 16: the LR schedule now spans 16 steps (it is a function of the step and train.steps "
            "alone, so every island agrees), so the LR goes from 0 (step 12 of the old schedule) to 0.003 at step 13; to extend "
            "it without raising the LR, resume from a checkpoint at or before step 10, where its decay began") in result.stdout
    lr = {r["step"]: r["lr"] for r in read_metrics(run_dir)}
    assert lr[10] == pytest.approx(0.003) and lr[12] == 0.0  # the first 12 steps' schedule decayed over steps 11-12
    assert lr[14] == pytest.approx(0.002) and lr[16] == 0.0  # the new one decays over steps 14-16


def test_flipped_bytes_and_a_truncated_shard_in_latest_fall_back_with_one_line_each(finished_run, tmp_path, cache_dir):
    run_dir = copy_of(finished_run, tmp_path)
    shard = run_dir / "checkpoints" / "step-00000012" / "__0_0.distcp"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 3] ^= 0x10
    shard.write_bytes(bytes(raw))
    truncated = run_dir / "checkpoints" / "step-00000008" / "__0_0.distcp"
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])

    result = run_atoll(train_args(run_dir, cache_dir, 12, "--resume"), TIMEOUT)
    assert result.returncode == 0, result.stderr
    reports = [line for line in result.stdout.splitlines() if "falling back" in line]
    assert len(reports) == 2, result.stdout
    assert "step-00000012" in reports[0] and "__0_0.distcp" in reports[0] and "sha256" in reports[0]
    assert "step-00000008" in reports[1] and "__0_0.distcp" in reports[1] and "truncated" in reports[1]
    assert "resumed at step 4" in result.stdout
    assert "Traceback" not in result.stderr and all(torch.isfinite(torch.tensor(r["loss"])) for r in read_metrics(run_dir))
    assert (run_dir / "checkpoints" / "step-00000012").is_dir()  # kept for inspection, never loaded
    assert Checkpointer(run_dir / "checkpoints", 3, True).latest().name == "step-00000012-t1"


def test_fresh_run_into_a_used_directory_is_refused_in_one_line(finished_run, tmp_path, cache_dir):
    run_dir = copy_of(finished_run, tmp_path)
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != ".atoll.lock"}
    result = run_atoll(train_args(run_dir, cache_dir, 12), TIMEOUT)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert "already holds a run" in result.stderr and "--resume" in result.stderr and "--run-dir" in result.stderr
    after = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != ".atoll.lock"}
    assert after == before


def test_a_remote_store_that_always_fails_never_stops_training(tmp_path, cache_dir):
    (tmp_path / "bucket").write_text("a file where the remote directory should be")
    run_dir = tmp_path / "run"
    result = run_atoll(train_args(run_dir, cache_dir, 8, "--checkpoint.remote", f"file://{tmp_path}/bucket/island-0",
                                  "--checkpoint.remote_attempts", "2", "--checkpoint.remote_backoff_s", "0"), TIMEOUT)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    errors = {r["step"]: r["checkpoint_remote_error"] for r in read_metrics(run_dir) if "checkpoint_remote_error" in r}
    assert "remote copy of step-00000008" in errors[8] and set(errors) <= {6, 8}, errors  # step 4's in a later record
    assert all("failed (2 attempt(s)" in e and "training goes on" in e for e in errors.values())
    assert sum("atoll: checkpoint: remote copy of step-" in line for line in result.stdout.splitlines()) == 2
    assert checkpoint_names(run_dir) == ["step-00000004", "step-00000008"] and read_metrics(run_dir)[-1]["step"] == 8


def test_a_failed_start_leaves_no_run_directory_behind(tmp_path, cache_dir):
    result = run_atoll(train_args(tmp_path / "runs" / "new", cache_dir, 4, "--data.source", str(tmp_path / "no-corpus")), TIMEOUT)
    assert result.returncode == 2 and "no-corpus" in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_an_island_restarted_without_resume_into_its_own_directory_keeps_the_old_runs_checkpoints_aside(tmp_path, cache_dir):
    island_dir = tmp_path / "berlin"
    outputs = []
    for run, steps, every in ((1, 8, 4), (2, 4, 2)):  # two runs, each with its own coordinator, same island id and directory
        coordinator = Coordinator("127.0.0.1", 0, 1, Rules(), tmp_path / f"membership-{run}.jsonl").start()
        try:
            result = run_atoll(train_args(island_dir, cache_dir, steps, "--coordinator", coordinator.address, "--island-id", "berlin",
                                          "--diloco.inner_steps", "2", "--checkpoint.every", str(every), "--checkpoint.keep", "2"), TIMEOUT)
        finally:
            coordinator.stop()
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        outputs.append(result.stdout)
    assert (f"atoll: checkpoints: {island_dir / 'checkpoints'} holds another run's checkpoints (newest step-00000008); "
            "this fresh run writes timeline 1 beside them and never prunes or resumes from them") in outputs[1]
    # the old run's newest two are kept aside; the new run's are pruned among themselves only
    assert checkpoint_names(island_dir) == ["step-00000002-t1", "step-00000004", "step-00000004-t1", "step-00000008"]
    assert Checkpointer(island_dir / "checkpoints", 2, True).latest().name == "step-00000004-t1"
    runs = {name: read_manifest(island_dir / "checkpoints" / name).run_id for name in checkpoint_names(island_dir)}
    assert runs["step-00000004-t1"] == runs["step-00000002-t1"] != runs["step-00000008"] == runs["step-00000004"]


def test_a_second_island_in_a_directory_in_use_is_refused_by_the_lock(tmp_path, cache_dir):
    run_dir = tmp_path / "shared"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(
        [sys.executable, "-m", "atoll.cli", *train_args(run_dir, cache_dir, 100000, "--island-id", "berlin")],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not (run_dir / ".atoll.lock").is_file() or not (run_dir / ".atoll.lock").read_text():
            assert time.monotonic() < deadline and first.poll() is None, "the first island never took the lock"
            time.sleep(0.2)
        second = run_atoll(train_args(run_dir, cache_dir, 12, "--island-id", "paris", "--resume"), TIMEOUT)
        assert second.returncode == 2
        assert f"in use by island 'berlin' (pid {first.pid}" in second.stderr and "Traceback" not in second.stderr
        assert first.poll() is None  # the first island trains on
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)


CHILD = textwrap.dedent("""
    import sys
    from pathlib import Path
    import torch, torch.distributed as dist
    from atoll.checkpoint import Checkpointer
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    checkpointer = Checkpointer(Path(sys.argv[1]), keep=2, is_leader=True)
    checkpointer.start(None)
    state = {"w": {"t": torch.ones(16 << 20)}}  # 64 MiB: the write and hash outlast the kill
    checkpointer.save(1, state)
    checkpointer.wait()
    state["w"]["t"].fill_(2.0)
    checkpointer.save(2, state)
    checkpointer.staged(everything=True)
    print("staged", flush=True)
    checkpointer.wait()
    print("written", flush=True)
""")


def test_kill_9_during_a_background_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    directory = tmp_path / "checkpoints"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(directory)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        line = child.stdout.readline()
        assert line.strip() == "staged", child.stderr.read()
        os.killpg(child.pid, signal.SIGKILL)  # the save of step 2 is being written in the background
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait(timeout=30)
    assert not (directory / "step-00000002").exists(), "the kill came too late: step 2 was already published"
    found = newest_verified(directory)
    assert found is not None and found.path.name == "step-00000001"
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        state = {"w": {"t": torch.zeros(16 << 20)}}
        Checkpointer(directory, keep=2, is_leader=True).load(found.path, state)
        assert bool((state["w"]["t"] == 1.0).all())
    finally:
        dist.destroy_process_group()


def simulate_args(run_dir: Path, cache_dir: str, *extra: str) -> list[str]:
    return [
        "simulate", "configs/debug.toml", "--islands", "2", "--procs-per-island", "2", "--run-dir", str(run_dir),
        "--train.steps", "20", "--diloco.inner_steps", "4", "--schedule.warmup_steps", "2", "--eval.every", "0",
        "--metrics.log_every", "1", "--checkpoint.every", "8", "--checkpoint.at_end", "false", "--data.cache_dir", cache_dir,
        "--mesh.heartbeat_interval_s", "0.5", "--mesh.heartbeat_timeout_s", "3", *extra,
    ]


@pytest.mark.timeout(3 * TIMEOUT)
def test_a_whole_run_stopped_and_resumed_reproduces_the_uninterrupted_losses(tmp_path, cache_dir):
    # 2 islands x 2 local ranks; both islands stop at inner step 14 (after the checkpoint of step
    # 8, outer step 2); `simulate --resume` with a new coordinator continues from outer step 2
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    result = run_atoll(simulate_args(whole, cache_dir), TIMEOUT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    faults = ["--fault", "island-0=term@inner:14", "--fault", "island-1=term@inner:14"]
    run_atoll(simulate_args(stopped, cache_dir, *faults), TIMEOUT)
    assert max(losses_by_step(stopped)["island-0"]) < 20  # it did stop
    result = run_atoll(simulate_args(stopped, cache_dir, "--resume"), TIMEOUT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    assert "resumed at step 8" in result.stdout and (stopped / "membership.journal.1").is_file()
    expected, got = losses_by_step(whole), losses_by_step(stopped)
    digests = {island: {step: d for step, (_, d) in steps.items() if d is not None} for island, steps in expected.items()}
    assert digests["island-0"] == digests["island-1"] and len(digests["island-0"]) == 5  # the islands agree at every outer step
    for island in ("island-0", "island-1"):
        assert sorted(got[island]) == list(range(1, 21))  # no duplicated or missing steps
        assert got[island] == expected[island], island  # bit-identical losses and outer digests
