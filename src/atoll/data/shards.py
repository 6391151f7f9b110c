"""Pre-tokenised shards: `atoll data prepare` writes them once, training memory-maps them.

Layout under a root (a local directory or any ``fsspec`` URL, e.g. ``s3://bucket/prepared``)::

    <root>/<source name>/manifest.json             written last: its presence means "complete"
    <root>/<source name>/train-<piece>-<k>.npy      1-D uint16 (vocab <= 65536) or uint32 tokens
    <root>/<source name>/val-<piece>-<k>.npy
    <root>/<source name>/progress/<piece>.json     resume records of an unfinished prepare

Each document is its tokens (with the tokenizer's own special tokens, e.g. Llama-3's bos)
followed by eos; documents are concatenated in source order. A document goes to ``val`` when a
sha256 of ``<source name>:<document key>`` maps below ``data.val_fraction``, so the split is the
same on every machine and for any number of workers.

Preparing: every piece of every source (see :mod:`atoll.data.sources`) is one task, run in
``workers`` processes (inline for 1). A task streams its documents in batches, tokenises them and
writes a shard whenever ``shard_tokens`` train tokens have gathered (val tokens are flushed with
it), then atomically rewrites its progress record: the shards so far and the index of the next
document. Memory is bounded by one shard per worker. An interrupted prepare resumes each
unfinished piece after its last written shard (its documents before that are read but not
tokenised again); finished pieces are skipped, and so are finished sources once every shard of
theirs has been checked against the manifest (size and sha256; a piece with a missing or corrupt
shard is redone). A record or manifest made from other source files or another tokenizer is
ignored and its piece redone.

Reading: the manifest must name the tokenizer training uses, and every shard must have the
manifest's size and sha256; otherwise :class:`ShardError` names the file. Local shards are hashed
once per machine (a stamp in the cache directory remembers size, mtime and digest); remote shards
are downloaded into the cache, hashed on the way, then memory-mapped like local ones.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import math
import os
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
from tqdm import tqdm

from atoll import logs
from atoll.atomic import atomic_write
from atoll.data.sources import BadFile, Document, Piece, Source, SourceError, SourceSpec
from atoll.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer, token_dtype

MANIFEST = "manifest.json"
PROGRESS_DIR = "progress"
SHARD_FORMAT = 1
"""Bumped whenever the shard layout or the document rule (special tokens, split) changes."""

ON_BAD_FILE = ("error", "skip")


class ShardError(ValueError):
    """Prepared shards that training must not use; the message names the file and the fix."""


# --- storage: local paths or any fsspec URL --------------------------------------------------------


class Store:
    """A directory behind an fsspec URL; local paths get atomic writes and direct memory maps."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.fs, self.root = fsspec.core.url_to_fs(os.path.expanduser(url))
        self.local = "file" in self.fs.protocol if isinstance(self.fs.protocol, tuple) else self.fs.protocol == "file"

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def name(self, *parts: str) -> str:
        """How messages show a file: the path, with the protocol for remote stores."""
        path = self.path(*parts)
        return path if self.local else self.fs.unstrip_protocol(path)

    def write(self, data: bytes, *parts: str) -> None:
        """Write ``data``, atomically: readers see the old file or the whole new one."""
        path = self.path(*parts)
        if self.local:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            atomic_write(Path(path), lambda f: f.write(data))
            return
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        self.fs.makedirs(self.fs._parent(path), exist_ok=True)
        self.fs.pipe_file(tmp, data)
        self.fs.mv(tmp, path)

    def read_json(self, *parts: str) -> dict[str, Any] | None:
        """The JSON object stored there, or None when there is no such file."""
        try:
            return json.loads(self.fs.cat_file(self.path(*parts)))
        except FileNotFoundError:
            return None

    def write_json(self, obj: dict[str, Any], *parts: str) -> None:
        self.write(json.dumps(obj, indent=1, sort_keys=True).encode(), *parts)


# --- tokenising documents ----------------------------------------------------------------------------


def encode_documents(tokenizer: Tokenizer, texts: list[str], dtype: np.dtype) -> list[np.ndarray]:
    """Each text as tokens followed by ``tokenizer.eos_id``, in ``dtype``."""
    if isinstance(tokenizer, ByteTokenizer):
        return [np.append(np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(dtype), dtype.type(tokenizer.eos_id))
                for t in texts]
    ids = tokenizer.encode_batch(texts) if isinstance(tokenizer, HFTokenizer) else [tokenizer.encode(t) for t in texts]
    return [np.array([*doc, tokenizer.eos_id], dtype=dtype) for doc in ids]


def in_val(source: str, key: str, val_fraction: float) -> bool:
    """Whether document ``key`` of ``source`` belongs to the validation split (stable sha256)."""
    digest = hashlib.sha256(f"{source}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < val_fraction


# --- preparing ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PrepareSettings:
    """What fixes the tokens of a prepare (besides the source files): all in each record."""

    tokenizer: str
    """data.tokenizer as given (a file, a directory or "byte")."""
    val_fraction: float
    shard_tokens: int
    on_bad_file: str


@dataclass
class PieceTask:
    """One piece of one source to tokenise into ``<url>/<source name>/``."""

    spec: SourceSpec
    piece: Piece
    url: str
    settings: PrepareSettings
    identity: dict[str, Any]
    """Source fingerprint, tokenizer name and format: a record that differs is stale."""
    fresh: bool = False
    """Redo the piece from its first document even if its record says done (a shard went bad)."""


@dataclass
class PrepareReport:
    """What a prepare did, per source: the manifests, and how much was new work."""

    manifests: dict[str, dict[str, Any]] = field(default_factory=dict)
    tokens_done: int = 0
    """Tokens tokenised by this call (0 when everything was already prepared)."""
    seconds: float = 0.0


_TOKENIZERS: dict[str, Tokenizer] = {}
_SOURCES: dict[SourceSpec, Source] = {}


def _cached_tokenizer(spec: str) -> Tokenizer:
    if spec not in _TOKENIZERS:
        _TOKENIZERS[spec] = load_tokenizer(spec)
    return _TOKENIZERS[spec]


def _cached_source(spec: SourceSpec) -> Source:
    if spec not in _SOURCES:
        _SOURCES[spec] = Source(spec)
    return _SOURCES[spec]


def identity_of(source: Source, tokenizer: Tokenizer, settings: PrepareSettings) -> dict[str, Any]:
    """Everything a manifest or progress record must match to be reused."""
    return {
        "format": SHARD_FORMAT,
        "source_fingerprint": source.fingerprint(),
        "tokenizer": tokenizer.name,
        "val_fraction": settings.val_fraction,
        "shard_tokens": settings.shard_tokens,
    }


def prepare(
    specs: list[SourceSpec],
    url: str,
    settings: PrepareSettings,
    workers: int = 1,
    progress: bool = True,
    log: Callable[[str], None] = logs.info,
) -> PrepareReport:
    """Tokenise every source of ``specs`` into shards under ``url`` (see the module docstring).

    Sources whose manifest matches their files, the tokenizer and ``settings`` are left alone;
    the others are (re)done piece by piece, resuming unfinished pieces. ``progress`` shows a
    token counter on stderr. Returns the manifests of all ``specs``.

    Raises:
        SourceError: a source cannot be read, or a bad file with ``on_bad_file = "error"``.
        ValueError: the tokenizer cannot be loaded.
    """
    start = time.perf_counter()
    tokenizer = _cached_tokenizer(settings.tokenizer)
    store = Store(url)
    report = PrepareReport()
    tasks: list[PieceTask] = []
    pending: dict[str, tuple[SourceSpec, Source, dict[str, Any]]] = {}
    for spec in specs:
        source = _cached_source(spec)
        identity = identity_of(source, tokenizer, settings)
        manifest = store.read_json(spec.name, MANIFEST)
        broken: set[str] = set()
        if manifest is not None and manifest["identity"] == identity:
            broken = _broken_pieces(store, spec.name, manifest)
            if not broken:
                report.manifests[spec.name] = manifest
                continue
            log(f"atoll: {spec.name}: {len(broken)} piece(s) with missing or corrupt shards are prepared again")
        pending[spec.name] = (spec, source, identity)
        for piece in source.pieces:
            record = store.read_json(spec.name, PROGRESS_DIR, f"{piece.id}.json")
            if piece.id in broken or record is None or record["identity"] != identity or not record["done"]:
                tasks.append(PieceTask(spec, piece, url, settings, identity, fresh=piece.id in broken))
    if tasks:
        log(f"atoll: preparing {len(pending)} source(s) ({len(tasks)} piece(s)) into {url} "
            f"with {min(workers, len(tasks))} worker(s)")
    bar = tqdm(unit="tok", unit_scale=True, desc="tokenising", disable=not (progress and tasks))

    def advance(tokens: int) -> None:
        report.tokens_done += tokens
        bar.update(tokens)

    try:
        _run_tasks(tasks, workers, advance)
    finally:
        bar.close()
    for name, (spec, source, identity) in pending.items():
        m = _join_manifest(store, spec, source, identity, tokenizer)
        _check_val_tokens(m, settings.val_fraction)
        store.write_json(m, spec.name, MANIFEST)
        report.manifests[name] = m
        skipped = f"; skipped {len(m['skipped_files'])} bad file(s)" if m["skipped_files"] else ""
        log(f"atoll: {name}: {m['documents']['train']:,} + {m['documents']['val']:,} documents, "
            f"{m['tokens']['train']:,} train + {m['tokens']['val']:,} val tokens in "
            f"{len(m['shards']['train']) + len(m['shards']['val'])} shard(s){skipped}")
    report.seconds = time.perf_counter() - start
    return report


def _run_tasks(tasks: list[PieceTask], workers: int, advance: Callable[[int], None]) -> None:
    """Run ``tasks`` inline (1 worker) or in ``workers`` spawned processes, reporting tokens."""
    if workers <= 1 or len(tasks) <= 1:
        for task in tasks:
            prepare_piece(task, advance)
        return
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # a fork after `tokenizers` started its threads can deadlock
    queue = ctx.Queue()
    processes = min(workers, len(tasks))
    threads = max(1, (os.cpu_count() or 1) // processes)
    with ProcessPoolExecutor(processes, mp_context=ctx, initializer=_start_worker, initargs=(threads, queue)) as pool:
        futures = {pool.submit(_prepare_in_worker, task) for task in tasks}
        while futures:
            done, futures = wait(futures, timeout=0.2, return_when=FIRST_COMPLETED)
            while not queue.empty():
                advance(queue.get())
            for future in done:
                future.result()  # re-raises a worker's error here, with its message
    while not queue.empty():
        advance(queue.get())


_PROGRESS: Any = None
"""In a worker process: the queue its token counts go to (set by :func:`_start_worker`)."""


def _start_worker(threads: int, progress: Any) -> None:
    """Worker start: remember the progress queue, and give `tokenizers` this worker's share of the
    CPUs (it would start a thread per CPU in every worker)."""
    global _PROGRESS
    _PROGRESS = progress
    os.environ["RAYON_NUM_THREADS"] = str(threads)


def _prepare_in_worker(task: PieceTask) -> dict[str, Any]:
    return prepare_piece(task, _PROGRESS.put)


def prepare_piece(task: PieceTask, report: Callable[[int], None]) -> dict[str, Any]:
    """Tokenise one piece into shards, resuming after its last written shard; returns its record."""
    spec, piece, settings = task.spec, task.piece, task.settings
    tokenizer = _cached_tokenizer(settings.tokenizer)
    dtype = token_dtype(tokenizer.vocab_size)
    store = Store(task.url)
    record_path = (spec.name, PROGRESS_DIR, f"{piece.id}.json")
    record = None if task.fresh else store.read_json(*record_path)
    if record is None or record["identity"] != task.identity:
        record = {"identity": task.identity, "piece": piece.id, "done": False, "next_document": 0,
                  "shards": {"train": [], "val": []}, "skipped_files": [], "documents": {"train": 0, "val": 0}}
    buffers: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    counts = {"train": 0, "val": 0}
    gathered = 0
    next_document = record["next_document"]

    def flush(next_document: int, done: bool) -> None:
        for split in ("train", "val"):
            if buffers[split]:
                tokens = np.concatenate(buffers[split])
                name = f"{split}-{piece.id}-{len(record['shards'][split]):04d}.npy"
                out = io.BytesIO()
                np.save(out, tokens)
                data = out.getvalue()
                store.write(data, spec.name, name)
                record["shards"][split].append({
                    "file": name, "tokens": int(tokens.size), "documents": counts[split],
                    "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                })
                record["documents"][split] += counts[split]
                buffers[split], counts[split] = [], 0
        record["next_document"], record["done"] = next_document, done
        store.write_json(record, *record_path)

    batches = _batches_after(_cached_source(spec).documents(piece), record["next_document"], spec, settings, record)
    for docs, first in batches:
        encoded = encode_documents(tokenizer, [d.text for d in docs], dtype)
        for i, (doc, tokens) in enumerate(zip(docs, encoded)):
            split = "val" if in_val(spec.name, doc.key, settings.val_fraction) else "train"
            buffers[split].append(tokens)
            counts[split] += 1
            if split == "train":
                gathered += tokens.size
            next_document = first + i + 1
            if gathered >= settings.shard_tokens:  # cut at a document: a resumed piece cuts the same way
                flush(next_document, done=False)
                gathered = 0
        report(int(sum(t.size for t in encoded)))
    flush(next_document, done=True)
    return record


def _batches_after(
    batches: Iterator[list[Document] | BadFile], skip: int, spec: SourceSpec, settings: PrepareSettings, record: dict[str, Any],
) -> Iterator[tuple[list[Document], int]]:
    """``(documents, index of the first)`` from document ``skip`` on; bad files stop or are recorded."""
    index = 0
    for batch in batches:
        if isinstance(batch, BadFile):
            if settings.on_bad_file == "error":
                raise SourceError(f"source {spec.name!r}: {batch}; remove it or set data.on_bad_file = \"skip\"")
            if batch.path not in record["skipped_files"]:
                record["skipped_files"].append(batch.path)
            continue
        first = index
        index += len(batch)
        if index > skip:
            yield batch[max(skip - first, 0):], max(first, skip)


def _broken_pieces(store: Store, name: str, manifest: dict[str, Any]) -> set[str]:
    """Ids of the pieces with a shard that is missing or differs from the manifest (size, sha256)."""
    broken = set()
    for shard in manifest["shards"]["train"] + manifest["shards"]["val"]:
        path = store.path(name, shard["file"])
        ok = store.fs.exists(path) and store.fs.size(path) == shard["bytes"]
        if ok:
            digest = _file_sha256(Path(path)) if store.local else hashlib.sha256(store.fs.cat_file(path)).hexdigest()
            ok = digest == shard["sha256"]
        if not ok:
            broken.add(shard["file"].split("-")[1])  # <split>-<piece>-<k>.npy
    return broken


def _check_val_tokens(manifest: dict[str, Any], val_fraction: float) -> None:
    """Refuse a source that leaves no validation tokens, naming the data.val_fraction that would give some.

    Checked before the manifest is written, so the source stays unprepared until it is fixed.
    """
    if manifest["tokens"]["val"] > 0:
        return
    documents = manifest["documents"]["train"] + manifest["documents"]["val"]
    name = manifest["source"]
    if documents < 2:
        raise SourceError(f"source {name!r} holds {documents} document(s): nothing can be held out for validation; give it more documents")
    enough = min(0.5, math.ceil(300 / documents) / 100)  # about 3 documents held out
    raise SourceError(
        f"source {name!r}: none of its {documents:,} documents fell in the validation split (data.val_fraction "
        f"{val_fraction}): set data.val_fraction to {enough} or more and prepare again"
    )


def _join_manifest(store: Store, spec: SourceSpec, source: Source, identity: dict[str, Any], tokenizer: Tokenizer) -> dict[str, Any]:
    """Join the pieces' records (in piece order) into the source's manifest (the caller writes it, last)."""
    manifest: dict[str, Any] = {
        "identity": identity, "source": spec.name, "path": spec.path, "tokenizer": tokenizer.name,
        "vocab_size": tokenizer.vocab_size, "dtype": token_dtype(tokenizer.vocab_size).name,
        "shards": {"train": [], "val": []}, "documents": {"train": 0, "val": 0},
        "tokens": {"train": 0, "val": 0}, "skipped_files": [],
    }
    for piece in source.pieces:
        record = store.read_json(spec.name, PROGRESS_DIR, f"{piece.id}.json")
        assert record is not None and record["done"], f"piece {piece.id} of {spec.name} was not prepared"
        manifest["skipped_files"] += record["skipped_files"]
        for split in ("train", "val"):
            manifest["shards"][split] += record["shards"][split]
            manifest["documents"][split] += record["documents"][split]
            manifest["tokens"][split] += sum(s["tokens"] for s in record["shards"][split])
    return manifest


# --- reading ------------------------------------------------------------------------------------------------


class ShardedTokens:
    """The shards of one split, read as one virtual 1-D token array (memory-mapped, never loaded).

    Supports ``len()`` and integer-array indexing (``tokens[idx]`` for any shape of ``idx``),
    which is all :class:`atoll.data.loader.PackedLoader` and the mixture loader use.
    """

    def __init__(self, arrays: list[np.ndarray]) -> None:
        self.arrays = [a for a in arrays if a.size]
        self.ends = np.cumsum([a.size for a in self.arrays], dtype=np.int64)
        self.dtype = self.arrays[0].dtype if self.arrays else np.dtype(np.uint32)

    def __len__(self) -> int:
        return int(self.ends[-1]) if self.arrays else 0

    def __getitem__(self, index: np.ndarray) -> np.ndarray:
        index = np.asarray(index, dtype=np.int64)
        shard = np.searchsorted(self.ends, index, side="right")
        out = np.empty(index.shape, dtype=self.dtype)
        for s in np.unique(shard):
            mask = shard == s
            start = self.ends[s] - self.arrays[s].size
            out[mask] = self.arrays[s][index[mask] - start]
        return out


@dataclass
class PreparedSource:
    """One source's manifest and its memory-mapped train and val tokens."""

    name: str
    manifest: dict[str, Any]
    train: ShardedTokens
    val: ShardedTokens


def open_prepared(name: str, url: str, tokenizer: Tokenizer, cache_dir: str | None) -> PreparedSource:
    """Open the prepared shards of source ``name`` under ``url``, checked, memory-mapped.

    Raises:
        ShardError: no manifest (run ``atoll data prepare``), another tokenizer, or a shard whose
            size or sha256 differs from the manifest (the message names the file).
    """
    store = Store(url)
    manifest = store.read_json(name, MANIFEST)
    if manifest is None:
        raise ShardError(f"no prepared shards for source {name!r} at {store.name(name, MANIFEST)}: "
                         "run `atoll data prepare CONFIG` first")
    if manifest["tokenizer"] != tokenizer.name:
        raise ShardError(
            f"{store.name(name, MANIFEST)} was tokenised with {manifest['tokenizer'][:19]} but data.tokenizer is "
            f"{tokenizer.name[:19]}: prepare again with this tokenizer or train with the one it was prepared with"
        )
    splits = {}
    for split in ("train", "val"):
        arrays = []
        for shard in manifest["shards"][split]:
            local = _verified_local_file(store, name, shard, cache_dir)
            array = np.load(local, mmap_mode="r")
            if array.ndim != 1 or array.size != shard["tokens"] or array.dtype.name != manifest["dtype"]:
                raise ShardError(f"shard {store.name(name, shard['file'])} holds {array.size} {array.dtype} tokens, "
                                 f"not the manifest's {shard['tokens']} {manifest['dtype']}: prepare it again")
            arrays.append(array)
        splits[split] = ShardedTokens(arrays)
    return PreparedSource(name, manifest, splits["train"], splits["val"])


def _verified_local_file(store: Store, name: str, shard: dict[str, Any], cache_dir: str | None) -> str:
    """A local path holding the shard's exact bytes: the file itself, or a verified download."""
    shown = store.name(name, shard["file"])
    fix = "prepare it again (`atoll data prepare CONFIG` redoes what does not match)"
    if not store.local:
        if cache_dir is None:
            raise ShardError(f"shard {shown} is remote: set data.cache_dir to a local directory to download it into")
        local = Path(cache_dir).expanduser() / "shards" / f"{shard['sha256']}.npy"
        if not local.is_file():
            local.parent.mkdir(parents=True, exist_ok=True)
            data = store.fs.cat_file(store.path(name, shard["file"]))
            if hashlib.sha256(data).hexdigest() != shard["sha256"]:
                raise ShardError(f"shard {shown} does not match the sha256 in its manifest (corrupt or changed): {fix}")
            atomic_write(local, lambda f: f.write(data))
        return str(local)
    path = Path(store.path(name, shard["file"]))
    if not path.is_file():
        raise ShardError(f"shard {shown} is missing: {fix}")
    stat = path.stat()
    if stat.st_size != shard["bytes"]:
        raise ShardError(f"shard {shown} has {stat.st_size} bytes, not the {shard['bytes']} in its manifest (truncated?): {fix}")
    stamp_text = f"{path.resolve()} {stat.st_size} {stat.st_mtime_ns} {shard['sha256']}"
    stamp = (Path(cache_dir).expanduser() / "verified" / hashlib.sha256(stamp_text.encode()).hexdigest()
             if cache_dir is not None else None)
    if stamp is not None and stamp.is_file():
        return str(path)
    if _file_sha256(path) != shard["sha256"]:
        raise ShardError(f"shard {shown} does not match the sha256 in its manifest (corrupt or changed): {fix}")
    if stamp is not None:
        stamp.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(stamp, lambda f: f.write(stamp_text.encode()))
    return str(path)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_path`` (processes of one machine prepare one at a time)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
