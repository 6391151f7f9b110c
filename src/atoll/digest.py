"""Digests of model weights: how processes and islands prove they hold identical tensors."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch


def digest_to_tensor(digest: str) -> torch.Tensor:
    """A hex digest as a uint8 tensor, for exchanging digests over a process group."""
    return torch.frombuffer(bytearray.fromhex(digest), dtype=torch.uint8)


def tensor_to_digest(tensor: torch.Tensor) -> str:
    """The inverse of digest_to_tensor."""
    return bytes(tensor.cpu().tolist()).hex()


def tensor_digest(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over (name, dtype, shape, raw bytes) of each tensor, in the order given."""
    h = hashlib.sha256()
    for name, tensor in tensors:
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
