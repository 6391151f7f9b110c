"""JSON-lines files a live run may still be appending to (metrics.jsonl, membership.jsonl): a torn
or partial line is skipped, never an error."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


def records(lines: Iterable[bytes | str]) -> Iterator[dict[str, Any]]:
    """The JSON objects among `lines`, in order, parsed as they are asked for; a line that is not
    one is skipped."""
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            yield record


def tail_lines(path: Path, nbytes: int) -> list[bytes]:
    """The lines among the last `nbytes` of `path` (the first may be partial)."""
    with path.open("rb") as f:
        f.seek(max(0, path.stat().st_size - nbytes))
        return f.read().splitlines()
