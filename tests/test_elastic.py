"""The elastic mesh: membership decisions (pure), scenarios, and real runs with injected faults.

The fault tests run `atoll simulate` with 3 islands of the debug model (4 where stated), a 0.5 s
heartbeat and a 3 s heartbeat timeout, and check states, not exit codes alone: the survivors
finish, every live island's outer digest agrees at every outer step, the world size in the
metrics follows the scenario, and no island process is left running.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from conftest import read_metrics, run_atoll

from atoll.errors import UserError
from atoll.faults import Fault, parse_faults
from atoll.mesh.membership import Epoch, IslandView, Registration, Rules, StepResult, decide, reconnect_grace_s
from atoll.simulate import Scenario, Signal, Start

TIMEOUT_S = 150
HEARTBEAT_TIMEOUT_S = 3.0
GRACE_S = 0.5
JOIN_OUTER_STEPS = 40
"""Long enough (in outer steps of 4 inner steps) for a late island to start up and be admitted."""


# --- membership.decide: the coordinator's rules, without processes ---------------------------------


def views(*ids: str, heard_at: float = 100.0) -> dict[str, IslandView]:
    return {i: IslandView(Registration(i, f"inc-{i}", 1), heard_at=heard_at, beat_interval_s=0.5) for i in ids}


EPOCH = Epoch(4, ("a", "b", "c"), 1, "start", ("inc-a", "inc-b", "inc-c"))
RULES = Rules(HEARTBEAT_TIMEOUT_S, GRACE_S, evict_after=3)


def decide_at(v: dict[str, IslandView], now: float = 101.0, decided: tuple[int, int] = (0, 0), failures: int = 0):
    return decide(EPOCH, v, decided, now, RULES, failures)


def test_nothing_is_decided_while_every_member_is_alive_and_training():
    assert decide_at(views("a", "b", "c")).epoch is None
    assert decide_at(views("a", "b", "c")).outcome is None


def test_a_step_commits_when_every_member_posted_ok_with_the_same_digest():
    v = views("a", "b", "c")
    for island in "ab":
        v[island].result = StepResult(7, True, "d1")
    assert decide_at(v).outcome is None  # c has not posted yet
    v["c"].result = StepResult(7, True, "d1")
    decision = decide_at(v)
    assert (decision.outcome, decision.step, decision.epoch) == ("commit", (7, 0), None)
    assert decide_at(v, decided=(7, 0)).outcome is None  # decided once


def test_different_digests_resync_from_the_majority_not_diverge():
    v = views("a", "b", "c")
    for island, digest in zip("abc", ["d2", "d1", "d1"]):
        v[island].result = StepResult(3, True, digest)
    decision = decide_at(v)
    assert (decision.outcome, decision.step, decision.source) == ("resync", (3, 0), 1)  # b: first holder of the majority
    assert decision.digests == {"a": "d2", "b": "d1", "c": "d1"} and decision.epoch is None
    for island in "abc":  # the next round of the same step is decided anew
        v[island].result = StepResult(3, True, "d1", round=1)
    assert decide_at(v, decided=(3, 0)).outcome == "commit"


def test_a_tie_between_digests_resyncs_from_the_first_member():
    v = views("a", "b")
    v["a"].result, v["b"].result = StepResult(3, True, "x"), StepResult(3, True, "y")
    assert decide(Epoch(0, ("a", "b"), 1, "start", ("inc-a", "inc-b")), v, (0, 0), 101.0, RULES).source == 0


def test_ready_joiners_are_admitted_at_a_boundary_in_id_order_never_at_a_commit():
    v = {**views("b", "c", "d"), **views("a", "e")}
    epoch = Epoch(4, ("b", "c", "d"), 1, "start", ("inc-b", "inc-c", "inc-d"))
    v["a"].ready = 2  # fetched the state of outer step 2; e is still fetching
    assert decide(epoch, v, (0, 0), 101.0, RULES).epoch is None  # the members are training
    for island in "bcd":
        v[island].result = StepResult(3, True, "d")
    decision = decide(epoch, v, (0, 0), 101.0, RULES, at_boundary=True)
    assert decision.outcome == "commit" and decision.epoch is None  # a commit admits no one
    for island in "bcd":
        v[island].result = None
    decision = decide(epoch, v, (3, 0), 101.0, RULES, at_boundary=True)
    assert decision.epoch.members == ("a", "b", "c", "d") and decision.epoch.number == 5 and decision.epoch.reason == "joined"
    assert decision.epoch.incarnations == ("inc-a", "inc-b", "inc-c", "inc-d")
    assert decision.joined == ("a",)


def test_after_a_failure_report_an_island_alive_but_silent_is_kept():
    v = views("a", "b", "c")
    v["a"].failed_at = 100.0
    v["b"].result = StepResult(2, True, "d")  # its ring finished: alive
    assert decide_at(v, now=100.2).epoch is None  # c may still report
    decision = decide_at(v, now=100.0 + GRACE_S + 0.01)
    assert decision.epoch.members == ("a", "b", "c")  # c is busy in its ring, not gone
    assert decision.left == {} and decision.repeated_failure


def test_after_a_failure_report_only_the_gone_are_dropped():
    v = views("a", "b", "c")
    v["a"].failed_at = 100.0
    v["c"].lost_at = 100.05  # its control connection closed as a collective failed: dead
    assert decide_at(v, now=100.2).epoch is None  # b may still report
    decision = decide_at(v, now=100.0 + GRACE_S + 0.01)  # before c's reconnect grace ends
    assert decision.epoch.members == ("a", "b")  # b, silent in its ring, stays
    assert decision.left == {"c": "its control connection closed (process gone)"} and not decision.repeated_failure


def test_a_closed_connection_that_a_peers_failed_collective_blames_or_names_nobody_is_gone_at_once():
    v = views("a", "b", "c")
    v["c"].lost_at = 100.0  # closed: dead, or alive and reconnecting
    v["a"].failed_at, v["a"].blamed = 100.01, "c"  # a's ring failed on c
    assert decide_at(v, now=100.02).epoch is None  # b may still report
    decision = decide_at(v, now=100.01 + GRACE_S + 0.01)  # long before c's reconnect grace ends
    assert decision.epoch.members == ("a", "b") and decision.left == {"c": "its control connection closed (process gone)"}
    v["b"].failed_at, v["b"].blamed = 100.02, "c"
    assert decide_at(v, now=100.03).left == {"c": "its control connection closed (process gone)"}  # everyone accounted for
    v["a"].blamed = v["b"].blamed = None  # gloo's error on a plain collective names no member
    assert decide_at(v, now=100.03).left == {"c": "its control connection closed (process gone)"}
    v["a"].blamed = v["b"].blamed = "a"  # every report points elsewhere: c's fate waits for its grace
    assert decide_at(v, now=100.01 + GRACE_S + 0.01).epoch is None
    assert reconnect_grace_s(v["c"]) > GRACE_S + 0.02


def test_a_failure_is_decided_at_once_when_every_member_is_accounted_for():
    v = views("a", "b", "c")
    for island in "abc":
        v[island].failed_at = 100.0
    decision = decide_at(v, now=100.01)
    assert decision.epoch.members == ("a", "b", "c") and decision.left == {}


def test_the_same_members_failing_again_and_again_evict_the_island_the_reports_blame():
    v = views("a", "b", "c")
    for island, blamed in zip("abc", ["c", "c", "b"]):
        v[island].failed_at, v[island].blamed = 100.0, blamed
    assert decide_at(v, now=100.01, failures=1).epoch.members == ("a", "b", "c")  # second failure: retried
    decision = decide_at(v, now=100.01, failures=2)  # third in a row: the culprit goes
    assert decision.epoch.members == ("a", "b")
    assert "evicted after 3 failed epochs" in decision.left["c"]


def test_without_blame_the_island_whose_own_ring_failed_is_evicted():
    v = views("a", "b", "c")
    for island in "abc":
        v[island].failed_at = 100.0
    v["b"].origin = True  # its ring failed by itself; a and c only abandoned theirs
    assert decide_at(v, now=100.01, failures=2).epoch.members == ("a", "c")


def test_without_any_pointer_the_most_recent_joiner_is_evicted():
    v = views("a", "b", "c")
    v["a"].admitted, v["b"].admitted, v["c"].admitted = 0, 3, 1
    for island in "abc":
        v[island].failed_at = 100.0
    assert decide_at(v, now=100.01, failures=2).epoch.members == ("a", "c")


def test_a_deathrattle_drops_an_island_at_once_a_closed_connection_after_its_grace_and_a_stale_heartbeat_at_the_timeout():
    v = views("a", "b", "c")
    v["b"].leaving = "SystemExit: 143"
    decision = decide_at(v)
    assert decision.epoch.members == ("a", "c") and decision.left == {"b": "left (SystemExit: 143)"}

    v = views("a", "b", "c")
    v["a"].lost_at = 100.9
    assert decide_at(v).epoch is None  # it may be reconnecting (its own request timed out)
    assert decide_at(v, now=100.9 + reconnect_grace_s(v["a"]) + 0.01).epoch.members == ("b", "c")

    v = views("a", "b", "c")
    v["c"].heard_at = 100.0 - HEARTBEAT_TIMEOUT_S + 0.5
    assert decide_at(v, now=100.0).epoch is None
    decision = decide_at(v, now=100.6)
    assert decision.epoch.members == ("a", "b") and "no heartbeat" in decision.left["c"]


def test_a_run_whose_members_all_left_has_ended_even_with_joiners_waiting():
    v = {**views("a", "b", "c"), **views("new")}
    for island in "abc":
        v[island].leaving = "finished"
    decision = decide_at(v)
    assert decision.epoch is None and decision.ended and decision.joined == ()


# --- scenarios ---------------------------------------------------------------------------------------


def test_scenario_from_file_and_flags(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(
        '[[fault]]\nisland = "island-1"\naction = "stop"\nat = "inner:5"\n\n[[start]]\nisland = "island-3"\nafter_outer = 2\n'
        '\n[[signal]]\nisland = "island-1"\naction = "cont"\nafter_outer = 3\n'
    )
    scenario = Scenario.parse(path, ["island-2=kill@allreduce:3"], ["island-1@4"], ["island-2=stop@5"])
    assert scenario.faults == {"island-1": [Fault("stop", "inner", 5)], "island-2": [Fault("kill", "allreduce", 3)]}
    assert scenario.starts == [Start("island-3", 2), Start("island-1", 4)]
    assert scenario.signals == [Signal("island-1", "cont", 3), Signal("island-2", "stop", 5)]


@pytest.mark.parametrize("faults,starts,signals", [
    (["island-1"], [], []), (["island-1=explode@inner:3"], [], []), ([], ["island-3"], []),
    ([], [], ["island-1=cont"]), ([], [], ["island-1=hup@2"]),
])
def test_malformed_scenario_flags_are_user_errors(faults, starts, signals):
    with pytest.raises(UserError):
        Scenario.parse(None, faults, starts, signals)


def test_fault_text_round_trips():
    assert parse_faults("kill@inner:7, stop@allreduce:3") == [Fault("kill", "inner", 7), Fault("stop", "allreduce", 3)]
    assert ",".join(f.to_text() for f in parse_faults("term@inner:1")) == "term@inner:1"


# --- real runs with injected faults ------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("token-cache"))


def simulate(
    run_dir: Path, cache_dir: str, islands: int, steps: int, faults: list[str] = (), starts: list[str] = (), extra: list[str] = (),
    output: list[str] | None = None,
) -> dict[str, list[dict]]:
    """Run a scenario; returns each island's outer-step records (both lives of a returning island),
    and appends what it printed to `output`."""
    args = [
        "simulate", "--islands", str(islands), "--run-dir", str(run_dir), "configs/debug.toml",
        "--train.steps", str(steps), "--diloco.inner_steps", "4", "--schedule.warmup_steps", "2",
        "--eval.every", "0", "--checkpoint.at_end", "false", "--metrics.log_every", "4", "--data.cache_dir", cache_dir,
        "--mesh.heartbeat_interval_s", "0.5", "--mesh.heartbeat_timeout_s", str(HEARTBEAT_TIMEOUT_S),
        "--mesh.collective_timeout_s", "30",
        *[a for f in faults for a in ("--fault", f)], *[a for s in starts for a in ("--start", s)], *extra,
    ]
    try:
        result = run_atoll(args, TIMEOUT_S)
        if output is not None:
            output.append(result.stdout)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    finally:
        assert kill_leftovers(run_dir) == []
    return {d.name: [r for r in read_metrics(d) if "outer_step" in r] for d in sorted(run_dir.glob("island-*"))}


def kill_leftovers(*run_dirs: Path) -> list[int]:
    """Kill -9 every process left over from these runs; their pids, for the test to assert none."""
    left = [pid for run_dir in run_dirs for pid in leftover_processes(run_dir)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    return left


def leftover_processes(run_dir: Path) -> list[int]:
    """Processes whose command line names this run's directory (every island's does)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(run_dir).encode() in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def assert_live_islands_agree(outer: dict[str, list[dict]], skipped: set[int] = frozenset()) -> dict[int, dict]:
    """Every island that logged outer step s has the same digest, epoch and world size, and only
    the `skipped` steps were skipped; returns one record per step."""
    by_step: dict[int, dict] = {}
    for island, records in outer.items():
        for r in records:
            first = by_step.setdefault(r["outer_step"], r)
            assert (r["outer_digest"], r["epoch"], r["world_size"], r["step"]) == (
                first["outer_digest"], first["epoch"], first["world_size"], first["step"]
            ), (island, r["outer_step"])
            assert r["skipped"] == (r["outer_step"] in skipped), (island, r["outer_step"])
    return by_step


def membership(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "membership.jsonl").read_text().splitlines()]


def test_survivors_agree_after_kill_during_the_inner_phase(tmp_path, cache_dir):
    outer = simulate(tmp_path / "run", cache_dir, 3, 16, faults=["island-1=kill@inner:6"])

    steps = assert_live_islands_agree(outer)
    assert [r["outer_step"] for r in outer["island-0"]] == [1, 2, 3, 4] == [r["outer_step"] for r in outer["island-2"]]
    assert [r["outer_step"] for r in outer["island-1"]] == [1]
    assert [steps[s]["world_size"] for s in (1, 2, 3, 4)] == [3, 2, 2, 2]
    events = membership(tmp_path / "run")
    # known dead from its closed control connection, not at the heartbeat timeout
    assert events[1]["left"] == {"island-1": "its control connection closed (process gone)"}
    assert events[1]["members"] == ["island-0", "island-2"]  # epochs list members by id
    # the survivors' next outer step completes within a second of the boundary, once the dead island's
    # connection has stayed closed for its reconnect grace (a live one whose own request timed out reconnects within it)
    grace = reconnect_grace_s(IslandView(Registration("island-1"), 0.0, beat_interval_s=0.5))
    assert max(r["sync_s"] for name in ("island-0", "island-2") for r in outer[name] if r["outer_step"] == 2) < grace + 1.0


def test_a_kill_during_the_allreduce_drops_only_the_dead_and_a_skewed_island_is_resynced(tmp_path, cache_dir):
    # island-1 dies in outer step 2's all-reduce while island-2 stalls 2 s there (alive, heartbeating,
    # past the 0.5 s report grace): only the dead one is dropped. In outer step 3 island-2's outer
    # weights are skewed: the digests differ and every island takes the majority's state.
    faults = ["island-1=kill@allreduce:2", "island-2=sleep@allreduce:2:2", "island-2=skew@allreduce:3"]
    outer = simulate(tmp_path / "run", cache_dir, 3, 20, faults=faults)

    steps = assert_live_islands_agree(outer)
    assert [steps[s]["world_size"] for s in (1, 2, 3, 4, 5)] == [3, 2, 2, 2, 2]
    assert steps[2]["attempts"] == 2 and steps[2]["epoch"] == 1
    events = membership(tmp_path / "run")
    assert events[1]["left"] == {"island-1": "its control connection closed (process gone)"}
    assert [list(e["left"]) for e in events if e["left"] and e["reason"] != "ended"][:1] == [["island-1"]]
    assert [r["outer_step"] for r in outer["island-2"]] == [1, 2, 3, 4, 5]  # the slow island was kept
    resync = [e for e in events if e["reason"] == "resync"]
    assert len(resync) == 1 and resync[0]["source"] == "island-0"
    assert resync[0]["digests"]["island-0"] != resync[0]["digests"]["island-2"]
    assert steps[3]["attempts"] == 2 and steps[3]["epoch"] == 1 and not steps[3]["skipped"]  # a resync round, then the commit


def test_an_island_whose_ring_always_fails_is_evicted_as_the_culprit(tmp_path, cache_dir):
    # island-1 can never take part in an all-reduce from outer step 2 on (a pair that cannot
    # connect): the same members fail together until the coordinator evicts the island the
    # reports point at, after mesh.evict_after failed epochs; the others go on and finish
    outer = simulate(tmp_path / "run", cache_dir, 3, 24, faults=["island-1=break@allreduce:2"])

    steps = assert_live_islands_agree(outer, skipped={s for s in range(2, 7) if any(r["skipped"] for o in outer.values() for r in o if r["outer_step"] == s)})
    evictions = [e for e in membership(tmp_path / "run") if "island-1" in e["left"]]
    assert len(evictions) == 1 and "culprit" in evictions[0]["left"]["island-1"]
    assert [steps[s]["world_size"] for s in (5, 6)] == [2, 2] and not steps[6]["skipped"]
    assert [r["outer_step"] for r in outer["island-0"]] == [1, 2, 3, 4, 5, 6]


def test_an_outer_step_out_of_attempts_is_skipped_by_every_survivor_alike(tmp_path, cache_dir):
    outer = simulate(tmp_path / "run", cache_dir, 3, 16, faults=["island-1=kill@allreduce:2"], extra=["--mesh.outer_attempts", "1"])

    steps = assert_live_islands_agree(outer, skipped={2})
    assert steps[2]["outer_digest"] == steps[1]["outer_digest"]  # nothing applied
    assert steps[2]["attempts"] == 1 and [steps[s]["world_size"] for s in (3, 4)] == [2, 2]


def test_a_peer_hung_inside_the_all_reduce_is_left_at_the_heartbeat_timeout_not_the_ring_deadline(tmp_path, cache_dir):
    outer = simulate(tmp_path / "run", cache_dir, 3, 16, faults=["island-1=stop@allreduce:2"],
                     extra=["--mesh.collective_timeout_s", "100"])

    steps = assert_live_islands_agree(outer)
    assert [steps[s]["world_size"] for s in (1, 2, 3, 4)] == [3, 2, 2, 2]
    assert steps[2]["attempts"] == 2  # the stalled ring was abandoned and the step redone by the two
    # gloo waits cannot be interrupted: without abandoning, the survivors would sit out the 100 s
    # ring deadline; the coordinator drops the hung island after the 3 s heartbeat timeout
    assert max(r["sync_s"] for name in ("island-0", "island-2") for r in outer[name] if r["outer_step"] == 2) < 50


def test_a_stopped_island_woken_after_it_was_dropped_exits_and_the_others_finish(tmp_path, cache_dir):
    outer = simulate(tmp_path / "run", cache_dir, 3, 24, faults=["island-1=stop@inner:6"], extra=["--signal", "island-1=cont@3"])

    steps = assert_live_islands_agree(outer)
    assert [steps[s]["world_size"] for s in range(1, 7)] == [3, 2, 2, 2, 2, 2]
    assert [r["outer_step"] for r in outer["island-1"]] == [1]  # woken, it found itself dropped and left


def test_two_failures_in_one_epoch_leave_the_other_two_in_step(tmp_path, cache_dir):
    outer = simulate(tmp_path / "run", cache_dir, 4, 16, faults=["island-1=kill@allreduce:2", "island-2=kill@allreduce:2"])

    steps = assert_live_islands_agree(outer)
    assert [steps[s]["world_size"] for s in (1, 2, 3, 4)] == [4, 2, 2, 2]
    # killed at once, the two may be dropped in one epoch or in two back to back
    left = [island for e in membership(tmp_path / "run") for island, why in e["left"].items() if why != "left (finished)"]
    assert sorted(left) == ["island-1", "island-2"]


class ScriptedJoin:
    """The coordinator as a joiner's fetch loop sees it: the first `stale` states it is ready with
    are stale; an accepted ready is admitted at the next admit()."""

    def __init__(self, stale: int) -> None:
        self.fetch: dict | None = {"step": 5, "sources": []}
        self.stale, self.accepted, self.calls = stale, False, []

    def post_ready(self, step: int) -> bool:
        self.calls.append(("ready", step))
        self.accepted = step < 0 or self.stale == 0
        self.stale -= not self.accepted
        return self.accepted

    def admit(self) -> None:
        self.calls.append(("admit",))
        if self.accepted:
            self.fetch = None


@pytest.mark.parametrize(("fetched", "stale", "expected"), [
    # every source was withdrawing its state: fetch again, never fall back to a broadcast at once
    ([-1, 5], 0, [("admit",), ("ready", 5), ("admit",)]),
    # three fetches failed or went stale: ready without a state (the broadcast on entering)
    ([-1, -1, -1], 0, [("admit",), ("admit",), ("ready", -1), ("admit",)]),
    ([5, 5, 5], 2, [("ready", 5), ("admit",), ("ready", 5), ("admit",), ("ready", 5), ("admit",)]),
])
def test_a_joiner_fetches_again_after_a_failed_fetch_before_it_falls_back_to_a_broadcast(monkeypatch, fetched, stale, expected):
    from atoll import joining

    monkeypatch.setattr(joining, "FETCH_RETRY_S", 0.0)
    member, results = ScriptedJoin(stale), iter(fetched)  # only the fetch loop: no model, no processes
    joining.fetch_until_admitted(member, 3, lambda where: next(results))
    assert member.calls == expected and next(results, None) is None


def test_a_joiner_fetches_the_state_from_live_islands_and_survives_a_source_dying_mid_transfer(tmp_path, cache_dir):
    # island-1 dies (SIGKILL) as it is about to send its second chunk (each of its two connections
    # asks for one at once): the joiner finishes from island-0 and island-2, verified chunk by
    # chunk, and enters without anyone broadcasting
    output: list[str] = []
    outer = simulate(
        tmp_path / "run", cache_dir, 3, 4 * JOIN_OUTER_STEPS, starts=["island-3@1"],
        # island-0 stalls 4 s in outer step 3's inner phase, so that the joiner (seconds to start)
        # enters mid-run however fast the members train
        faults=["island-1=kill@serve:2", "island-0=sleep@inner:40:4"],
        # H=16: a fetch that starts as the members apply a commit finds island-1 a version behind (or
        # ahead) of the others and drops it unserved; longer phases make that race rare
        extra=["--diloco.inner_steps", "16", "--mesh.transfer_chunk_mb", "0.1"], output=output,
    )

    steps = assert_live_islands_agree(outer)
    joiner = [line for line in output[0].splitlines() if line.startswith("[island-3]")]
    fetched = [line for line in joiner if "fetched the state of outer step" in line]
    # a commit landing between its fetch and its ready makes it fetch the newer state again
    assert fetched and "dropped 'island-1'" in fetched[0], "\n".join(joiner[:5])
    assert "from 'island-0'" in fetched[0] and "from 'island-2'" in fetched[0]
    assert not any("'island-1'" in line for line in fetched[1:])  # a dead source is not asked again
    assert any("took the run's progress" in line for line in joiner)  # three integers on entering
    assert not any("took the run's state" in line for line in joiner)  # no broadcast: the members never stalled
    first, end = outer["island-3"][0], 4 * JOIN_OUTER_STEPS // 16 + 1
    assert [r["outer_step"] for r in outer["island-3"]] == list(range(first["outer_step"], end))
    # its first outer step is the one being averaged where it entered: it contributes nothing to it
    assert first["world_size"] == 3 and first["contribution_norms"]["island-3"] == 0.0 and first["rejected"] == []
    assert steps[end - 1]["world_size"] == 3 and "island-1" not in steps[end - 1]["contribution_norms"]
    assert [e["joined"] for e in membership(tmp_path / "run") if e["joined"]][-1] == ["island-3"]
