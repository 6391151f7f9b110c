"""Atomic file writes: a reader sees the old file or the whole new one, never a torn one.

Temp files and directories are created with the modes `open` and `mkdir` give by default (0666 and
0777 less the process's umask), as the final file would have had if written in place: what atoll
writes is as readable as anything else the user writes (tempfile's mkstemp/mkdtemp would make it
0600/0700 whatever the umask).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

FILE_MODE = 0o666
"""Mode of a new file before the umask."""
PRIVATE_MODE = 0o600
"""Mode of a file that holds a secret (a run token), whatever the umask."""


def atomic_write(path: Path, write: Callable[[BinaryIO], None], mode: int = FILE_MODE) -> None:
    """Call `write` on a temp file beside `path`, fsync it, then rename it over `path`.

    The file gets `mode` less the umask (PRIVATE_MODE for secrets).
    """
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def temp_dir_beside(path: Path, suffix: str) -> Path:
    """A new empty directory `.<name>.<random><suffix>` beside `path`, with mkdir's default mode (0777 less the umask)."""
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}{suffix}"
    tmp.mkdir()
    return tmp


def umask_mode(mode: int = FILE_MODE) -> int:
    """`mode` less the process's umask: for files a library writes with its own mode (safetensors: 0600)."""
    status = Path("/proc/self/status")
    if status.is_file():  # Linux 4.7+: read the umask without changing it (threads may be creating files)
        for line in status.read_text().splitlines():
            if line.startswith("Umask:"):
                return mode & ~int(line.split()[1], 8)
    umask = os.umask(0o022)
    os.umask(umask)
    return mode & ~umask


def fsync_dir(directory: Path) -> None:
    """Make a rename inside `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
