"""One inner step: forward, backward and AdamW over this rank's share of the global batch."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from atoll.config import JobConfig
from atoll.guard import InnerGuard
from atoll.island import Island
from atoll.optim import clip_grad_norm


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    accum: int,
    cfg: JobConfig,
    island: Island,
    after_backward: Callable[[], None],
    guard: InnerGuard,
    step: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over this rank's share of the global batch, in `accum` micro-batches.

    Under FSDP2 every micro-batch's gradients are reduce-scattered at once, so a rank only ever
    holds sharded gradients (skipping the sync would keep unsharded fp32 gradients of the whole
    model between micro-batches). The loss is chunked over the vocabulary inside the model's
    forward. `after_backward` runs once the island's gradients are complete and before anything
    changes the weights (the ddp baseline averages gradients across islands there; a checkpoint
    still copying the weights finishes there); `guard` skips the optimizer step of inner step `step`
    (1-based) on a non-finite loss or gradient norm. Returns the rank's mean loss (cross-entropy, before
    z-loss) and the global gradient norm, both device tensors: reading them is the caller's host sync,
    done only when it logs (the guard's one flag per step aside).
    """
    if island.device.type == "cuda":  # page-locked, so the copies below are really asynchronous
        inputs, targets = inputs.pin_memory(), targets.pin_memory()
    ce_sum = torch.zeros((), device=island.device)
    for inp, tgt in zip(inputs.chunk(accum), targets.chunk(accum)):
        with autocast(island):
            total, ce, _ = model(inp.to(island.device, non_blocking=True), tgt.to(island.device, non_blocking=True),
                                 z_loss_weight=cfg.train.z_loss_weight)
        (total / accum).backward()
        ce_sum += ce.detach()
    after_backward()
    grad_norm = clip_grad_norm(model, cfg.optim.grad_clip)
    if guard.allows_step(step, ce_sum, grad_norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return ce_sum / accum, grad_norm


def autocast(island: Island) -> torch.autocast:
    """bf16 autocast for an unsharded CUDA model (FSDP2's policy does this when sharded)."""
    enabled = island.mixed_precision and island.world == 1
    return torch.autocast(device_type=island.device.type, dtype=torch.bfloat16, enabled=enabled)
