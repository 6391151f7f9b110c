"""Digests of model weights: how processes and islands prove they hold identical tensors.

A digest is sha256 over a header per tensor (name, dtype, shape) and the XXH3-128 digests of the
tensor's pieces. Why not sha256 over the bytes: without SHA extensions this CPU hashes 0.2 GB/s
per core (it would cost tens of seconds per outer step at 10B), XXH3 hashes 6.5 GB/s per core
from the tensor's own memory (no copy). Pieces are hashed on a thread pool (xxhash releases the
GIL): 1.6x on 2 idle cores, where the pass becomes memory-bound. The order pieces finish in
changes nothing: their digests enter sha256 in piece order. These digests detect *accidental*
divergence between processes that run the same code (a bug, nondeterminism, a bad transfer): a 128-bit hash with
full avalanche makes an accidental collision a 2^-128 event. They are not a defence against a
malicious island, which could report any digest it likes; authenticity is the run token's job.

- `tensor_digest`: tensors hashed whole, in PIECE_BYTES pieces (e.g. an outer-weight buffer);
  `piece_digests` and `combine` are its two halves, for a caller that keeps the piece digests of
  a buffer it has not written since (`DiLoCo`'s outer weights).
- `model_digest`: the full model's digest from each rank's shards without gathering them: every
  row (slice along dim 0) is one piece, so the digest does not depend on how rows are sharded;
  the ranks exchange only the 16-byte row digests.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch
import torch.distributed as dist
import xxhash
from torch import nn
from torch.distributed.tensor import DTensor

from atoll.island import local_rows

PIECE_BYTES = 2**22
"""Bytes per XXH3-128 piece in tensor_digest (a device tensor is copied to the host one piece at a time)."""
ROW_DIGEST_BYTES = 16


def digest_to_tensor(digest: str) -> torch.Tensor:
    """A hex digest as a uint8 tensor, for exchanging digests over a process group."""
    return torch.frombuffer(bytearray.fromhex(digest), dtype=torch.uint8)


def tensor_to_digest(tensor: torch.Tensor) -> str:
    """The inverse of digest_to_tensor."""
    return bytes(tensor.cpu().tolist()).hex()


def _bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor, without a copy."""
    return memoryview(tensor.view(torch.uint8).numpy()).cast("B")


def _header(name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> bytes:
    return f"{name}|{tensor.dtype}|{shape}|".encode()


def _hash_piece(piece: torch.Tensor) -> bytes:
    """XXH3-128 of one contiguous piece (a device piece is copied to the host first)."""
    return xxhash.xxh3_128_digest(_bytes(piece.cpu() if piece.device.type != "cpu" else piece))


_POOL: ThreadPoolExecutor | None = None


def _forget_pool() -> None:
    global _POOL
    _POOL = None


# a forked child inherits the pool object but not its threads: work submitted to it would never run
os.register_at_fork(after_in_child=_forget_pool)


def _hash_pool() -> ThreadPoolExecutor:
    """The process's hashing threads, as many as torch's intra-op threads (xxhash releases the GIL)."""
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max(1, torch.get_num_threads()), thread_name_prefix="atoll-digest")
    return _POOL


def piece_digests(tensor: torch.Tensor) -> list[bytes]:
    """The XXH3-128 digest of every piece of `tensor` (flattened), in order; CPU pieces on the hash pool."""
    t = tensor.detach().reshape(-1)  # a copy only if the tensor is not contiguous
    if t.numel() == 1 and t.stride(0) != 1:  # one value sliced with a step: contiguous, yet no byte view
        t = t.clone(memory_format=torch.contiguous_format)
    step = max(1, PIECE_BYTES // t.element_size())
    pieces = [t[start : start + step] for start in range(0, t.numel(), step)]
    if t.device.type != "cpu" or len(pieces) <= 1:
        return [_hash_piece(piece) for piece in pieces]
    futures: list[Future[bytes]] = [_hash_pool().submit(_hash_piece, piece) for piece in pieces]
    return [future.result() for future in futures]


def combine(parts: Iterable[tuple[str, torch.Tensor, Sequence[bytes]]]) -> str:
    """The digest of (name, tensor, its `piece_digests`) in order: what `tensor_digest` returns for (name, tensor)."""
    h = hashlib.sha256()
    for name, tensor, pieces in parts:
        h.update(_header(name, tensor, (tensor.numel(),)))
        for piece in pieces:
            h.update(piece)
    return h.hexdigest()


def tensor_digest(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """Digest of (name, dtype, shape, values) of each tensor, in the order given (the shape hashed
    is the flat one: the values' count).

    CPU tensors are hashed in place, on the hash pool; others are copied to the host PIECE_BYTES at a time.
    """
    return combine((name, tensor, piece_digests(tensor)) for name, tensor in tensors)


def _row_digests(local: torch.Tensor) -> torch.Tensor:
    """XXH3-128 of each row of a (CPU copy of a) shard: uint8 [rows, 16]."""
    host = local.detach().cpu().contiguous()
    rows = host.shape[0] if host.dim() else 1
    raw = _bytes(host.reshape(rows, -1))
    row_bytes = len(raw) // rows if rows else 0
    out = bytearray(rows * ROW_DIGEST_BYTES)
    for i in range(rows):
        out[i * ROW_DIGEST_BYTES : (i + 1) * ROW_DIGEST_BYTES] = xxhash.xxh3_128_digest(raw[i * row_bytes : (i + 1) * row_bytes])
    return torch.frombuffer(out, dtype=torch.uint8).view(rows, ROW_DIGEST_BYTES) if rows else torch.empty(0, ROW_DIGEST_BYTES, dtype=torch.uint8)


@torch.no_grad()
def model_digest(model: nn.Module) -> str:
    """Digest of the full model's parameters (state_dict order), the same on every rank and for
    any number of ranks, computed from this rank's shards.

    Under FSDP2 it is a collective over each parameter's mesh: every rank must call it. Host
    memory is one shard of one parameter (copied from the device) plus its row digests.
    """
    h = hashlib.sha256()
    for name, param in model.named_parameters():
        local = local_rows(param)[0]
        digests = _row_digests(local)
        if isinstance(param, DTensor) and any(p.is_shard() for p in param.placements):
            digests = _gather_rows(param, digests)
        h.update(_header(name, local, tuple(param.shape)))
        h.update(_bytes(digests.contiguous()))
    return h.hexdigest()


def _gather_rows(param: DTensor, digests: torch.Tensor) -> torch.Tensor:
    """Every rank's row digests of a dim-0 sharded parameter, in row order."""
    mesh = param.device_mesh
    world = mesh.size()
    per_rank = -(-param.shape[0] // world)
    device = param.to_local().device
    padded = torch.zeros(per_rank, ROW_DIGEST_BYTES, dtype=torch.uint8, device=device)
    padded[: digests.shape[0]] = digests.to(device)
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded, group=mesh.get_group())
    return torch.cat(gathered)[: param.shape[0]].cpu()
