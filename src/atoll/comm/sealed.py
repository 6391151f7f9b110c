"""Authenticated all-gather and broadcast on an epoch's global group: what crosses islands besides
the ring (the validation statistics, the progress table on entering an epoch, state broadcasts).

The group's connections come from a rendezvous that anyone who reaches the store can rewrite
(`atoll.mesh.groups`), so a man in the middle may sit on them. As in the ring (`atoll.comm.ring`),
every contribution therefore carries a 32-byte HMAC-SHA256 tag under the epoch key over (what,
call, sender, world) and its bytes, checked before anything is read from it; a tampered,
injected or replayed contribution raises RingError, a failed collective like any other. The
call number (`GlobalMean.calls`, equal on every island) keeps calls of one epoch apart; the
epoch key keeps epochs apart.

A broadcast goes chunk by chunk (`chunk_bytes`), each chunk received into a scratch buffer and
checked before it is copied into place: a broadcast that fails leaves each tensor a mix of its
old values and verified ones, never a byte the source did not send.

Failure semantics: gloo's (RuntimeError on a dead peer at once, on a silent one at the group's
timeout), or RingError on a tag that does not verify; a broadcast's tensors are then partly
updated, as above. With `key` None nothing is tagged (a group used without an epoch key).
"""

from __future__ import annotations

import hashlib
import hmac

import torch
import torch.distributed as dist

from atoll.comm.ring import TAG_BYTES, RingError


def _tag(key: bytes, identity: str, data: torch.Tensor) -> bytes:
    mac = hmac.new(key, identity.encode(), hashlib.sha256)
    mac.update(memoryview(data.numpy()))
    return mac.digest()


def _check(key: bytes, identity: str, data: torch.Tensor, tag: torch.Tensor, what: str, group: dist.ProcessGroup) -> None:
    if not hmac.compare_digest(_tag(key, identity, data), tag.numpy().tobytes()):
        raise RingError(f"{what} refused (rank {group.rank()} of {group.size()}): its MAC does not verify under the epoch key")


def _bytes_of(tensor: torch.Tensor) -> torch.Tensor:
    """The bytes of a contiguous tensor, as a flat uint8 view sharing its memory."""
    if not tensor.is_contiguous():
        raise ValueError("sealed collectives move contiguous tensors")
    return tensor.view(-1).view(torch.uint8)


def all_gather(tensor: torch.Tensor, group: dist.ProcessGroup, key: bytes | None, call: int) -> list[torch.Tensor]:
    """Every member's `tensor` (same shape and dtype on all), in rank order, each row checked
    against its sender's tag. Meant for small tensors: this member's row is copied once."""
    world, rank = group.size(), group.rank()
    data = _bytes_of(tensor.detach().cpu().contiguous())
    mine = data.clone()
    if key is not None:
        tag = _tag(key, f"gather/{call}/{rank}/{world}/", data)
        mine = torch.cat([mine, torch.frombuffer(bytearray(tag), dtype=torch.uint8)])
    everyone = [torch.empty_like(mine) for _ in range(world)]
    group.allgather([everyone], [mine]).wait()
    rows = []
    for sender, row in enumerate(everyone):
        payload = row[: data.numel()]
        if key is not None:
            _check(key, f"gather/{call}/{sender}/{world}/", payload, row[data.numel():], f"the all-gathered row of rank {sender}", group)
        rows.append(payload.view(tensor.dtype).view(tensor.shape))
    return rows


def broadcast_(
    tensors: list[torch.Tensor], group: dist.ProcessGroup, source: int, key: bytes | None, call: int, chunk_bytes: int,
) -> None:
    """Member `source`'s contiguous `tensors` into every member's, in place (see the module doc)."""
    world, rank = group.size(), group.rank()
    for index, tensor in enumerate(tensors):
        flat = _bytes_of(tensor)
        scratch = torch.empty(min(chunk_bytes, flat.numel()), dtype=torch.uint8) if rank != source else None
        for chunk, start in enumerate(range(0, flat.numel(), chunk_bytes)):
            part = flat[start : start + chunk_bytes]
            received = part if scratch is None else scratch[: part.numel()]
            group.broadcast(received, source).wait()
            if key is not None:
                identity = f"broadcast/{call}/{index}/{chunk}/{source}/{world}/"
                if scratch is None:
                    tag = torch.frombuffer(bytearray(_tag(key, identity, part)), dtype=torch.uint8)
                else:
                    tag = torch.empty(TAG_BYTES, dtype=torch.uint8)
                group.broadcast(tag, source).wait()
                if scratch is not None:
                    _check(key, identity, received, tag, f"chunk {chunk} of tensor {index} broadcast by rank {source}", group)
            if scratch is not None:
                part.copy_(received)
