"""Membership epochs: which islands train together, decided by the coordinator.

An epoch is one fixed membership of the run. Process groups are never resized: every change of
membership makes a new epoch with new groups. Pure data and decisions, no I/O.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Epoch:
    """One fixed membership of the run."""

    number: int
    """Epochs count up from 0; each has its own process groups."""
    members: tuple[str, ...]
    """Island ids, in global-rank order."""
    local_ranks: int
    """Local ranks per island; global group k joins local rank k of every member."""
    reason: str = "start"
    """Why this epoch began (for the event log)."""
    started_at: float = field(default=0.0, compare=False)
    """Coordinator's clock when it formed the epoch (islands do not share a clock)."""

    @property
    def world(self) -> int:
        return len(self.members)

    def index_of(self, island_id: str) -> int:
        """This island's rank in the global groups; ValueError if it is not a member."""
        return self.members.index(island_id)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @staticmethod
    def from_json(text: str | bytes) -> Epoch:
        raw = json.loads(text)
        return Epoch(raw["number"], tuple(raw["members"]), raw["local_ranks"], raw["reason"], raw["started_at"])


@dataclass(frozen=True)
class Registration:
    """What an island tells the coordinator when it arrives."""

    island_id: str
    local_ranks: int

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @staticmethod
    def from_json(text: str | bytes) -> Registration:
        raw = json.loads(text)
        return Registration(raw["island_id"], raw["local_ranks"])


def first_epoch(registered: list[Registration], min_islands: int, now: float) -> Epoch | None:
    """Epoch 0 once `min_islands` islands have registered, members in order of arrival.

    Raises ValueError if the islands disagree on their number of local ranks (their global groups
    could not pair up).
    """
    if len(registered) < min_islands:
        return None
    chosen = registered[:min_islands]
    ranks = {r.local_ranks for r in chosen}
    if len(ranks) != 1:
        detail = ", ".join(f"{r.island_id}: {r.local_ranks}" for r in chosen)
        raise ValueError(f"islands must run the same number of local ranks; got {detail}")
    return Epoch(0, tuple(r.island_id for r in chosen), ranks.pop(), "start", now)
