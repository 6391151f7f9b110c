"""`atoll eval`: validation loss and perplexity of a model, on the batches training evaluates.

The batches are those of `atoll.train.evaluate` (the first `eval.batches` unshuffled global batches
of the validation split, `train.global_batch` x `train.seq_len` tokens), so a run evaluated with its
own config.toml reproduces the `val_loss` it logged. Here one process evaluates the whole global
batch, in micro-batches of `train.micro_batch` sequences; the mean over equal-sized slices is the
mean that training's local ranks average.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from atoll.config import JobConfig
from atoll.data import Tokenizer, iter_eval_batches, load_split_tokens
from atoll.errors import UserError
from atoll.model import Llama, lm_loss


@dataclass
class EvalResult:
    """Mean cross-entropy (nats per token) over `batches` global batches of `tokens` tokens in all."""

    loss: float
    batches: int
    tokens: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)


def pick_device(preference: str) -> torch.device:
    """train.device's rule: cuda when asked for or available (auto), else cpu."""
    if preference == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device is 'cuda' but no CUDA device is visible: set --train.device cpu")
    use_cuda = preference == "cuda" or (preference == "auto" and torch.cuda.is_available())
    return torch.device("cuda") if use_cuda else torch.device("cpu")


def validation_tokens(cfg: JobConfig, tokenizer: Tokenizer) -> np.ndarray:
    """The validation split of cfg.data, tokenized by `tokenizer` (cached as training caches it)."""
    cache_dir = str(Path(cfg.data.cache_dir).expanduser()) if cfg.data.cache_dir else None
    try:
        return load_split_tokens(cfg.data.source, "val", cfg.data.val_fraction, tokenizer, cache_dir)
    except (FileNotFoundError, ValueError) as err:
        raise UserError(f"data: {err}") from None


@torch.no_grad()
def evaluate_model(model: Llama, tokenizer: Tokenizer, cfg: JobConfig, seq_len: int, device: torch.device) -> EvalResult:
    """Validation loss of `model` on cfg's evaluation batches; bf16 autocast on CUDA, as training."""
    if seq_len > model.args.max_seq_len:
        raise UserError(f"train.seq_len {seq_len} exceeds the model's {model.args.max_seq_len} positions: set --train.seq_len")
    tokens = validation_tokens(cfg, tokenizer)
    batch = cfg.train.global_batch
    try:
        batches = list(iter_eval_batches(tokens, seq_len, batch, 0, 1, cfg.eval.batches))
    except ValueError as err:
        raise UserError(f"data.source {cfg.data.source!r}: {err}") from None
    micro = cfg.train.micro_batch or batch
    if batch % micro:
        raise UserError(f"train.micro_batch {micro} does not divide train.global_batch {batch}")
    model.to(device).eval()
    losses = []
    for inputs, targets in batches:
        parts = []
        for inp, tgt in zip(inputs.split(micro), targets.split(micro)):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(inp.to(device))
            parts.append(lm_loss(logits, tgt.to(device))[1])
        losses.append(torch.stack(parts).mean())
    return EvalResult(float(torch.stack(losses).mean()), len(batches), len(batches) * batch * seq_len)
