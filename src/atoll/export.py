"""Hugging Face import and export of atoll's Llama: weights, config and tokenizer.

The mapping itself is atoll.hf.convert, the tokenizer files atoll.hf.tokenizer_files.

Export reads an atoll checkpoint tensor by tensor (atoll.checkpoint.reader), so memory holds one
safetensors shard, never the model.
An export directory is written beside its destination and renamed into place when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from atoll.atomic import atomic_write, fsync_dir
from atoll.checkpoint.reader import RUN_CONFIG_FILE, RunCheckpoint, find_checkpoint
from atoll.data import Tokenizer
from atoll.errors import UserError
from atoll.hf.convert import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    WEIGHTS_INDEX_FILE,
    args_from_hf_config,
    atoll_name,
    from_hf,
    hf_config,
    hf_name,
    json_text,
    to_hf,
)
from atoll.hf.tokenizer_files import tokenizer_files, tokenizer_of_hf_dir
from atoll.model import Llama, ModelArgs

GENERATION_CONFIG_FILE = "generation_config.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
"""Safetensors files above this are split, with an index (transformers' default of 5 GB)."""


def is_hf_dir(path: Path) -> bool:
    """A transformers model directory (config.json beside safetensors weights)."""
    return (path / CONFIG_FILE).is_file() and ((path / WEIGHTS_FILE).is_file() or (path / WEIGHTS_INDEX_FILE).is_file())


# --- export ----------------------------------------------------------------------------------------

@dataclass
class ExportReport:
    """What `export` wrote, for the command line to say."""

    out: Path
    source: RunCheckpoint
    diloco: bool
    local_ranks: int
    outer_step: int | None
    files: list[str]
    total_bytes: int


def plan_shards(sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Names grouped into consecutive shards of at most `max_bytes` (a larger tensor gets one of its own)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes:
        if shards[-1] and used + size > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def _write_file(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def export(source: Path, out: Path, dtype: str = "fp32", max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> ExportReport:
    """Write the model of run/checkpoint `source` to `out` as a transformers Llama directory.

    `out` must not exist or be empty; it appears only when complete (written to a temp directory
    beside it, fsynced, renamed). Peak memory is one safetensors shard. Raises UserError on bad input.
    """
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: choose from {', '.join(DTYPES)}")
    out = out.expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} already exists and is not empty: choose a new directory")
    run = find_checkpoint(source)
    reader = run.reader()
    torch_dtype = DTYPES[dtype]
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    shapes = reader.shapes
    shards = plan_shards([(n, s.numel() * itemsize) for n, s in shapes.items()], max_shard_bytes)
    names = [WEIGHTS_FILE] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial"))
    try:
        weight_map = {}
        for file, shard in zip(names, shards):
            tensors = {hf_name(n): to_hf(n, reader.read(n), run.args).to(torch_dtype).contiguous() for n in shard}
            save_file(tensors, tmp / file, metadata={"format": "pt"})
            _fsync(tmp / file)
            weight_map.update(dict.fromkeys(tensors, file))
            del tensors
        total = sum(s.numel() * itemsize for s in shapes.values())
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            _write_file(tmp / WEIGHTS_INDEX_FILE, json_text(index))
        eos = run.tokenizer.eos_id
        _write_file(tmp / CONFIG_FILE, json_text(hf_config(run.args, eos, torch_dtype)))
        generation = {"bos_token_id": None, "eos_token_id": eos, "pad_token_id": eos, "do_sample": False}
        _write_file(tmp / GENERATION_CONFIG_FILE, json_text(generation))
        for file, text in tokenizer_files(run.cfg.data.tokenizer, eos, run.args.max_seq_len).items():
            _write_file(tmp / file, text)
        fsync_dir(tmp)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = sorted(p.name for p in out.iterdir())
    return ExportReport(out, run, reader.diloco, reader.ranks, run.last_outer_step() if reader.diloco else None, files, total)


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


# --- import ----------------------------------------------------------------------------------------

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
