"""Optimizer tests: LR schedules as pure functions of the step, AdamW parameter groups, grad clipping."""

import math
from itertools import pairwise

import pytest
import torch

from atoll.config import OptimConfig, ScheduleConfig
from atoll.model import Llama, get_size
from atoll.optim import build_optimizer, clip_grad_norm, lr_factor, set_lr

# WSD fixture used below: 100 steps, 10 of warmup, decay over the last 20% = steps 80..99.
TOTAL, WARMUP, DECAY_START, FLOOR = 100, 10, 80, 0.1


def wsd(shape: str = "linear", **kw) -> ScheduleConfig:
    return ScheduleConfig(**{"kind": "wsd", "warmup_steps": WARMUP, "decay_fraction": 0.2,
                             "decay_shape": shape, "min_lr_ratio": FLOOR, **kw})


def factors(cfg: ScheduleConfig, total: int, steps: range) -> list[float]:
    return [lr_factor(step, total, cfg) for step in steps]


# --- warmup ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["wsd", "cosine", "constant"])
def test_warmup_rises_linearly_to_peak(kind):
    cfg = ScheduleConfig(kind=kind, warmup_steps=4, min_lr_ratio=0.1)
    assert factors(cfg, 20, range(5)) == [0.25, 0.5, 0.75, 1.0, 1.0]


def test_no_warmup_starts_at_peak():
    assert lr_factor(0, TOTAL, wsd(warmup_steps=0)) == 1.0


# --- WSD ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", ["linear", "sqrt", "cosine"])
def test_wsd_is_exactly_peak_through_stable_phase(shape):
    assert factors(wsd(shape), TOTAL, range(WARMUP, DECAY_START)) == [1.0] * (DECAY_START - WARMUP)


@pytest.mark.parametrize("shape", ["linear", "sqrt", "cosine"])
def test_wsd_decays_only_in_last_fraction_and_ends_at_floor(shape):
    cfg = wsd(shape)
    decay = factors(cfg, TOTAL, range(DECAY_START, TOTAL))
    assert lr_factor(DECAY_START - 1, TOTAL, cfg) == 1.0
    assert decay[0] < 1.0  # the first step of the decay window is already below peak
    assert all(a > b for a, b in pairwise(decay)), decay  # strictly decreasing
    assert decay[-1] == pytest.approx(FLOOR, abs=1e-12)  # final step (TOTAL - 1) is the floor
    assert min(decay) >= FLOOR - 1e-12


def test_wsd_shapes_at_quarter_and_midpoint_of_decay():
    # progress = (step - 80 + 1) / 20; factor = 0.1 + 0.9 * shape(progress).
    quarter, mid = DECAY_START + 4, DECAY_START + 9  # progress 0.25 and 0.5
    expected = {
        #          quarter: shape(0.25)                  midpoint: shape(0.5)
        "linear": (0.1 + 0.9 * 0.75, 0.1 + 0.9 * 0.5),  # 1 - p
        "sqrt": (0.1 + 0.9 * 0.5, 0.1 + 0.9 * (1 - 0.7071067811865476)),  # 1 - sqrt(p)
        "cosine": (0.1 + 0.9 * 0.5 * (1 + 0.7071067811865476), 0.1 + 0.9 * 0.5),  # (1 + cos(pi p)) / 2
    }
    got = {shape: (lr_factor(quarter, TOTAL, wsd(shape)), lr_factor(mid, TOTAL, wsd(shape)))
           for shape in expected}
    for shape, (want_quarter, want_mid) in expected.items():
        assert got[shape][0] == pytest.approx(want_quarter, abs=1e-12), shape
        assert got[shape][1] == pytest.approx(want_mid, abs=1e-12), shape
    # sqrt drops fastest; cosine holds the LR longest early in the decay...
    assert got["sqrt"][0] < got["linear"][0] < got["cosine"][0]
    # ...and at the exact midpoint linear and cosine coincide (0.55), sqrt is well below (~0.364).
    assert got["sqrt"][1] < got["linear"][1] == pytest.approx(got["cosine"][1], abs=1e-12)


def test_wsd_with_zero_decay_fraction_stays_at_peak_after_warmup():
    cfg = wsd(decay_fraction=0.0)
    assert factors(cfg, TOTAL, range(WARMUP, TOTAL)) == [1.0] * (TOTAL - WARMUP)


def test_wsd_with_zero_floor_ends_at_zero():
    assert lr_factor(TOTAL - 1, TOTAL, wsd("sqrt", min_lr_ratio=0.0)) == 0.0


# --- cosine and constant -----------------------------------------------------------------------

def test_cosine_peaks_after_warmup_halves_at_midpoint_and_approaches_floor():
    # warmup 10 of 110 steps: progress = (step - 10) / 100.
    cfg = ScheduleConfig(kind="cosine", warmup_steps=10, min_lr_ratio=0.2)
    assert lr_factor(10, 110, cfg) == 1.0
    assert lr_factor(60, 110, cfg) == pytest.approx(0.2 + 0.8 / 2, abs=1e-9)  # 0.6
    # The last step is at progress 0.99: 0.2 + 0.4 * (1 + cos(0.99 pi)) = 0.2001973758...
    last = lr_factor(109, 110, cfg)
    assert last == pytest.approx(0.2 + 0.4 * (1 - 0.9995065603657316), abs=1e-12)
    assert 0.2 < last < 0.2 + 1e-3
    values = factors(cfg, 110, range(10, 110))
    assert all(a > b for a, b in pairwise(values))


def test_cosine_ignores_wsd_only_settings():
    plain = ScheduleConfig(kind="cosine", warmup_steps=5)
    tweaked = ScheduleConfig(kind="cosine", warmup_steps=5, decay_fraction=0.9, decay_shape="sqrt")
    assert factors(plain, 50, range(50)) == factors(tweaked, 50, range(50))


def test_constant_is_peak_after_warmup_regardless_of_floor():
    cfg = ScheduleConfig(kind="constant", warmup_steps=5, min_lr_ratio=0.5, decay_fraction=0.5)
    assert factors(cfg, 50, range(5, 50)) == [1.0] * 45


# --- build_optimizer and set_lr ----------------------------------------------------------------

@pytest.fixture
def model() -> Llama:
    torch.manual_seed(0)
    return Llama(get_size("debug"))


def test_matrices_decay_and_norm_weights_do_not(model):
    opt = build_optimizer(model, OptimConfig(weight_decay=0.05))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.05
    assert no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"])
    assert all(p.ndim == 1 for p in no_decay["params"])
    names = {id(p): name for name, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert no_decay_names and all(name.endswith("norm.weight") for name in no_decay_names)
    # debug has 2 layers: 2 norms per block plus the final norm.
    assert len(no_decay_names) == 2 * 2 + 1
    decay_names = {names[id(p)] for p in decay["params"]}
    assert {"tok_embeddings.weight", "output.weight", "layers.0.attention.wq.weight"} <= decay_names


def test_every_parameter_is_in_exactly_one_group(model):
    opt = build_optimizer(model, OptimConfig())
    grouped = [id(p) for group in opt.param_groups for p in group["params"]]
    assert len(grouped) == len(set(grouped))
    assert set(grouped) == {id(p) for p in model.parameters()}
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == sum(
        p.numel() for p in model.parameters())


def test_frozen_parameters_are_left_out(model):
    model.tok_embeddings.weight.requires_grad_(False)
    opt = build_optimizer(model, OptimConfig())
    grouped = {id(p) for group in opt.param_groups for p in group["params"]}
    assert id(model.tok_embeddings.weight) not in grouped
    assert len(grouped) == sum(1 for p in model.parameters() if p.requires_grad)


def test_adamw_hyperparameters_are_passed_through(model):
    opt = build_optimizer(model, OptimConfig(lr=1.5e-3, betas=(0.8, 0.99), eps=1e-6))
    assert isinstance(opt, torch.optim.AdamW)
    for group in opt.param_groups:
        assert group["lr"] == 1.5e-3
        assert group["betas"] == (0.8, 0.99)
        assert group["eps"] == 1e-6


def test_set_lr_sets_every_group(model):
    opt = build_optimizer(model, OptimConfig(lr=1e-3))
    set_lr(opt, 3e-4 * lr_factor(0, 10, ScheduleConfig(warmup_steps=4)))
    assert [group["lr"] for group in opt.param_groups] == [7.5e-5, 7.5e-5]


# --- clip_grad_norm ----------------------------------------------------------------------------

def fill_grads(model: torch.nn.Module, skip: str = "norm.weight") -> dict[str, torch.Tensor]:
    """Random grads on every parameter except the final norm's; returns copies by name."""
    gen = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        p.grad = None if name == skip else torch.randn(p.shape, generator=gen)
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def global_norm(grads) -> float:
    return math.sqrt(sum(float(g.double().square().sum()) for g in grads))


def test_clip_returns_pre_clip_norm_and_scales_grads_down_to_max(model):
    before = fill_grads(model)
    norm_by_hand = global_norm(before.values())
    assert norm_by_hand > 10  # ~sqrt(#elements): clipping to 1.0 really scales
    returned = float(clip_grad_norm(model, 1.0))
    assert returned == pytest.approx(norm_by_hand, rel=1e-5)
    after = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert global_norm(after.values()) <= 1.0 + 1e-6
    assert global_norm(after.values()) == pytest.approx(1.0, rel=1e-4)
    scale = 1.0 / norm_by_hand  # every grad is scaled by the same factor: direction is kept
    for name, grad in after.items():
        torch.testing.assert_close(grad, before[name] * scale, rtol=1e-4, atol=1e-7)
    assert model.norm.weight.grad is None


def test_clip_with_zero_max_norm_only_measures(model):
    before = fill_grads(model)
    assert float(clip_grad_norm(model, 0.0)) == pytest.approx(global_norm(before.values()), rel=1e-5)
    for name, p in model.named_parameters():
        if name in before:
            assert torch.equal(p.grad, before[name])


def test_clip_below_max_norm_leaves_grads_unchanged(model):
    before = fill_grads(model)
    norm = float(clip_grad_norm(model, 1e9))
    assert norm == pytest.approx(global_norm(before.values()), rel=1e-5)
    for name, p in model.named_parameters():
        if name in before:
            torch.testing.assert_close(p.grad, before[name], rtol=1e-6, atol=0)
