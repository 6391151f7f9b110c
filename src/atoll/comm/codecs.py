"""Codecs: the wire formats of values averaged across islands.

A codec turns a 1-D fp32 tensor into a self-describing uint8 payload and back: `decode` needs
only the bytes and the element count, and `encoded_size(numel)` is fixed by the element count,
so a receiver preallocates its buffers. Every codec is vectorised torch (intra-op threads on CPU;
int8 and int4 also run cache-sized spans on a thread pool; the same code runs on CUDA tensors, untested
here) and deterministic: decoding the same bytes gives the same bits on every island, which the
ring relies on.

- fp32: the bytes of the values (exact).
- bf16, fp16: rounded to nearest. fp16 overflows to inf past 65504 and loses precision below
  6e-5 (subnormal), both of which pseudo-gradients can reach: prefer bf16.
- int8: blockwise absmax (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization",
  arXiv:2110.02861). Blocks of 64 values; each block stores its scale absmax/127 as bf16 and 64
  int8 codes round(x/scale). 1.03 bytes per value (3.88x smaller than fp32).
- int4: blockwise FP4 e2m1 (the element format of the OCP microscaling formats, which Streaming
  DiLoCo sends). Blocks of 32 values; each block stores its scale absmax/6 as bf16, and each
  value the nearest of 0, +-0.5, 1, 1.5, 2, 3, 4, 6 times the scale in 4 bits. 0.5625 bytes per
  value (7.11x smaller than fp32). Meant to go with error feedback (`atoll.diloco`).
- codebook8: PRIME's / hivemind's uniform 8-bit quantization: 256 uniform bins over the mean
  +-3 sigma of the whole tensor (outliers clamp to the edge bins), each bin decoded as the mean
  of the values that fell in it; the 256-entry fp32 codebook travels with the codes.

Measured relative L2 error (2^22 values, seed 0; `benchmarks/codecs.py` prints the Gaussian row):
- Gaussian:                                int8 0.60%, codebook8 1.60%, int4 10.1%
- Student-t, 3 dof:                        int8 1.11%, codebook8 32.1%, int4 10.6%
- Laplace with 1e-4 of values 50-sigma spikes: int8 1.08%, codebook8 41.3%, int4 10.0%
int8 wins on every distribution (its blocks adapt to local scale; one outlier only coarsens its
own block), so it is the default. Block size and scale dtype were measured too: blocks of 32 /
64 / 128 / 256 give 0.55 / 0.60 / 0.65 / 0.70% on Gaussian and 0.87 / 1.11 / 1.40 / 1.77% on
Student-t; 64 keeps the payload >= 3.8x smaller than fp32. A bf16 scale is as accurate as fp32
at half the bytes; an fp16 scale flushes to zero for pseudo-gradients around 1e-6 (99% error).

Which 4 bits: FP4 e2m1 against uniform absmax int4 (codes -7..7, same blocks and bf16 scales),
relative L2 error at blocks of 16 / 32 / 64:
- Gaussian:    FP4 9.4 / 10.1 / 10.6%,  uniform 8.5 / 9.7 / 10.8%
- Student-t 3: FP4 8.8 / 10.6 / 12.6%,  uniform 11.2 / 14.4 / 18.1%
- Laplace + spikes: FP4 8.7 / 10.0 / 11.6%,  uniform 9.7 / 11.8 / 14.3%
Uniform codes win on Gaussian by 0.4 points; FP4's finer steps near zero win on heavy tails by
26-36% (pseudo-gradients are heavy-tailed), so "int4" is FP4. Blocks of 32 (as MXFP4): 64 saves
5% of the bytes for 2 more points of error on Student-t. In the ring (`tests/test_ring.py`,
independent Gaussian islands) the average's error is 12.4 / 15.0 / 16.4% at 2 / 3 / 4 islands
(int8: 0.74 / 0.85 / 0.95%): every hop re-encodes a partial sum; error feedback returns it all.

Non-finite values: fp32/bf16/fp16 carry them; in int8 and int4 a NaN or inf decodes its whole block as NaN,
and in codebook8 it makes the whole payload NaN (its sigma is NaN); in topk it makes its chunk's
kept values NaN.

Sparse: topk (`TopkCodec`, SparseLoCo's recipe) keeps the largest-magnitude values of each chunk
of 4096 at 2 bits with 12-bit offsets: 141x smaller than fp32 at its default density (1/64). Its
payloads do not add up along a ring (`summable` is False), so they travel by an all-gather
(`comm/allgather.py`) and every island sums them itself.
"""

from __future__ import annotations

import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

INT8_BLOCK = 64
"""Values per int8 block (one bf16 scale each)."""
INT8_LEVELS = 127
"""Largest int8 code magnitude: codes are symmetric in [-127, 127]."""
INT4_BLOCK = 32
"""Values per int4 (FP4 e2m1) block (one bf16 scale each)."""
FP4_MAX = 6.0
"""The largest e2m1 magnitude: a block's absmax maps onto it."""
INT8_SCALE_HEADROOM = 1 + 2**-8
"""Inflating the scale by half a bf16 ulp before rounding it to bf16 keeps absmax/scale below
127.5, so every code rounds into [-127, 127] without clamping."""
SCALE_BYTES = 2
CODEBOOK_BINS = 256
CODEBOOK_SIGMAS = 3.0
"""Codebook bins cover mean +- this many standard deviations of the tensor."""
CODEBOOK_BYTES = CODEBOOK_BINS * 4
TOPK_CHUNK = 4096
"""Values per topk chunk (SparseLoCo's): offsets within it fit 12 bits."""
TOPK_DENSITY = 1 / 64
"""Default share of each chunk that topk keeps: 64 of 4096 (1.56%, inside SparseLoCo's 1-3%)."""
TOPK_BITS = 2
"""Default bits per kept value (SparseLoCo's 2): a sign and one bit of magnitude bin."""
TOPK_BIT_CHOICES = (1, 2, 4)


class Codec(ABC):
    """Wire format: fp32 1-D tensor <-> self-describing uint8 payload of a size fixed by numel."""

    name: str
    summable = True
    """True: a payload of a partial sum can be decoded, added to and re-encoded hop by hop (the ring,
    `comm/ring.py`). False: payloads only make sense whole (sparse), so every island's travels to
    every other and each island adds them up (`comm/allgather.py`)."""

    @abstractmethod
    def encoded_size(self, numel: int) -> int:
        """Bytes of the payload for `numel` values."""

    @abstractmethod
    def encode(self, values: torch.Tensor) -> torch.Tensor:
        """A new uint8 tensor of `encoded_size(values.numel())` bytes for a contiguous 1-D fp32 tensor."""

    @abstractmethod
    def decode(self, data: torch.Tensor, numel: int) -> torch.Tensor:
        """The fp32 values of a payload (may share memory with `data`)."""

    def decode_into(self, data: torch.Tensor, out: torch.Tensor) -> None:
        """Write the fp32 values of a payload into `out` (contiguous 1-D fp32), bit for bit what
        `decode` returns, without allocating `out`'s size anew."""
        out.copy_(self.decode(data, out.numel()))

    def decode_add_(self, data: torch.Tensor, out: torch.Tensor, sign: int = 1) -> None:
        """Add (sign 1) or subtract (sign -1) the fp32 values of a payload into `out` (contiguous
        1-D fp32): `out += sign x decode(data)`."""
        out.add_(self.decode(data, out.numel()), alpha=sign)

    def _check(self, values: torch.Tensor) -> None:
        if values.dtype != torch.float32 or values.dim() != 1 or not values.is_contiguous():
            raise ValueError(f"{self.name} encodes contiguous 1-D fp32 tensors, got {values.dtype} of shape {tuple(values.shape)}")

    def _check_payload(self, data: torch.Tensor, numel: int) -> None:
        expected = self.encoded_size(numel)
        if data.dtype != torch.uint8 or data.numel() != expected:
            raise ValueError(f"{self.name} payload of {numel} values must be {expected} uint8 bytes, got {data.numel()} {data.dtype}")


class Fp32Codec(Codec):
    name = "fp32"

    def encoded_size(self, numel: int) -> int:
        return 4 * numel

    def encode(self, values: torch.Tensor) -> torch.Tensor:
        self._check(values)
        return values.clone().view(torch.uint8)

    def decode(self, data: torch.Tensor, numel: int) -> torch.Tensor:
        self._check_payload(data, numel)
        return data.view(torch.float32)


class HalfCodec(Codec):
    """16-bit floats (bf16 or fp16), rounded to nearest."""

    def __init__(self, name: str, dtype: torch.dtype) -> None:
        self.name = name
        self.dtype = dtype

    def encoded_size(self, numel: int) -> int:
        return 2 * numel

    def encode(self, values: torch.Tensor) -> torch.Tensor:
        self._check(values)
        return values.to(self.dtype).view(torch.uint8)

    def decode(self, data: torch.Tensor, numel: int) -> torch.Tensor:
        self._check_payload(data, numel)
        return data.view(self.dtype).float()

    def decode_into(self, data: torch.Tensor, out: torch.Tensor) -> None:
        self._check_payload(data, out.numel())
        out.copy_(data.view(self.dtype))


def _blocks(flat: torch.Tensor, block: int) -> list[torch.Tensor]:
    """2-D views of `flat`: its whole blocks as rows, then the partial last block as one row."""
    whole = flat.numel() // block * block
    views = [flat[:whole].view(-1, block)] if whole else []
    if whole < flat.numel():
        views.append(flat[whole:].view(1, -1))
    return views


class _BlockCodec(Codec):
    """Blockwise scaled codes. Payload: [bf16 scale per block][the codes of every block in turn].

    Encode and decode work through the tensor in spans of SPAN_BLOCKS blocks (2 MiB of fp32 for
    int8) on a thread pool: each op of the recipe then reads and writes cache-resident data,
    instead of making ten passes over main memory, and the spans of a large tensor run on every
    core. Spans are independent, so the bits do not depend on the thread count.

    Why not a compiled kernel (torch.compile of the span, measured here): the first compile
    took 34 s in a fresh process, and inductor's code turned a NaN's code into -128 where these
    torch ops give 0, so an island with a compiler and one without would send different bytes.
    """

    block: int
    SPAN_BLOCKS = 8192
    POOL_SPANS = 3
    """Fewest spans worth the pool. Below it the spans run in turn on the calling thread, each op
    on torch's intra-op threads: a ring chunk (4 MB, two spans) then decodes in 0.16-0.2 s/GB
    instead of 0.24-0.30 on the pool (measured here on 2 cores: two pool threads each opening
    an OpenMP team oversubscribe the cores); encode is the same either way."""

    @abstractmethod
    def code_bytes(self, numel: int) -> int:
        """Bytes of the codes of one block of `numel` values (the last block may be partial)."""

    @abstractmethod
    def _encode_span(self, rows: torch.Tensor, code_rows: torch.Tensor, scales: torch.Tensor) -> None:
        """Write the scales and codes of value rows (one block each, all of one length)."""

    @abstractmethod
    def _decode_span(self, out_rows: torch.Tensor, code_rows: torch.Tensor, scales: torch.Tensor) -> None:
        """Write the values of code rows into `out_rows` (one block each)."""

    def _blocks_of(self, numel: int) -> int:
        return -(-numel // self.block)

    def encoded_size(self, numel: int) -> int:
        whole, rest = divmod(numel, self.block)
        return SCALE_BYTES * self._blocks_of(numel) + whole * self.code_bytes(self.block) + (self.code_bytes(rest) if rest else 0)

    def _split(self, data: torch.Tensor, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
        head = SCALE_BYTES * self._blocks_of(numel)
        return data[:head].view(torch.bfloat16), data[head:]

    def _spans(self, values: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
        """(value rows, code rows, scales) of every span: 2-D views, the partial last block as its own row."""
        whole, block_bytes = values.numel() // self.block, self.code_bytes(self.block)
        pieces = [(values[: whole * self.block].view(whole, self.block), codes[: whole * block_bytes].view(whole, block_bytes))] if whole else []
        if whole * self.block < values.numel():
            pieces.append((values[whole * self.block :].view(1, -1), codes[whole * block_bytes :].view(1, -1)))
        spans = []
        row = 0
        for rows, code_rows in pieces:
            for start in range(0, rows.shape[0], self.SPAN_BLOCKS):
                stop = start + self.SPAN_BLOCKS
                spans.append((rows[start:stop], code_rows[start:stop], scales[row + start : row + min(stop, rows.shape[0])]))
            row += rows.shape[0]
        return spans

    def encode(self, values: torch.Tensor) -> torch.Tensor:
        self._check(values)
        numel = values.numel()
        out = torch.empty(self.encoded_size(numel), dtype=torch.uint8, device=values.device)
        scales, codes = self._split(out, numel)
        _run(self._encode_span, self._spans(values, codes, scales), self.POOL_SPANS)
        return out

    def decode(self, data: torch.Tensor, numel: int) -> torch.Tensor:
        out = torch.empty(numel, dtype=torch.float32, device=data.device)
        self.decode_into(data, out)
        return out

    def decode_into(self, data: torch.Tensor, out: torch.Tensor) -> None:
        self._check(out)
        self._check_payload(data, out.numel())
        scales, codes = self._split(data, out.numel())
        _run(self._decode_span, self._spans(out, codes, scales), self.POOL_SPANS)


class Int8Codec(_BlockCodec):
    """Blockwise absmax int8: per block a bf16 scale absmax/127 and one int8 code round(x/scale) per value."""

    name = "int8"

    def __init__(self, block: int = INT8_BLOCK) -> None:
        self.block = block

    def code_bytes(self, numel: int) -> int:
        return numel

    def _encode_span(self, rows: torch.Tensor, code_rows: torch.Tensor, scales: torch.Tensor) -> None:
        # amax and amin separately: measured 2x faster than aminmax over 64-value rows on CPU
        absmax = torch.maximum(rows.amax(1), rows.amin(1).neg())
        scale = (absmax * (INT8_SCALE_HEADROOM / INT8_LEVELS)).to(torch.bfloat16)
        scales.copy_(scale)
        # an all-zero block has scale 0: its codes are 0, not 0/0
        inverse = torch.where(scale > 0, scale.float().reciprocal(), 0.0)
        code_rows.view(torch.int8).copy_(torch.mul(rows, inverse[:, None]).round_())

    def _decode_span(self, out_rows: torch.Tensor, code_rows: torch.Tensor, scales: torch.Tensor) -> None:
        # convert, then scale in place: measured 2x faster than a mixed-dtype mul into `out`
        out_rows.copy_(code_rows.view(torch.int8)).mul_(scales.float()[:, None])


class Fp4Codec(_BlockCodec):
    """Blockwise FP4 (e2m1, the element format of the OCP microscaling formats): per block of 32
    a bf16 scale absmax/6, and per value the nearest of 0, +-0.5, 1, 1.5, 2, 3, 4, 6 times it.

    A value's 4-bit code is 8 + k, k in [-7, 7] the signed index of its magnitude in that list
    (code 8 is zero). A block's bytes pair value j with value j + h (h: half the block, rounded
    up): low nibble j, high nibble j + h (0 past the end of a partial block of odd length), so
    packing and unpacking read and write two contiguous halves of a row.

    The signed index of a value y (in units of the scale) is round(y/2 + clamp(y, -2, 2) +
    clamp(y, -4, 4)/2): a piecewise-linear map (slopes 2, 1, 1/2 on |y| in [0, 2], [2, 4], [4, 6])
    that puts the grid's values on the integers and every midpoint between two of them on a
    half-integer, so it rounds to the nearest value (ties to the even index). Decoding inverts it
    from the code n = 8 + k in int8 arithmetic: 2y = 4n - clamp(n, 4, 12) - 2 clamp(n, 2, 14) - 8,
    then one conversion and one multiply by half the scale. No comparisons, `where` or
    `copysign`: on CPU they are 3-40x slower per value than torch's arithmetic (measured here).

    Speed (`benchmarks/codecs.py`, 64 MiB, 2 cores under a load average of 5-7.6 from other
    work, five runs): encode 0.77-2.40x a `clone()` (median 1.03x), decode into a buffer
    0.99-2.13x (median 1.18x); int8 in the same runs 1.33-3.63x and 4.1-10.6x. int4 is compute-bound (about twice int8's passes
    over each value: seven fp32 ones to encode) where clone is bound by page faults, so its
    ratio falls furthest when other work takes the cores.
    """

    name = "int4"

    def __init__(self, block: int = INT4_BLOCK) -> None:
        self.block = block

    def code_bytes(self, numel: int) -> int:
        return -(-numel // 2)

    def _encode_span(self, rows: torch.Tensor, code_rows: torch.Tensor, scales: torch.Tensor) -> None:
        # no headroom needed: bf16 rounding leaves absmax/scale <= 6.03, still index 7
        scale = (rows.abs().amax(1) * (1 / FP4_MAX)).to(torch.bfloat16)
        scales.copy_(scale)
        inverse = torch.where(scale > 0, scale.float().reciprocal(), 0.0)
        scaled = torch.mul(rows, inverse[:, None])
        index = scaled.clamp(-2, 2).add_(scaled, alpha=0.5).add_(scaled.clamp_(-4, 4), alpha=0.5).round_()
        half = code_rows.shape[1]
        if index.shape[1] < 2 * half:  # a partial block of odd length: its last high nibble is 0
            index = torch.cat([index, index.new_full((index.shape[0], 2 * half - index.shape[1]), -8.0)], 1)
        packed = torch.add(index[:, :half], index[:, half:], alpha=16).add_(8 + 16 * 8)
        # a NaN (or an inf: its block's scale is inf, so it is scaled by 0) becomes code 8: the block decodes as NaN anyway
        # through int32: fp32 -> uint8 measured 3-4x slower than fp32 -> int32 -> uint8
        code_rows.copy_(packed.nan_to_num_(8 + 16 * 8).to(torch.int32))

    def _decode_span(self, out_rows: torch.Tensor, code_rows: torch.Tensor, scales: torch.Tensor) -> None:
        half, numel = code_rows.shape[1], out_rows.shape[1]
        half_scale = scales.float().mul_(0.5)[:, None]
        # twice the value in int8 arithmetic (1 byte per value), then one conversion and one multiply in fp32
        for nibbles, out in ((code_rows & 15, out_rows[:, :half]), ((code_rows >> 4)[:, : numel - half], out_rows[:, half:])):
            code = nibbles.view(torch.int8)
            twice = code.mul(4).sub_(code.clamp(4, 12)).sub_(code.clamp(2, 14), alpha=2).sub_(8)
            out.copy_(twice).mul_(half_scale)


_POOL: ThreadPoolExecutor | None = None


def _forget_pool() -> None:
    global _POOL
    _POOL = None


# a forked child inherits the pool object but not its threads: work submitted to it would never run
os.register_at_fork(after_in_child=_forget_pool)


def _run(work: Callable[..., None], spans: list[tuple[torch.Tensor, ...]], pool_spans: int) -> None:
    """work(*span) for every span: inline for fewer than `pool_spans` spans (or on CUDA), else on the codec pool."""
    global _POOL
    if len(spans) < pool_spans or spans[0][0].device.type != "cpu":
        for span in spans:
            work(*span)
        return
    if _POOL is None:  # one pool per process, as wide as torch's intra-op pool
        _POOL = ThreadPoolExecutor(max(1, torch.get_num_threads()), thread_name_prefix="atoll-codec")
    for future in [_POOL.submit(work, *span) for span in spans]:
        future.result()


_SCRATCH = threading.local()


def _scratch(like: torch.Tensor) -> torch.Tensor:
    """This thread's fp32 buffer shaped as `like`, reused across calls: a fresh one per span costs
    its page faults every time (twice the topk encode, measured here)."""
    buffer = getattr(_SCRATCH, "buffer", None)
    if buffer is None or buffer.numel() < like.numel() or buffer.device != like.device:
        buffer = _SCRATCH.buffer = torch.empty(like.numel(), device=like.device)
    return buffer[: like.numel()].view_as(like)


def _largest(magnitudes: torch.Tensor, keep: int) -> torch.Tensor:
    """Positions in `magnitudes` (2-D, contiguous, >= 0) of the `keep` largest of each row, NaN
    the largest: int64 [rows, keep], rising. On CPU: each row's keep-th largest by numpy's
    introselect on values (`partition`), then the positions at or above it, already rising
    (`flatnonzero`): 2x `torch.topk` and its sort on a span here. A span where some row ties at its
    threshold (more than `keep` at or above it: a chunk of zeros) takes `argpartition`, whose
    choice among the tied is the same on every run."""
    rows, length = magnitudes.shape
    if magnitudes.device.type == "cpu":
        # non-negative floats order as their int32 bits, NaN above inf: NaN counts as the largest
        bits = magnitudes.numpy().view(np.int32)
        kth = length - keep
        chosen = np.flatnonzero(bits >= np.partition(bits, kth, axis=1)[:, kth : kth + 1])
        if chosen.size == rows * keep:  # every row has at least keep at or above its threshold: exactly keep each
            return torch.from_numpy(chosen).view(rows, keep)
        offsets = torch.from_numpy(np.sort(np.argpartition(bits, kth, axis=1)[:, kth:], 1))
    else:
        offsets = magnitudes.topk(keep, 1, sorted=False).indices.sort(1).values
    return offsets + torch.arange(rows, device=magnitudes.device)[:, None] * length  # row offsets to positions


class Codebook8Codec(Codec):
    """PRIME's uniform 8-bit codebook. Payload: [256 fp32 bin means][uint8 bin per value]."""

    name = "codebook8"

    def encoded_size(self, numel: int) -> int:
        return CODEBOOK_BYTES + numel

    def encode(self, values: torch.Tensor) -> torch.Tensor:
        self._check(values)
        numel = values.numel()
        out = torch.empty(self.encoded_size(numel), dtype=torch.uint8, device=values.device)
        codebook, codes = out[:CODEBOOK_BYTES].view(torch.float32), out[CODEBOOK_BYTES:]
        if numel == 0:
            codebook.zero_()
            return out
        mean = values.mean()
        width = values.std(correction=0) * (2 * CODEBOOK_SIGMAS / CODEBOOK_BINS)
        # a constant tensor has width 0: everything falls in the middle bin, whose mean is exact
        inverse = torch.where(width > 0, width.reciprocal(), 0.0)
        bins = (values - mean).mul_(inverse).round_().add_(CODEBOOK_BINS // 2).clamp_(0, CODEBOOK_BINS - 1)
        codes.copy_(bins)
        counts = torch.bincount(codes, minlength=CODEBOOK_BINS)
        sums = torch.bincount(codes, weights=values, minlength=CODEBOOK_BINS)
        # a NaN or inf breaks sigma and every bin with it: say so with NaN rather than decode garbage
        codebook.copy_(torch.where(width.isfinite(), sums / counts.clamp_min(1), torch.nan))
        return out

    def decode(self, data: torch.Tensor, numel: int) -> torch.Tensor:
        self._check_payload(data, numel)
        codebook = data[:CODEBOOK_BYTES].view(torch.float32)
        return torch.take(codebook, data[CODEBOOK_BYTES:].long())


class TopkCodec(Codec):
    """Sparse pseudo-gradients: per chunk of TOPK_CHUNK values, the `keep` largest in magnitude,
    each as a `bits`-bit code and a 12-bit offset within its chunk.

    The recipe is SparseLoCo's (Sarfi et al. 2025, "Communication Efficient LLM Pre-training with
    SparseLoCo", arXiv:2508.15706): chunk-wise Top-k (chunks of 4096, 1-3% kept), the kept values
    quantized to 2 bits, offsets within the chunk (12 bits for 4096), and error feedback on every
    island carrying what was not sent into the next pseudo-gradient (`comm.error_feedback`, which
    `comm.codec = "topk"` requires). Where atoll differs:
    - the quantizer: a code is a sign bit and `bits - 1` bits of magnitude bin (bins split the
      chunk's kept magnitudes [min, max] evenly), and decodes as the mean magnitude of its bin in
      its chunk (a bf16 table of 2^(bits-1) entries per chunk), so a chunk's kept magnitudes keep
      their sum bin by bin (up to the bf16 rounding of the means). SparseLoCo places its bins by
      the kept values' mean and standard deviation; both leave the rounding to error feedback.
    - the outer step: atoll keeps DiLoCo's Nesterov outer momentum and an undecayed residual, where
      SparseLoCo lets a decayed error-feedback accumulator stand in for the outer momentum.
    - chunks are runs of 4096 consecutive values of the flat bucket, whatever the shapes of the
      parameters in it (SparseLoCo chunks each parameter tensor by its shape).
    - the payloads travel by an all-gather and every island sums them itself (`comm/allgather.py`).

    Payload for numel values in C = ceil(numel / 4096) chunks (the last may be partial, keeping
    ceil(keep x length / 4096) values), K kept values in all:
    [bf16 bin table, 2^(bits-1) per chunk][K codes of `bits` bits, little-endian within a byte,
    chunk after chunk][K offsets in 12 bits, two to 3 bytes: a & 255, a >> 8 | (b & 15) << 4,
    b >> 4]; codes and offsets are zero-padded to whole bytes. Offsets rise strictly within a
    chunk; a payload whose do not is refused. The size is fixed by numel; the bytes by the values
    (ties in magnitude go the way `torch.topk` breaks them, the same on every run of one build).

    Defined cases: an empty tensor is an empty payload; a chunk of zeros decodes as zeros (its
    table is 0); a chunk with fewer non-zero values than it keeps sends some zeros, which decode as
    their bin's mean magnitude (error feedback takes that back); a NaN or inf in a chunk is kept
    (NaN counts as the largest magnitude) and makes the chunk's table NaN, so every value it kept
    decodes as NaN, and the values it did not keep as 0.

    Speed (`benchmarks/codecs.py --repeats 9`, 64 MiB, 2 cores, load 1): encode 0.70x a `clone()`
    (0.32x with `torch.topk` and a sort per span, side by side in the same minute), decode into a
    buffer 2.6x (zeros, then one scatter of the kept 1/64). Encoding runs spans of SPAN_ROWS
    chunks on the codec pool; the selection (`_largest`) is about two thirds of a span.
    """

    name = "topk"
    summable = False
    SPAN_ROWS = 256
    """Chunks encoded at a time: the magnitudes and the selection stay in cache (1M values)."""
    POOL_SPANS = 2
    """Fewest spans worth the codec pool (see _BlockCodec.POOL_SPANS)."""

    def __init__(self, density: float = TOPK_DENSITY, bits: int = TOPK_BITS) -> None:
        if not 0 < density <= 1:
            raise ValueError(f"topk density must be in (0, 1], got {density}")
        if bits not in TOPK_BIT_CHOICES:
            raise ValueError(f"topk bits must be one of {', '.join(map(str, TOPK_BIT_CHOICES))}, got {bits}")
        self.density, self.bits = density, bits
        self.keep = max(1, round(density * TOPK_CHUNK))
        """Values kept of a whole chunk."""
        self.bins = 2 ** (bits - 1)
        """Magnitude bins per chunk (1 at 1 bit: the code is the sign alone)."""

    def kept(self, length: int) -> int:
        """Values kept of a chunk of `length` values (1..TOPK_CHUNK)."""
        return -(-self.keep * length // TOPK_CHUNK)

    def _layout(self, numel: int) -> tuple[int, int, int, int]:
        """(whole chunks, length of the partial one (0: none), chunks, values kept in all)."""
        whole, rest = divmod(numel, TOPK_CHUNK)
        return whole, rest, whole + (rest > 0), whole * self.keep + (self.kept(rest) if rest else 0)

    def encoded_size(self, numel: int) -> int:
        _, _, chunks, kept = self._layout(numel)
        return SCALE_BYTES * self.bins * chunks + -(-kept * self.bits // 8) + 3 * -(-kept // 2)

    def _split(self, data: torch.Tensor, numel: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(bf16 table [chunks, bins], code bytes, offset bytes) of a payload."""
        _, _, chunks, kept = self._layout(numel)
        table_end = SCALE_BYTES * self.bins * chunks
        codes_end = table_end + -(-kept * self.bits // 8)
        return data[:table_end].view(torch.bfloat16).view(chunks, self.bins), data[table_end:codes_end], data[codes_end:]

    def _rows(self, flat: torch.Tensor) -> list[tuple[torch.Tensor, int]]:
        """(2-D view of whole chunks or of the partial one, values kept per row), in payload order, in spans."""
        whole, rest, _, _ = self._layout(flat.numel())
        pieces = []
        for start in range(0, whole, self.SPAN_ROWS):
            stop = min(whole, start + self.SPAN_ROWS)
            pieces.append((flat[start * TOPK_CHUNK : stop * TOPK_CHUNK].view(stop - start, TOPK_CHUNK), self.keep))
        if rest:
            pieces.append((flat[whole * TOPK_CHUNK :].view(1, rest), self.kept(rest)))
        return pieces

    def encode(self, values: torch.Tensor) -> torch.Tensor:
        self._check(values)
        numel = values.numel()
        out = torch.empty(self.encoded_size(numel), dtype=torch.uint8, device=values.device)
        table, code_bytes, offset_bytes = self._split(out, numel)
        _, _, _, kept = self._layout(numel)
        codes = torch.empty(kept, dtype=torch.int32, device=values.device)
        offsets = torch.empty(kept, dtype=torch.int32, device=values.device)
        spans, row, start = [], 0, 0
        for rows, keep in self._rows(values):
            count = rows.shape[0] * keep
            spans.append((rows, keep, table[row : row + rows.shape[0]], codes[start : start + count], offsets[start : start + count]))
            row, start = row + rows.shape[0], start + count
        _run(self._encode_span, spans, self.POOL_SPANS)
        if numel:
            _pack_codes(codes, self.bits, code_bytes)
            _pack_offsets(offsets, offset_bytes)
        return out

    def _encode_span(self, rows: torch.Tensor, keep: int, table: torch.Tensor, codes: torch.Tensor, offsets: torch.Tensor) -> None:
        """Write the bin tables of value rows (one chunk each) and their codes and offsets (int32, unpacked)."""
        magnitudes = torch.abs(rows, out=_scratch(rows))
        kept = _largest(magnitudes, keep)
        magnitude = torch.take(magnitudes, kept)  # 3x gather here
        negative = torch.take(rows, kept) < 0
        low, high = magnitude.amin(1, keepdim=True), magnitude.amax(1, keepdim=True)
        if self.bins > 1:
            # the share of [low, high] below each value, in bins; a chunk whose kept values are all equal (0/0) is bin 0;
            # the share is >= 0, so truncating is flooring (measured 10x faster than floor_ here)
            position = (magnitude - low).div_(high - low).mul_(self.bins).nan_to_num_(0.0)
            bins = position.clamp_(0, self.bins - 1).to(torch.int32)
        else:
            bins = torch.zeros_like(kept, dtype=torch.int32)
        means = torch.empty(rows.shape[0], self.bins, device=rows.device)
        for b in range(self.bins):  # a few bins of `keep` values: masked sums beat a scatter here
            member = bins == b
            means[:, b] = torch.where(member, magnitude, 0.0).sum(1) / member.sum(1).clamp_min(1)
        # a NaN or inf among the kept values: the chunk decodes as NaN where it kept values
        means.masked_fill_(~high.isfinite(), float("nan"))
        table.copy_(means)
        codes.view_as(bins).copy_(bins.bitwise_or_(negative.to(torch.int32) << (self.bits - 1)) if self.bits > 1 else negative)
        offsets.view_as(kept).copy_(kept % rows.shape[1])

    def decode(self, data: torch.Tensor, numel: int) -> torch.Tensor:
        out = torch.empty(numel, dtype=torch.float32, device=data.device)
        self.decode_into(data, out)
        return out

    def decode_into(self, data: torch.Tensor, out: torch.Tensor) -> None:
        out.zero_()
        self.decode_add_(data, out)

    def decode_add_(self, data: torch.Tensor, out: torch.Tensor, sign: int = 1) -> None:
        """Add (sign 1) or subtract (sign -1) the payload's values into `out` (contiguous 1-D fp32)
        at their positions, nothing elsewhere: `out += sign x decode(data)`, one add per kept value
        (the all-gather's sum; sign -1 gives what encoding `out` lost). Raises ValueError on a
        payload whose offsets do not rise within their chunks."""
        self._check(out)
        numel = out.numel()
        self._check_payload(data, numel)
        if numel == 0:
            return
        table, code_bytes, offset_bytes = self._split(data, numel)
        _, _, _, kept = self._layout(numel)
        codes = _unpack_codes(code_bytes, self.bits, kept)
        offsets = _unpack_offsets(offset_bytes, kept)
        start = row = 0
        for rows, keep in self._rows(out):
            count = rows.shape[0] * keep
            code = codes[start : start + count].view(rows.shape[0], keep)
            offset = offsets[start : start + count].view(rows.shape[0], keep)
            if not bool(((offset[:, 1:] > offset[:, :-1]).all() & (offset[:, -1] < rows.shape[1]).all()).item()):
                raise ValueError(f"topk payload of {numel} values refused: its offsets do not rise strictly within chunks {row}..{row + rows.shape[0] - 1}")
            magnitude = table[row : row + rows.shape[0]].float().gather(1, code & (self.bins - 1))
            # the sign bit: sign x (1 - 2 x bit) is +1 or -1
            rows.scatter_add_(1, offset, magnitude.mul_((code >> (self.bits - 1)).mul_(-2 * sign).add_(sign)))
            start, row = start + count, row + rows.shape[0]


def _pack_codes(codes: torch.Tensor, bits: int, out: torch.Tensor) -> None:
    """`bits`-bit codes (int32, < 2^bits) into bytes, code j of a byte at bit bits x j, zero-padded."""
    per_byte = 8 // bits
    padded = torch.cat([codes, codes.new_zeros(-codes.numel() % per_byte)]).view(-1, per_byte)
    shifts = torch.arange(0, 8, bits, dtype=torch.int32, device=codes.device)
    out.copy_((padded << shifts).sum(1))


def _unpack_codes(data: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The first `count` codes packed by `_pack_codes`, as int64."""
    shifts = torch.arange(0, 8, bits, dtype=torch.int64, device=data.device)
    return ((data.long()[:, None] >> shifts) & (2**bits - 1)).view(-1)[:count]


def _pack_offsets(offsets: torch.Tensor, out: torch.Tensor) -> None:
    """12-bit offsets (int32) two to 3 bytes: a & 255, a >> 8 | (b & 15) << 4, b >> 4 (zero-padded to even)."""
    pairs = torch.cat([offsets, offsets.new_zeros(offsets.numel() % 2)]).view(-1, 2)
    first, second = pairs[:, 0], pairs[:, 1]
    out.view(-1, 3).copy_(torch.stack([first & 255, (first >> 8) | ((second & 15) << 4), second >> 4], 1))


def _unpack_offsets(data: torch.Tensor, count: int) -> torch.Tensor:
    """The first `count` offsets packed by `_pack_offsets`, as int64."""
    triples = data.long().view(-1, 3)
    first = triples[:, 0] | ((triples[:, 1] & 15) << 8)
    second = (triples[:, 1] >> 4) | (triples[:, 2] << 4)
    return torch.stack([first, second], 1).view(-1)[:count]


CODECS: dict[str, Codec] = {
    codec.name: codec
    for codec in (Fp32Codec(), HalfCodec("bf16", torch.bfloat16), HalfCodec("fp16", torch.float16), Int8Codec(), Fp4Codec(), Codebook8Codec())
}
"""The dense codecs, whose payloads the ring sums hop by hop."""
SPARSE_CODECS = ("topk",)
"""Codecs built from their settings (`get_codec`), whose payloads travel by all-gather."""


def get_codec(name: str, topk_density: float = TOPK_DENSITY, topk_bits: int = TOPK_BITS) -> Codec:
    """The codec called `name` (one of CODECS or SPARSE_CODECS); topk takes its density and bits
    (`comm.topk_density`, `comm.topk_bits`), the others ignore them."""
    if name == TopkCodec.name:
        return TopkCodec(topk_density, topk_bits)
    if name not in CODECS:
        raise ValueError(f"unknown codec {name!r}: choose one of {', '.join([*CODECS, *SPARSE_CODECS])}")
    return CODECS[name]
