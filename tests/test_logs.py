"""Log lines (`atoll.logs`), the never-silent heartbeat, and the TensorBoard / W&B sinks' extras.

The sinks' round trip through a real run is in test_report.py (TensorBoard); W&B is tested here
through `MetricsLog` with the real package in offline mode, read back from its run file. wandb is
not in the `test` extra (with its dependencies ~100 MB): where it is missing, its test skips.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import time

import pytest
from conftest import REPO

from atoll import logs
from atoll.config import MetricsConfig
from atoll.errors import UserError
from atoll.metrics import MetricsLog, check_sinks, scalars

STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


@pytest.fixture
def logged(capsys):
    """Lines logged through atoll.logs while a test runs (text, info), identity reset afterwards."""
    logs.configure("info", "text")
    yield lambda: capsys.readouterr().out.splitlines()
    logs.set_island(None, None)
    logs.configure("info", "text")


def test_text_lines_carry_utc_milliseconds_level_island_and_rank(logged):
    logs.set_island("island-3", 1)
    logs.info("atoll: checkpoint saved")
    logs.log.warning("atoll: slow link")
    logs.log.debug("not shown at info")
    lines = logged()
    assert len(lines) == 2
    assert re.fullmatch(STAMP + r" INFO  island-3/1 atoll: checkpoint saved", lines[0])
    assert re.fullmatch(STAMP + r" WARNING island-3/1 atoll: slow link", lines[1])


def test_json_lines_and_the_level_reach_child_processes(logged):
    logs.configure("warning", "json")
    code = "from atoll import logs; logs.configure(role='coordinator'); logs.info('hidden'); logs.log.error('atoll: broken')"
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    lines = child.stdout.splitlines()
    assert len(lines) == 1
    entry = json.loads(lines[0])
    assert entry["level"] == "ERROR" and entry["role"] == "coordinator" and entry["message"] == "atoll: broken"
    assert entry["island"] is None and re.fullmatch(STAMP, entry["time"])


def test_utc_stamp_is_utc_to_the_millisecond():
    assert logs.utc_stamp(0.0) == "1970-01-01T00:00:00.000Z"
    assert logs.utc_stamp(86400 + 3723.0456) == "1970-01-02T01:02:03.045Z"


def test_heartbeat_says_what_a_silent_process_does_and_stops_when_it_speaks(logged):
    beat = logs.Heartbeat(every_s=0.2)
    beat.doing("building the model")
    time.sleep(0.75)
    beat.doing(None)
    said = [line for line in logged() if "still building the model" in line]
    assert 1 <= len(said) <= 4 and re.search(r"still building the model \(\d+ s\)$", said[0])
    time.sleep(0.4)
    assert not [line for line in logged() if "still" in line]  # quiet once nothing is being done
    beat.doing("training: inner step 1 of 10")
    for _ in range(6):  # a process that keeps talking is never interrupted
        beat.spoke()
        time.sleep(0.05)
    beat.doing(None)
    assert not [line for line in logged() if "still" in line]


def test_log_flags_are_taken_before_and_after_the_command(tmp_path):
    cmd = [sys.executable, "-m", "atoll.cli", "report", str(tmp_path), "--log-format", "json", "--log-level", "debug"]
    after = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert after.returncode == 2 and after.stderr.startswith("atoll: error: ")
    bad = subprocess.run([sys.executable, "-m", "atoll.cli", "--log-format", "xml", "token"], capture_output=True, text=True,
                         timeout=120, cwd=REPO)
    assert bad.returncode == 2 and "invalid choice: 'xml'" in bad.stderr


def test_scalars_flatten_nested_numbers_and_count_rejections():
    record = {"time": 1.0, "step": 4, "loss": 3.5, "mfu": None, "outer_digest": "ab", "skipped": False,
              "rejected": ["island-2"], "tokens_by_source": {"web": 10, "code": 6}, "sync_s": float("nan")}
    assert scalars(record) == {"loss": 3.5, "skipped": 0.0, "rejected": 1.0, "tokens_by_source/web": 10.0, "tokens_by_source/code": 6.0}


def test_a_missing_extra_is_one_line_naming_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("tensorboard", "wandb") else real(name, *a))
    with pytest.raises(UserError, match=r"^metrics.tensorboard needs the tensorboard package: pip install 'atoll\[tensorboard\]'"):
        check_sinks(MetricsConfig(tensorboard=True))
    with pytest.raises(UserError, match=r"^metrics.wandb_project needs the wandb package: pip install 'atoll\[wandb\]'"):
        check_sinks(MetricsConfig(wandb_project="atoll-test"))
    check_sinks(MetricsConfig())


BLOCK = 32768
"""W&B's run file (run-*.wandb) is a LevelDB-style log: a 7-byte file header (':W&B', magic, version),
then records in 32 KiB blocks, each with a 7-byte header (crc32, length, type: 1 full, 2 first,
3 middle, 4 last) holding protobuf `Record`s. wandb 0.31 dropped its Python reader: read it here."""


def wandb_records(path) -> list[bytes]:
    raw = path.read_bytes()
    assert raw[:4] == b":W&B"
    out, pending, pos = [], b"", 7
    while pos + 7 <= len(raw):
        if BLOCK - pos % BLOCK < 7:  # too little left in the block for a header: it is padding
            pos += BLOCK - pos % BLOCK
            continue
        length, kind = int.from_bytes(raw[pos + 4:pos + 6], "little"), raw[pos + 6]
        chunk, pos = raw[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:  # zero padding at the end of a block
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            out.append(pending)
    return out


@pytest.mark.timeout(180)
@pytest.mark.skipif(importlib.util.find_spec("wandb") is None,
                    reason="wandb is not installed (pip install 'atoll[wandb]'; not in the test extra: ~100 MB with its dependencies)")
def test_wandb_offline_run_files_hold_the_logged_scalars(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    from wandb.proto import wandb_internal_pb2

    from atoll.metrics import WandbSink

    outer = {"sync_s": 0.5, "bytes_sent": 1000}
    rows = [{"step": 4, "loss": 3.25, "outer_step": 1, "utilization": 0.875, "tokens_by_source": {"web": 100}, **outer},
            {"step": 8, "loss": 2.5, "val_loss": 2.75, "outer_step": 2, "utilization": 0.9375, "tokens_by_source": {"web": 200}, **outer}]
    sink = WandbSink("atoll-test", tmp_path, "island-0", "run1234", {"train.steps": 8})
    log = MetricsLog(tmp_path / "metrics.jsonl", 8, 0, "plain", True, [sink])
    for row in rows:
        log.log(row)
    log.close()

    [run_file] = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    history = []
    for data in wandb_records(run_file):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
    assert [h["_step"] for h in history] == [4, 8]
    for h, row in zip(history, rows):
        assert h["loss"] == row["loss"] and h["utilization"] == row["utilization"] and h["tokens_by_source/web"] == row["tokens_by_source"]["web"]
    assert history[1]["val_loss"] == 2.75 and "val_loss" not in history[0]
