"""Language-model loss: token-mean cross-entropy plus an optional max-z-loss, both in float32."""

import torch
import torch.nn.functional as F
from torch import Tensor


def lm_loss(logits: Tensor, targets: Tensor, z_loss_weight: float = 0.0,
            ignore_index: int = -100) -> tuple[Tensor, Tensor, Tensor]:
    """Next-token loss for logits [B, T, V] and target ids [B, T]; returns (total, ce, z).

    ce is the cross-entropy averaged over positions whose target is not ignore_index, computed on
    logits upcast to float32 whatever their dtype. z is the mean over the same positions of the
    squared largest logit, unweighted; total = ce + z_loss_weight * z. The z term keeps logits
    from drifting large, which destabilises low-precision training: PaLM (Chowdhery et al., 2022)
    penalises log(Z)^2; INTELLECT-1 (Prime Intellect, 2024) uses this max-logit variant.

    Both terms are divided once, by this call's count of non-ignored tokens, so they do not scale
    with batch size or sequence length. A caller averaging micro-batches with unequal token counts
    must reweight them itself. If every target is ignored, ce and z are 0 (not NaN).
    """
    logits = logits.float().flatten(0, 1)
    targets = targets.flatten()
    keep = targets != ignore_index
    n_tokens = keep.sum().clamp(min=1)
    ce = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum") / n_tokens
    # where(), not boolean indexing: no data-dependent shape, so no host sync on GPU.
    # With weight 0, z is only reported: keep it out of the graph (its backward costs a logits-sized pass).
    with torch.set_grad_enabled(torch.is_grad_enabled() and z_loss_weight > 0):
        max_sq = logits.max(dim=-1).values.square()
        z = torch.where(keep, max_sq, 0.0).sum() / n_tokens
    return (ce + z_loss_weight * z if z_loss_weight > 0 else ce), ce, z
