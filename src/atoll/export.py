"""Hugging Face import and export of atoll's Llama: weights, config and tokenizer.

The mapping itself is atoll.hf.convert, the tokenizer files atoll.hf.tokenizer_files.

Export reads an atoll checkpoint tensor by tensor: a DiLoCo checkpoint holds, per local rank, a flat
fp32 buffer of that rank's FSDP2 shards of the outer weights (`diloco.rank<k>.outer`), and only the
rows of one parameter are read from each rank's buffer at a time; other checkpoints hold the model
as DCP tensors, loaded one at a time. So memory holds one safetensors shard, never the model.
An export directory is written beside its destination and renamed into place when complete.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import struct
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata

from atoll.atomic import atomic_write, fsync_dir
from atoll.checkpoint import newest_verified
from atoll.checkpoint.timeline import is_complete, parse_name
from atoll.config import JobConfig, load_config
from atoll.data import Tokenizer, load_tokenizer
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
RUN_CONFIG_FILE = "config.toml"
METRICS_FILE = "metrics.jsonl"
MODEL_PREFIX = "model_optimizer.model."
"""Where the trainer's ModelOptimizerState puts the model in a checkpoint (DCP flattened keys)."""
OUTER_KEY = re.compile(r"^diloco\.rank(\d+)\.outer$")
"""The DiLoCo outer weights of one local rank: a flat fp32 buffer of its shards (atoll.diloco)."""
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
"""Safetensors files above this are split, with an index (transformers' default of 5 GB)."""


# --- reading a run's checkpoint tensor by tensor ---------------------------------------------------

class _Window(io.RawIOBase):
    """A read-only view of bytes [offset, offset + length) of an open file (one DCP storage item)."""

    def __init__(self, file: io.BufferedReader, offset: int, length: int) -> None:
        self.file, self.offset, self.length, self.pos = file, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        self.pos = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.length}[whence] + pos
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buffer: Any) -> int:
        n = max(0, min(len(buffer), self.length - self.pos))
        self.file.seek(self.offset + self.pos)
        got = self.file.readinto(memoryview(buffer)[:n])
        self.pos += got
        return got


class _FlatBuffer:
    """Reads ranges of a flat tensor in a DCP checkpoint without loading the rest.

    DCP stores a tensor as one `torch.save` zip archive inside a .distcp file; its storage is an
    uncompressed zip member, so a range is a seek and a read (and nothing is unpickled).
    """

    def __init__(self, checkpoint: Path, fqn: str, meta: TensorStorageMetadata, storage: Any) -> None:
        if storage.transform_descriptors:
            raise UserError(f"{checkpoint}: {fqn} is stored transformed ({storage.transform_descriptors}); export reads plain DCP files only")
        self.path = checkpoint / storage.relative_path
        self.dtype = meta.properties.dtype
        self.numel = meta.size.numel()
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        with open(self.path, "rb") as f, zipfile.ZipFile(_Window(f, storage.offset, storage.length)) as archive:
            names = archive.namelist()
            data = [n for n in names if n.endswith("/data/0")]
            order = [n for n in names if n.endswith("/byteorder")]
            if (len(data) != 1 or archive.getinfo(data[0]).file_size != self.numel * itemsize
                    or archive.getinfo(data[0]).compress_type != zipfile.ZIP_STORED):
                raise UserError(f"{checkpoint}: {fqn} is not stored as one plain tensor; cannot read it in parts")
            if order and archive.read(order[0]).decode() != sys.byteorder:
                raise UserError(f"{checkpoint}: {fqn} was written on a machine of the other byte order")
            info = archive.getinfo(data[0])
            f.seek(storage.offset + info.header_offset + 26)  # the local header's name and extra lengths
            name_len, extra_len = struct.unpack("<HH", f.read(4))
        self.start = storage.offset + info.header_offset + 30 + name_len + extra_len
        self.itemsize = itemsize

    def read(self, start: int, count: int) -> torch.Tensor:
        """Elements [start, start + count) as a new CPU tensor."""
        with open(self.path, "rb") as f:
            f.seek(self.start + start * self.itemsize)
            raw = bytearray(f.read(count * self.itemsize))
        return torch.frombuffer(raw, dtype=self.dtype) if count else torch.empty(0, dtype=self.dtype)


def fsdp_rows(rows: int, ranks: int) -> list[int]:
    """Rows of a dim-0 length `rows` that each of `ranks` FSDP2 ranks holds (Shard(0), torch.chunk sizes)."""
    chunk = math.ceil(rows / ranks)
    return [max(0, min(chunk, rows - k * chunk)) for k in range(ranks)]


class CheckpointReader:
    """The full tensors of one atoll checkpoint, one at a time.

    In a DiLoCo checkpoint these are the outer weights (what the last committed outer step left,
    the same on every island), rebuilt from every local rank's flat buffer; otherwise the model.
    Raises UserError when the checkpoint does not hold the model described by `names`/`shapes`.
    """

    def __init__(self, checkpoint: Path, shapes: dict[str, torch.Size]) -> None:
        self.checkpoint = checkpoint
        self.shapes = shapes
        metadata = FileSystemReader(checkpoint).read_metadata()
        outer = {int(m.group(1)): key for key in metadata.state_dict_metadata if (m := OUTER_KEY.match(key))}
        self.diloco = bool(outer)
        self.ranks = len(outer)
        self.buffers: list[_FlatBuffer] = []
        if self.diloco:
            if sorted(outer) != list(range(self.ranks)):
                raise UserError(f"{checkpoint}: DiLoCo buffers of local ranks {sorted(outer)}; expected 0..{self.ranks - 1}")
            for k in range(self.ranks):
                key = outer[k]
                storage = metadata.storage_data[MetadataIndex(key, torch.Size([0]))]
                self.buffers.append(_FlatBuffer(checkpoint, key, metadata.state_dict_metadata[key], storage))
            self.offsets = self._shard_offsets()
        else:
            for name, shape in shapes.items():
                found = metadata.state_dict_metadata.get(MODEL_PREFIX + name)
                if not isinstance(found, TensorStorageMetadata) or found.size != shape:
                    got = getattr(found, "size", "nothing")
                    raise UserError(f"{checkpoint}: {name} has shape {list(got) if got != 'nothing' else got}, "
                                    f"the run's config says {list(shape)}: is this checkpoint from this run?")

    def _shard_offsets(self) -> list[dict[str, int]]:
        """Where each parameter's rows start in each local rank's flat buffer (parameter order)."""
        offsets: list[dict[str, int]] = [{} for _ in range(self.ranks)]
        for k in range(self.ranks):
            at = 0
            for name, shape in self.shapes.items():
                offsets[k][name] = at
                at += fsdp_rows(shape[0], self.ranks)[k] * shape[1:].numel()
            if at != self.buffers[k].numel:
                raise UserError(f"{self.checkpoint}: local rank {k}'s outer weights hold {self.buffers[k].numel} values, "
                                f"the run's model sharded {self.ranks} ways needs {at}: is this checkpoint from this run?")
        return offsets

    def read(self, name: str) -> torch.Tensor:
        """The full fp32 tensor of parameter `name`."""
        shape = self.shapes[name]
        if not self.diloco:
            state = {name: torch.empty(shape)}
            with warnings.catch_warnings():  # DCP warns that no process group exists: one process reads
                warnings.simplefilter("ignore", UserWarning)
                dcp.load({"model_optimizer": {"model": state}}, checkpoint_id=self.checkpoint, no_dist=True)
            return state[name].float()
        parts = []
        for k, rows in enumerate(fsdp_rows(shape[0], self.ranks)):
            part = self.buffers[k].read(self.offsets[k][name], rows * shape[1:].numel())
            parts.append(part.view(rows, *shape[1:]))
        return torch.cat(parts).float()


# --- runs, checkpoints and HF directories ----------------------------------------------------------

def is_hf_dir(path: Path) -> bool:
    """A transformers model directory (config.json beside safetensors weights)."""
    return (path / CONFIG_FILE).is_file() and ((path / WEIGHTS_FILE).is_file() or (path / WEIGHTS_INDEX_FILE).is_file())


@dataclass
class RunCheckpoint:
    """One checkpoint of a run, with the run's resolved config and model shape."""

    run_dir: Path
    checkpoint: Path
    cfg: JobConfig
    args: ModelArgs
    tokenizer: Tokenizer

    @property
    def step(self) -> int:
        return parse_name(self.checkpoint.name)[0]

    def reader(self) -> CheckpointReader:
        return CheckpointReader(self.checkpoint, param_shapes(self.args))

    def last_outer_step(self) -> int | None:
        """The last outer step committed by this checkpoint's step, from metrics.jsonl (None if unknown)."""
        path = self.run_dir / METRICS_FILE
        if not path.is_file():
            return None
        found = None
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if "outer_step" in record and not record.get("skipped") and record["step"] <= self.step:
                found = record["outer_step"]
        return found


def param_shapes(args: ModelArgs) -> dict[str, torch.Size]:
    """Parameter names and shapes of Llama(args), in named_parameters order (no memory used)."""
    with torch.device("meta"):
        model = Llama(args)
    return {name: p.shape for name, p in model.named_parameters()}


def _latest_checkpoint(run_dir: Path) -> Path | None:
    """The run's newest checkpoint that verifies (its current timeline's), or None."""
    if not (run_dir / "checkpoints").is_dir():
        return None
    found = newest_verified(run_dir / "checkpoints", lambda line: print(f"atoll: {line}", flush=True))
    return found.path if found else None


def find_checkpoint(path: Path) -> RunCheckpoint:
    """A run directory (its latest checkpoint), a checkpoint directory, or a simulate run directory
    (the island whose latest checkpoint is newest: in DiLoCo every island holds the same outer weights)."""
    path = path.expanduser()
    if is_complete(path):
        run_dir, checkpoint = path.parent.parent, path
    else:
        run_dir = path
        checkpoint = _latest_checkpoint(path)
        islands = sorted(p for p in path.glob("island-*") if (p / RUN_CONFIG_FILE).is_file()) if path.is_dir() else []
        if checkpoint is None and islands:
            found = [(c, island) for island in islands if (c := _latest_checkpoint(island)) is not None]
            if found:
                checkpoint, run_dir = max(found, key=lambda ci: parse_name(ci[0].name))
                print(f"atoll: {path} holds {len(islands)} island(s); using {run_dir.name}'s latest checkpoint", file=sys.stderr)
        if checkpoint is None:
            raise UserError(f"{path}: no complete checkpoint (checkpoints/step-N) found; pass a run directory, "
                            "a checkpoint directory or a Hugging Face model directory")
    if not (run_dir / RUN_CONFIG_FILE).is_file():
        raise UserError(f"{run_dir} has no {RUN_CONFIG_FILE}: pass the checkpoint of an atoll run directory")
    from atoll.train import model_args  # the trainer's rule for the model shape, kept in one place

    cfg = load_config(run_dir / RUN_CONFIG_FILE)
    try:
        tokenizer = load_tokenizer(cfg.data.tokenizer)
    except (FileNotFoundError, ValueError) as err:
        raise UserError(f"{run_dir / RUN_CONFIG_FILE}: data.tokenizer: {err}") from None
    return RunCheckpoint(run_dir, checkpoint, cfg, model_args(cfg, tokenizer.vocab_size), tokenizer)


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
