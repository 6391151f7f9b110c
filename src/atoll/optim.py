"""The inner optimizer: AdamW, gradient clipping and learning-rate schedules.

Schedules are pure functions of the step (`lr_factor`), so resuming needs only the step count.
WSD (warmup-stable-decay) follows Hu et al. 2024, "MiniCPM" (arXiv:2404.06395): linear warmup,
a long constant phase, then a short decay whose shape is linear, sqrt or cosine.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from atoll.config import DilocoConfig, OptimConfig, ScheduleConfig


def decays_weight(param: torch.Tensor) -> bool:
    """Whether AdamW decays this parameter: matrices yes; norms and other vectors no."""
    return param.ndim >= 2


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (`decays_weight`)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if decays_weight(p)]
    no_decay = [p for p in params if not decays_weight(p)]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def lr_factor(step: int, total_steps: int, cfg: ScheduleConfig) -> float:
    """Multiplier of the peak LR for optimizer step `step` (0-based) of `total_steps`."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.kind == "constant":
        return 1.0
    floor = cfg.min_lr_ratio
    if cfg.kind == "cosine":
        span = max(total_steps - cfg.warmup_steps, 1)
        progress = (step - cfg.warmup_steps) / span
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_steps = max(1, round(cfg.decay_fraction * total_steps)) if cfg.decay_fraction > 0 else 0
    decay_start = total_steps - decay_steps
    if decay_steps == 0 or step < decay_start:
        return 1.0
    progress = (step - decay_start + 1) / decay_steps
    if cfg.decay_shape == "linear":
        shape = 1 - progress
    elif cfg.decay_shape == "sqrt":
        shape = 1 - math.sqrt(progress)
    else:
        shape = 0.5 * (1 + math.cos(math.pi * progress))
    return floor + (1 - floor) * shape


def outer_anneal_weight(step: int, total_steps: int, cfg: ScheduleConfig) -> float:
    """How much of DiLoCo's outer lr and momentum to keep after inner step `step` (0-based).

    1 through warmup (the islands are still speeding up, not annealing), then the schedule's LR
    multiplier, so the outer step anneals exactly when and as fast as the inner LR does.
    """
    return 1.0 if step < cfg.warmup_steps else lr_factor(step, total_steps, cfg)


def outer_step_weight(step: int, total_steps: int, schedule: ScheduleConfig, diloco: DilocoConfig) -> float:
    """The share of DiLoCo's outer lr and momentum the outer step after inner step `step` (0-based)
    takes (`atoll.diloco.DiLoCo.anneal`): 0, a plain average of the islands' weights, through the
    first diloco.plain_average_fraction of train.steps; then 1, or `outer_anneal_weight` with
    diloco.anneal_with_schedule. A pure function of the step and train.steps: every island, a
    joiner or a resumed one included, takes the same outer step.
    """
    if step < round(diloco.plain_average_fraction * total_steps):
        return 0.0
    return outer_anneal_weight(step, total_steps, schedule) if diloco.anneal_with_schedule else 1.0


def describe_new_horizon(step: int, old_total: int, new_total: int, cfg: ScheduleConfig, peak_lr: float) -> str | None:
    """What a resume at `step` with train.steps changed from `old_total` to `new_total` does to the
    LR, in one line; None when the LR goes on as it would have.

    The schedule stays a pure function of the step and train.steps, the same on every island (a
    joiner included), so a new horizon is a new schedule from the resumed step on: resumed in a
    wsd run's stable phase the LR goes on unchanged; resumed in or after its decay (or along a
    cosine) it jumps to the new schedule's value.
    """
    if old_total == new_total:
        return None
    continuing = lr_factor(min(step, old_total - 1), old_total, cfg)  # what the old schedule would have set next (or last)
    if math.isclose(continuing, lr_factor(step, new_total, cfg), rel_tol=1e-9, abs_tol=1e-12):
        return None
    before = peak_lr * lr_factor(step - 1, old_total, cfg) if step > 0 else 0.0
    after = peak_lr * lr_factor(step, new_total, cfg)
    line = (f"train.steps {old_total} -> {new_total}: the LR schedule now spans {new_total} steps (it is a function of the "
            f"step and train.steps alone, so every island agrees), so the LR goes from "
            f"{before:.3g} (step {step} of the old schedule) to {after:.3g} at step {step + 1}")
    decay_start = old_total - max(1, round(cfg.decay_fraction * old_total)) if cfg.decay_fraction > 0 else old_total
    if cfg.kind == "wsd" and step > decay_start:
        line += f"; to extend it without raising the LR, resume from a checkpoint at or before step {decay_start}, where its decay began"
    return line


def weight_kept(start: int, end: int, total_steps: int, peak_lr: float, weight_decay: float,
                cfg: ScheduleConfig) -> float:
    """The share of a decayed weight that AdamW's decoupled weight decay keeps over optimizer steps
    [start, end): the product of (1 - lr_t * weight_decay), as torch's AdamW multiplies each step.

    DiLoCo's outer step takes this decay out of the pseudo-gradient and applies it once
    (`DiLoCo.set_weight_kept`), so that outer momentum does not amplify it.
    """
    kept = 1.0
    for step in range(start, end):
        kept *= 1.0 - peak_lr * lr_factor(step, total_steps, cfg) * weight_decay
    return kept


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm (over all shards) and return the norm before clipping, a 0-d
    tensor on the device (reading it is a host sync: the training loop does so only when it logs).

    max_norm 0 only measures. Works for plain and FSDP2-sharded (DTensor) parameters alike.
    """
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return norm.detach()
