"""Run-wide settings with real processes: an island whose settings would change the run's numbers
is refused at registration, naming the keys; one that differs only in per-island settings joins."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from conftest import read_metrics
from test_operations import TIMEOUT_S, TOKEN, finish, island, logs, wait_for

from atoll import errors
from atoll.mesh.coordinator import Coordinator
from atoll.mesh.membership import Rules


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("token-cache"))


def in_a_world_of_two(island_dir: Path) -> bool:
    return (island_dir / "metrics.jsonl").is_file() and any(r.get("world_size") == 2 for r in read_metrics(island_dir))


@pytest.mark.timeout(TIMEOUT_S + 60)
def test_an_island_with_another_lr_is_refused_naming_it_and_per_island_settings_join(tmp_path, cache):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    coord = Coordinator("127.0.0.1", 0, 1, Rules(heartbeat_timeout_s=3), run_dir / "membership.jsonl", TOKEN).start()
    procs = []
    try:
        procs.append(island(coord.address, "a", run_dir, 100000, cache))
        wait_for(lambda: (run_dir / "a" / "metrics.jsonl").is_file(), TIMEOUT_S, "island a training", procs)
        refused = island(coord.address, "b", run_dir, 100000, cache, "--optim.lr", "1e-3", "--train.z_loss_weight", "2e-4")
        refused.wait(timeout=TIMEOUT_S)
        procs.append(island(coord.address, "c", run_dir, 100000, cache, "--train.micro_batch", "2", "--checkpoint.keep", "7"))
        wait_for(lambda: in_a_world_of_two(run_dir / "c"), TIMEOUT_S, "island c in the run", procs)
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        finish(procs, run_dir)
        coord.stop()
    refusal = (run_dir / "b.log").read_text()
    assert refused.returncode == errors.CONFIG_MISMATCH, logs(run_dir)
    assert "Traceback" not in refusal and refusal.count("differs from the run's") == 1
    assert "optim.lr: run has 0.003, island has 0.001" in refusal and "train.z_loss_weight: run has 0.0, island has 0.0002" in refusal
    assert "micro_batch" not in refusal and "checkpoint.keep" not in refusal
