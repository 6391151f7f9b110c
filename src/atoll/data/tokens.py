"""A corpus split as one flat token array, cached on disk.

Documents are concatenated, each followed by the tokenizer's eos id, into a 1-D ``uint32``
array that :class:`atoll.data.loader.PackedLoader` cuts into training windows.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from atoll.atomic import atomic_write
from atoll.data.corpus import load_documents, split_files
from atoll.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer

TOKEN_DTYPE = np.uint32
"""dtype of token arrays: holds any vocabulary size."""

_CACHE_FORMAT = 1
"""Bumped whenever the cached array's layout or tokenization rule changes."""


def tokenize_documents(docs: list[str], tokenizer: Tokenizer) -> np.ndarray:
    """All ``docs`` tokenized and concatenated, each followed by ``tokenizer.eos_id``.

    Returns a 1-D ``uint32`` array of ``sum(len(ids) + 1)`` tokens (empty for no docs).
    """
    if isinstance(tokenizer, ByteTokenizer):
        # One UTF-8 buffer for the whole split, eos inserted after each document's bytes.
        encoded = [d.encode("utf-8") for d in docs]
        flat = np.frombuffer(b"".join(encoded), dtype=np.uint8).astype(TOKEN_DTYPE)
        ends = np.cumsum([len(b) for b in encoded], dtype=np.int64)
        return np.insert(flat, ends, tokenizer.eos_id)
    if isinstance(tokenizer, HFTokenizer):
        ids = tokenizer.encode_batch(docs)
    else:
        ids = [tokenizer.encode(d) for d in docs]
    eos = np.array([tokenizer.eos_id], dtype=TOKEN_DTYPE)
    parts = [p for doc_ids in ids for p in (np.asarray(doc_ids, dtype=TOKEN_DTYPE), eos)]
    return np.concatenate(parts) if parts else np.empty(0, dtype=TOKEN_DTYPE)


def _cache_key(source: str, split: str, val_fraction: float, tokenizer: Tokenizer) -> str:
    """sha256 over everything that determines the tokens: files, their sizes and mtimes."""
    root, files = split_files(source, split, val_fraction)
    stats = [(f.relative_to(root).as_posix(), f.stat()) for f in files]
    identity = {
        "format": _CACHE_FORMAT,
        "root": str(root.resolve()),
        "split": split,
        "val_fraction": val_fraction,
        "tokenizer": tokenizer.name,
        "files": [(rel, st.st_size, st.st_mtime_ns) for rel, st in stats],
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode("utf-8")).hexdigest()


def load_split_tokens(
    source: str,
    split: str,
    val_fraction: float,
    tokenizer: Tokenizer,
    cache_dir: str | None,
) -> np.ndarray:
    """Token array of ``source``'s ``split`` (see :func:`tokenize_documents`), cached on disk.

    The cache file is ``<cache_dir>/tokens-<split>-<key>.npy`` where the key hashes the source
    root, split, ``val_fraction``, ``tokenizer.name`` and every file's relative path, size and
    mtime, so editing, adding or removing a file retokenizes. Writes are atomic, so concurrent
    processes filling the same cache at worst tokenize twice. The array returned from the cache
    is memory-mapped read-only: the local ranks of a machine share its pages instead of each
    holding a copy. ``cache_dir=None`` disables the cache (and returns an in-memory array).

    Raises:
        ValueError: bad ``split`` or ``val_fraction``.
        FileNotFoundError: the source does not exist or holds no files.
    """
    if cache_dir is None:
        return tokenize_documents(load_documents(source, split, val_fraction), tokenizer)
    key = _cache_key(source, split, val_fraction, tokenizer)
    path = Path(cache_dir).expanduser() / f"tokens-{split}-{key[:32]}.npy"
    if not path.is_file():
        tokens = tokenize_documents(load_documents(source, split, val_fraction), tokenizer)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: np.save(f, tokens))
    return np.load(path, mmap_mode="r")
