"""DiLoCo: islands train alone for H inner steps, then average pseudo-gradients and take an
outer Nesterov step (Douillard et al. 2023, "DiLoCo: Distributed Low-Communication Training of
Language Models", arXiv:2311.08105; INTELLECT-1 used H=100, outer lr 0.7, momentum 0.9).

The outer weights and the outer momentum live in fp32 CPU memory as flat buffers over this
process's local shard, so DiLoCo costs no accelerator memory. The pseudo-gradient is
outer − inner; it is averaged across islands in per-layer buckets by `GlobalMean` (the encoded
ring over this local rank's global groups, bit-identical on every island);
`torch.optim.SGD(nesterov=True)` steps the flat outer buffer; the result overwrites the inner
weights. The inner optimizer's state is kept across outer steps.

Also here: `average_gradients`, the data-parallel baseline that averages every step's gradients
across islands over the same groups.

The outer step comes in three parts so that the caller (`atoll.sync`) can make it elastic:
`average` (pseudo-gradient, recomputed from scratch on every attempt, then averaged),
`agreement_digest` (what the islands compare before anyone applies) and `apply` (the Nesterov
step and the copy into the inner weights).

Failure semantics: a failed collective raises out of `average` before the outer weights or the
model change; the pseudo-gradient buffer is then undefined, and the next `average` recomputes
it (the inner weights have not changed), so an attempt can be redone among the survivors.
Nothing is applied before the caller knows every island averaged the same values.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.stateful import Stateful

from atoll.comm.allreduce import GlobalMean
from atoll.digest import tensor_digest

_LAYER = re.compile(r"^(layers\.\d+)\.")


def local_shard(param: torch.Tensor) -> torch.Tensor:
    """This process's part of a parameter (the DTensor's local shard under FSDP2, else itself)."""
    return param.to_local() if hasattr(param, "to_local") else param


def layer_buckets(names: list[str], sizes: list[int]) -> list[slice]:
    """Slices of the flat buffer, one per transformer block (and one per other top-level module).

    `names` and `sizes` are in buffer order; parameters of one block are contiguous in it.
    """
    buckets: list[slice] = []
    start, key = 0, None
    offset = 0
    for name, size in zip(names, sizes):
        match = _LAYER.match(name)
        this_key = match.group(1) if match else name.split(".")[0]
        if key is not None and this_key != key:
            buckets.append(slice(start, offset))
            start = offset
        key = this_key
        offset += size
    if offset > start:
        buckets.append(slice(start, offset))
    return buckets


class DiLoCo(Stateful):
    """Outer weights, outer optimizer and the outer step for one local rank of one island."""

    def __init__(self, model: nn.Module, lr: float, momentum: float, nesterov: bool) -> None:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.shards = [local_shard(p) for _, p in named]
        self.sizes = [s.numel() for s in self.shards]
        self.buckets = layer_buckets(self.names, self.sizes)
        self.outer = self._gather_inner()
        self.pseudo_grad = torch.zeros_like(self.outer)
        self.outer.grad = self.pseudo_grad
        self.lr, self.momentum = lr, momentum
        self.optimizer = torch.optim.SGD(
            [self.outer], lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0
        )

    def anneal(self, weight: float) -> None:
        """Scale the outer step towards a plain average: lr 1 - (1 - lr) * weight, momentum * weight.

        weight 1 is the configured Nesterov step; weight 0 replaces the outer weights by the mean
        of the islands' inner weights (lr 1, no momentum). The momentum buffer is kept.
        """
        for group in self.optimizer.param_groups:
            group["lr"] = 1.0 - (1.0 - self.lr) * weight
            group["momentum"] = self.momentum * weight

    @torch.no_grad()
    def _gather_inner(self) -> torch.Tensor:
        """The inner weights' local shards as one flat fp32 CPU tensor."""
        return torch.cat([s.detach().reshape(-1).to("cpu", torch.float32) for s in self.shards])

    @torch.no_grad()
    def _scatter_outer(self) -> None:
        """Overwrite the inner weights with the outer weights."""
        for shard, chunk in zip(self.shards, self.outer.split(self.sizes)):
            shard.copy_(chunk.view_as(shard))

    @torch.no_grad()
    def average(self, mean: GlobalMean) -> None:
        """Recompute the pseudo-gradient (outer − inner) and average it across islands in per-layer buckets.

        Raises the collective's error (RingError) on a dead or silent peer; the buffer's contents
        are then undefined and nothing else changed.
        """
        self.pseudo_gradient()
        self.mean_pseudo_gradient(mean)

    @torch.no_grad()
    def pseudo_gradient(self) -> torch.Tensor:
        """Recompute outer − inner into the pseudo-gradient buffer and return it (the first half of `average`)."""
        torch.sub(self.outer, self._gather_inner(), out=self.pseudo_grad)
        return self.pseudo_grad

    @torch.no_grad()
    def scale_contribution(self, factor: float) -> None:
        """Multiply the pseudo-gradient buffer by `factor` before the ring (see `atoll.validation`);
        0 writes zeros, which also clears NaN and inf (0 x NaN is NaN)."""
        if factor == 0:
            self.pseudo_grad.zero_()
        elif factor != 1:
            self.pseudo_grad.mul_(factor)

    @torch.no_grad()
    def mean_pseudo_gradient(self, mean: GlobalMean) -> None:
        """Average the pseudo-gradient buffer as it is across islands (the second half of `average`);
        fails as `average` does."""
        for bucket in self.buckets:
            mean.mean_(self.pseudo_grad[bucket])

    def agreement_digest(self) -> str:
        """Digest of the outer weights and the averaged pseudo-gradient: equal on all islands iff
        applying the step leaves every island with the same outer weights."""
        return tensor_digest([("outer", self.outer), ("pseudo_grad", self.pseudo_grad)])

    @torch.no_grad()
    def apply(self) -> str:
        """The outer Nesterov step on the averaged pseudo-gradient, then outer -> inner weights.

        Returns the digest of the new outer weights (this rank's shard).
        """
        self.optimizer.step()
        self._scatter_outer()
        return tensor_digest([("outer", self.outer)])

    @torch.no_grad()
    def restore_inner(self) -> str:
        """Overwrite the inner weights with the outer weights, which stay as they are (a skipped
        outer step, or an island reset after non-finite inner steps); returns the outer digest."""
        self._scatter_outer()
        return tensor_digest([("outer", self.outer)])

    @torch.no_grad()
    def broadcast_state(self, group: dist.ProcessGroup, source: int) -> None:
        """Every member of `group` takes member `source`'s outer weights and momentum, and copies
        them into its inner weights (how a joiner catches up). Raw fp32 tensors only.

        Raises RuntimeError (gloo) on a dead or silent peer; this rank's state is then undefined
        until a later broadcast succeeds.
        """
        state = self.optimizer.state[self.outer]
        has_momentum = torch.tensor([int("momentum_buffer" in state)], dtype=torch.int64)
        group.broadcast(has_momentum, source).wait()
        tensors = [self.outer]
        if has_momentum.item():
            state.setdefault("momentum_buffer", torch.zeros_like(self.outer))
            tensors.append(state["momentum_buffer"])
        else:
            state.pop("momentum_buffer", None)
        for tensor in tensors:
            group.broadcast(tensor, source).wait()
        self._scatter_outer()

    def state_dict(self) -> dict[str, Any]:
        return {"outer": self.outer.detach().clone(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        with torch.no_grad():
            self.outer.copy_(state_dict["outer"])
        self.optimizer.load_state_dict(state_dict["optimizer"])


@torch.no_grad()
def average_gradients(model: nn.Module, mean: GlobalMean) -> None:
    """Data-parallel baseline: replace every local gradient shard by its mean across islands."""
    named = [(n, local_shard(p.grad)) for n, p in model.named_parameters() if p.grad is not None]
    grads = [g for _, g in named]
    sizes = [g.numel() for g in grads]
    flat = torch.cat([g.reshape(-1).to("cpu", torch.float32) for g in grads])
    for bucket in layer_buckets([n for n, _ in named], sizes):
        mean.mean_(flat[bucket])
    for grad, chunk in zip(grads, flat.split(sizes)):
        grad.copy_(chunk.view_as(grad))
