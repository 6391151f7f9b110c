"""The model leaves atoll: export to Hugging Face, import, evaluation and sampling.

One DiLoCo run of the debug model on 2 local ranks (FSDP2 shards in each rank's outer buffer) is
trained once; transformers then loads its export and must agree with atoll's own model.
"""

from __future__ import annotations

import json
import os
import stat
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
import transformers
from conftest import REPO, read_metrics, run_atoll

from atoll.cli import main
from atoll.data import ByteTokenizer
from atoll.errors import UserError
from atoll.hf import find_checkpoint, load_hf_weights, load_model
from atoll.model import Llama, get_size

TIMEOUT = 300
SAMPLE_TEXT = "def main():\n    print('héllo, wörld <|endoftext|>')  # 東京\n"
SHARD = "150KB"  # the debug model's 0.66 MB of fp32 weights in 5 files, so the index is exercised


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("token-cache"))


@pytest.fixture(scope="module")
def run(tmp_path_factory, cache_dir) -> Path:
    """A 1-island DiLoCo run on 2 local ranks: checkpoints at step 2 (no outer step yet) and 4 (after the last)."""
    run_dir = tmp_path_factory.mktemp("runs") / "diloco"
    result = run_atoll([
        "simulate", "--islands", "1", "--procs-per-island", "2", "--run-dir", str(run_dir), "configs/debug.toml",
        "--train.steps", "4", "--schedule.warmup_steps", "1", "--diloco.inner_steps", "3", "--checkpoint.every", "2",
        "--checkpoint.keep", "5", "--eval.every", "4", "--data.cache_dir", cache_dir,
    ], TIMEOUT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run_dir / "island-0"


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hf") / "debug"
    assert main(["export", str(run), "--out", str(out), "--max-shard-size", SHARD]) == 0
    return out


def test_export_loads_in_transformers_with_atoll_logits_and_tokens(run, exported, capsys):
    config = json.loads((exported / "config.json").read_text())
    assert config["rms_norm_eps"] == 1e-5 and config["rope_theta"] == 500000.0 and config["tie_word_embeddings"] is False
    assert len(json.loads((exported / "model.safetensors.index.json").read_text())["weight_map"]) == 21

    hf = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
    ids = tokenizer(SAMPLE_TEXT)["input_ids"]
    assert ids == ByteTokenizer().encode(SAMPLE_TEXT)
    assert tokenizer.decode(ids) == SAMPLE_TEXT

    ours = load_model(run).model
    tokens = torch.tensor([ids[:64]])
    with torch.no_grad():
        diff = (hf(tokens).logits - ours(tokens)).abs().max().item()
    assert diff <= 1e-4, diff


def _inner(checkpoint: Path, name: str, shape: torch.Size) -> torch.Tensor:
    """The inner (trained) weight `name` in a checkpoint, as the trainer saved it."""
    state = {name: torch.empty(shape)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # no process group: one process reads
        dcp.load({"model_optimizer": {"model": state}}, checkpoint_id=checkpoint, no_dist=True)
    return state[name]


def test_export_takes_the_outer_weights_of_the_last_committed_outer_step(run):
    # At step 2 no outer step has happened: the outer weights are still the seeded initial weights,
    # while the inner weights have trained. At step 4 the final outer step copied outer into inner.
    torch.manual_seed(0)
    initial = Llama(find_checkpoint(run).args)
    early = load_model(run / "checkpoints" / "step-00000002").model
    last = load_model(run / "checkpoints" / "step-00000004").model
    for (name, init), outer2, outer4 in zip(initial.named_parameters(), early.parameters(), last.parameters()):
        assert torch.equal(outer2, init), name
        assert not torch.equal(_inner(run / "checkpoints" / "step-00000002", name, init.shape), init), name
        assert torch.equal(outer4, _inner(run / "checkpoints" / "step-00000004", name, init.shape)), name


def test_export_of_a_run_without_diloco_takes_its_model_weights(cache_dir, tmp_path):
    run_dir, out = tmp_path / "alone", tmp_path / "hf"
    result = run_atoll(["train", "configs/debug.toml", "--run-dir", str(run_dir), "--train.steps", "2",
                        "--schedule.warmup_steps", "0", "--eval.every", "0", "--data.cache_dir", cache_dir], TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert main(["export", str(run_dir), "--out", str(out), "--dtype", "bf16"]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    trained = Llama(find_checkpoint(run_dir).args)
    for name, param in trained.named_parameters():
        param.data = _inner(run_dir / "checkpoints" / "step-00000002", name, param.shape)
    tokens = torch.tensor([ByteTokenizer().encode(SAMPLE_TEXT)[:64]])
    with torch.no_grad():
        diff = (hf(tokens).logits - trained(tokens)).abs().max().item()
    assert 0 < diff < 0.05, diff  # bf16 weights: close, not equal


def test_export_import_export_gives_identical_files(exported, cache_dir, tmp_path):
    # A DiLoCo island checkpoints its outer weights, which stay the imported ones until the first outer step.
    again = tmp_path / "again"
    result = run_atoll([
        "simulate", "--islands", "1", "--run-dir", str(tmp_path / "imported"), "configs/debug.toml",
        "--model.init_from", str(exported), "--train.steps", "2", "--schedule.warmup_steps", "0",
        "--diloco.inner_steps", "2", "--checkpoint.every", "1", "--checkpoint.keep", "5", "--eval.every", "0",
        "--data.cache_dir", cache_dir,
    ], TIMEOUT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    checkpoint = tmp_path / "imported" / "island-0" / "checkpoints" / "step-00000001"
    assert main(["export", str(checkpoint), "--out", str(again), "--max-shard-size", SHARD]) == 0
    files = sorted(p.name for p in exported.iterdir())
    assert files == sorted(p.name for p in again.iterdir())
    for name in files:
        assert (exported / name).read_bytes() == (again / name).read_bytes(), name


def test_eval_of_the_export_equals_the_runs_last_val_loss(run, exported, capsys):
    logged = [r["val_loss"] for r in read_metrics(run) if "val_loss" in r][-1]
    for args in ([str(run)], [str(exported), str(run / "config.toml")]):
        assert main(["eval", *args]) == 0
        line = capsys.readouterr().out.splitlines()[-1]
        assert abs(float(line.split()[1]) - logged) <= 1e-4, (line, logged)


def test_sample_at_temperature_0_is_deterministic_and_equals_transformers_greedy_generate(exported, capsys):
    args = ["sample", str(exported), "--prompt", "def ", "--max-new-tokens", "24", "--temperature", "0"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first

    hf = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
    prompt = torch.tensor([tokenizer("def ")["input_ids"]])
    greedy = hf.generate(prompt, do_sample=False, max_new_tokens=24)
    assert first == tokenizer.decode(greedy[0], skip_special_tokens=True) + "\n"


def test_sample_with_a_seed_repeats_itself(exported, capsys):
    args = ["sample", str(exported), "--prompt", "import ", "--max-new-tokens", "16", "--seed", "3"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first and first.startswith("import ")


def test_init_from_a_model_of_another_shape_is_one_line(exported):
    with pytest.raises(UserError, match=r"its dim is 64, this run's model has 256"):
        load_hf_weights(Llama(get_size("demo")), exported)


def test_export_refuses_a_non_empty_out_and_a_path_without_checkpoints(run, exported, tmp_path, capsys):
    assert main(["export", str(run), "--out", str(exported)]) == 2
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "already exists and is not empty" in err[0] and "no complete checkpoint" in err[1]
    assert not (tmp_path / "x").exists()


def test_export_and_the_runs_json_files_respect_the_umask(run, tmp_path):
    old = os.umask(0o022)
    try:
        assert main(["export", str(run), "--out", str(tmp_path / "public")]) == 0
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "public").iterdir()}
    assert stat.S_IMODE((tmp_path / "public").stat().st_mode) == 0o755
    assert modes["tokenizer.json"] == modes["config.json"] == modes["model.safetensors"] == 0o644, modes
    assert set(modes.values()) == {0o644}
    made_by_run = 0o666 & ~old  # the run's process inherited the test's umask
    checkpoint = sorted((run / "checkpoints").glob("step-*"))[-1]
    assert stat.S_IMODE((checkpoint / "manifest.json").stat().st_mode) == made_by_run
    assert stat.S_IMODE((run / "checkpoints" / "timelines.json").stat().st_mode) == made_by_run
    assert stat.S_IMODE((run / "run.json").stat().st_mode) == made_by_run


def test_version_and_print_config(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    from atoll import __version__

    assert capsys.readouterr().out.strip() == f"atoll {__version__}"
    assert main(["train", str(REPO / "configs" / "debug.toml"), "--optim.lr", "0.01", "--init-from", "x", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert 'lr = 0.01' in out and 'init_from = "x"' in out and 'name = "debug"' in out
