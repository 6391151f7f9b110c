"""Llama model tests: shapes, causality, GQA, RoPE, init determinism, sizes, checkpointing."""

import dataclasses
import hashlib
import math

import pytest
import torch

from atoll.model import (
    SIZES,
    Llama,
    ModelArgs,
    apply_activation_checkpointing,
    count_params,
    get_size,
    lm_loss,
)
from atoll.model.llama import Attention, apply_rope, rope_table

DEBUG = SIZES["debug"]


def state_digest(model: torch.nn.Module) -> str:
    """sha256 over every state_dict tensor's name and bytes."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def random_tokens(args: ModelArgs, batch: int = 2, seq: int | None = None) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, args.vocab_size, (batch, seq or args.max_seq_len), generator=gen)


def test_forward_gives_logits_per_position_for_full_and_shorter_sequences():
    torch.manual_seed(0)
    model = Llama(DEBUG)
    for seq in (DEBUG.max_seq_len, 17):
        logits = model(random_tokens(DEBUG, batch=3, seq=seq))
        assert logits.shape == (3, seq, DEBUG.vocab_size)
        assert logits.dtype == torch.float32
        assert torch.isfinite(logits).all()


def test_sequence_longer_than_max_seq_len_is_rejected():
    model = Llama(DEBUG)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(random_tokens(DEBUG, seq=DEBUG.max_seq_len + 1))


def test_changing_token_t_leaves_logits_before_t_unchanged():
    torch.manual_seed(0)
    model = Llama(DEBUG)
    tokens = random_tokens(DEBUG)
    t = 40
    changed = tokens.clone()
    changed[:, t] = (changed[:, t] + 1) % DEBUG.vocab_size
    with torch.no_grad():
        before, after = model(tokens), model(changed)
    torch.testing.assert_close(before[:, :t], after[:, :t], rtol=0, atol=1e-6)
    assert not torch.allclose(before[:, t:], after[:, t:])


def test_grouped_query_attention_equals_explicitly_repeated_kv_heads():
    torch.manual_seed(0)
    args = ModelArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_hidden=64, vocab_size=16,
                     max_seq_len=8)
    attn = Attention(args)
    x = torch.randn(2, 8, args.dim)
    rope = rope_table(args.head_dim, args.max_seq_len, args.rope_theta)

    q = apply_rope(attn.wq(x).view(2, 8, 4, 8), rope).transpose(1, 2)
    k = apply_rope(attn.wk(x).view(2, 8, 2, 8), rope).transpose(1, 2)
    v = attn.wv(x).view(2, 8, 2, 8).transpose(1, 2)
    # Query heads 0,1 share kv head 0; heads 2,3 share kv head 1.
    k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(args.head_dim)
    scores = scores.masked_fill(torch.ones(8, 8, dtype=torch.bool).triu(1), float("-inf"))
    expected = attn.wo((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 8, args.dim))

    torch.testing.assert_close(attn(x, rope), expected)


def test_fewer_kv_heads_shrink_only_wk_and_wv():
    mha = dataclasses.replace(DEBUG, n_kv_heads=DEBUG.n_heads)
    saved = 2 * DEBUG.dim * (mha.n_kv_heads - DEBUG.n_kv_heads) * DEBUG.head_dim
    assert count_params(mha)["total"] - count_params(DEBUG)["total"] == saved * DEBUG.n_layers
    torch.manual_seed(0)
    assert Llama(mha)(random_tokens(mha)).shape == (2, mha.max_seq_len, mha.vocab_size)


def test_rope_scores_depend_only_on_relative_position():
    head_dim, seq = 16, 64
    rope = rope_table(head_dim, seq, theta=500000.0)
    gen = torch.Generator().manual_seed(0)
    q_vec, k_vec = torch.randn(2, head_dim, generator=gen)
    # The same vector at every position, rotated by each position's angle.
    q = apply_rope(q_vec.expand(1, seq, 1, head_dim), rope)[0, :, 0]
    k = apply_rope(k_vec.expand(1, seq, 1, head_dim), rope)[0, :, 0]
    for m, n, d in [(3, 1, 10), (0, 7, 40), (20, 20, 5)]:
        torch.testing.assert_close(q[m] @ k[n], q[m + d] @ k[n + d], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(q[5] @ k[1], q[5] @ k[2])


def test_same_seed_gives_identical_weights():
    torch.manual_seed(123)
    first = state_digest(Llama(DEBUG))
    torch.manual_seed(123)
    second = state_digest(Llama(DEBUG))
    torch.manual_seed(124)
    other = state_digest(Llama(DEBUG))
    assert first == second != other


def test_meta_build_then_to_empty_and_init_weights_matches_eager_build():
    torch.manual_seed(7)
    eager = Llama(DEBUG)
    torch.manual_seed(7)
    with torch.device("meta"):
        lazy = Llama(DEBUG)
    assert all(p.is_meta for p in lazy.parameters())
    lazy.to_empty(device="cpu")
    lazy.init_weights()
    assert state_digest(lazy) == state_digest(eager)
    assert torch.equal(lazy.rope, eager.rope)


def test_init_uses_scaled_std_for_residual_projections_and_head():
    torch.manual_seed(0)
    args = dataclasses.replace(SIZES["demo"], n_layers=8)
    model = Llama(args)
    block = model.layers[0]
    assert block.attention.wq.weight.std().item() == pytest.approx(0.02, rel=0.05)
    residual_std = 0.02 / math.sqrt(2 * args.n_layers)
    assert block.feed_forward.w2.weight.std().item() == pytest.approx(residual_std, rel=0.05)
    assert block.attention.wo.weight.std().item() == pytest.approx(residual_std, rel=0.05)
    assert model.output.weight.std().item() == pytest.approx(args.dim ** -0.5, rel=0.05)
    assert torch.equal(block.ffn_norm.weight, torch.ones(args.dim))


def test_intellect_1_param_count_matches_closed_form():
    a = SIZES["intellect-1-10b"]
    attention = a.dim * a.n_heads * a.head_dim * 2 + a.dim * a.n_kv_heads * a.head_dim * 2
    feed_forward = 3 * a.dim * a.ffn_hidden
    per_layer = attention + feed_forward + 2 * a.dim
    expected = a.vocab_size * a.dim + a.n_layers * per_layer + a.dim + a.dim * a.vocab_size
    counts = count_params(a)
    assert counts["total"] == expected
    assert 10.1e9 <= counts["total"] <= 10.3e9
    assert counts["embedding"] == a.vocab_size * a.dim


def test_llama3_8b_has_about_8_03b_params():
    assert count_params(SIZES["8b"])["total"] == pytest.approx(8.03e9, rel=0.005)


@pytest.mark.parametrize("name", list(SIZES))
def test_every_size_counts_params_on_meta(name):
    counts = count_params(SIZES[name])
    assert counts["embedding"] + counts["non_embedding"] == counts["total"] > 0


def test_small_sizes_have_expected_scale():
    assert 100e3 <= count_params(SIZES["debug"])["total"] <= 500e3
    assert 140e6 <= count_params(SIZES["150m"])["total"] <= 160e6


def test_get_size_returns_copy_and_rejects_unknown_names():
    args = get_size("debug")
    args.max_seq_len = 8
    assert SIZES["debug"].max_seq_len == 64
    with pytest.raises(ValueError, match="debug"):
        get_size("huge")


@pytest.mark.parametrize("change", [dict(dim=65), dict(n_kv_heads=3), dict(n_layers=0),
                                    dict(dim=24, n_heads=8)])
def test_invalid_model_args_raise_value_error(change):
    with pytest.raises(ValueError):
        dataclasses.replace(DEBUG, **change)


def test_activation_checkpointing_gives_identical_loss_and_gradients():
    tokens = random_tokens(DEBUG)
    results = []
    for use_checkpointing in (False, True):
        torch.manual_seed(0)
        model = Llama(DEBUG)
        if use_checkpointing:
            apply_activation_checkpointing(model)
        loss, _, _ = lm_loss(model(tokens[:, :-1]), tokens[:, 1:], z_loss_weight=1e-4)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_plain, grads_plain), (loss_ckpt, grads_ckpt) = results
    assert torch.equal(loss_plain, loss_ckpt)
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=0, atol=0)


def test_forward_with_targets_gives_the_loss_and_gradients_of_the_logits_route():
    tokens = random_tokens(DEBUG)
    results = []
    for with_targets in (False, True):
        torch.manual_seed(0)
        model = Llama(DEBUG)
        if with_targets:
            loss = model(tokens[:, :-1], tokens[:, 1:], z_loss_weight=1e-4)[0]
        else:
            loss = lm_loss(model(tokens[:, :-1]), tokens[:, 1:], z_loss_weight=1e-4)[0]
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_logits, grads_logits), (loss_targets, grads_targets) = results
    torch.testing.assert_close(loss_targets, loss_logits, rtol=1e-6, atol=1e-6)
    for name, grad in grads_logits.items():
        torch.testing.assert_close(grads_targets[name], grad, rtol=1e-5, atol=1e-6)
