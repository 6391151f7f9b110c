"""`atoll report`, summary.json, TensorBoard event files and the log lines of a real simulate run.

One short `atoll simulate` run (2 islands of the debug model, 12 steps, H = 4, JSON log lines,
TensorBoard on) serves every test that needs a run; the others build their inputs by hand.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from atoll.comm.allreduce import ring_bytes
from atoll.report import build_series, bucket_means, read_run, read_series, write_report
from atoll.report import ring_bytes as report_ring_bytes

DEBUG_CONFIG = str(REPO / "configs" / "debug.toml")
RUN_TIMEOUT_S = 240
ISLANDS = ("island-0", "island-1")


@pytest.fixture(scope="module")
def simulated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """(run dir, finished process) of one short simulate run with TensorBoard on and JSON logs."""
    tmp = tmp_path_factory.mktemp("report")
    run_dir = tmp / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "atoll.cli", "--log-format", "json", "simulate", "--islands", "2", DEBUG_CONFIG,
         "--run-dir", str(run_dir), "--train.steps", "12", "--diloco.inner_steps", "4", "--eval.every", "4",
         "--eval.batches", "1", "--metrics.log_every", "2", "--metrics.tensorboard", "true", "--data.cache_dir", str(tmp / "cache")],
        cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the islands run in sessions of their own and die with their parent's pipes
        out, err = proc.communicate()
        pytest.fail(f"atoll simulate did not finish in {RUN_TIMEOUT_S}s\n{out[-3000:]}\n{err[-3000:]}")
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    return run_dir, subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def records(island_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (island_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
def test_report_of_a_simulate_run_plots_the_islands_numbers(simulated, tmp_path):
    run_dir, _ = simulated
    out = write_report(run_dir, tmp_path / "report.html")
    page = out.read_text()
    assert page.count('<img alt="') == 6 and "src=\"http" not in page and "<link" not in page  # self-contained
    series = read_series(page)

    assert series["islands"] == list(ISLANDS)
    for name in ISLANDS:
        recs = records(run_dir / name)
        trained = [r for r in recs if "loss" in r]
        assert series["loss"][name]["loss"] == [round(r["loss"], 6) for r in trained]
        assert series["loss"][name]["tokens"] == [r["tokens"] for r in trained]
        val = [r for r in recs if "val_loss" in r]
        assert len(val) == 3 and series["val_loss"][name]["val_loss"] == [round(r["val_loss"], 6) for r in val]
        outer = [r for r in recs if "outer_step" in r]
        assert series["outer"][name]["outer_step"] == [1, 2, 3]
        assert series["outer"][name]["utilization"] == [round(r["utilization"], 6) for r in outer]
        assert series["outer"][name]["sync_s"] == [round(r["sync_s"], 6) for r in outer]
        # bytes per outer step: the differences of the cumulative counter, against 4 inner steps of fp32 data-parallel
        sent = [r["bytes_sent"] for r in outer]
        assert series["outer"][name]["bytes_sent"] == [sent[0], sent[1] - sent[0], sent[2] - sent[1]]
        params = json.loads((run_dir / name / "run.json").read_text())["params"]["total"]
        assert series["outer"][name]["ddp_bytes"] == [4 * ring_bytes(params, 4, 2)] * 3
        assert series["outer"][name]["rejected"] == [] and series["outer"][name]["skipped"] == []
        assert series["checkpoints"][name]["save_step"] == [12]
        assert series["tokens_by_source"][name] == {"data": trained[-1]["tokens"]}
    events = [json.loads(line) for line in (run_dir / "membership.jsonl").read_text().splitlines()]
    assert series["world"]["world_size"] == [len(e["members"]) for e in events]
    assert series["world"]["world_size"][0] == 2 and series["world"]["events"][0]["reason"] == "start"


@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
def test_simulate_writes_summary_json_and_names_the_report_command(simulated):
    run_dir, result = simulated
    lines = result.stdout.splitlines()
    assert lines[-1] == f"atoll: summary in {run_dir / 'summary.json'}; plots: atoll report {run_dir}"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["report"] == f"atoll report {run_dir}" and summary["outcome"] == f"atoll: all 2 islands finished; run dir {run_dir}"
    for name in ISLANDS:
        last = [r for r in records(run_dir / name) if "loss" in r][-1]
        island = summary["islands"][name]
        assert island["loss"] == last["loss"] and island["bytes_sent"] == last["bytes_sent"] and island["outer_steps"] == 3
        assert any(line.startswith(f"{name}: loss {last['loss']:.4f}") for line in lines)


@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
def test_tensorboard_event_files_hold_the_logged_scalars(simulated):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = simulated
    for name in ISLANDS:
        events = EventAccumulator(str(run_dir / name / "tensorboard"))
        events.Reload()
        recs = records(run_dir / name)
        for key in ("loss", "val_loss", "utilization", "bytes_sent"):
            logged = [(r["step"], r[key]) for r in recs if key in r]
            read = [(e.step, e.value) for e in events.Scalars(key)]
            assert [s for s, _ in read] == [s for s, _ in logged], (name, key)
            assert all(math.isclose(v, x, rel_tol=1e-6) for (_, v), (_, x) in zip(read, logged)), (name, key)


@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
def test_islands_log_json_lines_with_utc_time_level_island_and_rank(simulated):
    _, result = simulated
    by_island = {}
    for line in result.stdout.splitlines():
        prefix, _, rest = line.partition("] ")
        if prefix in ("[island-0", "[island-1") and rest.startswith("{"):
            by_island.setdefault(prefix[1:], []).append(json.loads(rest))
    assert set(by_island) == set(ISLANDS)
    for name, entries in by_island.items():
        assert all(e["island"] == name and e["rank"] == 0 and e["level"] == "INFO" for e in entries)
        assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", e["time"]) for e in entries)
        assert any(e["message"].startswith("atoll: done: 12 steps") for e in entries)
    launcher = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert any(e["role"] == "simulate" and "status page" in e["message"] for e in launcher)


def test_bucket_means_keeps_short_series_and_averages_long_ones():
    assert bucket_means([1, 2, 3], [4, 5, 6], limit=5) == ([1, 2, 3], [4, 5, 6])
    xs, ys = bucket_means(list(range(10)), [float(v) * 2 for v in range(10)], limit=4)
    assert xs == [1.0, 4.0, 7.0, 9.0] and ys == [2.0, 8.0, 14.0, 18.0]  # buckets of 3: (0,1,2) (3,4,5) (6,7,8) (9)
    assert report_ring_bytes(10**6, 4, 3) == ring_bytes(10**6, 4, 3)


def test_report_of_a_restarted_island_with_a_torn_line_rejections_and_sources(tmp_path):
    run_dir = tmp_path / "solo"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps({"params": {"total": 1000}}))
    (run_dir / "config.toml").write_text("[diloco]\ninner_steps = 2\n")
    rows = [
        {"time": 100.0, "step": 2, "loss": 3.0, "tokens": 20, "outer_step": 1, "utilization": 0.9, "sync_s": 0.1,
         "bytes_sent": 500, "world_size": 2, "rejected": ["island-9"], "skipped": False, "tokens_by_source": {"web": 15, "code": 5}},
        {"time": 3700.0, "step": 4, "loss": 2.0, "tokens": 40, "outer_step": 2, "utilization": 0.8, "sync_s": 0.2,
         "bytes_sent": 800, "world_size": 2, "rejected": [], "skipped": True, "checkpoint_blocked_s": 0.5,
         "tokens_by_source": {"web": 30, "code": 10}},
        # restarted: its counter starts again
        {"time": 7300.0, "step": 6, "loss": 1.5, "tokens": 60, "outer_step": 3, "utilization": 0.7, "sync_s": 0.3,
         "bytes_sent": 250, "world_size": 3, "rejected": [], "skipped": False, "tokens_by_source": {"web": 45, "code": 15}},
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"time": 7400, "ste')
    series = build_series(read_run(run_dir))

    outer = series["outer"]["solo"]
    assert outer["bytes_sent"] == [500, 300, 250]
    assert outer["ddp_bytes"] == [2 * ring_bytes(1000, 4, 2), 2 * ring_bytes(1000, 4, 2), 2 * ring_bytes(1000, 4, 3)]
    assert outer["rejected"] == [{"outer_step": 1, "islands": ["island-9"]}] and outer["skipped"] == [2]
    assert series["loss"]["solo"]["hours"] == [0.0, 1.0, 2.0]
    assert series["world"]["world_size"] == [2, 3] and series["world"]["hours"] == [0.0, 2.0]
    assert series["checkpoints"]["solo"]["blocked_s"] == [0.5]
    assert series["tokens_by_source"]["solo"] == {"web": 45, "code": 15}


def test_report_of_a_directory_without_metrics_is_one_line_and_exit_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "atoll.cli", "report", str(tmp_path)], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr == f"atoll: error: {tmp_path} holds no metrics.jsonl (nor island-*/metrics.jsonl): is it a run directory?\n"
