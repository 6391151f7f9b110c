"""What an island's training loop keeps across a restart, as `Stateful`s the checkpointer collects.

`TrainState` (island-wide progress), `RankState` (a local rank's data position and RNG streams)
and `OuterProgress` (the outer-step count); `checkpoint_facts` are the mesh facts a manifest records.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.distributed.checkpoint.stateful import Stateful

from atoll.data import BatchSource

if TYPE_CHECKING:
    from atoll.sync import IslandSync


@dataclass
class TrainState(Stateful):
    """Island-wide progress: identical on every local rank."""

    step: int = 0
    tokens: int = 0
    """Tokens this island trained on (a joiner counts from when it joined)."""
    samples: int = 0
    """The run-wide sample cursor: samples all islands together consumed before the next step."""

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.step = int(state_dict["step"])
        self.tokens = int(state_dict["tokens"])
        self.samples = int(state_dict["samples"])


class RankState(Stateful):
    """What differs per local rank: its data position and its RNG streams."""

    def __init__(self, loader: BatchSource, device: torch.device) -> None:
        self.loader = loader
        self.device = device

    def state_dict(self) -> dict[str, Any]:
        state = {"loader": self.loader.state_dict(), "rng": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.loader.load_state_dict(state_dict["loader"])
        torch.set_rng_state(state_dict["rng"])
        if "cuda_rng" in state_dict:
            torch.cuda.set_rng_state(state_dict["cuda_rng"], self.device)


class OuterProgress(Stateful):
    """The outer-step count, so a resumed island's outer steps continue instead of restarting at 1.

    Contract with `IslandSync`: it keeps the count of committed or skipped outer steps in the
    integer attribute `outer_steps` (0 when the island trains alone).
    """

    def __init__(self, sync: IslandSync) -> None:
        self.sync = sync

    def state_dict(self) -> dict[str, Any]:
        return {"outer_steps": int(getattr(self.sync, "outer_steps", 0))}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.sync.outer_steps = int(state_dict["outer_steps"])


def checkpoint_facts(sync: IslandSync, outer_digest: str | None) -> dict[str, Any]:
    """The manifest's mesh fields: outer step, epoch, members and the digest of the outer weights.

    Contract with `IslandSync`: `outer_steps` (int) and, in a mesh, `member.epoch` with
    `number` (int) and `members` (island ids); an island alone reports epoch None and no members.
    """
    epoch = getattr(getattr(sync, "member", None), "epoch", None)
    return {
        "outer_step": int(getattr(sync, "outer_steps", 0)),
        "epoch": epoch.number if epoch is not None else None,
        "members": list(epoch.members) if epoch is not None else [],
        "outer_digest": outer_digest,
    }
