"""The model an island trains: its shape from the config and the tokenizer, its micro-batching,
and building it sharded (FSDP2) and initialised in place."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from atoll.config import JobConfig
from atoll.digest import model_digest
from atoll.errors import UserError
from atoll.hf import load_hf_weights
from atoll.island import Island, shard_model
from atoll.model import Llama, ModelArgs, get_size
from atoll.model.llama import apply_activation_checkpointing


def model_args(cfg: JobConfig, tokenizer_vocab: int) -> ModelArgs:
    """The named size with the config's overrides applied, checked against the tokenizer."""
    try:
        args = get_size(cfg.model.name)
    except (KeyError, ValueError) as err:
        raise UserError(f"model.name {cfg.model.name!r}: {err.args[0]}") from None
    changes: dict[str, Any] = {}
    if cfg.model.vocab_size is not None:
        changes["vocab_size"] = cfg.model.vocab_size
    if cfg.model.rope_theta is not None:
        changes["rope_theta"] = cfg.model.rope_theta
    changes["max_seq_len"] = max(sequence_length(cfg), args.max_seq_len)
    args = dataclasses.replace(args, **changes)
    if tokenizer_vocab > args.vocab_size:
        raise UserError(
            f"model.vocab_size {args.vocab_size} is smaller than the tokenizer's {tokenizer_vocab} ids: "
            f"set --model.vocab_size {tokenizer_vocab} or more"
        )
    return args


def sequence_length(cfg: JobConfig) -> int:
    """Tokens per training sequence: train.seq_len, or the model size's max_seq_len."""
    return cfg.train.seq_len or get_size(cfg.model.name).max_seq_len


def accumulation_steps(cfg: JobConfig, island: Island) -> int:
    """Micro-batches per optimizer step on each rank, so the island's ranks cover the global batch."""
    per_rank, rem = divmod(cfg.train.global_batch, island.world)
    if rem:
        raise UserError(f"train.global_batch {cfg.train.global_batch} is not divisible by {island.world} local ranks")
    micro = min(cfg.train.micro_batch or per_rank, per_rank)
    if per_rank % micro:
        raise UserError(
            f"train.micro_batch {micro} does not divide the {per_rank} sequences per rank "
            f"(global_batch {cfg.train.global_batch} / {island.world} ranks)"
        )
    return per_rank // micro


def build_model(args: ModelArgs, cfg: JobConfig, island: Island) -> tuple[nn.Module, str]:
    """Build on the meta device, apply AC, compile and FSDP2, then initialise each rank's shard in place.

    Start-up memory per rank is O(shard) on host and device. The weights depend only on
    train.seed (the same full weights for any number of local ranks), and so does the returned
    digest of the full initial weights, computed from the shards (`model_digest`). With
    model.init_from the weights come from a Hugging Face directory, loaded into a full model on
    CPU before sharding (so that path costs the full model's memory once per rank).
    """
    torch.manual_seed(cfg.train.seed)
    if cfg.model.init_from:  # a full model on CPU, filled from the HF files, then sharded
        model = Llama(args)
        load_hf_weights(model, Path(cfg.model.init_from))
    else:
        with torch.device("meta"):
            model = Llama(args)
    if cfg.model.activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.model.compile:
        for block in model.layers:
            block.compile()
    model = shard_model(model, island)
    if cfg.model.init_from:
        model.to(island.device)
    else:
        model.to_empty(device=island.device)
        model.init_weights()
    return model, model_digest(model)
