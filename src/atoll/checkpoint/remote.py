"""Copies of checkpoints in remote storage, through fsspec (any URL it understands: s3://, gs://,
memory://, file://, ...).

Object stores have no atomic rename, so completeness is carried by the manifest instead: `upload`
puts every file first and `manifest.json` last, and `download` trusts nothing it has not verified
(it fetches into `<name>.partial`, checks every sha256, then renames). A crash mid-upload leaves a
remote directory without a manifest, which `download` refuses and the next upload overwrites.

Training never waits for a remote copy and never stops for one: `RemoteCopier` uploads each
published checkpoint on a thread of its own, retrying with backoff, and reports the outcome as
events (a line and metrics fields, `checkpoint_remote_error` on failure). Local retention does not
wait for it either: a checkpoint pruned while it is being copied is dropped for the newer one.
"""

from __future__ import annotations

import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec

from atoll.atomic import fsync_dir
from atoll.checkpoint.manifest import MANIFEST, CorruptCheckpoint, Manifest, verify
from atoll.checkpoint.timeline import parse_name

PARTIAL_SUFFIX = ".partial"


def upload(local: Path, url: str) -> None:
    """Copy the complete checkpoint `local` to `url` (a directory URL), manifest last.

    Raises the filesystem's error (OSError, botocore's, ...) when the remote side fails, at the
    first failure: no retry (`RemoteCopier` retries) and no timeout of its own (the backend's
    apply). The local checkpoint is untouched either way; a remote copy cut short has no manifest.
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
    that does not match it, and the filesystem's error when the remote side fails (no retry, no
    timeout of its own: the backend's apply); `local` is then not created.
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


REMOTE_ERROR_FIELD = "checkpoint_remote_error"
"""Metrics field of a remote copy that failed every attempt: one line naming the checkpoint, the URL and the error."""
REMOTE_STEP_FIELD = "checkpoint_remote_step"
"""Metrics field of a remote copy that completed: the step of the checkpoint now in remote storage."""


@dataclass
class RemoteEvent:
    """The outcome of one checkpoint's remote copy: a log line and the metrics fields it adds."""

    line: str
    fields: dict[str, Any] = field(default_factory=dict)


class RemoteCopier:
    """Uploads published checkpoints to `url` in the background, newest first, retrying with backoff.

    `submit` returns at once. One copy runs at a time; a checkpoint submitted while another is
    being copied waits, and replaces any older one still waiting (only the newest is worth
    copying). A failed upload is tried again after `backoff_s`, then twice that, ... up to
    `attempts` tries in all, or until a newer checkpoint waits; then the copy is given up with one
    event naming the checkpoint, the URL and the last error (`checkpoint_remote_error`), and the
    next `submit` (the next save) tries again with its checkpoint. There is no timeout of its own:
    a remote call that hangs holds only this thread (fsspec's and the store's own timeouts apply),
    training and later saves go on, and `wait` gives up on it after its timeout. A checkpoint
    deleted locally during its copy (pruned by retention, which never waits for the remote) is
    dropped without error when a newer one is waiting.
    """

    def __init__(self, url: str, attempts: int, backoff_s: float) -> None:
        self.url = url.rstrip("/")
        self.attempts = attempts
        self.backoff_s = backoff_s
        self._lock = threading.Condition()
        self._waiting: Path | None = None
        self._busy = False
        self._closed = threading.Event()
        self._events: list[RemoteEvent] = []
        self._thread = threading.Thread(target=self._run, name="atoll-remote-copy", daemon=True)
        self._thread.start()

    def submit(self, local: Path) -> None:
        """Queue the complete local checkpoint `local` for copying to `<url>/<its name>` (never blocks)."""
        with self._lock:
            self._waiting = local
            self._lock.notify_all()

    def events(self) -> list[RemoteEvent]:
        """Outcomes of copies that finished since the last call (never blocks)."""
        with self._lock:
            events, self._events = self._events, []
        return events

    def wait(self, timeout_s: float) -> None:
        """Block until nothing is waiting or being copied, at most `timeout_s`; a copy still running
        then is reported as an event (and goes on, or not: `close` abandons it)."""
        with self._lock:
            if not self._lock.wait_for(lambda: self._waiting is None and not self._busy, timeout=timeout_s):
                line = f"checkpoint: the remote copy to {self.url} still runs after {timeout_s:.0f}s; left unfinished (the local checkpoint is complete)"
                self._events.append(RemoteEvent(line, {REMOTE_ERROR_FIELD: line}))

    def close(self) -> None:
        """Stop the thread: a copy in progress ends after its current attempt, without retries; the
        thread is a daemon, so an attempt that hangs never holds the process at exit."""
        self._closed.set()
        with self._lock:
            self._lock.notify_all()

    def _run(self) -> None:
        while True:
            with self._lock:
                self._lock.wait_for(lambda: self._waiting is not None or self._closed.is_set())
                if self._closed.is_set():
                    return
                local, self._waiting, self._busy = self._waiting, None, True
            event = self._copy(local)
            with self._lock:
                if event is not None:
                    self._events.append(event)
                self._busy = False
                self._lock.notify_all()

    def _copy(self, local: Path) -> RemoteEvent | None:
        """Upload `local` with retries; the event to report, or None when it was superseded."""
        url = f"{self.url}/{local.name}"
        step = parse_name(local.name)[0]
        attempt = 0
        while True:
            attempt += 1
            try:
                upload(local, url)
            except Exception as err:  # fsspec backends raise their own types (OSError, botocore's, aiohttp's, ...)
                if not local.is_dir() and self._waiting is not None:
                    return None  # pruned locally while copied; the newer checkpoint waits
                error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}".rstrip(": ")
                newer = self._waiting is not None  # retrying an older checkpoint would only delay the newest
                if attempt == self.attempts or newer or self._closed.wait(self.backoff_s * 2 ** (attempt - 1)):
                    line = (f"checkpoint: remote copy of {local.name} to {url} failed ({attempt} attempt(s), last: {error}); "
                            "training goes on and the next checkpoint is copied again")
                    return RemoteEvent(line, {REMOTE_ERROR_FIELD: line})
                continue
            retried = f" after {attempt} attempts" if attempt > 1 else ""
            return RemoteEvent(f"checkpoint: copied {local.name} to {url}{retried}", {REMOTE_STEP_FIELD: step})
