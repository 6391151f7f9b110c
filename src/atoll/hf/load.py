"""Loading into atoll's Llama: a Hugging Face Llama directory's weights (`--init-from`), and, for eval and
sample, any model atoll reads (a run, a checkpoint or an HF directory) as an unsharded CPU model.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from atoll.checkpoint.reader import RUN_CONFIG_FILE, find_checkpoint
from atoll.data import Tokenizer
from atoll.errors import UserError
from atoll.hf.convert import CONFIG_FILE, WEIGHTS_FILE, WEIGHTS_INDEX_FILE, args_from_hf_config, atoll_name, from_hf, hf_name
from atoll.hf.tokenizer_files import tokenizer_of_hf_dir
from atoll.model import Llama, ModelArgs


# --- import ----------------------------------------------------------------------------------------

def is_hf_dir(path: Path) -> bool:
    """A transformers model directory (config.json beside safetensors weights)."""
    return (path / CONFIG_FILE).is_file() and ((path / WEIGHTS_FILE).is_file() or (path / WEIGHTS_INDEX_FILE).is_file())


def _hf_tensors(hf_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(transformers name, tensor) of every weight in an HF directory, one file open at a time."""
    index = hf_dir / WEIGHTS_INDEX_FILE
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [WEIGHTS_FILE]
    for file in files:
        with safe_open(hf_dir / file, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def read_hf_config(hf_dir: Path) -> ModelArgs:
    """The ModelArgs of an HF Llama directory; UserError if it is not one atoll can load."""
    if not is_hf_dir(hf_dir):
        raise UserError(f"{hf_dir} is not a Hugging Face model directory (config.json and model.safetensors[.index.json])")
    try:
        config = json.loads((hf_dir / CONFIG_FILE).read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{hf_dir / CONFIG_FILE} is not valid JSON: {err}") from None
    return args_from_hf_config(config, hf_dir / CONFIG_FILE)


_SHAPE_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "vocab_size")


@torch.no_grad()
def load_hf_weights(model: Llama, hf_dir: Path) -> None:
    """Copy the weights of HF Llama directory `hf_dir` into `model` (unsharded, any device).

    The directory's config must describe `model`'s shape (rope_theta and rms_norm_eps included);
    otherwise, or on a missing or misshapen tensor, a one-line UserError names the difference.
    """
    hf_dir = hf_dir.expanduser()
    theirs = read_hf_config(hf_dir)
    ours = model.args
    for field in (*_SHAPE_FIELDS, "rope_theta", "norm_eps"):
        if getattr(theirs, field) != getattr(ours, field):
            raise UserError(f"--init-from {hf_dir}: its {field} is {getattr(theirs, field)}, this run's model has "
                            f"{getattr(ours, field)}: choose the matching model.name and overrides")
    params = dict(model.named_parameters())
    missing = set(params)
    for name, tensor in _hf_tensors(hf_dir):
        ours_name = atoll_name(name)
        if ours_name not in params:
            raise UserError(f"--init-from {hf_dir}: unexpected tensor {name}: not a Llama weight atoll knows")
        if tensor.shape != params[ours_name].shape:
            raise UserError(f"--init-from {hf_dir}: {name} has shape {list(tensor.shape)}, "
                            f"this run's model needs {list(params[ours_name].shape)}")
        params[ours_name].copy_(from_hf(ours_name, tensor, ours))
        missing.discard(ours_name)
    if missing:
        raise UserError(f"--init-from {hf_dir}: no weight for {hf_name(sorted(missing)[0])} ({len(missing)} missing)")


# --- loading a model to evaluate or sample ----------------------------------------------------------

@dataclass
class LoadedModel:
    """An atoll Llama with its tokenizer, from a run or an HF directory."""

    model: Llama
    tokenizer: Tokenizer
    run_config: Path | None
    """The run's config.toml when the model came from a run."""
    described: str


@torch.no_grad()
def load_model(path: Path) -> LoadedModel:
    """The model at `path` (run, checkpoint or HF directory) as an unsharded fp32 Llama on the CPU."""
    path = path.expanduser()
    if is_hf_dir(path):
        args = read_hf_config(path)
        model = _empty_model(args)
        load_hf_weights(model, path)
        return LoadedModel(model, tokenizer_of_hf_dir(path), None, f"{path} (Hugging Face)")
    run = find_checkpoint(path)
    reader = run.reader()
    model = _empty_model(run.args)
    for name, param in model.named_parameters():
        param.copy_(reader.read(name))
    what = "outer weights" if reader.diloco else "weights"
    return LoadedModel(model, run.tokenizer, run.run_dir / RUN_CONFIG_FILE, f"{run.checkpoint} ({what} at step {run.step})")


def _empty_model(args: ModelArgs) -> Llama:
    """Llama(args) in CPU memory, to be overwritten with loaded weights (init_weights fills the RoPE table)."""
    with torch.device("meta"):
        model = Llama(args)
    model.to_empty(device="cpu")
    model.init_weights()
    return model.eval()
