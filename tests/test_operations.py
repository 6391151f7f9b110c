"""Ordinary operations on a live run, with real processes: what an operator does at 4 a.m.

Each test starts a coordinator and islands of the debug model as a user would (`atoll
coordinator`, `atoll train --coordinator`), or in the test process where the coordinator's own
process does not matter, performs the operation, and checks states: every island's outer digests
agree step by step, the membership log says what happened, and no process is left behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import REPO, free_port, read_metrics
from test_elastic import (
    assert_live_islands_agree,
    kill_leftovers,
    leftover_processes,
    membership,
)

from atoll.mesh.coordinator import Coordinator
from atoll.mesh.membership import Rules

LOOPBACK = "127.0.0.1"
TOKEN = "operations-test-token"
TIMEOUT_S = 180
TRAIN_ARGS = [
    "configs/debug.toml", "--diloco.inner_steps", "4", "--schedule.warmup_steps", "2", "--eval.every", "0",
    "--checkpoint.at_end", "false", "--metrics.log_every", "4", "--mesh.heartbeat_interval_s", "0.5",
    "--mesh.heartbeat_timeout_s", "3", "--mesh.collective_timeout_s", "30",
]


def atoll(args: list[str], log: Path) -> subprocess.Popen:
    """Start `atoll ARGS` in its own session, output to `log`."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "ATOLL_RUN_TOKEN": TOKEN}
    return subprocess.Popen(
        [sys.executable, "-m", "atoll.cli", *args], cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def island(address: str, name: str, run_dir: Path, steps: int, cache: str, *extra: str) -> subprocess.Popen:
    return atoll(["train", *TRAIN_ARGS, "--train.steps", str(steps), "--data.cache_dir", cache, "--coordinator", address,
                  "--island-id", name, "--run-dir", str(run_dir / name), *extra], run_dir / f"{name}.log")


def wait_for(condition, timeout: float, what: str, alive: list[subprocess.Popen] = ()) -> None:
    """Wait until `condition()`; fail at `timeout`, or at once if a process of `alive` has exited."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        for proc in alive:
            if proc.poll() is not None:
                pytest.fail(f"atoll {proc.args[3]} (pid {proc.pid}) exited with {proc.returncode} while waiting for {what}")
        time.sleep(0.1)


def outer_steps(run_dir: Path, name: str) -> list[dict]:
    path = run_dir / name / "metrics.jsonl"
    return [r for r in read_metrics(run_dir / name) if "outer_step" in r] if path.is_file() else []


def finish(procs: list[subprocess.Popen], run_dir: Path) -> list[int]:
    """Wait for every process (hard timeout), then kill whatever of this run is left; exit codes."""
    deadline = time.monotonic() + TIMEOUT_S
    try:
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        left = kill_leftovers(run_dir)
    assert left == []
    return [proc.returncode for proc in procs]


def logs(run_dir: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(run_dir.glob("*.log")))


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("token-cache"))


@pytest.mark.timeout(TIMEOUT_S + 60)
def test_killing_a_launcher_of_two_local_ranks_leaves_no_rank_running(tmp_path, cache):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    launcher = atoll(["train", *TRAIN_ARGS, "--nproc", "2", "--train.steps", "100000", "--data.cache_dir", cache,
                      "--run-dir", str(run_dir / "alone")], run_dir / "launcher.log")
    try:
        metrics = run_dir / "alone" / "metrics.jsonl"
        wait_for(lambda: (metrics.is_file() and metrics.stat().st_size > 0) or launcher.poll() is not None, TIMEOUT_S, "training to start")
        assert launcher.poll() is None, logs(run_dir)
        ranks = leftover_processes(run_dir)
        assert len(ranks) >= 3  # the launcher, torchrun and two ranks
        os.kill(launcher.pid, signal.SIGKILL)  # the launcher alone, not its process group
        killed = time.monotonic()
        wait_for(lambda: leftover_processes(run_dir) == [], 10, "the ranks to exit")
        assert time.monotonic() - killed < 5
    finally:
        finish([launcher], run_dir)


@pytest.mark.timeout(TIMEOUT_S + 60)
def test_an_island_killed_and_restarted_under_its_id_with_resume_rejoins_and_ends_identical(tmp_path, cache):
    # the operator's restart: same id, same directory, --resume; the run went on meanwhile, so the
    # island fetches the live state from its peers instead of trusting its older checkpoint
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    coord = Coordinator(LOOPBACK, 0, 3, Rules(heartbeat_timeout_s=3), run_dir / "membership.jsonl", TOKEN).start()
    try:
        # H=16: with H=4 a fast machine commits an outer step every ~0.1 s, faster than the restarted
        # island can fetch and say it is ready, so it would fall back to the broadcast
        rest = ("--checkpoint.every", "8", "--diloco.inner_steps", "16")
        procs = {name: island(coord.address, name, run_dir, 320, cache, *rest) for name in ("a", "b", "c")}
        wait_for(lambda: len(outer_steps(run_dir, "b")) >= 3, TIMEOUT_S, "outer step 3", list(procs.values()))
        os.killpg(procs["b"].pid, signal.SIGKILL)
        procs["b"].wait()
        time.sleep(1.0)  # restarted within 2 s, well before the 3 s heartbeat timeout
        first_life = outer_steps(run_dir, "b")
        again = island(coord.address, "b", run_dir, 320, cache, *rest, "--resume", str(run_dir / "b"))
        codes = finish([procs["a"], procs["c"], again], run_dir)
    finally:
        coord.stop()
    assert codes == [0, 0, 0], logs(run_dir)
    outer = {"a": outer_steps(run_dir, "a"), "c": outer_steps(run_dir, "c"), "b": outer_steps(run_dir, "b"), "b0": first_life}
    steps = assert_live_islands_agree(outer)
    assert outer["b"][-1]["outer_digest"] == outer["a"][-1]["outer_digest"] == outer["c"][-1]["outer_digest"]
    assert steps[max(steps)]["world_size"] == 3
    second_life = (run_dir / "b.log").read_text()
    assert "resumed at step" in second_life and "fetched the state of outer step" in second_life
    assert "diverged" not in second_life and "took the run's state" not in second_life
    events = membership(run_dir)
    left = [e for e in events if "b" in e["left"]]
    assert left and left[0]["left"]["b"] in ("its control connection closed (process gone)", "replaced by a new incarnation of the same id (the old process is gone)")
    assert any(e["joined"] == ["b"] for e in events[1:])


@pytest.mark.timeout(TIMEOUT_S + 60)
def test_a_coordinator_killed_and_restarted_mid_run_continues_it(tmp_path, cache):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    port = free_port()
    coordinator_args = ["coordinator", "--port", str(port), "--islands", "2", "--heartbeat-timeout", "3",
                        "--events", str(run_dir / "membership.jsonl")]
    coordinator = atoll(coordinator_args, run_dir / "coordinator-1.log")
    address = f"{LOOPBACK}:{port}"
    procs = [island(address, name, run_dir, 48, cache) for name in ("a", "b")]
    restarted = None
    try:
        wait_for(lambda: len(outer_steps(run_dir, "a")) >= 2, TIMEOUT_S, "outer step 2", [coordinator, *procs])
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
    text = (run_dir / "coordinator-2.log").read_text()
    assert "resumed run" in text and "the run has ended" in text


@pytest.mark.timeout(2 * TIMEOUT_S + 60)
def test_islands_started_in_another_order_give_identical_losses(tmp_path, cache):
    finals = []
    for order in (("a", "b", "c"), ("c", "b", "a")):
        run_dir = tmp_path / "-".join(order)
        run_dir.mkdir()
        coord = Coordinator(LOOPBACK, 0, 3, Rules(heartbeat_timeout_s=3), token=TOKEN).start()
        try:
            procs = []
            for name in order:
                procs.append(island(coord.address, name, run_dir, 16, cache))
                time.sleep(1.0)
            codes = finish(procs, run_dir)
        finally:
            coord.stop()
        assert codes == [0, 0, 0], logs(run_dir)
        finals.append({name: [(r["step"], r["loss"], r["outer_digest"]) for r in outer_steps(run_dir, name)] for name in "abc"})
    assert finals[0] == finals[1]


@pytest.mark.timeout(TIMEOUT_S + 100)
def test_a_paused_coordinator_costs_the_run_its_pause_and_drops_no_one(tmp_path, cache):
    # SIGSTOP: nothing answers and connections stay open; the islands' own requests time out (15 s)
    # and close their connections, which must not read as their deaths when the coordinator runs again.
    # 35 s: past two of those request timeouts (two rounds of retries) and 10x the heartbeat timeout
    pause_s = 35
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    port = free_port()
    coordinator = atoll(["coordinator", "--port", str(port), "--islands", "2", "--heartbeat-timeout", "3",
                         "--events", str(run_dir / "membership.jsonl")], run_dir / "coordinator.log")
    address = f"{LOOPBACK}:{port}"
    procs = [island(address, name, run_dir, 32, cache) for name in ("a", "b")]
    try:
        wait_for(lambda: len(outer_steps(run_dir, "a")) >= 2, TIMEOUT_S, "outer step 2", [coordinator, *procs])
        os.killpg(coordinator.pid, signal.SIGSTOP)
        time.sleep(pause_s)
        os.killpg(coordinator.pid, signal.SIGCONT)
        codes = finish([*procs, coordinator], run_dir)
    finally:
        finish([coordinator, *procs], run_dir)
    assert codes == [0, 0, 0], logs(run_dir)
    steps = assert_live_islands_agree({name: outer_steps(run_dir, name) for name in ("a", "b")})
    assert {s["world_size"] for s in steps.values()} == {2} and sorted(steps) == list(range(1, 9))
    assert all(why == "left (finished)" for e in membership(run_dir) for why in e["left"].values())  # nobody dropped
    said = (run_dir / "a.log").read_text()
    assert "no answer from the coordinator" in said and "retrying until" in said and "answers again after" in said


def forge(address: str, run_id: str, boot: str, stop: threading.Event, sent: list[int]) -> None:
    """An outsider with the run's address but not its token: every kind of forgery, bounded."""
    from test_mesh import raw_rpc

    from atoll.mesh import protocol
    from atoll.mesh.auth import run_key, sign

    forgeries = [
        ("register", "mallory", {"local_ranks": 1, "fingerprint": {}}),
        ("leave", "a", {"reason": "forged"}),
        ("report", "b", {"epoch": 0, "what": "forged", "blamed": "c"}),
        ("result", "c", {"epoch": 0, "step": 1, "round": 0, "ok": True, "digest": "forged", "wait_s": 0}),
        ("beat", "a", {"interval": 0.5}),
        ("barrier", "a", {"epoch": 0, "name": "outer-2", "wait_s": 0}),
    ]
    deadline = time.monotonic() + 60
    for n in range(300):
        if stop.is_set() or time.monotonic() > deadline:
            return
        op, target, args = forgeries[n % len(forgeries)]
        body = protocol.request_body(op, target, "stolen-incarnation", "main", boot, 10**15 + n, args)
        for key in (run_key("guess", run_id), run_key(TOKEN, "another-run")):
            status, _ = raw_rpc(address, body, sign(key, body))
            assert status == protocol.REFUSED
            sent[0] += 1
        time.sleep(0.05)


@pytest.mark.timeout(TIMEOUT_S + 60)
def test_an_outsider_forging_every_message_leaves_a_live_run_of_three_unharmed(tmp_path, cache):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    coord = Coordinator(LOOPBACK, 0, 3, Rules(heartbeat_timeout_s=3), run_dir / "membership.jsonl", TOKEN).start()
    stop, sent = threading.Event(), [0]
    outsider = threading.Thread(target=forge, args=(coord.address, coord.run_id, coord.boot, stop, sent))
    try:
        procs = [island(coord.address, name, run_dir, 24, cache) for name in ("a", "b", "c")]
        outsider.start()
        codes = finish(procs, run_dir)
    finally:
        stop.set()
        outsider.join(timeout=70)
        coord.stop()
    assert codes == [0, 0, 0], logs(run_dir)
    steps = assert_live_islands_agree({name: outer_steps(run_dir, name) for name in ("a", "b", "c")})
    assert {s["world_size"] for s in steps.values()} == {3} and sorted(steps) == list(range(1, 7))
    assert sent[0] > 0 and coord.refused == sent[0]
    assert all(why == "left (finished)" for e in membership(run_dir) for why in e["left"].values())


def forge_rendezvous(address: str, run_id: str, boot: str, stop: threading.Event, statuses: list[int]) -> None:
    """An outsider writing gloo's rendezvous keys of this and the next epochs, with large values, bounded."""
    from test_mesh import raw_rpc

    from atoll.mesh import protocol
    from atoll.mesh.auth import run_key, sign
    from atoll.mesh.groups import group_prefix

    deadline = time.monotonic() + 60
    for n in range(200):
        if stop.is_set() or time.monotonic() > deadline:
            return
        epoch, size = n % 6, (512 << 10) if n % 2 else (2 << 20)  # the larger is over the body cap
        args = {"epoch": epoch, "key": f"{group_prefix(epoch, 0, 0)}0/{n % 3}", "value": "A" * size}
        body = protocol.request_body("rendezvous_set", "a", "stolen-incarnation", "main", boot, 10**15 + n, args)
        try:
            statuses.append(raw_rpc(address, body, sign(run_key("guess", run_id), body))[0])
        except OSError:
            statuses.append(0)  # the coordinator closed the connection mid-body (over the cap)
        time.sleep(0.05)


@pytest.mark.timeout(TIMEOUT_S + 60)
def test_an_outsider_writing_future_epochs_rendezvous_cannot_stop_the_next_epoch_forming(tmp_path, cache):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    coord = Coordinator(LOOPBACK, 0, 3, Rules(heartbeat_timeout_s=3), run_dir / "membership.jsonl", TOKEN).start()
    stop, statuses = threading.Event(), []
    outsider = threading.Thread(target=forge_rendezvous, args=(coord.address, coord.run_id, coord.boot, stop, statuses))
    try:
        procs = {name: island(coord.address, name, run_dir, 32, cache) for name in ("a", "b", "c")}
        outsider.start()
        wait_for(lambda: len(outer_steps(run_dir, "c")) >= 2, TIMEOUT_S, "outer step 2", list(procs.values()))
        os.killpg(procs["c"].pid, signal.SIGKILL)  # a new epoch of a and b must form while the outsider writes
        codes = finish([procs["a"], procs["b"]], run_dir)
    finally:
        stop.set()
        outsider.join(timeout=70)
        coord.stop()
        finish(list(procs.values()), run_dir)
    assert codes == [0, 0], logs(run_dir)
    steps = assert_live_islands_agree({name: outer_steps(run_dir, name) for name in ("a", "b")})
    assert sorted(steps) == list(range(1, 9)) and steps[8]["world_size"] == 2 and steps[1]["world_size"] == 3
    assert statuses and set(statuses) <= {401, 413, 0} and coord.refused == statuses.count(401) > 0
    assert [e["left"] for e in membership(run_dir) if "c" in e["left"]] == [{"c": "its control connection closed (process gone)"}]
