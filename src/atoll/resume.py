"""Where an island's run continues from: its run directory's claim, the checkpoint it resumes and
the config it was written under (every local rank gets the same answer from the leader).

A manifest records the config's fingerprint without the mesh's addresses, so a run resumed with its
coordinator elsewhere is the same run; a different fingerprint is resumed with a note naming the keys.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from atoll.checkpoint import Checkpointer, RunDirLock, check_fresh_run_dir
from atoll.config import JobConfig
from atoll.errors import UserError
from atoll.fingerprint import config_changes, flat_config
from atoll.island import Island, broadcast_text
from atoll.logs import info as log_line


ADDRESS_KEYS = ("coordinator", "token", "serve_host", "interface", "advertise_host", "port_range", "advertise_port_range")
"""mesh.* settings that say where the run is reached, not what it trains: a restarted coordinator may listen elsewhere."""


def config_fingerprint(cfg: JobConfig) -> str:
    """sha256 of the resolved config but the mesh's addresses (recorded in every manifest, compared on resume)."""
    resolved = cfg.model_dump(mode="json")
    resolved["mesh"] = {k: v for k, v in resolved["mesh"].items() if k not in ADDRESS_KEYS}
    return hashlib.sha256(json.dumps(resolved, sort_keys=True).encode()).hexdigest()


def recorded_config(cfg: JobConfig) -> dict[str, Any]:
    """The flat config every manifest records, without the mesh's addresses and token."""
    hidden = {f"mesh.{key}" for key in ADDRESS_KEYS}
    return {k: v for k, v in flat_config(cfg).items() if k not in hidden}


def describe_config_change(manifest_config: dict[str, Any], cfg: JobConfig) -> str:
    """The resume note for a config that differs from the checkpoint's, naming the keys."""
    if not manifest_config:
        return "; note: the config differs from the checkpoint's (which does not record its keys)"
    return "; note: the config differs from the checkpoint's: " + ", ".join(config_changes(manifest_config, recorded_config(cfg)))


@dataclass
class ResumePoint:
    """Where a run continues from, the same on every local rank."""

    path: Path
    timeline: int
    outer_digest: str | None
    steps: int | None
    """The train.steps the checkpoint was written under (None: not recorded)."""


def claim_run_dir(run_dir: Path, resume: str | None, ident: str | None, island: Island) -> RunDirLock | None:
    """The leader locks the run directory; a fresh run refuses one that holds another run.

    Every local rank raises the same UserError when the leader's claim fails.
    """
    lock, error = None, ""
    if island.is_leader:
        try:
            lock = RunDirLock(run_dir, ident)
            if resume is None:
                check_fresh_run_dir(run_dir, ident)
        except UserError as err:
            error = str(err)
            if lock is not None:
                lock.release()
    error = broadcast_text(error, island)
    if error:
        raise UserError(error)
    return lock


def open_checkpoints(checkpointer: Checkpointer, resume: str | None, cfg: JobConfig, ident: str | None, island: Island) -> ResumePoint | None:
    """Find and verify the checkpoint to resume from (leader), fix the timeline, tell every rank.

    The leader prints one line per newer checkpoint that did not verify, and what verifying the
    chosen one cost. Raises UserError on every rank when nothing usable is found.
    """
    fingerprint = config_fingerprint(cfg)
    answer: dict[str, Any] = {}
    if island.is_leader:
        try:
            found = checkpointer.find_resumable(resume, report=lambda line: log_line(f"atoll: {line}")) if resume else None
            note = checkpointer.start(found.path if found else None, found.manifest.run_id if found else None, ident, fingerprint)
            if note is not None:
                log_line(f"atoll: {note}")
            answer = {"timeline": checkpointer.timeline, "run_id": checkpointer.identity.run_id}
            if found is not None:
                m = found.manifest
                log_line(f"atoll: verified {found.path} ({len(m.files)} files, {sum(f['bytes'] for f in m.files.values()) / 1e6:.1f} MB, "
                         f"sha256) in {found.verify_s:.2f}s" + ("" if m.config_fingerprint == fingerprint else describe_config_change(m.config, cfg)))
                answer.update(path=str(found.path), outer_digest=m.outer_digest, steps=m.config.get("train.steps"))
        except UserError as err:
            answer = {"error": str(err)}
    answer = json.loads(broadcast_text(json.dumps(answer), island))
    if "error" in answer:
        raise UserError(answer["error"])
    checkpointer.identity = dataclasses.replace(checkpointer.identity, run_id=answer["run_id"], island_id=ident,
                                                config_fingerprint=fingerprint, config=recorded_config(cfg))
    checkpointer.timeline = answer["timeline"]
    if "path" not in answer:
        return None
    return ResumePoint(Path(answer["path"]), answer["timeline"], answer["outer_digest"], answer["steps"])
