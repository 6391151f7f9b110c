"""The tokenizer files of a Hugging Face directory: writing tokenizer.json and tokenizer_config.json, reading them back.

atoll's byte tokenizer is written as a byte-level BPE with no merges; a tokenizer.json that is exactly
that text reads back as the byte tokenizer, any other as an HF tokenizer.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as HFTokenizerModel
from tokenizers import decoders, models, pre_tokenizers

from atoll.data import BYTE_TOKENIZER_SPEC, ByteTokenizer, HFTokenizer, Tokenizer
from atoll.errors import UserError
from atoll.hf.convert import json_text

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
BYTE_EOS_TOKEN = "<|endoftext|>"
"""The byte tokenizer's end-of-sequence id 256, as a token of its tokenizer.json."""

def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, which the ByteLevel pre-tokenizer applies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def byte_tokenizer_json() -> str:
    """atoll's byte tokenizer as an HF tokenizer.json: id b is UTF-8 byte b, id 256 is eos.

    A byte-level BPE with no merges, so every byte is its own token; deterministic text.
    """
    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    tok = HFTokenizerModel(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BYTE_EOS_TOKEN])
    return tok.to_str()


def tokenizer_of_hf_dir(hf_dir: Path) -> Tokenizer:
    """The tokenizer of an export: atoll's byte tokenizer when tokenizer.json is exactly its HF form."""
    path = hf_dir / TOKENIZER_FILE
    if not path.is_file():
        raise UserError(f"{hf_dir} has no {TOKENIZER_FILE}: atoll reads tokenizers in that format only")
    if path.read_text() == byte_tokenizer_json():
        return ByteTokenizer()
    try:
        return HFTokenizer(path)
    except ValueError as err:
        raise UserError(str(err)) from None


def tokenizer_files(spec: str, eos_id: int, max_len: int) -> dict[str, str]:
    """tokenizer.json (the given one, or the byte tokenizer's) and a tokenizer_config.json naming eos.

    The byte tokenizer reads a literal "<|endoftext|>" in text as its bytes, as atoll does
    (split_special_tokens); a given tokenizer.json keeps its own rule, which atoll shares.
    """
    byte = spec == BYTE_TOKENIZER_SPEC
    if byte:
        text = byte_tokenizer_json()
    else:
        text = Path(spec).expanduser().read_text()
    eos = HFTokenizerModel.from_str(text).id_to_token(eos_id)
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": eos,
        "pad_token": None,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_len,
        "split_special_tokens": byte,
    }
    return {TOKENIZER_FILE: text, TOKENIZER_CONFIG_FILE: json_text(tokenizer_config)}
