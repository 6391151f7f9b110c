"""The mapping between atoll's Llama and transformers' `LlamaForCausalLM`: names, RoPE layout, config.json.

atoll's Llama is transformers' `LlamaForCausalLM` with three differences that this module bridges:

- Names: `layers.0.attention.wq.weight` is `model.layers.0.self_attn.q_proj.weight`, etc.
- RoPE: atoll rotates adjacent channel pairs (2i, 2i+1) of each head (Meta's layout);
  transformers rotates channel i with i + head_dim/2 ("rotate half"). The rows of wq and wk are
  permuted on the way out and back on the way in (as transformers' convert_llama_weights_to_hf).
- Defaults: transformers' `rms_norm_eps` is 1e-6, atoll's 1e-5, so config.json states every field.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from atoll.errors import UserError
from atoll.model import ModelArgs

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
HF_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}

_LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def hf_name(name: str) -> str:
    """The transformers name of atoll parameter `name`."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    layer, rest = _LAYER.match(name).groups()
    return f"model.layers.{layer}.{_LAYER_NAMES[rest]}"


def atoll_name(name: str) -> str | None:
    """The atoll parameter of transformers name `name`, or None if atoll's Llama has no such tensor."""
    for ours, theirs in _TOP_NAMES.items():
        if theirs == name:
            return ours
    match = _HF_LAYER.match(name)
    if match is None:
        return None
    for ours, theirs in _LAYER_NAMES.items():
        if theirs == match.group(2):
            return f"layers.{match.group(1)}.{ours}"
    return None


def _heads(name: str, args: ModelArgs) -> int | None:
    """Heads whose rows a wq / wk weight holds (None for every other tensor)."""
    if name.endswith("attention.wq.weight"):
        return args.n_heads
    if name.endswith("attention.wk.weight"):
        return args.n_kv_heads
    return None


def to_hf(name: str, tensor: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    """atoll's tensor `name` in transformers' layout: wq/wk rows go from pairs (2i, 2i+1) to (i, i + d/2)."""
    heads = _heads(name, args)
    if heads is None:
        return tensor
    rows, cols = tensor.shape
    return tensor.view(heads, args.head_dim // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def from_hf(name: str, tensor: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    """The inverse of `to_hf` (`name` is the atoll name)."""
    heads = _heads(name, args)
    if heads is None:
        return tensor
    rows, cols = tensor.shape
    return tensor.view(heads, 2, args.head_dim // 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_config(args: ModelArgs, eos_id: int, dtype: torch.dtype) -> dict[str, Any]:
    """config.json for transformers' LlamaForCausalLM, every field explicit.

    RoPE is stated both ways (`rope_theta` for transformers 4, `rope_parameters` for 5).
    """
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": args.vocab_size,
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_hidden,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": args.max_seq_len,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": args.rope_theta},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "bos_token_id": None,
        "eos_token_id": eos_id,
        "pad_token_id": None,
        "torch_dtype": HF_DTYPE_NAMES[dtype],
    }


def args_from_hf_config(config: dict[str, Any], where: Path) -> ModelArgs:
    """The ModelArgs of a transformers Llama config.json; anything atoll's Llama cannot hold is a UserError."""
    def need(key: str, value: Any) -> None:
        if config.get(key, value) != value:
            raise UserError(f"{where}: {key} is {config[key]!r}; atoll's Llama needs {value!r}")

    need("model_type", "llama")
    need("hidden_act", "silu")
    need("attention_bias", False)
    need("mlp_bias", False)
    need("tie_word_embeddings", False)
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise UserError(f"{where}: RoPE scaling {rope!r} is not supported; atoll's Llama uses plain RoPE")
    try:
        args = ModelArgs(
            dim=config["hidden_size"],
            n_layers=config["num_hidden_layers"],
            n_heads=config["num_attention_heads"],
            n_kv_heads=config.get("num_key_value_heads", config["num_attention_heads"]),
            ffn_hidden=config["intermediate_size"],
            vocab_size=config["vocab_size"],
            max_seq_len=config["max_position_embeddings"],
            rope_theta=rope.get("rope_theta", config.get("rope_theta", 10000.0)),
            norm_eps=config.get("rms_norm_eps", 1e-6),
        )
    except KeyError as err:
        raise UserError(f"{where}: config.json has no {err.args[0]!r}") from None
    except ValueError as err:
        raise UserError(f"{where}: {err}") from None
    if config.get("head_dim", args.head_dim) != args.head_dim:
        raise UserError(f"{where}: head_dim {config['head_dim']} is not hidden_size / num_attention_heads ({args.head_dim})")
    return args


def json_text(value: Any) -> str:
    """The text of a JSON file of a transformers directory: indented, ending in a newline."""
    return json.dumps(value, indent=2) + "\n"
