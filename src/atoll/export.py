"""Hugging Face import and export of atoll's Llama: weights, config and tokenizer.

atoll's Llama is transformers' `LlamaForCausalLM` with three differences that this module bridges:

- Names: `layers.0.attention.wq.weight` is `model.layers.0.self_attn.q_proj.weight`, etc.
- RoPE: atoll rotates adjacent channel pairs (2i, 2i+1) of each head (Meta's layout);
  transformers rotates channel i with i + head_dim/2 ("rotate half"). The rows of wq and wk are
  permuted on the way out and back on the way in (as transformers' convert_llama_weights_to_hf).
- Defaults: transformers' `rms_norm_eps` is 1e-6, atoll's 1e-5, so config.json states every field.

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
from tokenizers import Tokenizer as HFTokenizerModel
from tokenizers import decoders, models, pre_tokenizers
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata

from atoll.atomic import atomic_write, fsync_dir
from atoll.checkpoint import newest_verified
from atoll.checkpoint.timeline import is_complete, parse_name
from atoll.config import JobConfig, load_config
from atoll.data import BYTE_TOKENIZER_SPEC, ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer
from atoll.errors import UserError
from atoll.model import Llama, ModelArgs

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
RUN_CONFIG_FILE = "config.toml"
METRICS_FILE = "metrics.jsonl"
MODEL_PREFIX = "model_optimizer.model."
"""Where the trainer's ModelOptimizerState puts the model in a checkpoint (DCP flattened keys)."""
OUTER_KEY = re.compile(r"^diloco\.rank(\d+)\.outer$")
"""The DiLoCo outer weights of one local rank: a flat fp32 buffer of its shards (atoll.diloco)."""
BYTE_EOS_TOKEN = "<|endoftext|>"
"""The byte tokenizer's end-of-sequence id 256, as a token of its tokenizer.json."""
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
HF_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
"""Safetensors files above this are split, with an index (transformers' default of 5 GB)."""

_LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


# --- names, the RoPE permutation and config.json --------------------------------------------------

def hf_name(name: str) -> str:
    """The transformers name of atoll parameter `name`."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    layer, rest = _LAYER.match(name).groups()
    return f"model.layers.{layer}.{_LAYER_NAMES[rest]}"


def atoll_name(name: str) -> str | None:
    """The atoll parameter of transformers name `name`, or None if atoll's Llama has no such tensor."""
    for ours, theirs in _TOP_NAMES.items():
        if theirs == name:
            return ours
    match = _HF_LAYER.match(name)
    if match is None:
        return None
    for ours, theirs in _LAYER_NAMES.items():
        if theirs == match.group(2):
            return f"layers.{match.group(1)}.{ours}"
    return None


def _heads(name: str, args: ModelArgs) -> int | None:
    """Heads whose rows a wq / wk weight holds (None for every other tensor)."""
    if name.endswith("attention.wq.weight"):
        return args.n_heads
    if name.endswith("attention.wk.weight"):
        return args.n_kv_heads
    return None


def to_hf(name: str, tensor: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    """atoll's tensor `name` in transformers' layout: wq/wk rows go from pairs (2i, 2i+1) to (i, i + d/2)."""
    heads = _heads(name, args)
    if heads is None:
        return tensor
    rows, cols = tensor.shape
    return tensor.view(heads, args.head_dim // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def from_hf(name: str, tensor: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    """The inverse of `to_hf` (`name` is the atoll name)."""
    heads = _heads(name, args)
    if heads is None:
        return tensor
    rows, cols = tensor.shape
    return tensor.view(heads, 2, args.head_dim // 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_config(args: ModelArgs, eos_id: int, dtype: torch.dtype) -> dict[str, Any]:
    """config.json for transformers' LlamaForCausalLM, every field explicit.

    RoPE is stated both ways (`rope_theta` for transformers 4, `rope_parameters` for 5).
    """
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": args.vocab_size,
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_hidden,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": args.max_seq_len,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": args.rope_theta},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "bos_token_id": None,
        "eos_token_id": eos_id,
        "pad_token_id": None,
        "torch_dtype": HF_DTYPE_NAMES[dtype],
    }


def args_from_hf_config(config: dict[str, Any], where: Path) -> ModelArgs:
    """The ModelArgs of a transformers Llama config.json; anything atoll's Llama cannot hold is a UserError."""
    def need(key: str, value: Any) -> None:
        if config.get(key, value) != value:
            raise UserError(f"{where}: {key} is {config[key]!r}; atoll's Llama needs {value!r}")

    need("model_type", "llama")
    need("hidden_act", "silu")
    need("attention_bias", False)
    need("mlp_bias", False)
    need("tie_word_embeddings", False)
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise UserError(f"{where}: RoPE scaling {rope!r} is not supported; atoll's Llama uses plain RoPE")
    try:
        args = ModelArgs(
            dim=config["hidden_size"],
            n_layers=config["num_hidden_layers"],
            n_heads=config["num_attention_heads"],
            n_kv_heads=config.get("num_key_value_heads", config["num_attention_heads"]),
            ffn_hidden=config["intermediate_size"],
            vocab_size=config["vocab_size"],
            max_seq_len=config["max_position_embeddings"],
            rope_theta=rope.get("rope_theta", config.get("rope_theta", 10000.0)),
            norm_eps=config.get("rms_norm_eps", 1e-6),
        )
    except KeyError as err:
        raise UserError(f"{where}: config.json has no {err.args[0]!r}") from None
    except ValueError as err:
        raise UserError(f"{where}: {err}") from None
    if config.get("head_dim", args.head_dim) != args.head_dim:
        raise UserError(f"{where}: head_dim {config['head_dim']} is not hidden_size / num_attention_heads ({args.head_dim})")
    return args


# --- tokenizers ----------------------------------------------------------------------------------

def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, which the ByteLevel pre-tokenizer applies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def byte_tokenizer_json() -> str:
    """atoll's byte tokenizer as an HF tokenizer.json: id b is UTF-8 byte b, id 256 is eos.

    A byte-level BPE with no merges, so every byte is its own token; deterministic text.
    """
    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    tok = HFTokenizerModel(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BYTE_EOS_TOKEN])
    return tok.to_str()


def tokenizer_of_hf_dir(hf_dir: Path) -> Tokenizer:
    """The tokenizer of an export: atoll's byte tokenizer when tokenizer.json is exactly its HF form."""
    path = hf_dir / TOKENIZER_FILE
    if not path.is_file():
        raise UserError(f"{hf_dir} has no {TOKENIZER_FILE}: atoll reads tokenizers in that format only")
    if path.read_text() == byte_tokenizer_json():
        return ByteTokenizer()
    try:
        return HFTokenizer(path)
    except ValueError as err:
        raise UserError(str(err)) from None


def _tokenizer_files(spec: str, eos_id: int, max_len: int) -> dict[str, str]:
    """tokenizer.json (the given one, or the byte tokenizer's) and a tokenizer_config.json naming eos.

    The byte tokenizer reads a literal "<|endoftext|>" in text as its bytes, as atoll does
    (split_special_tokens); a given tokenizer.json keeps its own rule, which atoll shares.
    """
    byte = spec == BYTE_TOKENIZER_SPEC
    if byte:
        text = byte_tokenizer_json()
    else:
        text = Path(spec).expanduser().read_text()
    eos = HFTokenizerModel.from_str(text).id_to_token(eos_id)
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": eos,
        "pad_token": None,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_len,
        "split_special_tokens": byte,
    }
    return {TOKENIZER_FILE: text, TOKENIZER_CONFIG_FILE: _json(tokenizer_config)}


def _json(value: Any) -> str:
    return json.dumps(value, indent=2) + "\n"


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
            _write_file(tmp / WEIGHTS_INDEX_FILE, _json(index))
        eos = run.tokenizer.eos_id
        _write_file(tmp / CONFIG_FILE, _json(hf_config(run.args, eos, torch_dtype)))
        generation = {"bos_token_id": None, "eos_token_id": eos, "pad_token_id": eos, "do_sample": False}
        _write_file(tmp / GENERATION_CONFIG_FILE, _json(generation))
        for file, text in _tokenizer_files(run.cfg.data.tokenizer, eos, run.args.max_seq_len).items():
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
