"""The checkpoint manifest: a small JSON file that says what a checkpoint is and proves its bytes.

`manifest.json` sits beside the DCP shards of one checkpoint and is written last, after every
shard and `.metadata` are on disk: a checkpoint without a manifest is incomplete by definition.
It names the run, the island, the position (step, outer step, epoch, members, digest of the outer
weights), the config fingerprint, the timeline the checkpoint belongs to, and the sha256 and size
of every other file in the directory. `verify` rehashes those files; any difference (flipped
bytes, a truncated or missing shard) is reported as a `CorruptCheckpoint` naming the file.

JSON only: nothing in a manifest is ever unpickled, so one can be read from a peer or a bucket.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from atoll.atomic import atomic_write

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_HASH_BLOCK = 8 << 20
_HASH_THREADS = min(8, os.cpu_count() or 1)


class CorruptCheckpoint(Exception):
    """A checkpoint whose files do not match its manifest; the message names the file."""


@dataclass
class Manifest:
    """What one island's checkpoint holds, in JSON.

    `outer_step`, `epoch`, `members` and `outer_digest` describe the island's place in a mesh
    (0, None, [] and None when it trains alone). `timeline` is the checkpoint's timeline in its
    directory (see `atoll.checkpoint.timeline`); `files` maps each file name to
    {"sha256": hex, "bytes": size}.
    """

    run_id: str
    island_id: str | None
    step: int
    outer_step: int = 0
    epoch: int | None = None
    members: list[str] = field(default_factory=list)
    outer_digest: str | None = None
    config_fingerprint: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    """The run's resolved config as {dotted key: value} (no addresses or token), to name what a resume changes."""
    timeline: int = 0
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    created: float = 0.0
    format: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        """Parse a manifest; raises CorruptCheckpoint on anything that is not one."""
        try:
            raw = json.loads(text)
            known = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw}
            manifest = cls(**known)
        except (ValueError, TypeError, KeyError) as err:
            raise CorruptCheckpoint(f"{MANIFEST} is not a valid manifest ({err})") from None
        if not isinstance(manifest.files, dict) or not isinstance(manifest.step, int):
            raise CorruptCheckpoint(f"{MANIFEST} is not a valid manifest (files or step of the wrong type)")
        return manifest


def sha256_file(path: Path) -> str:
    """sha256 of a file's bytes, read in 8 MiB blocks (hashlib releases the GIL on large blocks)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


def digest_files(directory: Path) -> dict[str, dict[str, Any]]:
    """{name: {"sha256", "bytes"}} for every regular file in `directory` but the manifest, hashed
    in parallel threads (one checkpoint holds several shards)."""
    names = sorted(p.name for p in directory.iterdir() if p.is_file() and p.name != MANIFEST)
    with ThreadPoolExecutor(_HASH_THREADS) as pool:
        digests = list(pool.map(lambda n: sha256_file(directory / n), names))
    return {n: {"sha256": d, "bytes": (directory / n).stat().st_size} for n, d in zip(names, digests)}


def write_manifest(directory: Path, manifest: Manifest) -> None:
    """Hash the directory's files into `manifest.files` and write it atomically, last."""
    manifest.files = digest_files(directory)
    atomic_write(directory / MANIFEST, lambda f: f.write(manifest.to_json().encode()))


def read_manifest(directory: Path) -> Manifest:
    """The manifest of a checkpoint directory; CorruptCheckpoint if it is missing or unreadable."""
    try:
        text = (directory / MANIFEST).read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise CorruptCheckpoint(f"{MANIFEST} cannot be read ({err.__class__.__name__})") from None
    return Manifest.from_json(text)


def verify(directory: Path) -> Manifest:
    """Rehash every file the manifest lists; returns the manifest if all match.

    Raises CorruptCheckpoint naming the first file that is missing, has another size (truncated)
    or another sha256 (flipped bytes). Files the manifest does not list are ignored.
    """
    manifest = read_manifest(directory)
    for name, expected in manifest.files.items():
        path = directory / name
        if not path.is_file():
            raise CorruptCheckpoint(f"{name} is missing")
        size = path.stat().st_size
        if size != expected["bytes"]:
            raise CorruptCheckpoint(f"{name} has {size} bytes, the manifest says {expected['bytes']} (truncated or overwritten)")
    names = list(manifest.files)
    with ThreadPoolExecutor(_HASH_THREADS) as pool:
        actual = list(pool.map(lambda n: sha256_file(directory / n), names))
    for name, digest in zip(names, actual):
        if digest != manifest.files[name]["sha256"]:
            raise CorruptCheckpoint(f"{name} does not match its sha256 in the manifest (corrupt bytes)")
    return manifest


def checkpoint_bytes(manifest: Manifest) -> int:
    """Total size of the files a manifest lists."""
    return sum(int(f["bytes"]) for f in manifest.files.values())
