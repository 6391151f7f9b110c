"""Tokenizers: raw UTF-8 bytes, or any Hugging Face ``tokenizer.json`` (e.g. Llama-3's).

Every tokenizer has a ``name`` that identifies its vocabulary exactly; the token cache and the
shard manifests key on it, so two tokenizers with the same name must produce the same ids.

A document becomes ``encode(text)`` followed by ``eos_id``. An HF tokenizer encodes with its own
special tokens, as its post-processor defines them: Llama-3's prepends ``<|begin_of_text|>``,
a plain BPE adds nothing. Its eos is the ``eos_token`` of a ``tokenizer_config.json`` beside the
file (as ``transformers`` saves it), else the first of :data:`EOS_CANDIDATES` in the vocabulary.
"""

from __future__ import annotations

import hashlib
import json
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

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
"""Beside ``tokenizer.json`` in a saved HF tokenizer directory; names its bos/eos tokens."""

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
    """A ``tokenizers`` tokenizer loaded from a ``tokenizer.json`` file or a directory holding one.

    ``name`` is ``"hf:"`` + sha256 of ``tokenizer.json`` (and of ``tokenizer_config.json`` when
    it is read), so a changed vocabulary or eos changes the name.

    Raises (on construction):
        ValueError: no eos: ``tokenizer_config.json`` names none and the vocabulary holds none of
            :data:`EOS_CANDIDATES`; or the eos it names is not in the vocabulary.
    """

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        self.path = path / TOKENIZER_FILE if path.is_dir() else path
        self._tok = tokenizers.Tokenizer.from_file(str(self.path))
        digest = hashlib.sha256(self.path.read_bytes())
        config_path = self.path.parent / TOKENIZER_CONFIG_FILE
        eos_token = None
        if config_path.is_file():
            config_bytes = config_path.read_bytes()
            eos_token = _token_text(json.loads(config_bytes).get("eos_token"))
            if eos_token is not None:
                digest.update(config_bytes)
        self.name = "hf:" + digest.hexdigest()
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        candidates = (eos_token,) if eos_token is not None else EOS_CANDIDATES
        eos_id = next((i for i in map(self._tok.token_to_id, candidates) if i is not None), None)
        if eos_id is None:
            wanted = (f"{eos_token!r} (named by {config_path})" if eos_token is not None
                      else f"one of {', '.join(EOS_CANDIDATES)}")
            raise ValueError(f"tokenizer {self.path} has no end-of-sequence token; expected {wanted} in its vocabulary")
        self.eos_id = eos_id

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` with the tokenizer's own special tokens (e.g. Llama-3's bos)."""
        return self._tok.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts at once; the library spreads them over CPU threads."""
        return [e.ids for e in self._tok.encode_batch(texts)]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


def _token_text(entry: object) -> str | None:
    """A special token as ``tokenizer_config.json`` stores it: a string or ``{"content": ...}``."""
    if isinstance(entry, dict):
        entry = entry.get("content")
    return entry if isinstance(entry, str) else None


def load_tokenizer(spec: str) -> Tokenizer:
    """``"byte"`` gives :class:`ByteTokenizer`; anything else is a ``tokenizer.json`` file or a
    local directory holding one (a saved HF tokenizer, e.g. Llama-3's).

    Raises:
        FileNotFoundError: the path does not exist, or the directory holds no tokenizer.json.
        ValueError: the file is not a tokenizer, or it has no end-of-sequence token.
    """
    if spec == BYTE_TOKENIZER_SPEC:
        return ByteTokenizer()
    path = Path(spec).expanduser()
    if not (path.is_file() or (path / TOKENIZER_FILE).is_file()):
        raise FileNotFoundError(
            f"tokenizer {spec!r} is neither a file nor a directory holding {TOKENIZER_FILE}; pass "
            "data.tokenizer = \"byte\", the path of a tokenizer.json or a saved HF tokenizer directory"
        )
    try:
        return HFTokenizer(path)
    except Exception as err:  # the Rust library raises its own Exception type for a bad file
        if isinstance(err, ValueError) and "end-of-sequence" in str(err):
            raise
        raise ValueError(f"tokenizer {spec!r} cannot be loaded as a tokenizer.json: {err}") from None


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype holding every id: uint16 up to 65536 ids, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


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
