"""The run-wide sample cursor: how islands keep their data disjoint however membership changes.

All members agree on one cursor (inner steps advance it by world x train.global_batch); island i
of the epoch reads the global_batch samples from cursor + i x global_batch, and a joiner receives
the cursor with the run's progress (`atoll.epoch_entry`).
"""

from __future__ import annotations

from typing import Protocol

import torch

from atoll.data.loader import BatchSource


class HasCursor(Protocol):
    samples: int
    """The run-wide sample cursor: samples all islands together consumed before the next step."""


def island_first_sample(run_samples: int, island_index: int, global_batch: int) -> int:
    """The first run-wide sample island `island_index` reads in the inner step at `run_samples`."""
    return run_samples + island_index * global_batch


def next_batch(loader: BatchSource, progress: HasCursor, index: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's batch of the next inner step as island `index` of `world`; advances the cursor."""
    first = island_first_sample(progress.samples, index, loader.global_batch)
    progress.samples += world * loader.global_batch
    return loader.batch_at(first)
