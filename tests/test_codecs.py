"""Codecs: exact sizes, round trips within each format's precision, the 8-bit comparison, and topk's
sparse payloads (kept positions, bins, layout, non-finite and zero chunks, repeatability)."""

from __future__ import annotations

import math

import pytest
import torch

from atoll.comm.codecs import CODECS, INT4_BLOCK, INT8_BLOCK, TOPK_CHUNK, Fp4Codec, Int8Codec, TopkCodec, get_codec
from atoll.config import CommConfig

LENGTHS = [0, 1, 7, 31, 32, 33, 63, 64, 65, 1009]
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
        "int4": math.ceil(numel / 2) + 2 * math.ceil(numel / INT4_BLOCK),
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


def test_zero_and_constant_tensors_survive_8_and_4_bit_codecs():
    assert torch.equal(round_trip("int8", torch.zeros(130)), torch.zeros(130))
    assert torch.equal(round_trip("int4", torch.zeros(131)), torch.zeros(131))
    assert torch.equal(round_trip("codebook8", torch.full((130,), 3.25)), torch.full((130,), 3.25))
    # a block of one value repeated is its absmax: index 7, exact up to the bf16 scale
    assert torch.equal(round_trip("int4", torch.full((64,), -3.0)), torch.full((64,), -3.0))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values_decode_as_nan_in_8_and_4_bit_codecs(bad):
    values = gaussian(3 * INT8_BLOCK)
    values[5] = bad
    int8 = round_trip("int8", values)
    assert int8[:INT8_BLOCK].isnan().all()  # the block that held it
    assert int8[INT8_BLOCK:].isfinite().all()  # the others are untouched
    int4 = round_trip("int4", values)
    assert int4[:INT4_BLOCK].isnan().all()
    assert int4[INT4_BLOCK:].isfinite().all()
    assert round_trip("codebook8", values).isnan().all()


def test_wrong_payload_or_name_is_refused_in_one_line():
    codec = get_codec("int8")
    with pytest.raises(ValueError, match="must be 71 uint8 bytes"):
        codec.decode(torch.zeros(68, dtype=torch.uint8), 67)
    with pytest.raises(ValueError, match="contiguous 1-D fp32"):
        codec.encode(torch.zeros(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="choose one of fp32, bf16, fp16, int8, int4, codebook8, topk"):
        get_codec("int2")


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


FP4_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def reference_fp4(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(bf16 scales, signed grid index of every value, its distance to the nearest grid value),
    from the format's definition: nearest of +-FP4_GRID x absmax/6, in fp64."""
    blocks = -(-values.numel() // INT4_BLOCK)
    padded = torch.cat([values, values.new_zeros(blocks * INT4_BLOCK - values.numel())]).view(blocks, INT4_BLOCK)
    scale = (padded.abs().amax(1) / 6).to(torch.bfloat16)
    inverse = torch.where(scale > 0, scale.float().reciprocal(), 0.0)
    scaled = torch.mul(padded, inverse[:, None]).view(-1)[: values.numel()].double()
    distance = (scaled.abs()[:, None] - FP4_GRID.double()).abs()
    return scale, scaled, distance.amin(1)


def unpack_fp4(payload: torch.Tensor, numel: int) -> torch.Tensor:
    """The signed grid index of every value, read nibble by nibble as the Fp4Codec doc lays them out."""
    blocks = -(-numel // INT4_BLOCK)
    codes, index = payload[2 * blocks :], []
    for start in range(0, numel, INT4_BLOCK):
        length = min(INT4_BLOCK, numel - start)
        half = -(-length // 2)
        block = codes[start // 2 : start // 2 + half].long()
        index.extend([*(block & 15).tolist(), *(block >> 4).tolist()[: length - half]])
    return torch.tensor(index) - 8


@pytest.mark.parametrize("numel", [1, 31, 33, 2 * Fp4Codec.SPAN_BLOCKS * INT4_BLOCK + 3 * INT4_BLOCK + 17])
def test_int4_is_the_nearest_fp4_value_of_each_block_and_its_nibbles_follow_the_documented_layout(numel):
    values = student_t3(numel, seed=3)
    values[: min(numel, INT4_BLOCK)] *= 1e-30  # tiny scales (bf16 subnormals) quantize like unit ones
    codec = get_codec("int4")
    payload = codec.encode(values)
    scale, scaled, nearest = reference_fp4(values)
    blocks = scale.numel()
    assert torch.equal(payload[: 2 * blocks].view(torch.bfloat16), scale)
    index = unpack_fp4(payload, numel)
    assert index.abs().max() <= 7 and ((index == 0) | (index.sign() == scaled.sign())).all()
    chosen = FP4_GRID.double()[index.abs()]
    # nearest up to the fp32 rounding of the index map (a value within 1e-6 of a midpoint may go either way)
    assert ((scaled.abs() - chosen).abs() <= nearest + 1e-6).all()
    decoded = codec.decode(payload, numel)
    want = (index.sign() * chosen).float() * scale.float().repeat_interleave(INT4_BLOCK)[:numel]
    assert torch.equal(decoded.view(torch.int32), want.view(torch.int32))


def test_int4_ties_go_to_the_even_index_and_every_grid_value_round_trips():
    grid = torch.cat([FP4_GRID, -FP4_GRID[1:]])
    assert torch.equal(round_trip("int4", grid), grid)  # absmax 6: scale 1
    midpoints = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -2.5, -5.0])
    assert round_trip("int4", midpoints).tolist() == [6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -2.0, -4.0]


def test_int4_spans_on_the_thread_pool_give_the_bits_of_one_span_and_repeat_exactly():
    values = laplace_with_spikes(3 * Fp4Codec.SPAN_BLOCKS * INT4_BLOCK + 45)
    values[7 * INT4_BLOCK : 8 * INT4_BLOCK] = 0.0
    values[9 * INT4_BLOCK + 4], values[-3] = float("nan"), float("inf")
    one_span = Fp4Codec()
    one_span.SPAN_BLOCKS = 10**9
    payload = Fp4Codec().encode(values)
    assert torch.equal(payload, one_span.encode(values)) and torch.equal(payload, Fp4Codec().encode(values))
    decoded = Fp4Codec().decode(payload, values.numel())
    assert torch.equal(decoded.view(torch.int32), one_span.decode(payload, values.numel()).view(torch.int32))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(payload, Fp4Codec().encode(values))
        assert torch.equal(decoded.view(torch.int32), Fp4Codec().decode(payload, values.numel()).view(torch.int32))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("distribution, bounds", [(gaussian, (0.102, 0.096)), (student_t3, (0.101, 0.135)), (laplace_with_spikes, (0.101, 0.118))])
def test_int4_is_fp4_because_it_beats_uniform_4_bit_codes_on_heavy_tails(distribution, bounds):
    # the alternative measured: blockwise absmax int4 (codes -7..7, the same blocks and scales)
    values = distribution()
    rows = values.view(-1, INT4_BLOCK)
    scale = (rows.abs().amax(1, keepdim=True) / 7).to(torch.bfloat16).float()
    uniform = (rows / scale).round().clamp(-7, 7).mul(scale).view(-1)
    fp4, absmax4 = relative_error(round_trip("int4", values), values), relative_error(uniform, values)
    assert fp4 <= bounds[0] and absmax4 >= bounds[1]
    if distribution is not gaussian:  # on Gaussian values uniform codes are 0.4 points better
        assert fp4 < absmax4


# --- topk: SparseLoCo's sparse pseudo-gradients --------------------------------------------------

TOPK_LENGTHS = [0, 1, 7, TOPK_CHUNK - 1, TOPK_CHUNK, TOPK_CHUNK + 1, 3 * TOPK_CHUNK + 1009]


def topk_reference(values: torch.Tensor, density: float = 1 / 64, bits: int = 2) -> torch.Tensor:
    """decode(encode(values)) from the TopkCodec doc, chunk by chunk in fp64: keep the largest
    magnitudes, bin them evenly over [min, max] of the kept ones, decode each as its bin's mean
    magnitude (rounded to bf16) with its sign."""
    out = torch.zeros_like(values)
    keep_whole = max(1, round(density * TOPK_CHUNK))
    for start in range(0, values.numel(), TOPK_CHUNK):
        chunk = values[start : start + TOPK_CHUNK].double()
        keep = math.ceil(keep_whole * chunk.numel() / TOPK_CHUNK)
        kept = chunk.abs().argsort(descending=True, stable=True)[:keep]
        magnitude = chunk[kept].abs()
        low, high, bins = magnitude.min(), magnitude.max(), 2 ** (bits - 1)
        which = ((magnitude - low) / (high - low) * bins).nan_to_num(0.0).clamp(0, bins - 1).floor().long()
        means = torch.stack([magnitude[which == b].mean() if (which == b).any() else magnitude.new_zeros(()) for b in range(bins)])
        decoded = means.float().to(torch.bfloat16).float()[which] * torch.where(chunk[kept] < 0, -1.0, 1.0).float()
        out[start + kept] = decoded
    return out


@pytest.mark.parametrize("bits", [1, 2, 4])
@pytest.mark.parametrize("numel", TOPK_LENGTHS)
def test_topk_size_is_its_table_codes_and_12_bit_offsets_fixed_by_numel(numel, bits):
    codec = get_codec("topk", topk_bits=bits)
    whole, rest = divmod(numel, TOPK_CHUNK)
    kept = whole * 64 + math.ceil(64 * rest / TOPK_CHUNK)
    chunks = whole + (rest > 0)
    expected = 2 * 2 ** (bits - 1) * chunks + math.ceil(kept * bits / 8) + 3 * math.ceil(kept / 2)
    payload = codec.encode(gaussian(numel))
    assert codec.encoded_size(numel) == expected and payload.shape == (expected,) and payload.dtype == torch.uint8
    assert codec.decode(payload, numel).shape == (numel,)


def test_topk_at_the_defaults_is_141x_smaller_than_fp32_and_36x_smaller_than_int8():
    numel = 64 * TOPK_CHUNK
    topk = get_codec("topk").encoded_size(numel)
    assert topk == 64 * (4 + 16 + 96)  # per chunk: 2 bf16 means, 64 codes of 2 bits, 64 offsets of 12 bits
    assert 4 * numel / topk > 141 and get_codec("int8").encoded_size(numel) / topk > 36


@pytest.mark.parametrize("bits", [1, 2, 4])
@pytest.mark.parametrize("numel", [1, 7, TOPK_CHUNK + 1, 3 * TOPK_CHUNK + 1009])
def test_topk_keeps_each_chunks_largest_values_as_their_bins_mean_with_their_sign(numel, bits):
    values = student_t3(numel, seed=4)  # continuous: no ties in magnitude
    decoded = round_trip_topk(values, bits=bits)
    want = topk_reference(values, bits=bits)
    assert torch.equal(decoded != 0, want != 0)  # the same positions kept
    # the bin means are fp32 sums of up to 64 values against fp64 ones: an ulp of bf16 apart at most
    assert ((decoded - want).abs() <= want.abs() * 2**-7).all()


def round_trip_topk(values: torch.Tensor, **settings) -> torch.Tensor:
    codec = get_codec("topk", **{f"topk_{k}": v for k, v in settings.items()})
    return codec.decode(codec.encode(values), values.numel())


def test_topk_payload_repeats_exactly_across_spans_threads_and_calls():
    values = laplace_with_spikes(300 * TOPK_CHUNK + 123)
    payload = TopkCodec().encode(values)
    one_span = TopkCodec()
    one_span.SPAN_ROWS = 10**9
    assert torch.equal(payload, one_span.encode(values)) and torch.equal(payload, TopkCodec().encode(values))
    decoded = TopkCodec().decode(payload, values.numel())
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(payload, TopkCodec().encode(values))
        assert torch.equal(decoded.view(torch.int32), TopkCodec().decode(payload, values.numel()).view(torch.int32))
    finally:
        torch.set_num_threads(threads)
    out = torch.full((values.numel(),), 7.0)
    TopkCodec().decode_into(payload, out)
    assert torch.equal(out.view(torch.int32), decoded.view(torch.int32))


def test_topk_decode_add_adds_or_subtracts_only_at_the_kept_positions():
    values, base = gaussian(2 * TOPK_CHUNK + 9, seed=1), gaussian(2 * TOPK_CHUNK + 9, seed=2)
    codec = get_codec("topk")
    payload = codec.encode(values)
    out = base.clone()
    codec.decode_add_(payload, out)
    assert torch.equal(out, base + codec.decode(payload, values.numel()))
    lost = values.clone()
    codec.decode_add_(payload, lost, -1)  # what encoding `values` lost, as the all-gather's `dropped`
    assert torch.equal(lost.view(torch.int32), (values - codec.decode(payload, values.numel())).view(torch.int32))


def test_topk_zero_chunks_decode_as_zeros_and_a_sparse_chunk_keeps_all_its_non_zeros():
    values = torch.zeros(3 * TOPK_CHUNK + 10)
    assert torch.equal(round_trip_topk(values), values)
    values[TOPK_CHUNK + torch.tensor([5, 900, 4000])] = torch.tensor([1.0, -2.0, 3.0])
    decoded = round_trip_topk(values)[TOPK_CHUNK : 2 * TOPK_CHUNK]
    assert (decoded[[5, 900, 4000]] != 0).all() and decoded[900] < 0
    assert torch.equal(round_trip_topk(values)[: TOPK_CHUNK], torch.zeros(TOPK_CHUNK))


def test_topk_a_chunk_tied_at_its_threshold_keeps_exactly_its_share_and_leaves_the_other_chunks_as_alone():
    # chunk 1: ten values of magnitude 2, the rest +-0.5: its 64 kept are the ten and 54 of the tied
    values = gaussian(3 * TOPK_CHUNK, seed=3)
    tied = torch.full((TOPK_CHUNK,), 0.5) * torch.where(gaussian(TOPK_CHUNK, seed=5) < 0, -1.0, 1.0)
    tied[torch.arange(10) * 400] = torch.tensor([2.0, -2.0] * 5)
    values[TOPK_CHUNK : 2 * TOPK_CHUNK] = tied
    codec = get_codec("topk")
    payload = codec.encode(values)
    assert torch.equal(payload, codec.encode(values))  # the choice among the tied repeats
    decoded = codec.decode(payload, values.numel())
    chunk = decoded[TOPK_CHUNK : 2 * TOPK_CHUNK]
    assert int((chunk != 0).sum()) == codec.keep and (chunk[torch.arange(10) * 400] != 0).all()
    assert torch.equal(torch.sign(chunk[chunk != 0]), torch.sign(tied[chunk != 0]))
    for first in (0, 2 * TOPK_CHUNK):  # the continuous chunks are encoded as they would be on their own
        alone = values[first : first + TOPK_CHUNK]
        assert torch.equal(decoded[first : first + TOPK_CHUNK], codec.decode(codec.encode(alone), TOPK_CHUNK))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_topk_non_finite_values_make_their_chunks_kept_values_nan_and_no_others(bad):
    values = gaussian(3 * TOPK_CHUNK + 100)
    values[TOPK_CHUNK + 17] = bad
    decoded = round_trip_topk(values)
    chunk = decoded[TOPK_CHUNK : 2 * TOPK_CHUNK]
    assert chunk[17].isnan() and chunk.isnan().sum() == 64 and (chunk[~chunk.isnan()] == 0).all()
    assert decoded[:TOPK_CHUNK].isfinite().all() and decoded[2 * TOPK_CHUNK :].isfinite().all()


def test_topk_payload_with_offsets_out_of_order_or_bad_settings_is_refused_in_one_line():
    codec = get_codec("topk")
    payload = codec.encode(gaussian(TOPK_CHUNK))
    offsets = payload[4 + 16 :]
    offsets[:3] = torch.tensor([5, 0, 0], dtype=torch.uint8)  # offsets 5, 0: not rising
    with pytest.raises(ValueError, match="offsets do not rise strictly within chunks 0..0"):
        codec.decode(payload, TOPK_CHUNK)
    with pytest.raises(ValueError, match="must be 116 uint8 bytes"):
        codec.decode(payload[:-1], TOPK_CHUNK)
    with pytest.raises(ValueError, match="density must be in"):
        TopkCodec(density=0.0)
    with pytest.raises(ValueError, match="bits must be one of 1, 2, 4"):
        TopkCodec(bits=3)


def test_topk_offsets_follow_the_documented_12_bit_layout():
    values = torch.zeros(TOPK_CHUNK)
    positions = torch.arange(0, TOPK_CHUNK, 64) + 7  # 64 kept values: 7, 71, ..., 4039
    values[positions] = torch.linspace(1, 2, 64)
    payload = get_codec("topk").encode(values)
    triples = payload[4 + 16 :].long().view(-1, 3)
    first, second = triples[:, 0] | (triples[:, 1] & 15) << 8, triples[:, 1] >> 4 | triples[:, 2] << 4
    assert torch.equal(torch.stack([first, second], 1).view(-1), positions)
    codes = payload[4:20].long()
    # 2 bits each, code j of a byte at bit 2j: sign 0, bin 0 for the lower half of [1, 2], 1 above
    unpacked = torch.stack([codes >> (2 * j) & 3 for j in range(4)], 1).view(-1)
    assert torch.equal(unpacked, (torch.linspace(1, 2, 64) >= 1.5).long())
