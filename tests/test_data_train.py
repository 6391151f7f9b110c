"""A mixture of parquet, jsonl.gz and text files: prepare -> train -> resume, as a user runs it."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import read_metrics, run_atoll

from atoll.cli import main
from atoll.config import load_config
from atoll.data import train_bpe
from atoll.train import train

TIMEOUT = 180


@pytest.fixture(scope="module")
def mixture_config(tmp_path_factory):
    """A config training the debug model on three sources of our own files, prepared shards in prepared/."""
    root = tmp_path_factory.mktemp("mixture")
    (root / "pq").mkdir()
    pq.write_table(pa.table({"text": [f"def f{i}(x):\n    return x * {i}\n" * 6 for i in range(400)]}), root / "pq" / "code.parquet")
    (root / "web").mkdir()
    with gzip.open(root / "web" / "pages.jsonl.gz", "wt") as f:
        for i in range(300):
            f.write(json.dumps({"text": f"Page {i}: the islands trade shells and songs. " * 5}) + "\n")
    (root / "notes").mkdir()
    for i in range(60):
        (root / "notes" / f"{i}.md").write_text(f"# Note {i}\n\nRemember the tide tables, entry {i}.\n" * 8)
    config = root / "mixture.toml"
    config.write_text(f"""
[model]
name = "debug"
[train]
steps = 8
seq_len = 64
global_batch = 8
[schedule]
warmup_steps = 2
[eval]
every = 4
batches = 1
[metrics]
log_every = 1
progress = "plain"
[data]
prepared = "{root / 'prepared'}"
cache_dir = "{root / 'cache'}"
val_fraction = 0.2
shard_tokens = 8000
[[data.sources]]
name = "code"
path = "{root / 'pq'}"
weight = 0.6
[[data.sources]]
name = "web"
path = "{root / 'web' / '*.jsonl.gz'}"
weight = 0.3
[[data.sources]]
name = "notes"
path = "{root / 'notes'}"
weight = 0.1
""")
    result = run_atoll(["data", "prepare", str(config), "--workers", "2", "--no-progress"], TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert "prepared 3 source(s)" in result.stdout
    return config


def test_prepare_train_resume_equals_an_uninterrupted_run(mixture_config, tmp_path):
    cfg = load_config(mixture_config, {"checkpoint.every": 4})
    train(cfg, tmp_path / "straight")
    resumed = train(cfg, tmp_path / "resumed", resume=str(tmp_path / "straight" / "checkpoints" / "step-00000004"))
    assert resumed.steps == 8
    straight, after = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    assert [r["step"] for r in after] == [5, 6, 7, 8]
    assert [r["loss"] for r in after] == [r["loss"] for r in straight[4:]]
    assert after[-1]["tokens_by_source"] == straight[-1]["tokens_by_source"]
    assert after[-1]["val_loss_by_source"] == straight[-1]["val_loss_by_source"]

    tokens = straight[-1]["tokens_by_source"]
    assert set(tokens) == {"code", "web", "notes"} and sum(tokens.values()) == 8 * 8 * 64
    assert set(straight[3]["val_loss_by_source"]) == {"code", "web", "notes"}
    assert min(straight[3]["val_loss_by_source"].values()) <= straight[3]["val_loss"] <= max(straight[3]["val_loss_by_source"].values())


def test_training_on_shards_of_another_tokenizer_is_one_line_naming_the_manifest(mixture_config, tmp_path, capsys):
    tokenizer = train_bpe(["the islands trade shells and songs " * 40], 300, tmp_path / "tok.json")
    code = main(["train", str(mixture_config), "--run-dir", str(tmp_path / "run"), "--data.tokenizer", str(tokenizer.path)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "manifest.json was tokenised with byte but data.tokenizer is hf:" in err


def test_raw_sources_without_prepare_are_tokenised_once_into_the_cache(mixture_config, tmp_path):
    cfg = load_config(mixture_config, {"data.prepared": None, "data.cache_dir": str(tmp_path / "cache"), "train.steps": 2,
                                         "schedule.warmup_steps": 0, "eval.every": 0})
    train(cfg, tmp_path / "a")
    shards = sorted((tmp_path / "cache" / "prepared").rglob("*.npy"))
    stamps = [p.stat().st_mtime_ns for p in shards]
    assert shards and read_metrics(tmp_path / "a")[-1]["tokens_by_source"]
    train(cfg, tmp_path / "b")
    assert [p.stat().st_mtime_ns for p in shards] == stamps  # reused, not tokenised again
    assert read_metrics(tmp_path / "a")[-1]["loss"] == read_metrics(tmp_path / "b")[-1]["loss"]
