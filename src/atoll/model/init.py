"""Sharding-independent random initialisation: each rank fills only its own shard, in place.

A parameter's values, read flat in row-major order, are cut into chunks of INIT_CHUNK elements;
chunk k of the parameter called `name` is drawn from its own CPU generator seeded with
sha256(seed | name | k). A rank draws only the chunks that overlap its rows (at most two more
than it keeps), so start-up memory is O(shard) and the full weights are the same for any number
of local ranks, on any device (values are drawn on CPU, then copied to the shard's device).
"""

from __future__ import annotations

import hashlib

import torch

from atoll.island import local_rows

INIT_CHUNK = 2**20
"""Elements per independently seeded draw (4 MiB of fp32): the extra work per rank is at most
two of these per parameter, and the host buffer is one of them."""


def _generator(seed: int, name: str, chunk: int) -> torch.Generator:
    key = hashlib.sha256(f"{seed}|{name}|{chunk}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(key[:8], "little") >> 1)


@torch.no_grad()
def normal_shard_(param: torch.Tensor, std: float, seed: int, name: str) -> None:
    """Fill this rank's shard of `param` with its rows of the normal(0, std) tensor fixed by (seed, name)."""
    local, first_row = local_rows(param)
    if local.numel() == 0:
        return
    flat = local.view(-1)  # FSDP2 shards and plain parameters are contiguous
    row_size = local[0].numel() if local.dim() > 1 else 1
    begin = first_row * row_size
    end = begin + flat.numel()
    total = param.numel()
    for chunk in range(begin // INIT_CHUNK, (end - 1) // INIT_CHUNK + 1):
        lo, hi = chunk * INIT_CHUNK, min((chunk + 1) * INIT_CHUNK, total)
        values = torch.empty(hi - lo).normal_(0.0, std, generator=_generator(seed, name, chunk))
        take_lo, take_hi = max(lo, begin), min(hi, end)
        flat[take_lo - begin : take_hi - begin].copy_(values[take_lo - lo : take_hi - lo])


@torch.no_grad()
def fill_shard_(param: torch.Tensor, value: float) -> None:
    """Set this rank's shard of `param` to `value`."""
    local_rows(param)[0].fill_(value)
