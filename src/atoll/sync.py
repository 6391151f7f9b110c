"""How an island keeps in step with the others, as the training loop sees it.

Three modes: alone (no coordinator: nothing to do), `diloco` (an outer step every H inner steps
and at the end) and `ddp` (gradients averaged across islands every step, the baseline). This
module also keeps the clocks and byte counters that the outer-step metrics report:
compute_s (inner phase wall time), sync_s (wall time blocked in cross-island communication) and
utilization = compute_s / (compute_s + sync_s).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from atoll.comm.allreduce import GlobalMean
from atoll.comm.codecs import get_codec
from atoll.config import JobConfig
from atoll.digest import digest_to_tensor, tensor_digest
from atoll.diloco import DiLoCo, average_gradients
from atoll.island import Island
from atoll.mesh.client import MeshMember


class IslandSync:
    """Cross-island synchronisation for one local rank; inert when `member` is None."""

    def __init__(self, cfg: JobConfig, model: nn.Module, member: MeshMember | None, island: Island) -> None:
        self.member = member
        self.island = island
        self.mode = cfg.mesh.mode if member is not None else "alone"
        self.inner_steps = cfg.diloco.inner_steps
        self.mean = (
            GlobalMean(member.groups, get_codec(cfg.comm.codec), cfg.mesh.collective_timeout_s, int(cfg.comm.chunk_mb * 1e6))
            if member is not None else None
        )
        self.model = model
        self.diloco = (
            DiLoCo(model, cfg.diloco.outer_lr, cfg.diloco.outer_momentum, cfg.diloco.nesterov)
            if self.mode == "diloco" else None
        )
        self.outer_steps = 0
        self._phase_start = time.perf_counter()
        self._sync_s = 0.0

    def pause(self, seconds: float) -> None:
        """Exclude time spent outside training (evaluation, checkpoints) from compute_s."""
        self._phase_start += seconds

    def after_backward(self) -> None:
        """ddp: average this step's gradients across islands before the optimizer step."""
        if self.mode == "ddp":
            start = time.perf_counter()
            average_gradients(self.model, self.mean)
            self._sync_s += time.perf_counter() - start

    def after_step(self, step: int, is_last: bool) -> dict[str, Any]:
        """diloco: the outer step, when due (every H steps and at the end); returns its metrics."""
        if self.diloco is None or (step % self.inner_steps and not is_last):
            return {}
        compute_s = time.perf_counter() - self._phase_start
        stats = self.diloco.outer_step(self.mean)
        self.outer_steps += 1
        self._phase_start = time.perf_counter()
        return {
            "outer_step": self.outer_steps,
            "compute_s": compute_s,
            "sync_s": stats.sync_s,
            "utilization": compute_s / (compute_s + stats.sync_s),
            "outer_digest": self.island_digest(stats.digest),
        }

    def log_fields(self) -> dict[str, Any]:
        """Cumulative wire bytes and world size for every logged record; ddp adds its timings since the last log."""
        if self.member is None:
            return {}
        record: dict[str, Any] = {
            "bytes_sent": self.mean.wire.bytes_sent,
            "bytes_recv": self.mean.wire.bytes_recv,
            "world_size": self.member.world,
        }
        if self.mode == "ddp":
            compute_s = time.perf_counter() - self._phase_start - self._sync_s
            record.update(compute_s=compute_s, sync_s=self._sync_s, utilization=compute_s / (compute_s + self._sync_s))
            self._phase_start, self._sync_s = time.perf_counter(), 0.0
        return record

    def island_digest(self, shard_digest: str) -> str:
        """Digest of the whole island's outer weights: over every local rank's shard digest."""
        if self.island.world == 1:
            return shard_digest
        mine = digest_to_tensor(shard_digest).to(self.island.device)
        everyone = [torch.empty_like(mine) for _ in range(self.island.world)]
        torch.distributed.all_gather(everyone, mine)
        return tensor_digest((str(rank), t) for rank, t in enumerate(everyone))

    def stateful(self) -> dict[str, Any]:
        """What must go into this rank's checkpoint (the outer weights and momentum)."""
        return {f"diloco.rank{self.island.rank}": self.diloco} if self.diloco is not None else {}
