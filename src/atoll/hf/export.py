"""Export of an atoll run's model as a Hugging Face Llama directory: weights, config and tokenizer.

The checkpoint is read tensor by tensor (atoll.checkpoint.reader), so memory holds one safetensors
shard, never the model. An export directory is written beside its destination and renamed into
place when complete.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from atoll.atomic import atomic_write, fsync_dir, temp_dir_beside, umask_mode
from atoll.checkpoint.reader import RunCheckpoint, find_checkpoint
from atoll.errors import UserError
from atoll.hf.convert import CONFIG_FILE, WEIGHTS_FILE, WEIGHTS_INDEX_FILE, hf_config, hf_name, json_text, to_hf
from atoll.hf.tokenizer_files import tokenizer_files

GENERATION_CONFIG_FILE = "generation_config.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
"""Safetensors files above this are split, with an index (transformers' default of 5 GB)."""


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
    tmp = temp_dir_beside(out, ".partial")
    try:
        weight_map = {}
        for file, shard in zip(names, shards):
            tensors = {hf_name(n): to_hf(n, reader.read(n), run.args).to(torch_dtype).contiguous() for n in shard}
            save_file(tensors, tmp / file, metadata={"format": "pt"})
            os.chmod(tmp / file, umask_mode())  # safetensors writes 0600 whatever the umask
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
