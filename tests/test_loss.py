"""Tests of lm_loss and chunked_lm_loss: cross-entropy in float32, ignored targets, a length-independent z-loss."""

import pytest
import torch
import torch.nn.functional as F

from atoll.model import chunked_lm_loss, lm_loss


def make_batch(batch: int = 2, seq: int = 8, vocab: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(batch, seq, vocab, generator=gen)
    targets = torch.randint(0, vocab, (batch, seq), generator=gen)
    return logits, targets


def test_ce_equals_torch_cross_entropy_for_float32():
    logits, targets = make_batch()
    _, ce, _ = lm_loss(logits, targets)
    torch.testing.assert_close(ce, F.cross_entropy(logits.flatten(0, 1), targets.flatten()))


def test_bfloat16_logits_give_float32_loss_close_to_float32():
    logits, targets = make_batch()
    total, ce, z = lm_loss(logits.bfloat16(), targets, z_loss_weight=1e-4)
    assert total.dtype == ce.dtype == z.dtype == torch.float32
    _, ce_fp32, _ = lm_loss(logits, targets)
    torch.testing.assert_close(ce, ce_fp32, rtol=0, atol=1e-2)


def test_ignored_positions_do_not_affect_loss():
    logits, targets = make_batch()
    targets[0, :3] = -100
    targets[1, 5] = -100
    total, ce, z = lm_loss(logits, targets, z_loss_weight=1e-2)
    poisoned = logits.clone()
    poisoned[0, :3] = 1e4
    poisoned[1, 5] = -1e4
    for got, want in zip(lm_loss(poisoned, targets, z_loss_weight=1e-2), (total, ce, z)):
        assert torch.equal(got, want)
    keep = targets != -100
    expected_z = logits.max(-1).values[keep].square().mean()
    torch.testing.assert_close(z, expected_z)


def test_all_ignored_targets_give_zero_not_nan():
    logits, targets = make_batch()
    total, ce, z = lm_loss(logits, torch.full_like(targets, -100), z_loss_weight=1.0)
    assert total.item() == ce.item() == z.item() == 0.0


def test_z_and_ce_do_not_scale_with_batch_size_or_sequence_length():
    logits, targets = make_batch()
    reference = lm_loss(logits, targets, z_loss_weight=1e-3)
    for dim in (0, 1):
        repeated = lm_loss(logits.repeat_interleave(4, dim=dim),
                           targets.repeat_interleave(4, dim=dim), z_loss_weight=1e-3)
        for got, want in zip(repeated, reference):
            torch.testing.assert_close(got, want)


def test_zero_z_weight_gives_total_equal_to_ce():
    logits, targets = make_batch()
    total, ce, z = lm_loss(logits, targets)
    assert torch.equal(total, ce)
    assert z > 0


def test_total_is_ce_plus_weighted_z_and_gradient_reaches_logits():
    logits, targets = make_batch()
    logits.requires_grad_()
    total, ce, z = lm_loss(logits, targets, z_loss_weight=0.5)
    torch.testing.assert_close(total, ce + 0.5 * z)
    total.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0


@pytest.mark.parametrize("chunk_tokens", [1, 7, 64, None])
@pytest.mark.parametrize("z_loss_weight", [0.0, 1e-2])
def test_chunked_loss_and_its_gradients_equal_the_plain_loss(chunk_tokens, z_loss_weight):
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 25, 16, generator=gen).requires_grad_()
    head = (torch.randn(300, 16, generator=gen) * 2).requires_grad_()
    targets = torch.randint(0, 300, (2, 25), generator=gen)
    targets[0, :5] = -100
    plain = lm_loss(hidden @ head.T, targets, z_loss_weight=z_loss_weight)
    plain_grads = torch.autograd.grad(plain[0], (hidden, head))
    chunked = chunked_lm_loss(hidden, head, targets, z_loss_weight=z_loss_weight, chunk_tokens=chunk_tokens)
    chunked_grads = torch.autograd.grad(chunked[0], (hidden, head))
    for got, want in zip(chunked, plain):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for got, want in zip(chunked_grads, plain_grads):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert chunked[2] > 0


def test_chunked_loss_without_grad_matches_and_all_ignored_gives_zero():
    hidden, head = torch.randn(1, 9, 8), torch.randn(40, 8)
    targets = torch.randint(0, 40, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(chunked_lm_loss(hidden, head, targets, chunk_tokens=4)[1],
                                   lm_loss(hidden @ head.T, targets)[1], rtol=1e-6, atol=1e-6)
    total, ce, z = chunked_lm_loss(hidden, head, torch.full_like(targets, -100), z_loss_weight=1.0, chunk_tokens=4)
    assert total.item() == ce.item() == z.item() == 0.0
