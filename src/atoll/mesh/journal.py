"""The coordinator's journal: its decisions, durable, so a restarted coordinator continues the run.

One JSON object per line, appended and fsynced before the decision is announced to anyone:

    {"kind": "run", "run_id", "local_ranks", "fingerprint"}   the run's identity, once
    {"kind": "registration", "registration"}                  an incarnation that was accepted
    {"kind": "epoch", "epoch", "left", "joined", "links"}     a new epoch (members in ring order, and
                                                              the measured links it was ordered from)
    {"kind": "outcome", "epoch", "step", "round", "outcome", "next", "source"}
    {"kind": "ended", "why"}

A torn last line (the coordinator died while writing it) is ignored: the decision it held was
never announced. Replaying the lines rebuilds the state `Coordinator` needs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from atoll.mesh.membership import Epoch, Registration
from atoll.mesh.ring_order import Link, links_from_json


@dataclass
class JournalState:
    """What a journal says about the run so far."""

    run_id: str | None = None
    local_ranks: int | None = None
    fingerprint: dict = field(default_factory=dict)
    registrations: dict[str, Registration] = field(default_factory=dict)
    """The newest accepted incarnation of each island id."""
    epochs: dict[int, Epoch] = field(default_factory=dict)
    outcomes: dict[tuple[int, int, int], dict[str, Any]] = field(default_factory=dict)
    links: dict[tuple[str, str], Link] = field(default_factory=dict)
    """The measured links the latest epoch was ordered from."""
    ended: str | None = None


class Journal:
    """Append-only, fsynced JSONL file; `None` path keeps nothing (decisions die with the process)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._file = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = path.open("a")

    def append(self, record: dict[str, Any]) -> None:
        if self._file is None:
            return
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def replay(path: Path | None) -> JournalState:
    """The state recorded in the journal at `path` (empty if there is none)."""
    state = JournalState()
    if path is None or not path.is_file():
        return state
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line: never announced
        kind = record.get("kind")
        if kind == "run":
            state.run_id, state.local_ranks, state.fingerprint = record["run_id"], record["local_ranks"], record["fingerprint"]
        elif kind == "registration":
            registration = Registration.from_dict(record["registration"])
            state.registrations[registration.island_id] = registration
        elif kind == "epoch":
            epoch = Epoch.from_dict(record["epoch"])
            state.epochs[epoch.number] = epoch
            state.links = links_from_json(record.get("links", {}))
            for island in record.get("left", {}):
                state.registrations.pop(island, None)
        elif kind == "outcome":
            state.outcomes[(record["epoch"], record["step"], record["round"])] = record
        elif kind == "ended":
            state.ended = record["why"]
    return state
