"""Codecs: the wire formats of values averaged across islands.

A codec turns a 1-D fp32 tensor into a self-describing uint8 payload and back: `decode` needs
only the bytes and the element count, and `encoded_size(numel)` is fixed by the element count,
so a receiver preallocates its buffers. Every codec is vectorised torch (intra-op threads on CPU;
int8 also runs cache-sized spans on a thread pool; the same code runs on CUDA tensors, untested
here) and deterministic: decoding the same bytes gives the same bits on every island, which the
ring relies on.

- fp32: the bytes of the values (exact).
- bf16, fp16: rounded to nearest. fp16 overflows to inf past 65504 and loses precision below
  6e-5 (subnormal), both of which pseudo-gradients can reach: prefer bf16.
- int8: blockwise absmax (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization",
  arXiv:2110.02861). Blocks of 64 values; each block stores its scale absmax/127 as bf16 and 64
  int8 codes round(x/scale). 1.03 bytes per value (3.88x smaller than fp32).
- codebook8: PRIME's / hivemind's uniform 8-bit quantization: 256 uniform bins over the mean
  +-3 sigma of the whole tensor (outliers clamp to the edge bins), each bin decoded as the mean
  of the values that fell in it; the 256-entry fp32 codebook travels with the codes.

Measured relative L2 error (2^22 values, seed 0; `benchmarks/codecs.py` prints the Gaussian row):
- Gaussian:                                int8 0.60%, codebook8 1.60%
- Student-t, 3 dof:                        int8 1.11%, codebook8 32.1%
- Laplace with 1e-4 of values 50-sigma spikes: int8 1.08%, codebook8 41.3%
int8 wins on every distribution (its blocks adapt to local scale; one outlier only coarsens its
own block), so it is the default. Block size and scale dtype were measured too: blocks of 32 /
64 / 128 / 256 give 0.55 / 0.60 / 0.65 / 0.70% on Gaussian and 0.87 / 1.11 / 1.40 / 1.77% on
Student-t; 64 keeps the payload >= 3.8x smaller than fp32. A bf16 scale is as accurate as fp32
at half the bytes; an fp16 scale flushes to zero for pseudo-gradients around 1e-6 (99% error).

Non-finite values: fp32/bf16/fp16 carry them; in int8 a NaN or inf decodes its whole block as NaN,
and in codebook8 it makes the whole payload NaN (its sigma is NaN).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

INT8_BLOCK = 64
"""Values per int8 block (one bf16 scale each)."""
INT8_LEVELS = 127
"""Largest int8 code magnitude: codes are symmetric in [-127, 127]."""
INT8_SCALE_HEADROOM = 1 + 2**-8
"""Inflating the scale by half a bf16 ulp before rounding it to bf16 keeps absmax/scale below
127.5, so every code rounds into [-127, 127] without clamping."""
SCALE_BYTES = 2
CODEBOOK_BINS = 256
CODEBOOK_SIGMAS = 3.0
"""Codebook bins cover mean +- this many standard deviations of the tensor."""
CODEBOOK_BYTES = CODEBOOK_BINS * 4


class Codec(ABC):
    """Wire format: fp32 1-D tensor <-> self-describing uint8 payload of a size fixed by numel."""

    name: str

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


class Int8Codec(Codec):
    """Blockwise absmax int8. Payload: [bf16 scale per block][int8 code per value].

    Encode and decode work through the tensor in spans of SPAN_BLOCKS blocks (2 MiB of fp32) on
    a thread pool: each op of the recipe then reads and writes cache-resident data, instead of
    making ten passes over main memory, and the spans of a large tensor run on every core. Spans
    are independent, so the bits do not depend on the thread count.

    Why not a compiled kernel (torch.compile of the span, measured here): the first compile
    took 34 s in a fresh process, and inductor's code turned a NaN's code into -128 where these
    torch ops give 0, so an island with a compiler and one without would send different bytes.
    """

    name = "int8"
    SPAN_BLOCKS = 8192
    POOL_SPANS = 3
    """Fewest spans worth the pool. Below it the spans run in turn on the calling thread, each op
    on torch's intra-op threads: a ring chunk (4 MB, two spans) then decodes in 0.16-0.2 s/GB
    instead of 0.24-0.30 on the pool (measured here on 2 cores: two pool threads each opening
    an OpenMP team oversubscribe the cores); encode is the same either way."""

    def __init__(self, block: int = INT8_BLOCK) -> None:
        self.block = block

    def _blocks_of(self, numel: int) -> int:
        return -(-numel // self.block)

    def encoded_size(self, numel: int) -> int:
        return SCALE_BYTES * self._blocks_of(numel) + numel

    def _split(self, data: torch.Tensor, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
        head = SCALE_BYTES * self._blocks_of(numel)
        return data[:head].view(torch.bfloat16), data[head:].view(torch.int8)

    def _spans(self, values: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
        """(value rows, code rows, scales) of every span: 2-D views, the partial last block as its own row."""
        spans = []
        row = 0
        for rows, code_rows in zip(_blocks(values, self.block), _blocks(codes, self.block)):
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
        _run(_encode_span, self._spans(values, codes, scales), self.POOL_SPANS)
        return out

    def decode(self, data: torch.Tensor, numel: int) -> torch.Tensor:
        out = torch.empty(numel, dtype=torch.float32, device=data.device)
        self.decode_into(data, out)
        return out

    def decode_into(self, data: torch.Tensor, out: torch.Tensor) -> None:
        self._check(out)
        self._check_payload(data, out.numel())
        scales, codes = self._split(data, out.numel())
        _run(_decode_span, self._spans(out, codes, scales), self.POOL_SPANS)


def _encode_span(rows: torch.Tensor, code_rows: torch.Tensor, scales: torch.Tensor) -> None:
    # amax and amin separately: measured 2x faster than aminmax over 64-value rows on CPU
    absmax = torch.maximum(rows.amax(1), rows.amin(1).neg())
    scale = (absmax * (INT8_SCALE_HEADROOM / INT8_LEVELS)).to(torch.bfloat16)
    scales.copy_(scale)
    # an all-zero block has scale 0: its codes are 0, not 0/0
    inverse = torch.where(scale > 0, scale.float().reciprocal(), 0.0)
    code_rows.copy_(torch.mul(rows, inverse[:, None]).round_())


def _decode_span(out_rows: torch.Tensor, code_rows: torch.Tensor, scales: torch.Tensor) -> None:
    # convert, then scale in place: measured 2x faster than a mixed-dtype mul into `out`
    out_rows.copy_(code_rows).mul_(scales.float()[:, None])


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


CODECS: dict[str, Codec] = {
    codec.name: codec
    for codec in (Fp32Codec(), HalfCodec("bf16", torch.bfloat16), HalfCodec("fp16", torch.float16), Int8Codec(), Codebook8Codec())
}


def get_codec(name: str) -> Codec:
    """The codec called `name` (one of CODECS)."""
    if name not in CODECS:
        raise ValueError(f"unknown codec {name!r}: choose one of {', '.join(CODECS)}")
    return CODECS[name]
