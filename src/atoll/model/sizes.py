"""Named model sizes, and parameter counts computed without allocating the model."""

import dataclasses

import torch

from atoll.model.llama import Llama, ModelArgs

SIZES: dict[str, ModelArgs] = {
    # ~164k params: for fast tests. Vocab 512 holds the byte-level tokenizer's 257 ids.
    "debug": ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=192,
                       vocab_size=512, max_seq_len=64),
    # ~3.4M params: trains visibly on a laptop CPU.
    "demo": ModelArgs(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn_hidden=768,
                      vocab_size=512, max_seq_len=256),
    # ~150M params.
    "150m": ModelArgs(dim=768, n_layers=16, n_heads=12, n_kv_heads=4, ffn_hidden=2048,
                      vocab_size=32000, max_seq_len=1024),
    # ~1.1B params.
    "1b": ModelArgs(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_hidden=8192,
                    vocab_size=32000, max_seq_len=2048),
    # Llama-3-8B, ~8.03B params.
    "8b": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_hidden=14336,
                    vocab_size=128256, max_seq_len=8192),
    # INTELLECT-1 (Prime Intellect, 2024): Llama-3-8B widened to 42 layers, ~10.2B params.
    "intellect-1-10b": ModelArgs(dim=4096, n_layers=42, n_heads=32, n_kv_heads=8,
                                 ffn_hidden=14336, vocab_size=128256, max_seq_len=8192),
}


def get_size(name: str) -> ModelArgs:
    """A copy of SIZES[name], safe to modify. Raises ValueError listing valid names if unknown."""
    if name not in SIZES:
        raise ValueError(f"unknown model size {name!r}; valid sizes: {', '.join(SIZES)}")
    return dataclasses.replace(SIZES[name])


def count_params(args: ModelArgs) -> dict[str, int]:
    """Parameter counts of Llama(args), built on the meta device so nothing is allocated.

    Returns {"total", "embedding", "non_embedding"}. "embedding" is tok_embeddings only: it is a
    table lookup, while the untied output head is a matmul and counts as non-embedding.
    """
    with torch.device("meta"):
        model = Llama(args)
    total = sum(p.numel() for p in model.parameters())
    embedding = model.tok_embeddings.weight.numel()
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding}
