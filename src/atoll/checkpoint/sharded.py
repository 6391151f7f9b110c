"""Sharded checkpoints with torch.distributed.checkpoint (DCP): staged, written in the background,
published atomically, verified on load.

Layout: `<dir>/step-00000100/` is one complete checkpoint: the DCP shards of every local rank,
DCP's `.metadata`, and `manifest.json` (written last, with the sha256 of every other file; see
`atoll.checkpoint.manifest`). Checkpoints of later timelines carry a suffix (`step-00000150-t1`,
see `atoll.checkpoint.timeline`).

A save, collective over the island's local ranks:
1. waits for the previous save if it is still being written (at most one in flight; the wait is
   reported, and counts as blocked time: a save that cannot keep up slows training down rather
   than queueing copies of the state without bound),
2. starts staging the state into host memory (DCP's `DefaultStager` with asynchronous staging:
   a copy, on a thread of its own, into buffers reused from one save to the next, pinned when
   CUDA is present) and returns to training at once. The copy overlaps the next forward and
   backward, which only read the weights: training waits (`staged`) only if it is about to
   change the state before the copy is done, i.e. before its optimizer step. State that changes
   only at outer steps (the outer weights and momentum, `later`) is copied second and waited for
   only before the next outer step, so the optimizer step waits for the inner state alone;
3. a background thread then writes the staged copy with `dcp.save` over a gloo
   group of its own (so its collectives never interleave with training's) into
   `step-N.partial/`, then the leader hashes the files, writes the manifest, renames the
   directory to `step-N`, hands it to the remote copier (if any; see `atoll.checkpoint.remote`:
   the copy runs on a thread of its own, retried, and never blocks or stops training) and prunes.
A crash at any moment leaves every earlier complete checkpoint as it was: `.partial`
directories are never loaded and are cleared by the next save.

Loading verifies the manifest first. `find_resumable` walks the current timeline's history from
the newest checkpoint down, reporting each one that does not verify in one line and falling
back to the next.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Callable, Collection
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful
from torch.optim import Optimizer

from atoll.atomic import fsync_dir
from atoll.checkpoint import remote, timeline
from atoll.checkpoint.manifest import CorruptCheckpoint, Manifest, checkpoint_bytes, verify, write_manifest
from atoll.checkpoint.timeline import Timeline, checkpoint_name, is_complete, parse_name
from atoll.errors import UserError

PARTIAL_SUFFIX = ".partial"
DCP_METADATA = ".metadata"


class ModelOptimizerState(Stateful):
    """Model and optimizer state, sharded or not, in DCP's canonical (FQN-keyed) form."""

    def __init__(self, model: nn.Module, optimizer: Optimizer) -> None:
        self.model = model
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optimizer": optim_sd}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state_dict["model"],
            optim_state_dict=state_dict["optimizer"],
        )


def step_dir_name(step: int) -> str:
    """The directory name of timeline 0's checkpoint at `step`."""
    return checkpoint_name(step, 0)


@dataclass
class SaveReport:
    """One save, as the metrics record it."""

    step: int
    path: Path
    blocked_s: float
    """Time training was blocked: waiting for the previous save, starting the save, then waiting
    in `Checkpointer.staged` for the copy to host memory (final once the save is written)."""
    waited_s: float
    """The part of blocked_s spent waiting for the previous save to finish writing."""
    total_s: float = 0.0
    """From the start of the save to the checkpoint being published (its remote copy is not waited for)."""
    bytes: int = 0


@dataclass
class Resumable:
    """A verified checkpoint to resume from, with what it cost to verify."""

    path: Path
    manifest: Manifest
    verify_s: float
    skipped: list[str]
    """One line per newer checkpoint that did not verify."""


def newest_verified(directory: Path, report: Callable[[str], None] = lambda _: None) -> Resumable | None:
    """The newest checkpoint of `directory`'s current timeline history that verifies, or None.

    `directory` is a checkpoint directory (`<run>/checkpoints`) or a run directory. Each newer
    checkpoint that fails verification is passed to `report` as one line naming the file; it is
    left on disk untouched. Reads files only: no collectives, safe to call from any one process.
    """
    if (directory / "checkpoints").is_dir():
        directory = directory / "checkpoints"
    timelines = timeline.load_registry(directory)
    skipped: list[str] = []
    for path in reversed(timeline.lineage(directory, timelines, timelines[-1].id)):
        start = time.perf_counter()
        try:
            manifest = verify(path)
        except CorruptCheckpoint as err:
            skipped.append(f"checkpoint {path}: {err}; falling back to an older checkpoint")
            report(skipped[-1])
            continue
        return Resumable(path, manifest, time.perf_counter() - start, skipped)
    return None


class Checkpointer:
    """Saves and loads one island's checkpoints under one directory.

    `save`, `load`, `wait` and `close` are collective over the island's local group: all local
    ranks call them together. Only the leader touches shared files (manifest, rename, pruning,
    timeline registry, upload). `asynchronous=False` writes inside `save` (the benchmark's
    baseline). `remote_url`, a fsspec URL, receives a copy of every checkpoint after it is published,
    in the background (`remote_attempts` tries each, `remote_backoff_s` doubling between them; see
    `RemoteCopier`); the leader's `remote_events` tell how those copies went.
    """

    def __init__(
        self, directory: Path, keep: int, is_leader: bool, *, asynchronous: bool = True, remote_url: str | None = None,
        remote_attempts: int = 3, remote_backoff_s: float = 5.0,
    ) -> None:
        self.directory = directory
        self.keep = keep
        self.is_leader = is_leader
        self.asynchronous = asynchronous
        self._remote = (remote_url, remote_attempts, remote_backoff_s) if remote_url and is_leader else None
        self._copier: remote.RemoteCopier | None = None
        """Started by the first save that has a checkpoint to copy."""
        self.timeline = 0
        self.identity = Manifest(run_id=uuid.uuid4().hex, island_id=None, step=0)
        self._group: dist.ProcessGroup | None = None
        self._stager: DefaultStager | None = None
        self._writer: ThreadPoolExecutor | None = None
        self._in_flight: Future[SaveReport] | None = None
        self._staging: tuple[Future[dict[str, Any]] | None, Future[dict[str, Any]], SaveReport] | None = None
        """The save in flight's copies still to wait for: (inner state or None once waited, `later` keys, its report)."""
        self._done: list[SaveReport] = []

    # --- timelines --------------------------------------------------------------------------------

    def start(self, resumed_from: Path | None, run_id: str | None = None, island_id: str | None = None,
              config_fingerprint: str | None = None) -> str | None:
        """Fix the timeline this run writes and the identity its manifests carry (leader writes the registry).

        Fresh run into an unused directory: timeline 0. Fresh run into a directory that holds
        another run's checkpoints (an island of a mesh restarted without --resume into its own
        directory, the one case `check_fresh_run_dir` lets in): a new timeline with no parent, so
        `latest` and retention see only this run's checkpoints and the other run's are kept
        aside, never pruned; returns one line saying so (None otherwise). Resumed from the newest
        checkpoint of the current timeline's history: that timeline continues. Resumed from
        anything older here, or from a checkpoint elsewhere into a directory that already has a
        history: a new timeline. Island leader only (it reads and writes the registry); the other
        local ranks take `timeline` and `identity` from it (see `atoll.resume.open_checkpoints`).
        """
        self.identity = Manifest(run_id=run_id or uuid.uuid4().hex, island_id=island_id, step=0, config_fingerprint=config_fingerprint)
        had_registry = (self.directory / timeline.REGISTRY).is_file()
        timelines = timeline.load_registry(self.directory)
        history = timeline.lineage(self.directory, timelines, timelines[-1].id)
        note = None
        if resumed_from is None and history:
            timelines, changed = [*timelines, Timeline(max(t.id for t in timelines) + 1)], True
            note = (f"checkpoints: {self.directory} holds another run's checkpoints (newest {history[-1].name}); this fresh "
                    f"run writes timeline {timelines[-1].id} beside them and never prunes or resumes from them")
        elif resumed_from is None or (history and history[-1].resolve() == resumed_from.resolve()):
            changed = False  # the current timeline continues
        elif not history and not had_registry:
            timelines, changed = [Timeline(0, origin=str(resumed_from))], True
        else:
            here = resumed_from.resolve().parent == self.directory.resolve()
            new = Timeline(max(t.id for t in timelines) + 1, parent=resumed_from.name if here else None, origin=None if here else str(resumed_from))
            timelines, changed = [*timelines, new], True
        self.timeline = timelines[-1].id
        if self.is_leader and (changed or not had_registry):
            timeline.save_registry(self.directory, timelines)
        return note

    def latest(self) -> Path | None:
        """The newest complete (not necessarily verified) checkpoint of the current timeline's history."""
        timelines = timeline.load_registry(self.directory)
        found = timeline.lineage(self.directory, timelines, timelines[-1].id)
        return found[-1] if found else None

    def find_resumable(self, spec: str, report: Callable[[str], None]) -> Resumable:
        """Turn `--resume` (latest, a checkpoint directory, a run directory, or a fsspec URL of a
        checkpoint) into a verified checkpoint. Leader only: it reads and hashes files.

        latest / a run directory: the newest checkpoint of its history that verifies; each newer
        one that does not is passed to `report` in one line. An explicit checkpoint must verify
        itself. A URL is downloaded (verified) into this directory first. Raises UserError in
        one line when nothing usable is found.
        """
        if "://" in spec:
            return self._fetch(spec)
        if spec == "latest":
            where = self.directory
        else:
            path = Path(spec).expanduser()
            if parse_name(path.name) is not None:
                if not is_complete(path):
                    raise UserError(f"--resume {spec}: not a complete checkpoint (no manifest.json); resume from its run directory to use the newest good one")
                start = time.perf_counter()
                try:
                    manifest = verify(path)
                except CorruptCheckpoint as err:
                    raise UserError(f"--resume {spec}: {err}; pass an older checkpoint or the run directory") from None
                return Resumable(path, manifest, time.perf_counter() - start, [])
            where = path
        found = newest_verified(where, report)
        if found is None:
            raise UserError(f"--resume {spec}: no checkpoint that verifies in {where}; pass --run-dir of an earlier run or another checkpoint")
        return found

    def _fetch(self, url: str) -> Resumable:
        name = url.rstrip("/").rsplit("/", 1)[-1]
        if parse_name(name) is None:
            raise UserError(f"--resume {url}: a remote checkpoint URL must end in its step directory (step-NNNNNNNN)")
        local = self.directory / f"fetched-{name}" / name
        start = time.perf_counter()
        if not is_complete(local):
            try:
                manifest = remote.download(url, local)
            except CorruptCheckpoint as err:
                raise UserError(f"--resume {url}: {err}") from None
            except (OSError, ValueError) as err:
                raise UserError(f"--resume {url}: cannot read it ({err})") from None
            return Resumable(local, manifest, time.perf_counter() - start, [])
        return Resumable(local, verify(local), time.perf_counter() - start, [])

    # --- save -------------------------------------------------------------------------------------

    def save(self, step: int, state: dict[str, Any], facts: dict[str, Any] | None = None, later: Collection[str] = ()) -> SaveReport:
        """Checkpoint `state` (Statefuls or plain dicts of tensors) at `step`.

        `facts` fills the manifest's outer_step, epoch, members and outer_digest. Asynchronous:
        returns as soon as the copy to host memory has started; the caller must call `staged()`
        before it changes any of the state's tensors, and `staged(everything=True)` before it
        changes those of the keys in `later` (copied second). Not asynchronous: returns once the
        checkpoint is written. The report's total_s is known when the save completes
        (`completed`, `wait`). Raises UserError if the previous save failed on an OSError (disk
        full, permissions), naming the path.
        """
        start = time.perf_counter()
        previous = self.wait()  # at most one save in flight: the staging buffers are reused
        waited = time.perf_counter() - start if previous is not None else 0.0
        final = self.directory / checkpoint_name(step, self.timeline)
        partial = final.with_name(final.name + PARTIAL_SUFFIX)
        if self.is_leader:
            self.directory.mkdir(parents=True, exist_ok=True)
            for leftover in self.directory.glob(f"*{PARTIAL_SUFFIX}"):  # from crashed saves
                shutil.rmtree(leftover)
        self._ensure_started()
        dist.barrier()
        plain = {key: value.state_dict() if isinstance(value, Stateful) else value for key, value in state.items()}
        manifest = replace(self.identity, step=step, timeline=self.timeline, **(facts or {}))
        report = SaveReport(step, final, blocked_s=0.0, waited_s=waited)
        if self.asynchronous:
            if torch.cuda.is_available():  # the copy runs on a stream of its own: it must see the last step's writes
                torch.cuda.current_stream().synchronize()
            first = self._stager.stage({key: value for key, value in plain.items() if key not in later})
            second = self._stager.stage({key: value for key, value in plain.items() if key in later})
            self._staging = (first, second, report)
            report.blocked_s = time.perf_counter() - start
            self._in_flight = self._writer.submit(self._write_staged, first, second, partial, final, manifest, report, start)
            return report
        self._write(plain, partial, final, manifest, report, start)
        report.blocked_s = report.total_s
        self._done.append(report)
        return report

    def staged(self, everything: bool = False) -> float:
        """Wait until the save in flight has copied the state that is not in its `later` keys (and,
        with `everything`, those too); returns the seconds waited, which count as blocked time
        (0.0 when there was nothing left to wait for).

        Local to this rank, never collective. A copy that failed (out of host memory) raises here.
        """
        if self._staging is None:
            return 0.0
        first, second, report = self._staging
        if first is None and not everything:
            return 0.0
        start = time.perf_counter()
        if first is not None:
            first.result()
        if everything:
            second.result()
        self._staging = None if everything else (None, second, report)
        waited = time.perf_counter() - start
        report.blocked_s += waited
        return waited

    def _write_staged(self, first: Future[dict[str, Any]], second: Future[dict[str, Any]], partial: Path, final: Path,
                      manifest: Manifest, report: SaveReport, start: float) -> SaveReport:
        return self._write({**first.result(), **second.result()}, partial, final, manifest, report, start)

    def _write(self, staged: dict[str, Any], partial: Path, final: Path, manifest: Manifest, report: SaveReport, start: float) -> SaveReport:
        # DCP's last phase gathers every rank's write results before the leader writes .metadata,
        # so once dcp.save returns on the leader every rank's shards are on disk (and fsynced).
        dcp.save(staged, checkpoint_id=partial, process_group=self._group)
        if self.is_leader:
            manifest.created = time.time()
            write_manifest(partial, manifest)
            report.bytes = checkpoint_bytes(manifest)
            _replace_dir(partial, final)
            if self._remote is not None:  # before pruning: a copy of a pruned checkpoint then yields to this one
                self._copier = self._copier or remote.RemoteCopier(*self._remote)
                self._copier.submit(final)
            self._prune()
        report.total_s = time.perf_counter() - start
        return report

    def _ensure_started(self) -> None:
        """The writer's own gloo group, stager and thread, created at the first save (collective)."""
        if self._group is not None:
            return
        self._group = dist.new_group(backend="gloo")
        if self.asynchronous:
            cuda = torch.cuda.is_available()
            self._stager = DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=False, use_async_staging=True, use_non_blocking_copy=cuda))
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="atoll-checkpoint")

    def wait(self) -> SaveReport | None:
        """Block until the save in flight (if any) is written; returns its report, or None."""
        if self._in_flight is None:
            return None
        future, self._in_flight, self._staging = self._in_flight, None, None
        try:
            report = future.result()
        except OSError as err:
            raise UserError(f"checkpoint into {self.directory} failed: {err.strerror or err} ({err.filename or ''}); free space or fix permissions, then --resume") from None
        self._done.append(report)
        return report

    def completed(self) -> list[SaveReport]:
        """Reports of saves that finished since the last call (never blocks)."""
        if self._in_flight is not None and self._in_flight.done():
            self.wait()
        done, self._done = self._done, []
        return done

    def remote_events(self) -> list[remote.RemoteEvent]:
        """Outcomes of the remote copies that finished since the last call (leader only; never blocks)."""
        return self._copier.events() if self._copier is not None else []

    def wait_remote(self, timeout_s: float) -> None:
        """Wait at most `timeout_s` for the remote copy in progress, retries included (leader only;
        a copy still running then is reported by `remote_events` and left to finish or not)."""
        if self._copier is not None:
            self._copier.wait(timeout_s)

    def close(self) -> list[SaveReport]:
        """Finish the save in flight, release the writer and stop the remote copier (a copy in
        progress is abandoned: `wait_remote` first to finish it); returns the reports not yet collected."""
        self.wait()
        if self._copier is not None:
            self._copier.close()
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None
        if self._stager is not None:
            self._stager.close()
            self._stager = None
        done, self._done = self._done, []
        return done

    # --- load -------------------------------------------------------------------------------------

    def load(self, path: Path, state: dict[str, Any]) -> None:
        """Restore `state` in place from the checkpoint at `path` (verify it first: find_resumable).

        Raises UserError in one line when the checkpoint does not fit `state` (another model
        size, a key it lacks).
        """
        try:
            dcp.load(state, checkpoint_id=path)
        except CheckpointException as err:
            first = str(err).strip().splitlines()
            raise UserError(f"checkpoint {path} does not fit this run (another config?): {first[-1] if first else type(err).__name__}") from None

    def _prune(self) -> None:
        for old in timeline.own_checkpoints(self.directory, self.timeline)[: -self.keep]:
            shutil.rmtree(old)


def _replace_dir(src: Path, dst: Path) -> None:
    """Atomically publish `src` as `dst`; an existing `dst` is swapped out first, then removed."""
    stale = dst.with_name(dst.name + ".old")
    if dst.exists():
        os.replace(dst, stale)
    os.replace(src, dst)
    fsync_dir(dst.parent)
    shutil.rmtree(stale, ignore_errors=True)
