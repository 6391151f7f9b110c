"""The membership event log: one JSON object per epoch change, the run's history of who came and went.

The coordinator appends one line per event to RUN_DIR/membership.jsonl (`atoll coordinator
--events FILE`):

    {"time", "epoch", "members", "joined", "left": {island: why}, "reason", ...}

reason is why the epoch began ("start", "joined", "departed", "collective failed", "replaced", ...),
"resync" (digests differed: everyone took one member's state) or "ended". The newest events are
also kept in memory for the status page (`atoll.mesh.status`); a coordinator restarted on the
same file reads them back, so the page shows the run's history across its restarts.

The file is an operator's log, not the journal: the coordinator's decisions survive its restart
through `atoll.mesh.journal`, never through this file.
"""

from __future__ import annotations

import json
import time
from collections import deque
from pathlib import Path
from typing import Any

from atoll.jsonl import records, tail_lines

RECENT_EVENTS = 200
"""Events kept in memory for the status page (a run changes membership a few times an hour)."""
TAIL_BYTES = 256 << 10
"""How much of an existing file a restarted coordinator reads back (its last lines)."""


class EventLog:
    """Appends events to `path` (none: kept in memory only) and keeps the newest RECENT_EVENTS."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT_EVENTS)
        if path is not None and path.is_file():
            self.recent.extend(records(tail_lines(path, TAIL_BYTES)[-RECENT_EVENTS:]))

    def append(self, number: int, members: list[str], joined: list[str], left: dict[str, str], reason: str, **extra: Any) -> None:
        """One event of epoch `number`, timestamped now (the coordinator's wall clock)."""
        event = {"time": time.time(), "epoch": number, "members": members, "joined": joined, "left": left, "reason": reason, **extra}
        self.recent.append(event)
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(event) + "\n")

    def since(self, wall_time: float) -> list[dict[str, Any]]:
        """The kept events at or after `wall_time`, oldest first."""
        return [event for event in self.recent if event.get("time", 0) >= wall_time]
