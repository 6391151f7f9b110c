"""`atoll simulate`: supervising island processes, the run summary, and one real two-island run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO

from atoll.cli import EXIT_USER_ERROR, main
from atoll.comm.allreduce import ring_bytes
from atoll.simulate import Scenario, Signal, _wait_all, signal_waits, summarize

DEBUG_CONFIG = str(REPO / "configs" / "debug.toml")
RUN_TIMEOUT_S = 240


def start(code: str) -> subprocess.Popen:
    """A child Python process in its own session, as `simulate` starts islands."""
    return subprocess.Popen([sys.executable, "-c", code], start_new_session=True)


def kill(*children: subprocess.Popen) -> None:
    for child in children:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait(timeout=10)


# --- _wait_all: supervising the islands ----------------------------------------------------------


def test_wait_all_returns_the_failed_island_and_terminates_the_others():
    sleeper = start("import time; time.sleep(60)")
    failing = start("import sys; sys.exit(3)")
    try:
        begin = time.monotonic()
        failed = _wait_all({"sleeper": sleeper, "failing": failing})
        assert time.monotonic() - begin < 30  # not the sleeper's 60 s

        assert failed == ["failing"]
        assert failing.returncode == 3
        sleeper.wait(timeout=10)
        assert sleeper.returncode == -signal.SIGTERM
    finally:
        kill(sleeper, failing)


def test_wait_all_returns_nothing_when_every_island_succeeds():
    children = {"a": start("pass"), "b": start("import time; time.sleep(0.5)")}
    try:
        assert _wait_all(children) == []
        assert [c.returncode for c in children.values()] == [0, 0]
    finally:
        kill(*children.values())


# --- summarize: the lines a user reads at the end -----------------------------------------------

PARAMS = 1_000_000
STEPS = 12


def write_island(run_dir: Path, name: str, bytes_sent: int, syncs: list[float], utils: list[float]) -> None:
    """An island directory as train.py writes it: run.json and metrics.jsonl with outer-step records."""
    island = run_dir / name
    island.mkdir(parents=True)
    (island / "run.json").write_text(json.dumps({
        "init_digest": "ab" * 32, "params": {"total": PARAMS, "non_embedding": PARAMS // 2},
        "local_ranks": 1, "device": "cpu", "start_step": 0, "island_id": name,
        "islands": ["island-0", "island-1"], "mode": "diloco",
    }))
    per_outer = bytes_sent // len(syncs)
    records = [{"step": 2, "loss": 5.0, "lr": 1e-3, "world_size": 2, "bytes_sent": 0, "bytes_recv": 0}]
    for i, (sync_s, util) in enumerate(zip(syncs, utils), start=1):
        records.append({
            "step": 4 * i, "loss": 4.0 - i * 0.25, "lr": 1e-3,
            "outer_step": i, "compute_s": 1.0, "sync_s": sync_s, "utilization": util, "outer_digest": "cd" * 32,
            "bytes_sent": per_outer * i, "bytes_recv": per_outer * i, "world_size": 2,
        })
        if i >= 2:  # evaluated at the last two outer steps only: the summary shows the latest
            records[-1]["val_loss"] = 4.5 - i * 0.25
    (island / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_summary_reports_bytes_against_data_parallel_sync_time_and_utilization(tmp_path):
    write_island(tmp_path, "island-0", 12_000_000, [0.1, 0.5, 0.2], [0.9, 0.8, 0.85])
    write_island(tmp_path, "island-1", 15_000_000, [0.3, 0.1, 0.7], [0.5, 0.6, 0.75])
    (tmp_path / "not-an-island").mkdir()

    # data-parallel: 12 steps x ring_bytes(1e6 fp32 params, 2 islands) = 12 x 4 MB = 48 MB
    assert STEPS * ring_bytes(PARAMS, 4, 2) == 48_000_000
    assert summarize(tmp_path).splitlines() == [
        (
            "island-0: loss 3.2500, val_loss 3.7500; sent 12.0 MB vs 48.0 MB for data-parallel (4x fewer); "
            "3 outer steps, median sync 0.200 s, utilization 85.0%"
        ),
        (  # 48 / 15 = 3.2; mean(0.5, 0.6, 0.75) = 0.6167
            "island-1: loss 3.2500, val_loss 3.7500; sent 15.0 MB vs 48.0 MB for data-parallel (3x fewer); "
            "3 outer steps, median sync 0.300 s, utilization 61.7%"
        ),
    ]


def test_summary_shows_kilobytes_sent_under_1_mb_to_three_digits(tmp_path):
    write_island(tmp_path, "island-0", 19_300, [0.1, 0.5, 0.2], [0.9, 0.8, 0.85])  # a topk run's bytes

    assert "sent 0.0193 MB vs 48.0 MB for data-parallel (2487x fewer)" in summarize(tmp_path)


def test_summary_of_a_run_without_evaluation_has_no_val_loss(tmp_path):
    write_island(tmp_path, "island-0", 12_000_000, [0.1, 0.5, 0.2], [0.9, 0.8, 0.85])
    metrics = tmp_path / "island-0" / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    metrics.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "val_loss"}) + "\n" for r in records))

    line = summarize(tmp_path)

    assert line.startswith("island-0: loss 3.2500")
    assert "sent 12.0 MB vs 48.0 MB" in line
    assert "val_loss" not in line


def test_summary_of_a_joiner_that_entered_at_the_last_outer_step_says_it_trained_nothing(tmp_path):
    write_island(tmp_path, "island-0", 12_000_000, [0.1, 0.5, 0.2], [0.9, 0.8, 0.85])
    write_island(tmp_path, "island-3", 0, [0.1], [0.0])
    metrics = tmp_path / "island-3" / "metrics.jsonl"  # its only record: the outer step it entered at
    metrics.write_text(json.dumps({"step": 12, "outer_step": 3, "sync_s": 0.1, "world_size": 2, "bytes_sent": 0}) + "\n")

    lines = summarize(tmp_path).splitlines()

    assert lines[0].startswith("island-0: loss 3.2500")
    assert lines[1] == "island-3: entered at the run's last outer step; it trained no steps"


def test_a_kill_waits_until_the_run_would_keep_its_floor_of_members(tmp_path):
    scenario = tmp_path / "chaos.toml"
    scenario.write_text('keep_alive = 2\n\n[[signal]]\nisland = "island-1"\naction = "kill"\nafter_outer = 3\n')
    parsed = Scenario.parse(scenario, [], [])
    assert parsed.keep_alive == 2 and parsed.signals == [Signal("island-1", "kill", 3)]
    kill = parsed.signals[0]
    assert signal_waits(kill, ["island-0", "island-1"], 4, 2, None)  # island-3 started but not admitted yet
    assert not signal_waits(kill, ["island-0", "island-1", "island-3"], 4, 2, None)
    assert not signal_waits(kill, ["island-0", "island-2"], 4, 2, None)  # not a member: nobody is lost
    # island-2 was killed in epoch 4 and still counts there: wait for the epoch without it
    assert signal_waits(kill, ["island-0", "island-1", "island-2", "island-3"], 4, 2, 4)
    assert not signal_waits(kill, ["island-0", "island-1", "island-3"], 5, 2, 4)
    assert not signal_waits(Signal("island-1", "cont", 3), ["island-1"], 4, 2, None)
    assert not signal_waits(kill, ["island-1"], 4, 0, None)  # no floor unless the scenario sets one


# --- CLI errors, as a user sees them ------------------------------------------------------------


def test_simulate_with_zero_islands_is_one_line_and_exit_2(capsys):
    code = main(["simulate", "--islands", "0", DEBUG_CONFIG])

    out, err = capsys.readouterr()
    assert code == EXIT_USER_ERROR == 2
    assert out == ""
    assert err.splitlines() == ["atoll: error: --islands and --procs-per-island must be at least 1"]


def test_coordinator_with_zero_islands_is_one_line_and_exit_2(capsys):
    code = main(["coordinator", "--islands", "0"])

    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    assert err.splitlines() == ["atoll: error: --islands must be at least 1, got 0"]


# --- one real run -------------------------------------------------------------------------------


def descendants(pid: int) -> list[int]:
    """Every live descendant of `pid` (islands run in their own sessions, so killpg misses them)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def run_simulate(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    """`python -m atoll.cli simulate ARGS`; on timeout kill it and every island it started."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "atoll.cli", "simulate", *args],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in descendants(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"atoll simulate did not finish in {timeout}s\n{out}\n{err}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.timeout(RUN_TIMEOUT_S + 30)
def test_two_simulated_islands_train_in_step_and_report_a_summary(tmp_path):
    run_dir = tmp_path / "run"
    result = run_simulate([
        "--islands", "2", DEBUG_CONFIG, "--run-dir", str(run_dir),
        "--train.steps", "12", "--diloco.inner_steps", "4",
        "--eval.every", "0",
        "--data.cache_dir", str(tmp_path / "cache"),
    ], RUN_TIMEOUT_S)
    assert result.returncode == 0, result.stdout + result.stderr

    records = {name: [json.loads(line) for line in (run_dir / name / "metrics.jsonl").read_text().splitlines()]
               for name in ("island-0", "island-1")}
    outer = {name: [r for r in recs if "outer_step" in r] for name, recs in records.items()}
    for name, recs in records.items():
        assert [r["outer_step"] for r in outer[name]] == [1, 2, 3], name
        assert [r["step"] for r in outer[name]] == [4, 8, 12], name
        assert all(r["world_size"] == 2 for r in recs), name
        info = json.loads((run_dir / name / "run.json").read_text())
        assert info["island_id"] == name
        assert sorted(info["islands"]) == ["island-0", "island-1"]
    for first, second in zip(outer["island-0"], outer["island-1"]):
        assert first["outer_digest"] == second["outer_digest"], first["outer_step"]
        assert first["bytes_sent"] == second["bytes_sent"] > 0
    assert outer["island-0"][0]["bytes_sent"] < outer["island-0"][-1]["bytes_sent"]  # cumulative

    lines = result.stdout.splitlines()
    assert any(line.startswith("[island-0] ") for line in lines)
    assert any(line.startswith("[island-1] ") for line in lines)
    finished = lines.index(f"atoll: all 2 islands finished; run dir {run_dir}")
    # before it: the islands' lines, prefixed, and the launcher's own log lines (the status page's address)
    assert all(line.startswith(("[island-0] ", "[island-1] ")) or " simulate atoll: " in line for line in lines[:finished])
    summary = lines[finished + 1:-1]
    assert lines[-1] == f"atoll: summary in {run_dir / 'summary.json'}; plots: atoll report {run_dir}"
    assert [line.split(":", 1)[0] for line in summary] == ["island-0", "island-1"]
    assert all("3 outer steps" in line and "val_loss" not in line for line in summary)
