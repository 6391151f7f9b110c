"""The inner-loop guard: an optimizer step on a NaN or infinite loss or gradient norm is skipped.

Clipping by a NaN norm turns every gradient into NaN and AdamW then writes NaN into the weights
and its moments for good; skipping the step keeps both clean, and the next batch may well be
fine. A run of non-finite steps means the weights themselves are broken (an overflow, a bit
flip): after more than `train.max_skipped_inner` in a row the island's inner weights are reset
to DiLoCo's outer weights, which its peers agreed on at the last outer step (the AdamW moments
stay: they never saw a non-finite step). Without outer weights (an island alone, or ddp) there
is nothing sound to reset to and the run stops with one line.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from atoll.diloco import DiLoCo
from atoll.errors import UserError
from atoll.island import Island, all_ranks_ok


class InnerGuard:
    """Decides, identically on every local rank, whether an inner step may update the weights."""

    def __init__(self, max_in_row: int, island: Island, diloco: DiLoCo | None, say: Callable[[str], None]) -> None:
        self.max_in_row = max_in_row
        self.island = island
        self.diloco = diloco
        self.say = say
        self.skipped = 0
        """Inner steps skipped since this process started (the `skipped_inner` metric)."""
        self.in_row = 0

    def allows_step(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor | float) -> bool:
        """True if inner step `step` (1-based) may run its optimizer step; False skips it, counts
        it and, after more than max_in_row in a row, resets the weights to the outer weights.

        Costs one host sync (a flag for the loss and the gradient norm together) and, on a
        multi-rank island, one all-reduce of a flag over the island's gloo control group, so
        every local rank takes the same decision. Raises UserError when a reset is due and there
        are no outer weights.
        """
        norm = torch.as_tensor(grad_norm, dtype=torch.float32, device=loss.device)
        finite = bool(torch.isfinite(torch.stack([loss.float(), norm])).all())
        if all_ranks_ok(finite, self.island):
            self.in_row = 0
            return True
        self.skipped += 1
        self.in_row += 1
        self.say(f"atoll: inner step {step} skipped: loss or gradient norm is not finite ({self.in_row} in a row)")
        if self.in_row > self.max_in_row:
            if self.diloco is None:
                raise UserError(
                    f"training diverged: {self.in_row} inner steps in a row up to step {step} had a non-finite loss or "
                    "gradient norm and there are no outer weights to reset to; lower optim.lr or resume from an earlier checkpoint"
                )
            self.diloco.restore_inner(whole=True)
            self.in_row = 0
            self.say(f"atoll: inner weights reset to the outer weights after {self.max_in_row + 1} non-finite inner steps in a row")
        return False
