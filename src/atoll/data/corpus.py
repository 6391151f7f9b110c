"""Text corpora and their deterministic train/val split.

The default corpus is the running Python's standard library: several hundred ``.py``
files (~10 MB) present on every machine that can run atoll, so a run needs no download.
Any other source is a directory of ``*.txt``/``*.md``/``*.py`` files or one text file.

Files are assigned to train or val by a sha256 of their path relative to the source root,
so the split is the same on every machine and does not depend on listing order.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from collections.abc import Callable
from pathlib import Path

from atoll.data.sources import check_text

STDLIB_SOURCE = "stdlib"
"""The ``source`` name that selects the standard-library corpus."""

TRAIN_SPLIT = "train"
VAL_SPLIT = "val"
SPLITS = (TRAIN_SPLIT, VAL_SPLIT)

TEXT_SUFFIXES = (".txt", ".md", ".py")
"""Files taken from a directory source."""

# Tests, the IDE, caches and installed third-party packages are not "the standard library".
_STDLIB_EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}
)
# Build-time files whose content differs between machines with the same Python version.
_STDLIB_EXCLUDED_PREFIXES = ("config-", "_sysconfigdata_")


def _relative_key(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _walk(
    root: Path,
    suffixes: tuple[str, ...],
    skip_dir: Callable[[str], bool],
    skip_file: Callable[[str], bool],
) -> list[Path]:
    """Files below ``root`` with one of ``suffixes``, sorted by relative path."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not skip_dir(d)]
        for name in filenames:
            if name.endswith(suffixes) and not skip_file(name):
                found.append(Path(dirpath) / name)
    return sorted(found, key=lambda p: _relative_key(p, root))


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def stdlib_root() -> Path:
    """Directory of the running Python's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """The ``.py`` files of the running Python's standard library, sorted by relative path.

    Excludes installed packages (``site-packages``/``dist-packages``), test suites
    (``test``/``tests`` directories), ``idlelib`` and machine-specific build files.
    """
    return _walk(
        stdlib_root(),
        (".py",),
        skip_dir=lambda d: d in _STDLIB_EXCLUDED_DIRS or d.startswith(_STDLIB_EXCLUDED_PREFIXES),
        skip_file=lambda f: f.startswith(_STDLIB_EXCLUDED_PREFIXES),
    )


def source_files(source: str) -> tuple[Path, list[Path]]:
    """Resolve ``source`` to ``(root, files)``, files sorted by path relative to ``root``.

    ``source`` is ``"stdlib"``, a directory (every ``*.txt``/``*.md``/``*.py`` file below it,
    skipping hidden files and directories such as ``.git`` or ``.venv``) or a single file,
    whose root is its parent directory.

    Raises:
        FileNotFoundError: the path does not exist, or a directory holds no matching files.
    """
    if source == STDLIB_SOURCE:
        return stdlib_root(), stdlib_files()
    path = Path(source).expanduser().resolve()
    if path.is_file():
        return path.parent, [path]
    if not path.is_dir():
        raise FileNotFoundError(f"data source {source!r} does not exist (resolved to {path})")
    files = _walk(path, TEXT_SUFFIXES, skip_dir=_is_hidden, skip_file=_is_hidden)
    if not files:
        raise FileNotFoundError(
            f"data source {source!r} holds no {'/'.join(TEXT_SUFFIXES)} files (resolved to {path})"
        )
    return path, files


def _check_split(split: str, val_fraction: float) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")


def _hash_unit(key: str) -> float:
    """A stable number in [0, 1) for ``key`` (sha256, identical on every machine)."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _assign(root: Path, files: list[Path], split: str, val_fraction: float) -> list[Path]:
    """The members of ``split`` among two or more ``files``; both splits end up non-empty."""
    units = {f: _hash_unit(_relative_key(f, root)) for f in files}
    val = {f for f in files if units[f] < val_fraction}
    if not val:
        val = {min(files, key=units.__getitem__)}
    elif len(val) == len(files):
        val.remove(max(files, key=units.__getitem__))
    in_val = split == VAL_SPLIT
    return [f for f in files if (f in val) == in_val]


def split_files(source: str, split: str, val_fraction: float) -> tuple[Path, list[Path]]:
    """``(root, files)`` of ``source`` that belong to ``split``, sorted by relative path.

    A file is in val when the sha256 of its relative path maps below ``val_fraction``. With two
    or more files both splits are non-empty: if the hash leaves one empty, the file closest to
    the boundary moves over. A source of one file is returned whole for both splits;
    :func:`load_documents` splits its text by position instead.

    Raises:
        ValueError: ``split`` is not "train"/"val", or ``val_fraction`` is not in (0, 1).
        FileNotFoundError: as :func:`source_files`.
    """
    _check_split(split, val_fraction)
    root, files = source_files(source)
    if len(files) == 1:
        return root, files
    return root, _assign(root, files, split, val_fraction)


def _split_text(text: str, split: str, val_fraction: float) -> str:
    """Train is the head of ``text`` and val its last ~``val_fraction``, cut after a newline."""
    cut = int(len(text) * (1.0 - val_fraction))
    newline = text.rfind("\n", 0, cut)
    if newline >= 0:
        cut = newline + 1
    return text[:cut] if split == TRAIN_SPLIT else text[cut:]


def _read(path: Path) -> str:
    """The file's text, undecodable bytes replaced; a file that is not text raises ValueError."""
    data = path.read_bytes()
    why = check_text(data)
    if why is not None:
        raise ValueError(
            f"{path} {why}: remove it from the corpus, or list the directory as a [[data.sources]] "
            "entry with data.on_bad_file = \"skip\""
        )
    return data.decode("utf-8", errors="replace")


def load_documents(source: str, split: str, val_fraction: float) -> list[str]:
    """The texts of ``source``'s ``split``, one document per file, in sorted path order.

    Files are read as UTF-8 with undecodable bytes replaced. A source of one file has no second
    path to hash, so it yields one document per split: the head of its text for train and the
    last ~``val_fraction`` for val.

    Raises:
        ValueError: bad ``split`` or ``val_fraction``, or a file that is not text (NUL bytes or
            mostly undecodable, see :func:`atoll.data.sources.check_text`).
        FileNotFoundError: the source does not exist or holds no files.
    """
    _check_split(split, val_fraction)
    root, files = source_files(source)
    if len(files) == 1:
        return [_split_text(_read(files[0]), split, val_fraction)]
    return [_read(f) for f in _assign(root, files, split, val_fraction)]
