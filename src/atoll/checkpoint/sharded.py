"""Sharded checkpoints with torch.distributed.checkpoint (DCP), written atomically.

Layout: `<dir>/step-00000100/` is one complete checkpoint (DCP shards plus `.metadata`). A save is
written to `step-00000100.partial/`, fsynced by DCP, and renamed only after every local rank has
finished, so a crash mid-save never replaces or corrupts the last good checkpoint: `.partial`
directories are never loaded and are cleared by the next save.

What goes in is a dict of `Stateful` objects (anything with state_dict/load_state_dict); the
trainer decides what they are. Per-rank state (data position, RNG) goes under a per-rank key.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful
from torch.optim import Optimizer

from atoll.atomic import fsync_dir
from atoll.errors import UserError

STEP_PREFIX = "step-"
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
    return f"{STEP_PREFIX}{step:08d}"


def is_complete(path: Path) -> bool:
    """A checkpoint directory that finished saving (renamed, with DCP metadata)."""
    return path.is_dir() and path.name.startswith(STEP_PREFIX) and not path.name.endswith(PARTIAL_SUFFIX) and (path / DCP_METADATA).is_file()


class Checkpointer:
    """Saves and loads the island's checkpoints under one directory.

    Every method is collective over the island's local group: all local ranks call it together.
    """

    def __init__(self, directory: Path, keep: int, is_leader: bool) -> None:
        self.directory = directory
        self.keep = keep
        self.is_leader = is_leader

    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Write a complete checkpoint for `step` and prune old ones; returns its directory."""
        final = self.directory / step_dir_name(step)
        partial = final.with_name(final.name + PARTIAL_SUFFIX)
        if self.is_leader:
            self.directory.mkdir(parents=True, exist_ok=True)
            for leftover in self.directory.glob(f"*{PARTIAL_SUFFIX}"):  # from crashed saves
                shutil.rmtree(leftover)
        dist.barrier()
        dcp.save(state, checkpoint_id=partial)
        dist.barrier()
        if self.is_leader:
            _replace_dir(partial, final)
            self._prune()
        dist.barrier()
        return final

    def load(self, path: Path, state: dict[str, Any]) -> None:
        """Restore `state` in place from the checkpoint at `path`."""
        dcp.load(state, checkpoint_id=path)

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        done = self._complete()
        return done[-1] if done else None

    def resolve(self, spec: str) -> Path:
        """Turn `--resume` (latest, a checkpoint directory, or a run directory) into a checkpoint path."""
        if spec == "latest":
            found = self.latest()
            if found is None:
                raise UserError(f"--resume latest: no complete checkpoint in {self.directory}; pass --run-dir of an earlier run")
            return found
        path = Path(spec).expanduser()
        if is_complete(path):
            return path
        found = Checkpointer(path / "checkpoints", self.keep, self.is_leader).latest()
        if found is None:
            raise UserError(f"--resume {spec}: not a checkpoint (step-N directory) nor a run directory holding one")
        return found

    def _complete(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.iterdir() if is_complete(p))

    def _prune(self) -> None:
        for old in self._complete()[: -self.keep]:
            shutil.rmtree(old)


def _replace_dir(src: Path, dst: Path) -> None:
    """Atomically publish `src` as `dst`; an existing `dst` is swapped out first, then removed."""
    stale = dst.with_name(dst.name + ".old")
    if dst.exists():
        os.replace(dst, stale)
    os.replace(src, dst)
    fsync_dir(dst.parent)
    shutil.rmtree(stale, ignore_errors=True)
