"""End-to-end training of one island through the CLI: 1 process and 2 local ranks (FSDP2, gloo)."""

from __future__ import annotations

import argparse
import json
import math
import shutil
import textwrap
from pathlib import Path

import pytest
from conftest import read_metrics, run_atoll

from atoll.checkpoint import Checkpointer
from atoll.config import load_config

TIMEOUT = 180


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("token-cache"))


def debug_args(run_dir: Path, cache_dir: str, steps: int = 8, *extra: str) -> list[str]:
    return [
        "train", "configs/debug.toml", "--run-dir", str(run_dir),
        "--train.steps", str(steps), "--train.global_batch", "8", "--train.seq_len", "64",
        "--schedule.warmup_steps", "2", "--metrics.log_every", "1", "--eval.every", "4", "--eval.batches", "1",
        "--data.cache_dir", cache_dir, *extra,
    ]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir)}


def test_single_process_run_learns_and_writes_metrics_config_and_checkpoint(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    result = run_atoll(debug_args(run_dir, cache_dir, 30, "--eval.every", "10"), TIMEOUT)
    assert result.returncode == 0, result.stderr

    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, 31))
    for key in ("step", "loss", "lr", "tokens", "tokens_per_s", "mfu", "grad_norm"):
        assert key in records[0]
    assert records[-1]["tokens"] == 30 * 8 * 64
    assert records[0]["mfu"] is None  # CPU: no known peak FLOP/s
    assert all(r["tokens_per_s"] > 0 for r in records)
    assert [r["step"] for r in records if "val_loss" in r] == [10, 20, 30]
    assert records[0]["loss"] > math.log(257) - 1.0  # starts near uniform over the byte vocabulary
    assert records[-1]["loss"] < records[0]["loss"] - 1.5
    assert records[-1]["val_loss"] < records[9]["val_loss"]

    assert load_config(run_dir / "config.toml").train.steps == 30
    info = json.loads((run_dir / "run.json").read_text())
    assert info["local_ranks"] == 1 and len(info["init_digest"]) == 64
    assert Checkpointer(run_dir / "checkpoints", 2, True).latest().name == "step-00000030"
    assert "done: 30 steps" in result.stdout


def test_two_local_ranks_match_one_process_on_the_same_global_batch(tmp_path, cache_dir):
    one = tmp_path / "one"
    two = tmp_path / "two"
    # The single process reaches the same global batch of 8 through 2 accumulation steps.
    r1 = run_atoll(debug_args(one, cache_dir, 8, "--train.micro_batch", "4"), TIMEOUT)
    r2 = run_atoll([*debug_args(two, cache_dir, 8), "--nproc", "2"], TIMEOUT)
    assert r1.returncode == 0, r1.stderr
    assert r2.returncode == 0, r2.stderr

    l1, l2 = losses(one), losses(two)
    assert sorted(l1) == sorted(l2) == list(range(1, 9))
    for step in l1:
        assert abs(l1[step] - l2[step]) < 1e-5, (step, l1[step], l2[step])
    assert l1[8] < l1[1]
    info1 = json.loads((one / "run.json").read_text())
    info2 = json.loads((two / "run.json").read_text())
    assert info2["local_ranks"] == 2
    assert info1["init_digest"] == info2["init_digest"]


def test_half_written_checkpoint_is_never_resumed_from(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    assert run_atoll(debug_args(run_dir, cache_dir, 4, "--eval.every", "0"), TIMEOUT).returncode == 0
    # A crash mid-save leaves a .partial directory (here: a newer step, with junk in it).
    partial = run_dir / "checkpoints" / "step-00000009.partial"
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"torn")
    shutil.copy(run_dir / "checkpoints" / "step-00000004" / ".metadata", partial / ".metadata")

    assert Checkpointer(run_dir / "checkpoints", 2, True).latest().name == "step-00000004"
    r = run_atoll([*debug_args(run_dir, cache_dir, 6, "--eval.every", "0"), "--resume"], TIMEOUT)
    assert r.returncode == 0, r.stderr
    assert [rec["step"] for rec in read_metrics(run_dir)] == [1, 2, 3, 4, 5, 6]
    assert "resumed at step 4" in r.stdout
    assert not partial.exists()  # the next save clears leftovers of crashed saves


def test_trained_bpe_tokenizer_drives_a_run_on_a_directory_corpus(tmp_path, cache_dir):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, path in enumerate(sorted(Path(json.__file__).parent.glob("*.py"))):
        (corpus / f"doc{i}.py").write_text(path.read_text() * 4)
    tokenizer = tmp_path / "tok.json"
    r = run_atoll(["tokenizer", "train", "--vocab-size", "400", "--source", str(corpus), "--out", str(tokenizer)], TIMEOUT)
    assert r.returncode == 0, r.stderr
    assert tokenizer.is_file() and "--data.tokenizer" in r.stdout

    run_dir = tmp_path / "run"
    r = run_atoll([*debug_args(run_dir, cache_dir, 4, "--eval.every", "0"), "--data.source", str(corpus),
                   "--data.tokenizer", str(tokenizer), "--data.val_fraction", "0.3"], TIMEOUT)
    assert r.returncode == 0, r.stderr
    first = read_metrics(run_dir)[0]["loss"]
    assert abs(first - math.log(512)) < 1.0  # ~uniform over the debug model's 512 ids, not the byte vocabulary's


def test_tokenizer_larger_than_the_model_vocabulary_is_a_one_line_error(tmp_path, cache_dir):
    tokenizer, corpus = tmp_path / "tok.json", tmp_path / "corpus.txt"
    corpus.write_text("".join(Path(m.__file__).read_text() for m in (argparse, textwrap)))  # enough for 600 tokens, fast
    result = run_atoll(["tokenizer", "train", "--vocab-size", "600", "--source", str(corpus), "--out", str(tokenizer)], TIMEOUT)
    assert result.returncode == 0, result.stderr
    r = run_atoll([*debug_args(tmp_path / "run", cache_dir, 4), "--data.tokenizer", str(tokenizer)], TIMEOUT)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "--model.vocab_size 600" in r.stderr
