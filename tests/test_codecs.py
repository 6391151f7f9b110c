"""Codecs: exact sizes, round trips within each format's precision, and the 8-bit comparison."""

from __future__ import annotations

import math

import pytest
import torch

from atoll.comm.codecs import CODECS, INT8_BLOCK, Int8Codec, get_codec
from atoll.config import CommConfig

LENGTHS = [0, 1, 7, 63, 64, 65, 1009]
MEASURE_NUMEL = 1 << 20


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def round_trip(name: str, values: torch.Tensor) -> torch.Tensor:
    codec = get_codec(name)
    return codec.decode(codec.encode(values), values.numel())


def gaussian(numel: int = MEASURE_NUMEL, seed: int = 0) -> torch.Tensor:
    return torch.randn(numel, generator=torch.Generator().manual_seed(seed))


def student_t3(numel: int = MEASURE_NUMEL, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.distributions.StudentT(3.0).sample((numel,))


def laplace_with_spikes(numel: int = MEASURE_NUMEL, seed: int = 0) -> torch.Tensor:
    """Laplace values with one in 10^4 replaced by a +-50 sigma spike."""
    torch.manual_seed(seed)
    values = torch.distributions.Laplace(0.0, 1.0).sample((numel,))
    spikes = torch.randint(0, numel, (numel // 10_000,))
    values[spikes] = 50 * values.std() * torch.sign(torch.randn(len(spikes)))
    return values


@pytest.mark.parametrize("numel", LENGTHS)
@pytest.mark.parametrize("name", list(CODECS))
def test_encoded_size_is_fixed_by_numel_and_decode_restores_the_length(name, numel):
    expected = {
        "fp32": 4 * numel,
        "bf16": 2 * numel,
        "fp16": 2 * numel,
        "int8": numel + 2 * math.ceil(numel / INT8_BLOCK),
        "codebook8": numel + 256 * 4,
    }[name]
    codec = get_codec(name)
    payload = codec.encode(gaussian(numel))
    assert codec.encoded_size(numel) == expected
    assert payload.dtype == torch.uint8 and payload.shape == (expected,)
    decoded = codec.decode(payload, numel)
    assert decoded.dtype == torch.float32 and decoded.shape == (numel,)


@pytest.mark.parametrize("name", list(CODECS))
def test_decode_into_a_buffer_writes_the_bits_decode_returns(name):
    codec = get_codec(name)
    numel = 3 * Int8Codec.SPAN_BLOCKS * INT8_BLOCK + 37  # on the int8 pool, with a partial block
    values = laplace_with_spikes(numel)
    values[5], values[numel - 1] = float("nan"), float("inf")
    payload = codec.encode(values)
    out = torch.full((numel,), 7.0)
    codec.decode_into(payload, out)
    assert torch.equal(out.view(torch.int32), codec.decode(payload, numel).view(torch.int32))


def test_fp32_round_trip_is_exact_including_non_finite_values():
    values = torch.cat([gaussian(1009), torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-40, 3e38])])
    decoded = round_trip("fp32", values)
    assert torch.equal(decoded.view(torch.int32), values.view(torch.int32))
    nan = round_trip("fp32", torch.tensor([float("nan")]))
    assert nan.isnan().all()


def test_encode_returns_bytes_independent_of_the_input():
    values = gaussian(100)
    for codec in CODECS.values():
        payload = codec.encode(values)
        before = payload.clone()
        values.add_(1.0)
        assert torch.equal(payload, before), codec.name


@pytest.mark.parametrize("name, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_half_codecs_round_to_nearest_within_half_an_ulp(name, dtype):
    # within fp16's normal range (6.1e-5 .. 65504) both formats err by at most eps/2 relative
    epsilon = torch.finfo(dtype).eps
    values = gaussian() * 100
    values = values[(values.abs() > 1e-3) & (values.abs() < 6e4)]
    decoded = round_trip(name, values)
    assert torch.equal(decoded, values.to(dtype).float())
    assert ((decoded - values).abs() <= values.abs() * epsilon / 2).all()


def test_int8_error_is_at_most_half_a_step_of_each_block():
    values = student_t3(64 * 1000 + 17)
    decoded = round_trip("int8", values)
    padded = torch.cat([values, values.new_zeros(-values.numel() % INT8_BLOCK)]).view(-1, INT8_BLOCK)
    step = padded.abs().amax(1) / 127
    error = torch.cat([decoded - values, values.new_zeros(padded.numel() - values.numel())]).view(-1, INT8_BLOCK)
    # the bf16 scale may round up by up to 2^-7 (one ulp): the step grows by at most that
    assert (error.abs() <= (step * (1 + 2**-7) / 2)[:, None]).all()


def test_codebook8_error_inside_three_sigma_is_at_most_one_bin():
    values = gaussian()
    decoded = round_trip("codebook8", values)
    sigma = values.std(correction=0)
    width = 6 * sigma / 256
    # 256 bins centred on mean + k * width, k in [-128, 127]: the edge bins also hold the outliers
    inside = (values - values.mean()).abs() < 3 * sigma - 2 * width
    assert ((decoded - values).abs()[inside] <= width).all()


@pytest.mark.parametrize(
    "distribution, int8_bound, codebook8_floor",
    [(gaussian, 0.0065, 0.015), (student_t3, 0.012, 0.2), (laplace_with_spikes, 0.012, 0.2)],
)
def test_int8_beats_codebook8_on_gaussian_and_heavy_tailed_values(distribution, int8_bound, codebook8_floor):
    values = distribution()
    int8 = relative_error(round_trip("int8", values), values)
    codebook8 = relative_error(round_trip("codebook8", values), values)
    assert int8 <= int8_bound
    assert codebook8 >= codebook8_floor
    assert int8 < codebook8


def test_int8_is_the_configured_default():
    assert CommConfig().codec == "int8"


def test_int8_keeps_relative_precision_for_tiny_pseudo_gradients():
    # bf16 scales span fp32's range: 1e-7-sized values quantize as well as unit-sized ones
    values = gaussian()
    assert relative_error(round_trip("int8", values * 1e-7), values * 1e-7) == pytest.approx(
        relative_error(round_trip("int8", values), values), rel=0.02
    )


def test_zero_and_constant_tensors_survive_8_bit_codecs():
    assert torch.equal(round_trip("int8", torch.zeros(130)), torch.zeros(130))
    assert torch.equal(round_trip("codebook8", torch.full((130,), 3.25)), torch.full((130,), 3.25))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values_decode_as_nan_in_8_bit_codecs(bad):
    values = gaussian(3 * INT8_BLOCK)
    values[5] = bad
    int8 = round_trip("int8", values)
    assert int8[:INT8_BLOCK].isnan().all()  # the block that held it
    assert int8[INT8_BLOCK:].isfinite().all()  # the others are untouched
    assert round_trip("codebook8", values).isnan().all()


def test_wrong_payload_or_name_is_refused_in_one_line():
    codec = get_codec("int8")
    with pytest.raises(ValueError, match="must be 71 uint8 bytes"):
        codec.decode(torch.zeros(68, dtype=torch.uint8), 67)
    with pytest.raises(ValueError, match="contiguous 1-D fp32"):
        codec.encode(torch.zeros(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="choose one of fp32, bf16, fp16, int8, codebook8"):
        get_codec("int4")


def test_int8_spans_on_the_thread_pool_give_the_bits_of_one_span():
    values = torch.randn(3 * Int8Codec.SPAN_BLOCKS * INT8_BLOCK + 100, generator=torch.Generator().manual_seed(1))
    values[5 * INT8_BLOCK : 6 * INT8_BLOCK] = 0.0  # an all-zero block in the first span
    one_span = Int8Codec()
    one_span.SPAN_BLOCKS = 10**9
    payload = Int8Codec().encode(values)
    assert torch.equal(payload, one_span.encode(values))
    assert torch.equal(Int8Codec().decode(payload, values.numel()), one_span.decode(payload, values.numel()))


def reference_int8_encode(values: torch.Tensor) -> torch.Tensor:
    """The int8 payload as first specified, in one span: the bits every faster recipe must keep."""
    blocks = -(-values.numel() // INT8_BLOCK)
    padded = torch.cat([values, values.new_zeros(blocks * INT8_BLOCK - values.numel())]).view(blocks, INT8_BLOCK)
    # padding with zeros changes no absmax; the pad's codes are cut off below
    absmax = torch.maximum(padded.amax(1), padded.amin(1).neg())
    scale = (absmax * ((1 + 2**-8) / 127)).to(torch.bfloat16)
    inverse = torch.where(scale > 0, scale.float().reciprocal(), 0.0)
    codes = torch.mul(padded, inverse[:, None]).round_().to(torch.int8).view(-1)[: values.numel()]
    return torch.cat([scale.view(torch.uint8), codes.view(torch.uint8)])


def test_int8_payload_and_decoded_bits_equal_the_reference_recipe():
    numel = 2 * Int8Codec.SPAN_BLOCKS * INT8_BLOCK + 3 * INT8_BLOCK + 37  # several spans, a partial last block
    values = torch.randn(numel, generator=torch.Generator().manual_seed(2))
    values[INT8_BLOCK : 2 * INT8_BLOCK] = 0.0  # an all-zero block
    values[5 * INT8_BLOCK + 3] = float("nan")
    values[7 * INT8_BLOCK + 1] = float("-inf")
    values[9 * INT8_BLOCK : 10 * INT8_BLOCK] *= 1e-38  # subnormal bf16 scales
    values[-37:] = 0.0  # the partial last block is all zero
    codec = Int8Codec()
    for length in (numel, numel - 37, 1, 63, 65):
        payload = codec.encode(values[:length].contiguous())
        assert torch.equal(payload, reference_int8_encode(values[:length])), length
        scales = payload[: 2 * -(-length // INT8_BLOCK)].view(torch.bfloat16).float()
        codes = payload[scales.numel() * 2 :].view(torch.int8).float()
        want = torch.cat([codes, codes.new_zeros(scales.numel() * INT8_BLOCK - length)]).view(-1, INT8_BLOCK).mul(scales[:, None])
        assert torch.equal(codec.decode(payload, length).view(torch.int32), want.view(-1)[:length].view(torch.int32)), length
