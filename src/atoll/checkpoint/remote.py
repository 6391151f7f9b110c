"""Copies of checkpoints in remote storage, through fsspec (any URL it understands: s3://, gs://,
memory://, file://, ...).

Object stores have no atomic rename, so completeness is carried by the manifest instead: `upload`
puts every file first and `manifest.json` last, and `download` trusts nothing it has not verified
(it fetches into `<name>.partial`, checks every sha256, then renames). A crash mid-upload leaves a
remote directory without a manifest, which `download` refuses and the next upload overwrites.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import fsspec

from atoll.atomic import fsync_dir
from atoll.checkpoint.manifest import MANIFEST, CorruptCheckpoint, Manifest, verify

PARTIAL_SUFFIX = ".partial"


def upload(local: Path, url: str) -> None:
    """Copy the complete checkpoint `local` to `url` (a directory URL), manifest last.

    Raises the filesystem's error (OSError, botocore's, ...) when the remote side fails; the
    local checkpoint is untouched either way.
    """
    fs, root = fsspec.core.url_to_fs(url)
    fs.makedirs(root, exist_ok=True)
    if fs.exists(f"{root}/{MANIFEST}"):  # overwriting: make the old copy incomplete first
        fs.rm(f"{root}/{MANIFEST}")
    names = sorted(p.name for p in local.iterdir() if p.is_file() and p.name != MANIFEST)
    for name in [*names, MANIFEST]:
        fs.put_file(str(local / name), f"{root}/{name}")


def download(url: str, local: Path) -> Manifest:
    """Fetch the remote checkpoint at `url` into the local directory `local`, verified.

    Raises CorruptCheckpoint (naming the file) when the remote copy has no manifest or a file
    that does not match it; `local` is then not created.
    """
    fs, root = fsspec.core.url_to_fs(url)
    if not fs.exists(f"{root}/{MANIFEST}"):
        raise CorruptCheckpoint(f"{url} has no {MANIFEST} (an incomplete upload, or not a checkpoint)")
    partial = local.with_name(local.name + PARTIAL_SUFFIX)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    manifest = Manifest.from_json(fs.cat_file(f"{root}/{MANIFEST}").decode())
    for name in manifest.files:
        if "/" in name or name in ("", ".", ".."):
            raise CorruptCheckpoint(f"{url}: the manifest names a file outside the checkpoint ({name!r})")
        fs.get_file(f"{root}/{name}", str(partial / name))
    fs.get_file(f"{root}/{MANIFEST}", str(partial / MANIFEST))
    try:
        verify(partial)
    except CorruptCheckpoint:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    partial.rename(local)
    fsync_dir(local.parent)
    return manifest
