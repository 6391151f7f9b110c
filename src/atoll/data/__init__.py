"""Data layer: corpora and sources, tokenizers, prepared shards, mixtures and the packed loaders.

Names are imported on first use, so that `atoll data prepare` and its worker processes load
neither torch nor the loaders (a worker then starts in a fraction of a second).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "atoll.data.corpus": ("STDLIB_SOURCE", "load_documents", "source_files", "split_files", "stdlib_files"),
    "atoll.data.loader": ("BatchSource", "MixtureLoader", "PackedLoader", "iter_eval_batches"),
    "atoll.data.mixture": ("MixturePlan", "WindowPermutation", "block_counts"),
    "atoll.data.pipeline": ("TrainingData", "load_training_data", "run_prepare", "training_tokenizer", "weighted_mean"),
    "atoll.data.shards": ("PrepareSettings", "ShardError", "ShardedTokens", "open_prepared", "prepare"),
    "atoll.data.sources": ("Source", "SourceError", "SourceSpec"),
    "atoll.data.tokenizer": (
        "BYTE_TOKENIZER_SPEC", "ByteTokenizer", "HFTokenizer", "Tokenizer", "load_tokenizer", "token_dtype", "train_bpe",
    ),
    "atoll.data.tokens": ("load_split_tokens", "tokenize_documents"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'atoll.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_MODULE_OF[name]), name)
