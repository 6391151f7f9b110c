"""Tokenizers: raw UTF-8 bytes, or a Hugging Face ``tokenizer.json`` (byte-level BPE).

Every tokenizer has a ``name`` that identifies its vocabulary exactly; the token cache keys
on it, so two tokenizers with the same name must produce the same ids.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from atoll.atomic import atomic_write

BYTE_TOKENIZER_SPEC = "byte"
"""The ``data.tokenizer`` value that selects :class:`ByteTokenizer`."""

EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")
"""End-of-sequence tokens looked up in a ``tokenizer.json`` vocabulary, first match wins."""

BPE_EOS_TOKEN = "<|endoftext|>"
"""The special token :func:`train_bpe` adds as end-of-sequence."""


class Tokenizer(Protocol):
    """Text to token ids and back; ``eos_id`` separates documents in a packed stream."""

    vocab_size: int
    eos_id: int
    name: str
    """Stable identity of the vocabulary: ``"byte"`` or ``"hf:<sha256 of tokenizer.json>"``."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, plus end-of-sequence as 256: no vocabulary file needed."""

    vocab_size = 257
    eos_id = 256
    name = BYTE_TOKENIZER_SPEC

    def encode_array(self, text: str) -> np.ndarray:
        """``text`` as a ``uint8`` array of its UTF-8 bytes (no copy per byte: fast path)."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        """Bytes back to text; eos is dropped and invalid UTF-8 becomes U+FFFD.

        Raises:
            ValueError: an id is outside 0..256.
        """
        return bytes(i for i in ids if i != self.eos_id).decode("utf-8", errors="replace")


class HFTokenizer:
    """A ``tokenizers`` tokenizer loaded from a ``tokenizer.json`` file.

    Raises (on construction):
        ValueError: the vocabulary holds none of :data:`EOS_CANDIDATES`.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._tok = tokenizers.Tokenizer.from_file(str(self.path))
        self.name = "hf:" + hashlib.sha256(self.path.read_bytes()).hexdigest()
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        eos_id = next(
            (i for i in map(self._tok.token_to_id, EOS_CANDIDATES) if i is not None), None
        )
        if eos_id is None:
            raise ValueError(
                f"tokenizer {self.path} has no end-of-sequence token; "
                f"expected one of {', '.join(EOS_CANDIDATES)} in its vocabulary"
            )
        self.eos_id = eos_id

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts at once; the library spreads them over CPU threads."""
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


def load_tokenizer(spec: str) -> Tokenizer:
    """``"byte"`` gives :class:`ByteTokenizer`; anything else is a path to a ``tokenizer.json``.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: the file holds no end-of-sequence token.
    """
    if spec == BYTE_TOKENIZER_SPEC:
        return ByteTokenizer()
    path = Path(spec).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"tokenizer file {spec!r} does not exist; pass data.tokenizer = \"byte\" "
            "or the path of a tokenizer.json"
        )
    return HFTokenizer(path)


def train_bpe(texts: Iterable[str], vocab_size: int, out_path: str | Path) -> HFTokenizer:
    """Train a byte-level BPE on ``texts`` and write it to ``out_path`` as ``tokenizer.json``.

    The vocabulary starts from all 256 bytes plus :data:`BPE_EOS_TOKEN`, so any text encodes;
    merges fill it up to ``vocab_size``. The file is written atomically (temp file, fsync,
    rename): an interrupted call leaves any earlier file intact.

    Raises:
        ValueError: ``vocab_size`` is below 257 (the bytes plus eos).
    """
    if vocab_size < 257:
        raise ValueError(f"vocab_size must be at least 257 (256 bytes + eos), got {vocab_size}")
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BPE_EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out_path, lambda f: f.write(tok.to_str().encode("utf-8")))
    return HFTokenizer(out_path)
