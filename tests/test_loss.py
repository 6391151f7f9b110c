"""Tests of lm_loss: cross-entropy in float32, ignored targets, and a length-independent z-loss."""

import torch
import torch.nn.functional as F

from atoll.model import lm_loss


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
