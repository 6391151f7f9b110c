"""Language-model loss: token-mean cross-entropy plus an optional max-z-loss, both in float32.

`lm_loss` takes logits; `chunked_lm_loss` takes the final hidden states and the output head and
never materialises the logits of a whole sequence (a [T, 128256] fp32 block is 4 GB at T = 8192).
"""

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint


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


LOSS_CHUNK_LOGITS = 2**27
"""Logits per chunk of `chunked_lm_loss` (512 MiB in fp32): 1046 tokens at a vocabulary of 128256."""


def _chunk_sums(hidden: Tensor, head: Tensor, targets: Tensor, with_z: bool, ignore_index: int) -> tuple[Tensor, Tensor]:
    """Summed cross-entropy and summed squared max logit of one chunk of positions."""
    logits = F.linear(hidden, head).float()
    ce = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")
    with torch.set_grad_enabled(torch.is_grad_enabled() and with_z):
        z = torch.where(targets != ignore_index, logits.max(dim=-1).values.square(), 0.0).sum()
    return ce, z


def chunked_lm_loss(hidden: Tensor, head: Tensor, targets: Tensor, z_loss_weight: float = 0.0,
                    ignore_index: int = -100, chunk_tokens: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """`lm_loss(hidden @ head.T, targets, ...)` without ever holding the logits of all positions.

    hidden [B, T, D] are the final-norm outputs, head [V, D] the output projection. Positions
    are taken `chunk_tokens` at a time (default: LOSS_CHUNK_LOGITS // V); each chunk's logits
    are made, upcast to fp32, reduced and dropped, and recomputed in backward (activation
    checkpointing per chunk), so forward and backward hold one chunk of logits at a time. The
    result and its gradients equal lm_loss's up to float summation order.
    """
    hidden = hidden.flatten(0, 1)
    targets = targets.flatten()
    step = chunk_tokens or max(1, LOSS_CHUNK_LOGITS // head.shape[0])
    with_z = z_loss_weight > 0
    ce_sum = z_sum = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], step):
        h, t = hidden[start : start + step], targets[start : start + step]
        if torch.is_grad_enabled():
            ce, z = checkpoint(_chunk_sums, h, head, t, with_z, ignore_index, use_reentrant=False)
        else:
            ce, z = _chunk_sums(h, head, t, with_z, ignore_index)
        ce_sum, z_sum = ce_sum + ce, z_sum + z
    n_tokens = (targets != ignore_index).sum().clamp(min=1)
    ce, z = ce_sum / n_tokens, z_sum / n_tokens
    return (ce + z_loss_weight * z if with_z else ce), ce, z
