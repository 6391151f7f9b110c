"""Sources of a mixture: where documents come from, read as a stream, in independent pieces.

A source is local files (a path, a directory or a glob) in one of these formats, or a Hugging Face
dataset:

- ``parquet``: read with ``pyarrow.parquet`` a record batch at a time, only the text column;
- ``jsonl``: JSON lines, plain or compressed (``.gz``, ``.zst``, detected from the name), read with
  ``pyarrow.json.open_json`` in blocks, parsing only the text field;
- ``arrow``: Arrow IPC files (what ``datasets`` writes), streamed a record batch at a time;
- ``text``: one document per file (``.txt``/``.md``/``.py`` in a directory);
- ``hf``: a dataset name on the Hub (or in the local ``datasets`` cache), read with
  ``datasets.load_dataset(..., streaming=True)``; or a directory written by
  ``Dataset.save_to_disk`` (read memory-mapped with ``datasets.load_from_disk``).

A source is cut into **pieces** that can be tokenised independently and in any order (one input
file, a range of rows, one shard of a streaming dataset); ``atoll data prepare`` gives one piece
to one worker. Documents inside a piece come in a fixed order, so ``(piece, index)`` names a
document on every machine.

Text that is not text: a ``text`` file holding NUL bytes, or whose bytes are more than
:data:`MAX_UNDECODABLE` undecodable as UTF-8, and a file that its format's reader cannot parse,
is a **bad file**. With ``on_bad_file = "error"`` it stops with one line naming the file; with
``"skip"`` it is left out and counted. Rows whose text field is null are left out.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TEXT_SUFFIXES = (".txt", ".md", ".py")
"""Files a ``text`` source takes from a directory."""

FORMAT_SUFFIXES = {
    "parquet": (".parquet",),
    "jsonl": (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst", ".ndjson"),
    "arrow": (".arrow",),
    "text": TEXT_SUFFIXES,
}
"""File name endings that select a format when a source's ``format`` is ``auto``."""

HF_SAVED_DATASET_MARKERS = ("state.json", "dataset_dict.json")
"""Either file marks a directory written by ``save_to_disk`` (a ``Dataset`` or a ``DatasetDict``)."""

MAX_UNDECODABLE = 0.01
"""A text file with more than this fraction of undecodable bytes is not text (U+FFFD would fill it)."""

TEXT_FILES_PER_PIECE = 512
"""Text files (one document each) tokenised as one piece."""

ROWS_PER_PIECE = 100_000
"""Rows of a saved dataset tokenised as one piece."""

READ_BATCH = 1024
"""Documents read (and tokenised) together."""


class SourceError(ValueError):
    """A source that cannot be read as configured; the message names it and the fix."""


class BadFile(SourceError):
    """One input file is not usable text (binary, undecodable or unparsable)."""

    def __init__(self, path: str, why: str) -> None:
        super().__init__(f"{path} {why}")
        self.path = path


@dataclass(frozen=True)
class SourceSpec:
    """One source as the config names it (see ``atoll.config.SourceConfig``)."""

    name: str
    path: str
    weight: float = 1.0
    format: str = "auto"
    text_field: str = "text"
    split: str = "train"
    subset: str | None = None

    @classmethod
    def from_config(cls, cfg: Any) -> SourceSpec:
        return cls(cfg.name, cfg.path, cfg.weight, cfg.format, cfg.text_field, cfg.split, cfg.subset)


@dataclass
class Piece:
    """A part of a source read by one worker: its id names it in shard files and progress records."""

    id: str
    files: list[str] = field(default_factory=list)
    rows: tuple[int, int] | None = None
    shard: tuple[int, int] | None = None
    """(index, count) of a streaming dataset's shards."""


@dataclass
class Document:
    """Text, and the key that places it in the train or validation split (stable across machines)."""

    key: str
    text: str


class Source:
    """A resolved source: its format, pieces and fingerprint, and a reader for each piece.

    Construction lists local files (or asks ``datasets`` for a streaming dataset's shards) but
    reads no document.

    Raises (on construction):
        SourceError: nothing matches the path, the formats of its files are mixed or unknown, or
            the Hugging Face dataset cannot be opened (offline and not cached, or no such split).
    """

    def __init__(self, spec: SourceSpec) -> None:
        self.spec = spec
        self.format, self.files = _resolve(spec)
        # Documents are keyed by paths relative to here, so the split is the same on every machine.
        self.root = os.path.commonpath(self.files) if len(self.files) > 1 else os.path.dirname(self.files[0]) if self.files else ""
        self._hf_dataset: Any = None
        self.pieces = self._cut_pieces()

    # --- identity ---------------------------------------------------------------------------------

    def fingerprint(self) -> str:
        """sha256 over what fixes the documents: format, fields, split, and each file's path,
        size and mtime (a Hub dataset: its name, subset and split)."""
        identity: dict[str, Any] = {
            "format": self.format,
            "path": self.spec.path,
            "text_field": self.spec.text_field,
            "split": self.spec.split,
            "subset": self.spec.subset,
            "files": [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in self._identity_files()],
        }
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()

    def _identity_files(self) -> list[str]:
        if self.format == "hf-disk":
            return sorted(str(p) for p in Path(self.spec.path).expanduser().rglob("*") if p.is_file())
        return self.files

    # --- pieces -----------------------------------------------------------------------------------

    def _cut_pieces(self) -> list[Piece]:
        if self.format == "text":
            chunks = range(0, len(self.files), TEXT_FILES_PER_PIECE)
            return [Piece(f"{i // TEXT_FILES_PER_PIECE:05d}", self.files[i:i + TEXT_FILES_PER_PIECE]) for i in chunks]
        if self.format in ("parquet", "jsonl", "arrow"):
            return [Piece(f"{i:05d}", [f]) for i, f in enumerate(self.files)]
        if self.format == "hf-disk":
            rows = len(self._dataset())
            return [Piece(f"{i // ROWS_PER_PIECE:05d}", rows=(i, min(i + ROWS_PER_PIECE, rows)))
                    for i in range(0, rows, ROWS_PER_PIECE)]
        shards = self._dataset().n_shards
        return [Piece(f"{i:05d}", shard=(i, shards)) for i in range(shards)]

    def _dataset(self) -> Any:
        """The ``datasets`` object behind an ``hf``/``hf-disk`` source, opened once."""
        if self._hf_dataset is None:
            self._hf_dataset = _open_hf(self.spec, self.format)
        return self._hf_dataset

    def documents(self, piece: Piece) -> Iterator[list[Document] | BadFile]:
        """Batches of up to :data:`READ_BATCH` documents of ``piece``, in a fixed order.

        A bad file is yielded as a :class:`BadFile` in place of its documents (the caller decides
        whether to stop or count it). Rows whose text is null (or, from ``datasets``, not a
        string) are left out.
        """
        if self.format == "text":
            yield from _text_documents(piece.files, self.root)
        elif self.format in ("parquet", "jsonl", "arrow"):
            yield from self._file_documents(piece.files[0])
        else:
            yield from self._dataset_documents(piece)

    def _file_documents(self, path: str) -> Iterator[list[Document] | BadFile]:
        reader = {"parquet": _parquet_batches, "jsonl": _jsonl_batches, "arrow": _arrow_batches}[self.format]
        row, key = 0, os.path.relpath(path, self.root)
        try:
            for texts in reader(path, self.spec.text_field):
                yield [Document(f"{key}:{row + i}", t) for i, t in enumerate(texts) if t is not None]
                row += len(texts)
        except SourceError:
            raise
        except Exception as err:  # pyarrow raises its own types for unparsable or truncated files
            yield BadFile(path, f"cannot be read as {self.format} ({str(err).splitlines()[0]})")

    def _dataset_documents(self, piece: Piece) -> Iterator[list[Document]]:
        ds = self._dataset()
        if piece.rows is not None:
            ds = ds.select(range(*piece.rows))
        elif piece.shard is not None:
            ds = ds.shard(num_shards=piece.shard[1], index=piece.shard[0])
        if self.spec.text_field not in (ds.column_names or [self.spec.text_field]):
            raise SourceError(
                f"source {self.spec.name!r}: dataset {self.spec.path} has no field {self.spec.text_field!r} "
                f"(fields: {', '.join(ds.column_names)}); set text_field"
            )
        row = 0
        for batch in ds.iter(batch_size=READ_BATCH):
            texts = batch[self.spec.text_field]
            yield [Document(f"{piece.id}:{row + i}", t) for i, t in enumerate(texts) if isinstance(t, str)]
            row += len(texts)


# --- resolving a path -----------------------------------------------------------------------------


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in HF_SAVED_DATASET_MARKERS)


def _resolve(spec: SourceSpec) -> tuple[str, list[str]]:
    """(format, sorted local files) of ``spec``; no files for ``hf``/``hf-disk`` sources."""
    local = Path(spec.path).expanduser()
    if spec.format == "hf" or (spec.format == "auto" and _is_saved_dataset(local)):
        return ("hf-disk" if _is_saved_dataset(local) else "hf"), []
    if local.is_dir():
        candidates = [str(p) for p in sorted(local.rglob("*")) if p.is_file()
                      and not any(part.startswith(".") for part in p.relative_to(local).parts)]
    elif local.is_file():
        candidates = [str(local.resolve())]
    else:
        candidates = sorted(p for p in glob.glob(str(local), recursive=True) if os.path.isfile(p))
    if not candidates:
        if spec.format == "auto" and not _looks_local(spec.path):
            return "hf", []  # "owner/name" that is no local path: a Hub dataset
        hub = ' (for a Hugging Face dataset of that name, set format = "hf")' if spec.format == "auto" and _hub_like(spec.path) else ""
        raise SourceError(f"source {spec.name!r}: nothing matches {spec.path!r}; give an existing file, directory or glob{hub}")
    formats = {_format_of(f) for f in candidates}
    if spec.format != "auto":
        files = [f for f in candidates if _format_of(f) == spec.format] if local.is_dir() else candidates
        return spec.format, [str(Path(f).resolve()) for f in files]
    known = formats - {None}
    if local.is_dir():  # a directory may hold READMEs and licences beside its data files
        if "parquet" in known or "jsonl" in known or "arrow" in known:
            known -= {"text"}
    if len(known) != 1:
        found = ", ".join(sorted(known)) or "no known format"
        raise SourceError(
            f"source {spec.name!r}: files under {spec.path!r} are {found}; "
            "set format to one of parquet, jsonl, arrow, text, hf"
        )
    fmt = known.pop()
    return fmt, [str(Path(f).resolve()) for f in candidates if _format_of(f) == fmt]


def _hub_like(path: str) -> bool:
    """Whether `path` has the shape of a Hub dataset name ("name" or "owner/name"): not absolute or
    explicitly relative, no glob, no file name ending."""
    return (not path.startswith(("/", "./", "../", "~")) and not any(c in path for c in "*?[")
            and _format_of(path) is None and len(Path(path).parts) <= 2)


def _looks_local(path: str) -> bool:
    """Whether a path that matches nothing was meant as a local one: not shaped like a Hub name, or
    under an existing directory (a typo such as corpus/dcos for corpus/docs)."""
    parts = Path(path).parts
    return not _hub_like(path) or (len(parts) == 2 and Path(parts[0]).expanduser().is_dir())


def _format_of(path: str) -> str | None:
    name = path.lower()
    return next((fmt for fmt, ends in FORMAT_SUFFIXES.items() if name.endswith(ends)), None)


# --- readers --------------------------------------------------------------------------------------


def check_text(data: bytes) -> str | None:
    """Why ``data`` is not text (NUL bytes, or too many undecodable bytes), or None if it is."""
    if b"\x00" in data:
        return "holds NUL bytes (a binary file)"
    text = data.decode("utf-8", errors="replace")
    bad = text.count("\ufffd") - data.decode("utf-8", errors="ignore").count("\ufffd")
    if text and bad > MAX_UNDECODABLE * len(text):
        return f"is {bad / len(text):.0%} undecodable as UTF-8 (a binary file?)"
    return None


def _text_documents(files: list[str], root: str) -> Iterator[list[Document] | BadFile]:
    batch: list[Document] = []
    for path in files:
        data = Path(path).read_bytes()
        why = check_text(data)
        if why is not None:
            yield BadFile(path, why)
            continue
        batch.append(Document(os.path.relpath(path, root), data.decode("utf-8", errors="replace")))
        if len(batch) == READ_BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def _column(table: Any, path: str, text_field: str) -> list[str | None]:
    if text_field not in table.column_names:
        raise SourceError(
            f"{path} has no field {text_field!r} (fields: {', '.join(table.column_names)}); "
            "set text_field of its source"
        )
    return table.column(text_field).to_pylist()


def _parquet_batches(path: str, text_field: str) -> Iterator[list[str | None]]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    if text_field not in parquet.schema_arrow.names:
        raise SourceError(
            f"{path} has no column {text_field!r} (columns: {', '.join(parquet.schema_arrow.names)}); "
            "set text_field of its source"
        )
    for batch in parquet.iter_batches(batch_size=READ_BATCH, columns=[text_field]):
        yield _column(batch, path, text_field)


def _jsonl_batches(path: str, text_field: str) -> Iterator[list[str | None]]:
    import pyarrow as pa
    import pyarrow.json as pj

    # Parse only the text field: other fields may change type between lines in real dumps.
    parse = pj.ParseOptions(explicit_schema=pa.schema([(text_field, pa.string())]), unexpected_field_behavior="ignore")
    with pa.input_stream(path, compression="detect") as stream:
        for i, batch in enumerate(pj.open_json(stream, parse_options=parse, read_options=pj.ReadOptions(block_size=1 << 22))):
            texts = _column(batch, path, text_field)
            if i == 0 and texts and all(t is None for t in texts):  # an absent field reads as nulls
                raise SourceError(f"{path} has no field {text_field!r} in its first {len(texts)} lines; set text_field of its source")
            yield texts


def _arrow_batches(path: str, text_field: str) -> Iterator[list[str | None]]:
    import pyarrow as pa

    with pa.memory_map(path) as source:
        try:
            reader = pa.ipc.open_stream(source)
        except pa.ArrowInvalid:
            source.seek(0)
            reader = pa.ipc.open_file(source)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        else:
            batches = iter(reader)
        for batch in batches:
            yield _column(batch, path, text_field)


def _open_hf(spec: SourceSpec, fmt: str) -> Any:
    """A saved dataset (memory-mapped) or a streaming Hub dataset; one-line errors when unreachable."""
    try:
        import datasets
    except ImportError:
        raise SourceError(f"source {spec.name!r} is a Hugging Face dataset: install them with pip install 'atoll[hf]'") from None

    try:
        if fmt == "hf-disk":
            ds = datasets.load_from_disk(str(Path(spec.path).expanduser()))
            if isinstance(ds, datasets.DatasetDict):
                if spec.split not in ds:
                    raise SourceError(f"source {spec.name!r}: {spec.path} has no split {spec.split!r} (splits: {', '.join(ds)})")
                ds = ds[spec.split]
            return ds
        return datasets.load_dataset(spec.path, spec.subset, split=spec.split, streaming=True)
    except SourceError:
        raise
    except Exception as err:  # datasets raises many types: offline, missing, gated, bad split
        raise SourceError(
            f"source {spec.name!r}: cannot open Hugging Face dataset {spec.path!r} "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
            "check the name and split, the network or the local cache (HF_HOME)"
        ) from None
