"""Reading an atoll checkpoint tensor by tensor, without building the model; finding a run's checkpoint.

A DiLoCo checkpoint holds, per local rank, a flat fp32 buffer of that rank's FSDP2 shards of the outer
weights (`diloco.rank<k>.outer`), and only the rows of one parameter are read from each rank's buffer
at a time; other checkpoints hold the model as DCP tensors, loaded one at a time. So reading holds
one parameter in memory at a time, never the whole checkpoint (export, eval and sample read this way).
"""

from __future__ import annotations

import io
import json
import math
import re
import struct
import sys
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata

from atoll.checkpoint.sharded import newest_verified
from atoll.checkpoint.timeline import is_complete, parse_name
from atoll.config import JobConfig, load_config
from atoll.data import Tokenizer, load_tokenizer
from atoll.errors import UserError
from atoll.logs import log
from atoll.model import Llama, ModelArgs

RUN_CONFIG_FILE = "config.toml"
METRICS_FILE = "metrics.jsonl"
MODEL_PREFIX = "model_optimizer.model."
"""Where the trainer's ModelOptimizerState puts the model in a checkpoint (DCP flattened keys)."""
OUTER_KEY = re.compile(r"^diloco\.rank(\d+)\.outer$")
"""The DiLoCo outer weights of one local rank: a flat fp32 buffer of its shards (atoll.diloco)."""


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
    found = newest_verified(run_dir / "checkpoints", lambda line: log.info(f"atoll: {line}"))
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
                log.info(f"atoll: {path} holds {len(islands)} island(s); using {run_dir.name}'s latest checkpoint")
        if checkpoint is None:
            raise UserError(f"{path}: no complete checkpoint (checkpoints/step-N) found; pass a run directory, "
                            "a checkpoint directory or a Hugging Face model directory")
    if not (run_dir / RUN_CONFIG_FILE).is_file():
        raise UserError(f"{run_dir} has no {RUN_CONFIG_FILE}: pass the checkpoint of an atoll run directory")
    from atoll.model_setup import model_args  # the trainer's rule for the model shape, kept in one place

    cfg = load_config(run_dir / RUN_CONFIG_FILE)
    try:
        tokenizer = load_tokenizer(cfg.data.tokenizer)
    except (FileNotFoundError, ValueError) as err:
        raise UserError(f"{run_dir / RUN_CONFIG_FILE}: data.tokenizer: {err}") from None
    return RunCheckpoint(run_dir, checkpoint, cfg, model_args(cfg, tokenizer.vocab_size), tokenizer)

