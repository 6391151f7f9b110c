"""Encode and decode speed of every codec next to a plain `tensor.clone()` and `copy_`, measured in one run.

    python benchmarks/codecs.py [--mib 64] [--repeats 5] [--device cpu|cuda]

The input is a Gaussian fp32 tensor of `--mib` MiB. GB/s is always the input's fp32 bytes over
the seconds taken (so encode, decode and clone are comparable). Each repeat times the clone and
then every codec's encode and decode, interleaved so machine noise spreads over all of them; the
table shows medians, the ratio to the clone (a fresh tensor, as encode and decode return: its
page faults count), the rate of a `copy_` into a preallocated tensor (the memory bandwidth, printed
for reference), `decode_into` a preallocated tensor (what the ring's all-gather and owner do), the
relative L2 error of decode(encode(x)) and the
compression ratio (fp32 bytes / payload bytes); fp32's decode is a view of the payload and shows
as such. topk (`comm.codec = "topk"`, default density and bits) is sparse: its relative error is
what it leaves for error feedback to send later (98% of the values, ~94% of a Gaussian's norm),
not a rounding error. On CPU the codecs use torch's intra-op threads
(the count is printed); `--device cuda` runs the same vectorised torch code on a GPU. This prints
figures only; it never fails on time.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from atoll.comm.codecs import CODECS, get_codec

MIB = 2**20
GB = 1e9


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64, help="size of the fp32 input in MiB")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (after one warm-up round)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    return parser.parse_args()


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of `fn` takes, its device work included."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    values = torch.randn(args.mib * MIB // 4, generator=torch.Generator().manual_seed(0)).to(device)
    numel, nbytes = values.numel(), values.numel() * 4
    codecs = {**CODECS, "topk": get_codec("topk")}
    payloads = {name: codec.encode(values) for name, codec in codecs.items()}
    reference = torch.empty_like(values)
    seconds: dict[str, list[float]] = {"clone": [], "copy_": []}
    for name in codecs:
        seconds[f"{name}.encode"], seconds[f"{name}.decode"], seconds[f"{name}.into"] = [], [], []
    for round_index in range(args.repeats + 1):  # round 0 warms up allocator and threads
        laps = {"clone": timed(values.clone, device), "copy_": timed(lambda: reference.copy_(values), device)}
        for name, codec in codecs.items():
            laps[f"{name}.encode"] = timed(lambda: codec.encode(values), device)
            laps[f"{name}.decode"] = timed(lambda: codec.decode(payloads[name], numel), device)
            laps[f"{name}.into"] = timed(lambda: codec.decode_into(payloads[name], reference), device)
        if round_index:
            for key, lap in laps.items():
                seconds[key].append(lap)

    def rate(key: str) -> float:
        return nbytes / statistics.median(seconds[key]) / GB

    clone = rate("clone")
    threads = f"{torch.get_num_threads()} intra-op threads" if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(f"{args.mib} MiB fp32 Gaussian on {device.type} ({threads}), median of {args.repeats} rounds")
    print(f"clone: {clone:.2f} GB/s, copy_ into a preallocated tensor: {rate('copy_'):.2f} GB/s")
    print(f"{'codec':<10} {'encode GB/s':>11} {'x clone':>8} {'decode GB/s':>11} {'x clone':>8} {'into GB/s':>10} {'x clone':>8} "
          f"{'rel L2 err':>10} {'ratio':>6}")
    for name, codec in codecs.items():
        encode, decode, into = rate(f"{name}.encode"), rate(f"{name}.decode"), rate(f"{name}.into")
        decoded = codec.decode(payloads[name], numel)
        # a decode that views the payload copies nothing: its rate would only time the call
        shown = f"{'view':>11} {'-':>8}" if decoded.data_ptr() == payloads[name].data_ptr() else f"{decode:>11.2f} {decode / clone:>8.2f}"
        error = ((decoded.double() - values.double()).norm() / values.double().norm()).item()
        ratio = nbytes / payloads[name].numel()
        print(f"{name:<10} {encode:>11.2f} {encode / clone:>8.2f} {shown} {into:>10.2f} {into / clone:>8.2f} {error:>10.3%} {ratio:>6.2f}")


if __name__ == "__main__":
    main()
