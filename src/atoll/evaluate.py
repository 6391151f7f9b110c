"""`atoll eval`: validation loss and perplexity of a model, on the batches training evaluates.

The data is what training loads for the same config (`atoll.data.load_training_data`): the
validation split of `data.source`, or of every source of a `data.sources` mixture. The batches
are those of `atoll.val_loss.evaluate` (the first `eval.batches` unshuffled global batches of each
validation set, or all of them for 0, `train.global_batch` x `train.seq_len` tokens), and a mixture's loss is the mean
of its per-source losses under the mixture's weights, so a run evaluated with its own config.toml
reproduces the `val_loss` (and `val_loss_by_source`) it logged. Here one process evaluates the
whole global batch, in micro-batches of `train.micro_batch` sequences; the mean over equal-sized
slices is the mean that training's local ranks average. The loss is chunked inside the model's
forward, so no [batch, seq, vocab] logits are ever held.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from atoll.config import JobConfig
from atoll.data import Tokenizer, TrainingData, iter_eval_batches, load_tokenizer, load_training_data, weighted_mean
from atoll.errors import UserError
from atoll.model import Llama


@dataclass
class EvalResult:
    """Mean cross-entropy (nats per token) over `batches` global batches of `tokens` tokens in all."""

    loss: float
    """Training's `val_loss`: for a mixture, the weighted mean of `by_source`."""
    batches: int
    """Global batches evaluated, all validation sets together."""
    tokens: int
    by_source: dict[str, float] | None = None
    """Training's `val_loss_by_source` for a mixture; None for the single corpus of data.source."""

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)


def pick_device(preference: str) -> torch.device:
    """train.device's rule: cuda when asked for or available (auto), else cpu."""
    if preference == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device is 'cuda' but no CUDA device is visible: set --train.device cpu")
    use_cuda = preference == "cuda" or (preference == "auto" and torch.cuda.is_available())
    return torch.device("cuda") if use_cuda else torch.device("cpu")


def load_eval_data(cfg: JobConfig, model_tokenizer: Tokenizer) -> TrainingData:
    """The validation sets training reads for cfg.data, tokenized by data.tokenizer.

    Raises:
        UserError: as `load_training_data`, or data.tokenizer is not the model's tokenizer (its
            vocabulary size or end-of-sequence id differs).
    """
    try:
        ours = load_tokenizer(cfg.data.tokenizer)
    except (FileNotFoundError, ValueError) as err:
        raise UserError(f"data: {err}") from None
    # Shards are tokenized by data.tokenizer, so that is the one to read with; an HF export's copy
    # of it has another name (its tokenizer_config.json differs) but the same ids. Checked before
    # loading: a mixture's data would otherwise be tokenized again with the wrong tokenizer.
    if (ours.vocab_size, ours.eos_id) != (model_tokenizer.vocab_size, model_tokenizer.eos_id):
        raise UserError(f"data.tokenizer {cfg.data.tokenizer!r} ({ours.vocab_size} ids, eos {ours.eos_id}) is not the model's "
                        f"tokenizer ({model_tokenizer.vocab_size} ids, eos {model_tokenizer.eos_id}): give the config the model was trained with")
    return load_training_data(cfg.data, print)


@torch.no_grad()
def evaluate_model(model: Llama, data: TrainingData, cfg: JobConfig, seq_len: int, device: torch.device) -> EvalResult:
    """Validation loss of `model` on cfg's evaluation batches of each of data's validation sets.

    bf16 autocast on CUDA, as training. Raises UserError when seq_len exceeds the model's
    positions, train.micro_batch does not divide train.global_batch, or a validation set holds
    fewer than one global batch.
    """
    if seq_len > model.args.max_seq_len:
        raise UserError(f"train.seq_len {seq_len} exceeds the model's {model.args.max_seq_len} positions: set --train.seq_len")
    batch = cfg.train.global_batch
    micro = cfg.train.micro_batch or batch
    if batch % micro:
        raise UserError(f"train.micro_batch {micro} does not divide train.global_batch {batch}")
    data.check_val(seq_len, batch, 0, 1, cfg.eval.batches)
    model.to(device).eval()
    by_source: dict[str, float] = {}
    batches = 0
    for name, tokens in data.val.items():
        losses = []
        for inputs, targets in iter_eval_batches(tokens, seq_len, batch, 0, 1, cfg.eval.batches):
            parts = []
            for inp, tgt in zip(inputs.split(micro), targets.split(micro)):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    parts.append(model(inp.to(device), tgt.to(device))[1])
            losses.append(torch.stack(parts).mean())
        by_source[name] = float(torch.stack(losses).mean())
        batches += len(losses)
    loss = weighted_mean(by_source, data.names, data.weights)
    return EvalResult(loss, batches, batches * batch * seq_len, by_source if data.mixture else None)
