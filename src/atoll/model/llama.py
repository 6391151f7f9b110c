"""The Llama-3 decoder-only transformer, readable top to bottom.

Order: config, rotary embeddings, attention, feed-forward, block, model (with its init), and
activation checkpointing. Architecture as in "The Llama 3 Herd of Models" (Meta, 2024):
pre-norm RMSNorm blocks, rotary position embeddings, grouped-query attention, SwiGLU
feed-forward, untied input embedding and output head, no biases anywhere.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from atoll.model.init import fill_shard_, normal_shard_
from atoll.model.loss import chunked_lm_loss


@dataclass
class ModelArgs:
    """Shape of a Llama model. Validated on construction; bad values raise ValueError."""

    dim: int
    """Width of the residual stream (model dimension)."""
    n_layers: int
    """Number of transformer blocks."""
    n_heads: int
    """Number of query heads; must divide `dim`."""
    n_kv_heads: int
    """Number of key/value heads (grouped-query attention); must divide `n_heads`."""
    ffn_hidden: int
    """Hidden width of the SwiGLU feed-forward."""
    vocab_size: int
    """Number of token ids; rows of the embedding and of the output head."""
    max_seq_len: int
    """Longest sequence the model accepts; length of the precomputed RoPE table."""
    rope_theta: float = 500000.0
    """RoPE base: frequencies are rope_theta^(-2i/head_dim). Llama-3 uses 500000."""
    norm_eps: float = 1e-5
    """Epsilon added to the mean square inside RMSNorm."""

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "vocab_size",
                     "max_seq_len", "rope_theta", "norm_eps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ModelArgs.{name} must be positive, got {getattr(self, name)}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim (dim / n_heads = {self.head_dim}) must be even for RoPE")

    @property
    def head_dim(self) -> int:
        """Width of one attention head: dim / n_heads."""
        return self.dim // self.n_heads


def rope_table(head_dim: int, max_seq_len: int, theta: float,
               device: torch.device | str | None = None) -> Tensor:
    """cos and sin of the rotary angles, float32, shape [max_seq_len, head_dim / 2, 2].

    Entry [p, i] holds (cos, sin) of p * theta^(-2i / head_dim): position p rotates the i-th
    pair of channels by that angle.
    """
    inv_freq = theta ** -(torch.arange(0, head_dim, 2, device=device, dtype=torch.float32)
                          / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, device=device, dtype=torch.float32), inv_freq)
    return torch.stack((angles.cos(), angles.sin()), dim=-1)


def apply_rope(x: Tensor, rope: Tensor) -> Tensor:
    """Rotate each adjacent channel pair of x [B, T, heads, head_dim] by its position's angle.

    rope is rope_table(...)[:T]. Pairs are interleaved (channels 2i, 2i+1), the layout of Meta's
    Llama weights. The rotation runs in float32 and the result has x's dtype.
    """
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = rope[:, None, :, 0], rope[:, None, :, 1]  # broadcast over heads
    rotated = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


class Attention(nn.Module):
    """Causal grouped-query self-attention: n_kv_heads key/value heads shared by n_heads queries."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x: Tensor, rope: Tensor) -> Tensor:
        B, T, _ = x.shape
        q = apply_rope(self.wq(x).view(B, T, self.n_heads, self.head_dim), rope)
        k = apply_rope(self.wk(x).view(B, T, self.n_kv_heads, self.head_dim), rope)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        # SDPA wants [B, heads, T, head_dim]; enable_gqa shares each kv head among its query group
        # without materialising repeated k/v. Only set when needed so plain MHA keeps every kernel.
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            is_causal=True, enable_gqa=self.n_kv_heads != self.n_heads)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU (Shazeer, 2020): w2(silu(w1 x) * w3 x)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.ffn_hidden, bias=False)
        self.w2 = nn.Linear(args.ffn_hidden, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, args.ffn_hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attention(norm(x)), then h + feed_forward(norm(h))."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.feed_forward = FeedForward(args)
        # Set by apply_activation_checkpointing(): recompute this block's activations in backward.
        self.activation_checkpointing = False

    def forward(self, x: Tensor, rope: Tensor) -> Tensor:
        if self.activation_checkpointing:
            return checkpoint(self._forward, x, rope, use_reentrant=False)
        return self._forward(x, rope)

    def _forward(self, x: Tensor, rope: Tensor) -> Tensor:
        h = x + self.attention(self.attention_norm(x), rope)
        return h + self.feed_forward(self.ffn_norm(h))


class Llama(nn.Module):
    """Llama-3 language model: token ids [B, T] -> next-token logits [B, T, vocab_size].

    Built on the `meta` device, it allocates nothing and is left uninitialised; materialise it with
    `to_empty(device=...)` then `init_weights()`. Built elsewhere, it is initialised at once, and
    `torch.manual_seed(s); Llama(args)` draws exactly what the meta route draws after the same seed.
    The trainer shards each element of `layers`, then the root, so that attribute name is API.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        device = torch.get_default_device()
        # PyTorch's per-layer default inits are overwritten by init_weights(); forking the RNG
        # keeps them from advancing it, so weights depend only on the seed, not on the build route.
        with torch.random.fork_rng(devices=[] if device.type in ("cpu", "meta") else [device],
                                   device_type=device.type):
            self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
            self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
            self.norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
            self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        # Non-persistent: derived from args, so checkpoints need not carry it. Kept in float32;
        # FSDP2 mixed precision casts parameters only.
        self.register_buffer(
            "rope", torch.empty(args.max_seq_len, args.head_dim // 2, 2), persistent=False)
        if self.output.weight.device.type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """(Re)initialise every parameter and the RoPE table in place.

        Embeddings and linear weights: normal(0, 0.02). Residual output projections (attention.wo,
        feed_forward.w2): normal(0, 0.02 / sqrt(2 * n_layers)), so the residual stream's variance
        does not grow with depth (GPT-2). Output head: normal(0, dim ** -0.5), which gives unit-std
        logits from the unit-RMS final norm. RMSNorm weights: 1.

        The values are a function of `seed` and the parameter names only (`atoll.model.init`):
        on a model sharded by FSDP2 each rank fills its own shard, and the full weights are the
        same for any number of ranks. seed None draws one from the global torch RNG, so
        `torch.manual_seed(s)` followed by any build route gives the same weights.
        """
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()))
        args = self.args
        self.rope.copy_(rope_table(args.head_dim, args.max_seq_len, args.rope_theta,
                                   device=self.rope.device))
        residual_std = 0.02 / math.sqrt(2 * args.n_layers)
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                fill_shard_(param, 1.0)
            elif name == "output.weight":
                normal_shard_(param, args.dim ** -0.5, seed, name)
            elif name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
                normal_shard_(param, residual_std, seed, name)
            else:
                normal_shard_(param, 0.02, seed, name)

    def forward(self, tokens: Tensor, targets: Tensor | None = None,
                z_loss_weight: float = 0.0) -> Tensor | tuple[Tensor, Tensor, Tensor]:
        """Logits [B, T, vocab_size] in the compute dtype for token ids [B, T], T <= max_seq_len.

        With `targets` [B, T], returns the loss (total, ce, z) of `chunked_lm_loss` instead, which
        never holds the logits of every position at once (the head's matmul runs inside forward,
        so FSDP2 has its weight gathered). Position t attends to positions <= t only. Raises
        ValueError if T > max_seq_len.
        """
        T = tokens.shape[1]
        if T > self.args.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len {self.args.max_seq_len}")
        h = self.tok_embeddings(tokens)
        rope = self.rope[:T]
        for layer in self.layers:
            h = layer(h, rope)
        h = self.norm(h)
        if targets is None:
            return self.output(h)
        return chunked_lm_loss(h, self.output.weight, targets, z_loss_weight)


def apply_activation_checkpointing(model: Llama) -> None:
    """Recompute each block's activations in backward instead of storing them.

    Saves memory for one extra forward per block; losses and gradients are unchanged. Uses
    non-reentrant checkpointing, which composes with FSDP2 applied to the blocks.
    """
    for block in model.layers:
        block.activation_checkpointing = True
