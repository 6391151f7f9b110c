"""Every expected failure of a run ends in one line and its documented exit code (`atoll.errors`).

Real processes where the behaviour is (an island as a user starts it, against a coordinator in
the test process), each with a hard timeout; the client's notice of what it waits for is timed
in-process. No test leaves a process behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import REPO, free_port, run_atoll
from test_operations import LOOPBACK, TIMEOUT_S, TOKEN, TRAIN_ARGS, finish, island, logs, outer_steps, wait_for

from atoll import errors
from atoll.config import JobConfig
from atoll.mesh.membership import Epoch
from atoll.epoch_entry import EpochEntry
from atoll.cli import main
from atoll.errors import DEBUG_ENV, UserError
from atoll.faults import FAULTS_ENV
from atoll.mesh.auth import TOKEN_ENV
from atoll.mesh.client import CoordinatorClient, new_incarnation, register, wait_for_admission
from atoll.mesh.coordinator import Coordinator
from atoll.mesh.membership import Rules

QUICK_S = 2.0
"""What a waiting client says first, it says within this long."""


def one_line(output: str) -> str:
    """The single error line of a failed run's output; fails on a traceback or a second error line."""
    assert "Traceback" not in output and "[rank" not in output, output[-3000:]
    lines = [line for line in output.splitlines() if line.startswith("atoll: error:")]
    assert len(lines) == 1, output[-3000:]
    return lines[0]


@pytest.fixture
def with_token(monkeypatch) -> None:
    monkeypatch.setenv(TOKEN_ENV, TOKEN)  # run_atoll passes the test's environment on


def train_alone(coordinator: str, name: str, run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    """`atoll train` of the debug model as island `name`, run to its end (hard timeout)."""
    return run_atoll(["train", *TRAIN_ARGS, "--train.steps", "8", "--coordinator", coordinator, "--island-id", name,
                      "--run-dir", str(run_dir / name), *extra], TIMEOUT_S)


def test_exit_codes_are_distinct_and_each_is_described():
    codes = [errors.USER_ERROR, errors.LOST_COORDINATOR, errors.DROPPED, errors.SKIPPED_STEPS, errors.RUN_ENDED,
             errors.CANNOT_ENTER, errors.DUPLICATE, errors.CONFIG_MISMATCH]
    assert len(set(codes)) == len(codes) and set(codes) == set(errors.EXIT_CODES) and 1 not in codes
    readme = (REPO / "README.md").read_text()
    assert all(f"| {code} |" in readme for code in codes)


def test_a_client_says_within_two_seconds_what_it_waits_for_and_until_when():
    address = f"{LOOPBACK}:{free_port()}"
    said: list[tuple[float, str]] = []
    start = time.monotonic()
    with pytest.raises(UserError) as err:
        CoordinatorClient(address, "x", "i", None, 3.0, 3.0, log=lambda line: said.append((time.monotonic() - start, line)))
    assert said and said[0][0] < QUICK_S
    assert address in said[0][1] and "until" in said[0][1] and "UTC" in said[0][1] and len(said) == 1
    assert address in str(err.value) and "\n" not in str(err.value)


def test_an_expected_failure_is_one_line_and_debug_adds_its_traceback(capsys, monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    assert main(["coordinator", "--islands", "0"]) == errors.USER_ERROR
    assert capsys.readouterr().err == "atoll: error: --islands must be at least 1, got 0\n"
    monkeypatch.setenv(DEBUG_ENV, "")  # restored after the test: --debug sets it for the ranks it starts
    assert main(["--debug", "coordinator", "--islands", "0"]) == errors.USER_ERROR
    err = capsys.readouterr().err
    assert "Traceback" in err and err.endswith("atoll: error: --islands must be at least 1, got 0\n")


@pytest.mark.timeout(TIMEOUT_S + 30)
def test_an_unresolvable_coordinator_host_is_one_line_naming_the_address_and_the_fix(tmp_path):
    result = run_atoll(["train", *TRAIN_ARGS, "--train.steps", "8", "--coordinator", "nohost.invalid:29400",
                        "--run-dir", str(tmp_path / "run")], TIMEOUT_S)
    assert result.returncode == errors.USER_ERROR
    line = one_line(result.stdout + result.stderr)
    assert "nohost.invalid:29400" in line and "--coordinator" in line


@pytest.mark.timeout(TIMEOUT_S + 30)
def test_an_unreachable_coordinator_is_said_before_the_island_builds_anything(tmp_path, with_token):
    address = f"{LOOPBACK}:{free_port()}"
    result = train_alone(address, "a", tmp_path, "--mesh.connect_timeout_s", "3", "--data.cache_dir", str(tmp_path / "cache"))
    assert result.returncode == errors.USER_ERROR
    said = result.stdout + result.stderr  # the wait is a log line (stdout), the failure one line on stderr
    assert f"waiting for the coordinator at {address}" in said and "until" in said
    assert address in one_line(result.stdout + result.stderr) and "debug model" not in result.stdout
    assert not (tmp_path / "a").exists()


@pytest.mark.timeout(3 * TIMEOUT_S)
def test_a_duplicate_id_a_mismatched_config_and_an_ended_run_are_refused_in_one_line_each(tmp_path, with_token):
    coord = Coordinator(LOOPBACK, 0, 2, Rules(heartbeat_timeout_s=3), token=TOKEN).start()
    waiting = island(coord.address, "a", tmp_path, 8, str(tmp_path / "cache"))  # alone: it waits, alive, for a second island
    try:
        wait_for(lambda: "a" in coord.views and coord._alive(coord.views["a"]), TIMEOUT_S, "island a to register", [waiting])
        duplicate = train_alone(coord.address, "a", tmp_path / "dup", "--data.cache_dir", str(tmp_path / "cache"))
        assert duplicate.returncode == errors.DUPLICATE
        assert "in use by a live process" in one_line(duplicate.stdout + duplicate.stderr)
        assert "debug model" not in duplicate.stdout and not (tmp_path / "dup").exists()  # refused before its model and run dir
        other = train_alone(coord.address, "b", tmp_path, "--data.cache_dir", str(tmp_path / "cache"), "--train.seed", "7")
        assert other.returncode == errors.CONFIG_MISMATCH
        assert "differs from the run's" in one_line(other.stdout + other.stderr)
    finally:
        os.killpg(waiting.pid, signal.SIGKILL)  # the run never started
        finish([waiting], tmp_path)
        coord.stop()

    ended = Coordinator(LOOPBACK, 0, 1, token=TOKEN).start()
    try:
        member = CoordinatorClient(ended.address, "m", new_incarnation(), TOKEN, 5.0, 10.0)
        register(member, 1, {})
        wait_for_admission(member, -1, lambda line: None)
        member.call("leave", {"reason": "finished"})
        late = train_alone(ended.address, "late", tmp_path, "--data.cache_dir", str(tmp_path / "cache"))
    finally:
        ended.stop()
    assert late.returncode == errors.RUN_ENDED
    assert "has ended" in one_line(late.stdout + late.stderr)


@pytest.mark.timeout(TIMEOUT_S + 60)
def test_a_coordinator_gone_for_good_ends_both_local_ranks_in_one_line_and_exit_3(tmp_path):
    coord = Coordinator(LOOPBACK, 0, 1, Rules(heartbeat_timeout_s=3), token=TOKEN).start()
    proc = island(coord.address, "a", tmp_path, 4000, str(tmp_path / "cache"), "--nproc", "2", "--mesh.coordinator_retry_s", "4")
    try:
        wait_for(lambda: len(outer_steps(tmp_path, "a")) >= 1, TIMEOUT_S, "outer step 1", [proc])
    finally:
        coord.stop()  # and never comes back
    codes = finish([proc], tmp_path)
    output = (tmp_path / "a.log").read_text()
    assert codes == [errors.LOST_COORDINATOR], output[-3000:]
    assert "lost the coordinator" in one_line(output) and "retrying until" in output


@pytest.mark.timeout(TIMEOUT_S + 60)
def test_an_island_dropped_while_stopped_exits_4_in_one_line_and_the_other_finishes(tmp_path):
    coord = Coordinator(LOOPBACK, 0, 2, Rules(heartbeat_timeout_s=3), token=TOKEN).start()
    procs = {name: island(coord.address, name, tmp_path, 48, str(tmp_path / "cache")) for name in ("a", "b")}
    try:
        wait_for(lambda: len(outer_steps(tmp_path, "b")) >= 1, TIMEOUT_S, "outer step 1", list(procs.values()))
        os.killpg(procs["b"].pid, signal.SIGSTOP)
        wait_for(lambda: coord.epoch.members == ("a",), TIMEOUT_S, "b to be dropped")
        os.killpg(procs["b"].pid, signal.SIGCONT)
        codes = finish([procs["a"], procs["b"]], tmp_path)
    finally:
        coord.stop()
    assert codes == [0, errors.DROPPED], logs(tmp_path)
    assert "was dropped from the run" in one_line((tmp_path / "b.log").read_text())


@pytest.mark.timeout(TIMEOUT_S + 60)
def test_too_many_skipped_outer_steps_end_every_island_in_one_line_and_exit_5(tmp_path, monkeypatch):
    coord = Coordinator(LOOPBACK, 0, 2, Rules(heartbeat_timeout_s=3, evict_after=100), token=TOKEN).start()
    once = ("--mesh.outer_attempts", "1", "--mesh.max_skipped_in_a_row", "1")
    procs = [island(coord.address, "a", tmp_path, 48, str(tmp_path / "cache"), *once)]
    monkeypatch.setenv(FAULTS_ENV, "break@allreduce:2")  # b's every all-reduce from outer step 2 on fails
    procs.append(island(coord.address, "b", tmp_path, 48, str(tmp_path / "cache"), *once))
    try:
        codes = finish(procs, tmp_path)
    finally:
        coord.stop()
    assert codes == [errors.SKIPPED_STEPS] * 2, logs(tmp_path)
    for name in ("a", "b"):
        assert "outer steps in a row were skipped" in one_line((tmp_path / f"{name}.log").read_text())


class _EpochsThatNeverForm:
    """A member whose every epoch's entry barrier fails (a peer that never arrives), as the
    coordinator answers when each new epoch loses someone before it forms."""

    island_id, incarnation = "island-0", "inc-0"

    def __init__(self) -> None:
        self.epoch = Epoch(0, ("island-0", "island-1"), 1, incarnations=("inc-0", "inc-1"))
        self.barriers = 0

    def epoch_named(self, number: int) -> Epoch:
        return Epoch(number, ("island-0", "island-1"), 1, reason="island-1 left", incarnations=("inc-0", "inc-1"))

    def barrier(self, name: str) -> bool:
        self.barriers += 1
        return False

    def next_epoch(self) -> int:
        return self.epoch.number + 1


def test_an_island_that_cannot_enter_any_epoch_stops_with_one_line_and_exit_code_7():
    cfg = JobConfig.model_validate({"mesh": {"enter_attempts": 3}})
    entry = EpochEntry(cfg, _EpochsThatNeverForm(), island=None, held=None, notes=[], wire=None)  # no barrier passes: no groups
    with pytest.raises(errors.ExpectedFailure) as failure:
        entry.enter(1)
    assert failure.value.exit_code == errors.CANNOT_ENTER == 7
    assert entry.member.barriers == 3
    assert str(failure.value) == ("could not enter an epoch in 3 attempts in a row (mesh.enter_attempts); last: epoch 3; "
                                  "see membership.jsonl for who failed")
