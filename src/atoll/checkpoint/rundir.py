"""Who may write into a run directory: one live process at a time, and a fresh run only into an
unused directory.

The lock is `flock` on `<run dir>/.atoll.lock`, held by the island leader for the whole run; the
kernel drops it when the process dies however it dies (kill -9 included), so a stale lock never
needs cleaning. The file holds the owner's island id, pid and host, for the refusal message.
`flock` is reliable on local filesystems; on network filesystems it depends on the server.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import TextIO

from atoll.checkpoint.timeline import parse_name
from atoll.errors import UserError

LOCK = ".atoll.lock"
RUN_INFO = "run.json"
METRICS = "metrics.jsonl"
SAME_ISLAND_WAIT_S = 30.0
"""How long an island restarted under its id waits for its previous process to release the lock."""


class RunDirLock:
    """An exclusive lock on a run directory, held until `release` or the process's death."""

    def __init__(self, run_dir: Path, island_id: str | None, same_island_wait_s: float = SAME_ISLAND_WAIT_S) -> None:
        """Take the lock; raises UserError naming the live owner if another process holds it.

        When the owner is the same island (an island restarted under its id while its previous
        process is still exiting), waits up to `same_island_wait_s` for it to go first.
        """
        self.run_dir = run_dir
        self._made = _first_missing(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / LOCK
        self._file: TextIO | None = self.path.open("a+")
        deadline = time.monotonic() + same_island_wait_s
        while True:
            try:
                fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if _still_linked(self._file, self.path):
                    break
                # the owner removed the lock file of a failed start as we waited: lock the new one
                self._file.close()
                run_dir.mkdir(parents=True, exist_ok=True)
                self._file = self.path.open("a+")
            except BlockingIOError:
                self._file.seek(0)
                text = self._file.read()
                if island_id is not None and _owner_island(text) == island_id and time.monotonic() < deadline:
                    time.sleep(0.2)
                    continue
                self._file.close()
                self._file = None
                raise UserError(
                    f"run dir {run_dir} is in use by {_describe_owner(text)}: stop that process, or pass another --run-dir"
                ) from None
        self._file.seek(0)
        self._file.truncate()
        owner = {"island_id": island_id, "pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        self._file.write(json.dumps(owner) + "\n")
        self._file.flush()

    def release(self) -> None:
        """Drop the lock (also dropped by the kernel when the process exits).

        A start that failed before the directory held anything of a run (`holds_a_run`) leaves no
        trace: the lock file goes, and so do the directories the lock created, if empty.
        """
        if self._file is None:
            return
        if holds_a_run(self.run_dir) is None:  # unlinked while still locked: see _still_linked
            self.path.unlink(missing_ok=True)
            _remove_empty(self.run_dir, self._made)
        fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()
        self._file = None


def _first_missing(path: Path) -> Path | None:
    """The outermost directory of `path` (itself included) that does not exist yet, or None."""
    missing = None
    for directory in [path, *path.parents]:
        if directory.exists():
            break
        missing = directory
    return missing


def _remove_empty(path: Path, up_to: Path | None) -> None:
    """Remove `path` and its parents up to `up_to` (the directories a lock created) while they are empty."""
    if up_to is None:
        return
    for directory in [path, *path.parents]:
        try:
            directory.rmdir()
        except OSError:  # not empty (another process wrote into it), or gone
            return
        if directory == up_to:
            return


def _still_linked(file: TextIO, path: Path) -> bool:
    """Whether the locked `file` is still the one at `path` (a released failed start unlinks it)."""
    try:
        return os.stat(path).st_ino == os.fstat(file.fileno()).st_ino
    except FileNotFoundError:
        return False


def _owner_island(text: str) -> str | None:
    try:
        return json.loads(text).get("island_id")
    except (ValueError, AttributeError):
        return None


def _describe_owner(text: str) -> str:
    try:
        owner = json.loads(text)
        island = f"island {owner['island_id']!r}" if owner.get("island_id") else "another run"
        return f"{island} (pid {owner['pid']} on {owner['host']})"
    except (ValueError, KeyError, TypeError):
        return "another process"


def holds_a_run(run_dir: Path) -> str | None:
    """What in `run_dir` shows it belongs to a run (its run.json, metrics or checkpoints), or None."""
    if (run_dir / RUN_INFO).is_file():
        return RUN_INFO
    metrics = run_dir / METRICS
    if metrics.is_file() and metrics.stat().st_size > 0:
        return METRICS
    checkpoints = run_dir / "checkpoints"
    if checkpoints.is_dir() and any(parse_name(p.name.removesuffix(".partial")) for p in checkpoints.iterdir()):
        return "checkpoints"
    return None


def check_fresh_run_dir(run_dir: Path, island_id: str | None) -> None:
    """Refuse a fresh (not resumed) run in a directory that holds another run.

    One exception: an island of a mesh restarted under its own id into its own directory (its
    run.json names the same island) goes through; the mesh decides what state it receives, and
    `Checkpointer.start` keeps the checkpoints already there aside on a timeline of their own
    (the island cannot know, before it joins, whether they are of the run it joins).
    Raises UserError in one line naming the directory and both ways out.
    """
    found = holds_a_run(run_dir)
    if found is None:
        return
    if island_id is not None and (run_dir / RUN_INFO).is_file():
        try:
            if json.loads((run_dir / RUN_INFO).read_text()).get("island_id") == island_id:
                return
        except ValueError:
            pass
    raise UserError(
        f"run dir {run_dir} already holds a run ({found}): pass --resume to continue it, or a new --run-dir"
    )
