"""The validation loss a training run logs every `eval.every` inner steps (`atoll eval` measures the same)."""

from __future__ import annotations

import torch
from torch import nn

from atoll.config import JobConfig
from atoll.data import TrainingData, iter_eval_batches
from atoll.inner_step import autocast
from atoll.island import Island, all_reduce_mean


@torch.no_grad()
def evaluate(model: nn.Module, data: TrainingData, seq_len: int, cfg: JobConfig, island: Island) -> dict[str, float]:
    """Mean validation cross-entropy of each validation set, over the same `eval.batches` global batches every time.

    The loss is chunked inside the model's forward, as in train_step: no [batch, seq, vocab] logits are held.
    """
    model.eval()
    result = {}
    for name, val_tokens in data.val.items():
        losses = []
        for inp, tgt in iter_eval_batches(val_tokens, seq_len, cfg.train.global_batch, island.rank, island.world, cfg.eval.batches):
            with autocast(island):
                losses.append(model(inp.to(island.device), tgt.to(island.device))[1])
        result[name] = float(all_reduce_mean(torch.stack(losses).mean()))
    model.train()
    return result
