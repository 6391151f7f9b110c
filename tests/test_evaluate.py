"""`atoll eval` and training's evaluation: per-source losses of a mixture, and a loss that never builds full logits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, read_metrics

import atoll.model.loss
from atoll.cli import main
from atoll.config import load_config
from atoll.data import ByteTokenizer, TrainingData, iter_eval_batches, train_bpe, weighted_mean
from atoll.evaluate import evaluate_model, load_eval_data, pick_device
from atoll.hf import load_model
from atoll.island import start_island, stop_island
from atoll.model import Llama, get_size, lm_loss
from atoll.train import train
from atoll.val_loss import evaluate

WEIGHTS = {"tide": 0.7, "shells": 0.3}


@pytest.fixture(scope="module")
def mixture_run(tmp_path_factory) -> Path:
    """A 4-step single-island run of the debug model on two text sources, evaluated at its last step."""
    root = tmp_path_factory.mktemp("mixture")
    for name in WEIGHTS:
        (root / name).mkdir()
        for i in range(40):
            (root / name / f"{i}.md").write_text(f"# {name} {i}\n\nThe {name} of island {i} come and go.\n" * 8)
    sources = "".join(f'\n[[data.sources]]\nname = "{n}"\npath = "{root / n}"\nweight = {w}\n' for n, w in WEIGHTS.items())
    config = root / "mixture.toml"
    config.write_text((REPO / "configs" / "debug.toml").read_text() + f"""
[data]
cache_dir = "{root / 'cache'}"
val_fraction = 0.25
{sources}""")
    # micro_batch 4: `atoll eval` evaluates in micro-batches, training's single rank in one pass.
    cfg = load_config(config, {"train.steps": 4, "train.micro_batch": 4, "schedule.warmup_steps": 1, "eval.every": 4,
                                "eval.batches": 2})
    run_dir = root / "run"
    train(cfg, run_dir)
    return run_dir


def test_eval_of_a_mixture_reports_the_runs_last_val_loss_by_source(mixture_run, capsys):
    logged = [r for r in read_metrics(mixture_run) if "val_loss" in r][-1]
    assert set(logged["val_loss_by_source"]) == set(WEIGHTS)

    assert main(["eval", str(mixture_run)]) == 0
    lines = capsys.readouterr().out.splitlines()
    printed = {line.split()[1]: float(line.split()[2]) for line in lines if line.startswith("val_loss_by_source ")}
    assert printed.keys() == logged["val_loss_by_source"].keys()
    for name, loss in printed.items():  # printed to 4 decimals
        assert loss == pytest.approx(logged["val_loss_by_source"][name], abs=1e-4), name
    assert lines[-1].startswith("val_loss ") and float(lines[-1].split()[1]) == pytest.approx(logged["val_loss"], abs=1e-4)

    loaded = load_model(mixture_run)
    cfg = load_config(loaded.run_config)
    data = load_eval_data(cfg, loaded.tokenizer)
    result = evaluate_model(loaded.model, data, cfg, cfg.train.seq_len, pick_device(cfg.train.device))
    assert result.by_source == pytest.approx(logged["val_loss_by_source"], abs=1e-5)
    assert result.loss == pytest.approx(logged["val_loss"], abs=1e-5)
    assert result.batches == 2 * len(WEIGHTS)


def test_eval_with_another_tokenizer_is_one_line_and_tokenizes_nothing(mixture_run, tmp_path, capsys):
    tokenizer = train_bpe(["the tide of island 3 comes and goes " * 40], 300, tmp_path / "tok.json")
    prepared = sorted(p.stat().st_mtime_ns for p in (mixture_run.parent / "cache").rglob("*") if p.is_file())
    assert main(["eval", str(mixture_run), "--data.tokenizer", str(tokenizer.path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"({tokenizer.vocab_size} ids, eos {tokenizer.eos_id})" in err and "is not the model's tokenizer (257 ids, eos 256)" in err
    assert sorted(p.stat().st_mtime_ns for p in (mixture_run.parent / "cache").rglob("*") if p.is_file()) == prepared


MIXTURE_EVAL = {"model.name": "debug", "train.seq_len": 32, "train.global_batch": 4, "train.micro_batch": 2,
                "eval.batches": 3, "train.device": "cpu"}
"""tiny_mixture's config overrides."""


@pytest.fixture
def tiny_mixture():
    """The debug model at random init and two validation sets of random tokens, weighted 0.7 / 0.3."""
    model = Llama(get_size("debug"))
    model.init_weights(seed=3)
    gen = np.random.default_rng(0)
    val = {name: gen.integers(0, model.args.vocab_size, 4000).astype(np.int64) for name in WEIGHTS}
    data = TrainingData(ByteTokenizer(), list(WEIGHTS), list(WEIGHTS.values()), [], val, mixture=True)
    return model.eval(), data, load_config(None, MIXTURE_EVAL)


def test_evaluation_never_builds_full_logits_and_equals_the_full_logits_loss(tiny_mixture, monkeypatch):
    model, data, cfg = tiny_mixture
    seq_len, batch = cfg.train.seq_len, cfg.train.global_batch
    with torch.no_grad():  # the reference: whole-batch logits [4, 32, 512], then lm_loss
        want = {name: float(torch.stack([lm_loss(model(inp), tgt)[1] for inp, tgt in
                                         iter_eval_batches(tokens, seq_len, batch, 0, 1, cfg.eval.batches)]).mean())
                for name, tokens in data.val.items()}

    def no_full_logits(hidden: torch.Tensor) -> torch.Tensor:
        raise AssertionError(f"evaluation applied the output head to hidden states {list(hidden.shape)}")

    monkeypatch.setattr(model.output, "forward", no_full_logits)
    # 7 positions' logits per chunk: several chunks per micro-batch, the last one short.
    monkeypatch.setattr(atoll.model.loss, "LOSS_CHUNK_LOGITS", 7 * model.args.vocab_size)

    result = evaluate_model(model, data, cfg, seq_len, torch.device("cpu"))
    assert result.by_source == pytest.approx(want, rel=1e-5)
    assert result.loss == pytest.approx(weighted_mean(want, data.names, data.weights), rel=1e-5)
    assert result.batches == cfg.eval.batches * len(WEIGHTS)

    island = start_island("cpu")
    try:
        got = evaluate(model, data, seq_len, cfg, island)
    finally:
        stop_island()
    assert got == pytest.approx(want, rel=1e-5)


def test_eval_batches_zero_evaluates_every_batch_of_the_split(tiny_mixture):
    model, data, cfg = tiny_mixture
    whole = load_config(None, {**MIXTURE_EVAL, "eval.batches": 0})
    seq_len, batch = cfg.train.seq_len, cfg.train.global_batch
    per_source = (4000 - 1) // seq_len // batch  # 31 batches of 4 windows in each 4000-token set
    with torch.no_grad():
        want = {name: float(torch.stack([model(inp, tgt)[1] for inp, tgt in
                                         iter_eval_batches(tokens, seq_len, batch, 0, 1, per_source)]).mean())
                for name, tokens in data.val.items()}
    result = evaluate_model(model, data, whole, seq_len, torch.device("cpu"))
    assert result.batches == per_source * len(WEIGHTS)
    assert result.by_source == pytest.approx(want, rel=1e-5)
    assert result.by_source != pytest.approx(evaluate_model(model, data, cfg, seq_len, torch.device("cpu")).by_source, rel=1e-5)
