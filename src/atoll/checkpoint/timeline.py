"""Timelines: which checkpoints of a directory belong to the history a run continues.

A run directory's checkpoints start on timeline 0. Resuming from anything but the newest
checkpoint of the current timeline's history (a rollback, or a fallback past a corrupt `latest`)
starts a new timeline whose parent is the checkpoint resumed from. Timeline t > 0 names its
checkpoints `step-00000150-t1`; timeline 0 keeps `step-00000150`, so a rollback never writes over
the abandoned timeline's checkpoint of the same step.

The history (lineage) of timeline t is its own checkpoints plus its parent's history up to the
parent's step. `latest` is the newest complete checkpoint in the current timeline's history, so
abandoned checkpoints are never chosen by mistake; `keep` prunes only the checkpoints the current
timeline wrote, so neither the checkpoint a timeline came from nor abandoned ones are ever deleted
by it.

The registry `timelines.json` (written atomically by the island leader) records every timeline
and its parent, so a new timeline counts from its start, before its first checkpoint.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from atoll.atomic import atomic_write
from atoll.checkpoint.manifest import MANIFEST

REGISTRY = "timelines.json"
_NAME = re.compile(r"^step-(\d{8,})(?:-t(\d+))?$")


@dataclass(frozen=True)
class Timeline:
    """One line of history in a checkpoint directory.

    `parent` is the name of the checkpoint (in the same directory) it resumed from, None for a
    timeline that started fresh or from a checkpoint elsewhere (`origin` then names that path).
    """

    id: int
    parent: str | None = None
    origin: str | None = None


def checkpoint_name(step: int, timeline: int) -> str:
    """`step-00000150` on timeline 0, `step-00000150-t1` on timeline 1."""
    return f"step-{step:08d}" + (f"-t{timeline}" if timeline else "")


def parse_name(name: str) -> tuple[int, int] | None:
    """(step, timeline) of a checkpoint directory name, or None for anything else."""
    match = _NAME.match(name)
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2) or 0)


def is_complete(path: Path) -> bool:
    """A checkpoint directory that finished saving: a step name and a manifest (written last)."""
    return parse_name(path.name) is not None and (path / MANIFEST).is_file()


def load_registry(directory: Path) -> list[Timeline]:
    """The directory's timelines, oldest first; [timeline 0] when it has no registry yet."""
    path = directory / REGISTRY
    if not path.is_file():
        return [Timeline(0)]
    raw = json.loads(path.read_text())
    return [Timeline(int(t["id"]), t.get("parent"), t.get("origin")) for t in raw["timelines"]]


def save_registry(directory: Path, timelines: list[Timeline]) -> None:
    """Write the registry atomically (island leader only)."""
    directory.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"timelines": [asdict(t) for t in timelines]}, indent=2)
    atomic_write(directory / REGISTRY, lambda f: f.write(text.encode()))


def complete_checkpoints(directory: Path) -> dict[str, tuple[int, int]]:
    """{name: (step, timeline)} of every complete checkpoint in the directory."""
    if not directory.is_dir():
        return {}
    return {p.name: parse_name(p.name) for p in directory.iterdir() if p.is_dir() and is_complete(p)}  # type: ignore[misc]


def lineage(directory: Path, timelines: list[Timeline], timeline: int) -> list[Path]:
    """The complete checkpoints in the history of `timeline`, oldest first (by step)."""
    by_id = {t.id: t for t in timelines}
    found = complete_checkpoints(directory)
    history: list[tuple[int, str]] = []
    current: Timeline | None = by_id.get(timeline, Timeline(timeline))
    limit: int | None = None
    seen: set[int] = set()
    while current is not None and current.id not in seen:
        seen.add(current.id)
        history += [(step, name) for name, (step, t) in found.items() if t == current.id and (limit is None or step <= limit)]
        parent = parse_name(current.parent) if current.parent else None
        if parent is None:
            break
        limit = parent[0] if limit is None else min(limit, parent[0])
        current = by_id.get(parent[1], Timeline(parent[1]))
    return [directory / name for _, name in sorted(history)]


def own_checkpoints(directory: Path, timeline: int) -> list[Path]:
    """The complete checkpoints `timeline` itself wrote, oldest first: the only ones `keep` prunes."""
    found = complete_checkpoints(directory)
    return [directory / n for n, (_, t) in sorted(found.items(), key=lambda kv: kv[1][0]) if t == timeline]
