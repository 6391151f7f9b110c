"""Data layer: corpora, tokenizers, token arrays and the packed-sequence loader."""

from atoll.data.corpus import (
    STDLIB_SOURCE,
    load_documents,
    source_files,
    split_files,
    stdlib_files,
)
from atoll.data.loader import BatchSource, PackedLoader, iter_eval_batches
from atoll.data.tokenizer import (
    BYTE_TOKENIZER_SPEC,
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
    load_tokenizer,
    train_bpe,
)
from atoll.data.tokens import load_split_tokens, tokenize_documents

__all__ = [
    "BYTE_TOKENIZER_SPEC",
    "STDLIB_SOURCE",
    "BatchSource",
    "ByteTokenizer",
    "HFTokenizer",
    "PackedLoader",
    "Tokenizer",
    "iter_eval_batches",
    "load_documents",
    "load_split_tokens",
    "load_tokenizer",
    "source_files",
    "split_files",
    "stdlib_files",
    "tokenize_documents",
    "train_bpe",
]
