"""The clocks behind the outer-step metrics: compute_s, sync_s, overlap_s and utilization.

- compute_s: wall time spent training since the last record (evaluation and checkpoint stalls
  are taken out with `pause`);
- sync_s: wall time training was blocked by cross-island communication (the boundary barrier,
  waiting for an all-reduce to land, the agreement after it, retries, epoch changes);
- overlap_s: wall time an all-reduce ran behind training (`diloco.overlap_steps`): it costs
  no compute, so it is not part of utilization;
- utilization = compute_s / (compute_s + sync_s), INTELLECT-1's definition.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any


class SyncClock:
    """Splits wall time since the last `take` into compute and blocked time, and adds up overlap."""

    def __init__(self) -> None:
        self._mark = time.perf_counter()
        self._compute = self._blocked = self._overlap = 0.0

    def pause(self, seconds: float) -> None:
        """Leave `seconds` just spent outside training (evaluation, checkpoints) out of compute_s."""
        self._mark += seconds

    def restart(self) -> None:
        """Count nothing trained so far (a joiner's first outer step: it trained nothing for it)."""
        self._mark = time.perf_counter()
        self._compute = 0.0

    @contextlib.contextmanager
    def blocked(self) -> Iterator[None]:
        """Time the block as sync_s: training waits for it."""
        start = time.perf_counter()
        self._compute += start - self._mark
        try:
            yield
        finally:
            self._mark = time.perf_counter()
            self._blocked += self._mark - start

    def overlapped(self, seconds: float) -> None:
        """Add `seconds` an all-reduce ran while the island trained."""
        self._overlap += seconds

    def take(self) -> dict[str, Any]:
        """compute_s, sync_s, overlap_s and utilization since the last `take`; starts the next count."""
        now = time.perf_counter()
        compute, blocked, overlap = self._compute + now - self._mark, self._blocked, self._overlap
        self._mark, self._compute, self._blocked, self._overlap = now, 0.0, 0.0, 0.0
        utilization = compute / (compute + blocked) if compute + blocked > 0 else 1.0  # nothing happened: nothing was lost
        return {"compute_s": compute, "sync_s": blocked, "overlap_s": overlap, "utilization": utilization}
