"""DiLoCo: islands train alone for H inner steps, then average pseudo-gradients and take an
outer Nesterov step (Douillard et al. 2023, "DiLoCo: Distributed Low-Communication Training of
Language Models", arXiv:2311.08105; INTELLECT-1 used H=100, outer lr 0.7, momentum 0.9).

The outer weights and the outer momentum live in fp32 CPU memory as flat buffers over this
process's local shard, so DiLoCo costs no accelerator memory. The pseudo-gradient is
outer − inner, less the inner AdamW's weight decay, which the outer step applies once itself
(`set_weight_kept`: momentum would otherwise multiply it); it is averaged across islands in per-layer buckets by `GlobalMean` (the encoded
ring over this local rank's global groups, bit-identical on every island);
`torch.optim.SGD(nesterov=True)` holds the outer step's settings and momentum, and its update is
applied bucket by bucket; the result overwrites the inner weights. Host memory per rank is the
three flat buffers (outer weights, pseudo-gradient, momentum: 12 bytes per parameter of the shard)
plus bucket-sized temporaries; nothing full-size is made on the way. The inner optimizer's state is kept across outer steps.

Error feedback (`comm.error_feedback`; Seide et al. 2014, "1-bit SGD", and Karimireddy et al.
2019, "Error Feedback Fixes SignSGD", arXiv:1901.09847; Streaming DiLoCo and SparseLoCo pair it
with low-bit pseudo-gradients): each island keeps a residual, in fp32 CPU memory like the outer
state, and adds it to its next pseudo-gradient. The residual is what the codec lost in this
island's encodings during the last committed ring (`comm/ring.py` writes it into `dropped`): its
own contribution at the first hop, the partial sums it passed on, and its share of the averaged
segment it owns. The islands' losses add up to what the whole ring lost, so giving them back
corrects the run's average, not only each island's own rounding. It is kept in pseudo-gradient
units: divided by the factor accepted contributions were scaled by (`atoll.validation`), so that
it re-enters the mean with the weight it left with. Its life:
- committed step that applied: residual <- what this attempt's ring lost (`apply`). A rejected
  or fresh island contributed zeros: its own pseudo-gradient and old residual are discarded with
  the inner weights (DiLoCo drops a rejected island's work), and it keeps what its encodings of
  the others' values lost.
- skipped step (too few accepted, or out of attempts): the residual stays as it was (it was never
  sent; the discarded pseudo-gradient does not join it, which would double the next one).
- failed attempt: nothing changes; the next attempt recomputes the pseudo-gradient with the same
  residual.
- checkpoints save it (`state_dict`) and a resume restores it exactly; a joiner's starts at zero,
  it is never served or broadcast to other islands, and taking the run's state keeps it.
Cost: two more flat fp32 buffers (the residual and the ring's `dropped`): 8 bytes per parameter.

Also here: `average_gradients`, the data-parallel baseline that averages every step's gradients
across islands over the same groups.

The outer step comes in three parts so that the caller (`atoll.outer_step`) can make it elastic:
`average` (pseudo-gradient, recomputed from scratch on every attempt, then averaged),
`agreement_digest` (what the islands compare before anyone applies) and `apply` (the Nesterov
step and the copy into the inner weights). An outer step that overlaps training
(`diloco.overlap_steps`) keeps its pseudo-gradient (`hold_contribution`: every attempt reuses it,
the inner weights having moved on) and `apply` merges the outer weights into the inner ones
(`diloco.merge_weight`) instead of copying them over.

With Streaming DiLoCo's fragments (`diloco.fragments`, `atoll.fragments`) an outer step averages
one fragment: `select` picks it, and the pseudo-gradient, the ring's buckets, the agreement digest
(of the fragment's averaged pseudo-gradient, with the whole outer state), the Nesterov update,
the error-feedback residual and the copy or merge into the inner weights then cover its
parameters only; the other fragments' inner weights go on training untouched. The momentum buffer
starts as zeros (not torch's copy of the first gradient: the fragments start at different steps),
which gives the same bits. Taking the run's state (a joiner, a resync) and the guard's reset
cover every fragment.

Local work per outer step, in passes over the shard (`benchmarks/outer_step.py` times each):
the pseudo-gradient (one pass), the agreement digest (the pseudo-gradient only: the outer
weights' and momentum's piece digests are kept from the last time they were hashed, see below)
and `apply` (the Nesterov step in cache-sized spans, the copy into the inner weights, the new
digest of the outer weights and momentum).
Digests hash on every core (`atoll.digest`).

Why keeping the state's digests is safe: the kept piece digests carry the buffer's address and
version counter, which torch bumps on every in-place torch op on the buffer or on any view of it
(optimizer steps, `copy_`, checkpoint loads); a digest whose version differs is recomputed.
Collectives (gloo) and state transfers (`atoll.comm.transfer`, which reads chunks straight into
the buffer's memory) write raw memory that the counter does not see: they only reach the outer
weights through the methods here that hand the buffer out or fill it (`broadcast_state`,
`transfer_buffers`, `took_state`, `load_state_dict`), and those drop the kept digests. A new
raw-memory writer must go through one of them.

Failure semantics: a failed collective raises out of `average` before the outer weights or the
model change; the pseudo-gradient buffer is then undefined, and the next `average` recomputes
it (the inner weights have not changed), so an attempt can be redone among the survivors.
Nothing is applied before the caller knows every island averaged the same values.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from itertools import accumulate
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.stateful import Stateful

from atoll.comm.allreduce import GlobalMean
from atoll.digest import combine, piece_digests
from atoll.fragments import split_fragments
from atoll.optim import decays_weight

_LAYER = re.compile(r"^(layers\.\d+)\.")
UPDATE_SPAN = 2**18
"""Values per span of the outer update (1 MiB of fp32 per buffer): elementwise ops, so the span
changes no bit, only how often the same data comes back from memory."""


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

    def __init__(
        self, model: nn.Module, lr: float, momentum: float, nesterov: bool, error_feedback: bool = False, fragments: int = 1,
        eager: bool = False,
    ) -> None:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        # parameters, not their local views: FSDP2's lazy init may re-allocate a shard (older torch,
        # uneven sharding), so a view taken now could go stale; `_shards` reads them at each use
        self.params = [p for _, p in named]
        self.sizes = [s.numel() for s in self._shards()]
        self.all_buckets = layer_buckets(self.names, self.sizes)
        self.fragments = split_fragments(self.names, self.sizes, fragments)
        """Streaming DiLoCo's fragments (`atoll.fragments`); one, the whole model, by default."""
        self.fragment_of = [f for f, fragment in enumerate(self.fragments) for _ in fragment.params]
        self.params_on = range(len(self.params))
        self.span = slice(0, sum(self.sizes))
        """The parameters, and their span of the flat buffers, that the next outer step averages (`select`)."""
        self.decayed = [decays_weight(p) for p in self.params]
        """Per parameter: whether the inner AdamW decays it (see `set_weight_kept`)."""
        self.kept_own = [1.0] * len(self.fragments)
        self.kept_run = [1.0] * len(self.fragments)
        # 12 bytes per parameter of the shard: outer weights, pseudo-gradient, momentum (created by
        # SGD's first step). The two that cross to the device are pinned on CUDA (DMA copies).
        pin = any(s.is_cuda for s in self._shards())
        self.outer = torch.empty(sum(self.sizes), pin_memory=pin)
        self._read_inner(self.outer)
        self.pseudo_grad = torch.zeros(sum(self.sizes), pin_memory=pin)
        self.outer.grad = self.pseudo_grad
        self.residual = torch.zeros(sum(self.sizes)) if error_feedback else None
        """Error feedback: what the codec lost of this island's contributions, added to the next (see the module doc)."""
        self.dropped = torch.zeros(sum(self.sizes)) if error_feedback else None
        """What the current attempt's ring lost in this island's encodings, in units of the sum over islands."""
        self.dropped_scale = 1.0
        """The factor accepted contributions were scaled by in the current attempt (`mean_pseudo_gradient`)."""
        self.start = self.outer.clone() if eager else None
        """Eager outer steps: where this island's inner phase started (its eager start, or the outer
        weights it last took), what its pseudo-gradient is measured from (see `eager_start`)."""
        self.held: torch.Tensor | None = None
        """The pseudo-gradient an overlapped outer step contributes (`hold_contribution`), allocated at its first use."""
        self.holding = False
        self.lr, self.momentum = lr, momentum
        self.optimizer = torch.optim.SGD(
            [self.outer], lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0
        )
        self._kept_digests: dict[str, tuple[int, int, list[bytes]]] = {}
        """Per state buffer ("outer", "momentum"): (its address, its version counter, its piece
        digests) when it was last hashed."""

    def select(self, fragment: int | None) -> None:
        """Make the next outer step average `fragment` only (its pseudo-gradient, ring, digest, update
        and copy into the inner weights), or, with None, the whole model. Not state: the caller selects
        before every outer step, from the step (`atoll.fragments.fragment_at`)."""
        if fragment is None:
            self.params_on, self.span = range(len(self.params)), slice(0, sum(self.sizes))
        else:
            self.params_on, self.span = self.fragments[fragment].params, self.fragments[fragment].span

    @property
    def buckets(self) -> list[slice]:
        """The per-layer buckets of the selected part (`select`): what the ring averages and validation measures."""
        return [b for b in self.all_buckets if self.span.start <= b.start and b.stop <= self.span.stop]

    def _on(self, buffer: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        """(parameter index, its chunk of `buffer`) for the selected parameters."""
        chunks = buffer.split(self.sizes)
        return [(i, chunks[i]) for i in self.params_on]

    def anneal(self, weight: float) -> None:
        """Scale the outer step towards a plain average: lr 1 - (1 - lr) * weight, momentum * weight.

        weight 1 is the configured Nesterov step; weight 0 replaces the outer weights by the mean
        of the islands' inner weights (lr 1, no momentum). The momentum buffer is kept.
        """
        for group in self.optimizer.param_groups:
            group["lr"] = 1.0 - (1.0 - self.lr) * weight
            group["momentum"] = self.momentum * weight

    def set_weight_kept(self, own: float, run: float, fragment: int | None = None) -> None:
        """Take the inner AdamW's weight decay out of the outer step's momentum and learning rate.

        `own`: the share of a decayed weight this island's inner phase kept (1 for a joiner that
        trained none of it); `run`: the share the run's inner phase kept, the same number on every
        island (`atoll.optim.weight_kept` over the phase's steps). The pseudo-gradient of a decayed
        parameter becomes own * outer - inner (its gradient steps only), and the outer step
        multiplies the decayed outer weights by `run` before its Nesterov update: the decay is
        applied once, as the islands applied it. Without this, the decay is part of a pseudo-
        gradient that points the same way every outer step, so Nesterov momentum multiplies it by
        outer_lr / (1 - outer_momentum), 7x at lr 0.7 and momentum 0.9, once the momentum has built
        up. 1 and 1 (the default) is the plain DiLoCo step. Like `anneal`, not state: set before every outer step.
        `fragment`: for that fragment's parameters only (their inner phase began elsewhere), None for all.
        """
        for f in range(len(self.fragments)) if fragment is None else [fragment]:
            self.kept_own[f], self.kept_run[f] = own, run

    def _kept(self, index: int) -> tuple[float, float]:
        """(own, run) weight kept for parameter `index` (`set_weight_kept`); (1, 1) for one the inner
        AdamW does not decay."""
        if not self.decayed[index]:
            return 1.0, 1.0
        f = self.fragment_of[index]
        return self.kept_own[f], self.kept_run[f]

    def _spans(self) -> Iterator[tuple[int, slice, torch.Tensor]]:
        """(parameter index, a span of the flat buffers, the inner weights' values there: a view of
        the shard) over the selected parameters, UPDATE_SPAN values at a time: elementwise work
        between the buffers and the inner weights without a full-size temporary."""
        shards, offsets = self._shards(), [0, *accumulate(self.sizes)]
        for i in self.params_on:
            flat, begin, end = shards[i].detach().reshape(-1), offsets[i], offsets[i + 1]
            for start in range(begin, end, UPDATE_SPAN):
                stop = min(start + UPDATE_SPAN, end)
                yield i, slice(start, stop), flat[start - begin : stop - begin]

    def _shards(self) -> list[torch.Tensor]:
        return [local_shard(p) for p in self.params]

    @torch.no_grad()
    def _pseudo_gradient(self) -> None:
        """pseudo_grad = outer − inner (+ the residual, with error feedback) over the selected
        parameters: one pass per CPU shard; a device shard is copied into the buffer first."""
        shards = self._shards()
        on_device = [s.device.type != "cpu" or s.dtype != torch.float32 for s in shards]
        if any(on_device):
            self._read_inner(self.pseudo_grad)
        outers = (self.outer if self.start is None else self.start).split(self.sizes)
        for i, out in self._on(self.pseudo_grad):
            torch.sub(outers[i], out if on_device[i] else shards[i].detach().reshape(-1), out=out)
            own = self._kept(i)[0]
            if own != 1.0:  # own * outer - inner: the decay stays out of the average
                out.add_(outers[i], alpha=own - 1.0)
        if self.residual is not None:
            self.pseudo_grad[self.span].add_(self.residual[self.span])

    @torch.no_grad()
    def _read_inner(self, out: torch.Tensor) -> None:
        """Copy the selected inner weights' local shards into the flat fp32 CPU buffer `out`, shard by shard."""
        shards = self._shards()
        for i, chunk in self._on(out):
            chunk.view_as(shards[i]).copy_(shards[i].detach(), non_blocking=True)
        if any(s.is_cuda for s in shards):
            torch.cuda.synchronize()

    @torch.no_grad()
    def _scatter_outer(self, whole: bool = False) -> None:
        """Overwrite the selected inner weights (`whole`: all of them) with the outer weights."""
        shards, chunks = self._shards(), self.outer.split(self.sizes)
        starts = self.start.split(self.sizes) if self.start is not None else None
        for i in range(len(shards)) if whole else self.params_on:
            shards[i].copy_(chunks[i].view_as(shards[i]), non_blocking=True)
            if starts is not None:  # eager: the next phase starts from the outer weights
                starts[i].copy_(chunks[i])
        if any(s.is_cuda for s in shards):
            torch.cuda.synchronize()

    @torch.no_grad()
    def _merge_outer(self, weight: float) -> None:
        """inner <- weight * inner + (1 - weight) * outer over the selected parameters, shard by shard
        (`lerp_`: no full-size temporary)."""
        shards = self._shards()
        for i, chunk in self._on(self.outer):
            shards[i].lerp_(chunk.view_as(shards[i]).to(shards[i].device, shards[i].dtype, non_blocking=True), 1.0 - weight)
        if any(s.is_cuda for s in shards):
            torch.cuda.synchronize()

    def _state_pieces(self) -> list[tuple[str, torch.Tensor, list[bytes]]]:
        """(name, buffer, piece digests) of what the next outer step reads: the outer weights and
        the momentum (once there is one). Kept digests are reused if the buffer is the same one and
        has not been written since, else hashed now."""
        buffers = [("outer", self.outer)]
        if (momentum := self.optimizer.state[self.outer].get("momentum_buffer")) is not None:
            buffers.append(("momentum", momentum))
        pieces = []
        for name, buffer in buffers:
            kept = self._kept_digests.get(name)
            if kept is None or kept[:2] != (buffer.data_ptr(), buffer._version):
                kept = self._kept_digests[name] = (buffer.data_ptr(), buffer._version, piece_digests(buffer))
            pieces.append((name, buffer, kept[2]))
        return pieces

    def state_digest(self) -> str:
        """`tensor_digest([("outer", outer), ("momentum", momentum)])` (no momentum before the first
        outer step): equal on two islands iff their next outer steps start from the same state."""
        return combine(self._state_pieces())

    @torch.no_grad()
    def average(self, mean: GlobalMean) -> None:
        """Recompute the pseudo-gradient (outer − inner) and average it across islands in per-layer buckets.

        Computed shard by shard into the pseudo-gradient buffer (no full-size temporary). Raises the collective's error (RingError) on a dead or silent
        peer; the buffer's contents are then undefined and nothing else changed.
        """
        self.pseudo_gradient()
        self.mean_pseudo_gradient(mean)

    @torch.no_grad()
    def pseudo_gradient(self) -> torch.Tensor:
        """Recompute outer − inner into the pseudo-gradient buffer and return it (the first half of
        `average`); while a contribution is held, copy that one in instead."""
        if self.holding:
            self.pseudo_grad[self.span].copy_(self.held[self.span])
        else:
            self._pseudo_gradient()
        return self.pseudo_grad

    @torch.no_grad()
    def hold_contribution(self) -> torch.Tensor:
        """Compute the pseudo-gradient now, into its buffer, and keep a copy that `pseudo_gradient`
        returns until `release_contribution`: an outer step whose all-reduce runs behind training
        (`diloco.overlap_steps`) is retried with what the island trained up to its boundary, not
        with the inner weights it has moved on to. One more flat fp32 buffer (4 bytes per parameter)."""
        self._pseudo_gradient()
        if self.held is None:
            self.held = torch.empty_like(self.pseudo_grad)
        self.held[self.span].copy_(self.pseudo_grad[self.span])
        self.holding = True
        return self.pseudo_grad

    def release_contribution(self) -> None:
        """The held contribution's outer step is over: the next pseudo-gradient is computed afresh."""
        self.holding = False

    @torch.no_grad()
    def scale_contribution(self, factor: float) -> None:
        """Multiply the pseudo-gradient buffer by `factor` before the ring (see `atoll.validation`);
        0 writes zeros, which also clears NaN and inf (0 x NaN is NaN)."""
        if factor == 0:
            self.pseudo_grad[self.span].zero_()
        elif factor != 1:
            self.pseudo_grad[self.span].mul_(factor)

    @torch.no_grad()
    def mean_pseudo_gradient(self, mean: GlobalMean, accepted_factor: float = 1.0) -> None:
        """Average the pseudo-gradient buffer as it is across islands (the second half of `average`);
        fails as `average` does. `accepted_factor`: what accepted contributions were scaled by
        (`scale_contribution`); with error feedback, what the ring lost is kept divided by it,
        to become the residual if this attempt's step is applied."""
        mean.mean_buckets_(self.pseudo_grad, self.buckets, self.dropped)
        self.dropped_scale = accepted_factor

    def agreement_digest(self) -> str:
        """Digest of everything the outer step reads: the outer weights, the momentum and the
        averaged pseudo-gradient; equal on all islands iff applying the step leaves every island
        with the same outer weights and momentum. The same bits as `tensor_digest` of those, in that
        order (of the selected part of the pseudo-gradient: the rest is not applied); the outer
        weights and momentum are hashed again only if written since last hashed."""
        averaged = self.pseudo_grad[self.span]
        return combine([*self._state_pieces(), ("pseudo_grad", averaged, piece_digests(averaged))])

    @torch.no_grad()
    def apply(self, merge_weight: float = 0.0, delta: bool = False) -> str:
        """The outer Nesterov step on the averaged pseudo-gradient, then outer -> inner weights:
        copied over them, or with `merge_weight` w merged into them, inner <- w * inner + (1 - w) * outer
        (an overlapped outer step landing on inner weights that moved on; `diloco.merge_weight`),
        or with `delta` the progress since the boundary kept on top of them, inner <- outer +
        (inner - inner at the boundary) (`diloco.overlap_merge` "delta"; the boundary's inner weights
        come from the held contribution, see `_subtract_boundary`).

        Returns `state_digest()` of the new outer weights and momentum (this rank's shard), whose
        pieces are kept for the next agreement digest. With error feedback, the residual becomes
        what this step's ring lost (see the module doc).
        """
        if delta:
            self._subtract_boundary()  # before the residual and the outer weights change: it reads them
        if self.residual is not None:
            torch.mul(self.dropped[self.span], 1.0 / self.dropped_scale, out=self.residual[self.span])
        self._outer_sgd_step()
        if delta:
            self._add_outer()
        elif merge_weight == 1.0:  # eager: the inner weights train on from their eager start
            pass
        elif merge_weight:
            self._merge_outer(merge_weight)
        else:
            self._scatter_outer()
        return self.state_digest()

    @torch.no_grad()
    def _subtract_boundary(self) -> None:
        """inner <- inner - (the inner weights at the boundary) over the selected parameters, span by
        span: the held contribution was own * outer - inner (+ the residual), so the boundary's inner
        weights are own * outer + residual - held (to rounding: local, and the same on a retry)."""
        for i, span, inner in self._spans():
            boundary = self.outer[span].mul(self._kept(i)[0])
            if self.residual is not None:
                boundary.add_(self.residual[span])
            inner.sub_(boundary.sub_(self.held[span]).to(inner.device, inner.dtype))

    @torch.no_grad()
    def _add_outer(self) -> None:
        """inner <- inner + outer over the selected parameters, shard by shard."""
        shards = self._shards()
        for i, chunk in self._on(self.outer):
            shards[i].add_(chunk.view_as(shards[i]).to(shards[i].device, shards[i].dtype, non_blocking=True))
        if any(s.is_cuda for s in shards):
            torch.cuda.synchronize()

    @torch.no_grad()
    def _outer_sgd_step(self) -> None:
        """`self.optimizer.step()`, bucket by bucket: the same ops on the same state, so the same
        bits, but Nesterov's look-ahead (grad + momentum * buffer) is an UPDATE_SPAN temporary
        where torch's SGD makes a full-size one."""
        group = self.optimizer.param_groups[0]
        if group["weight_decay"] or group["dampening"] or group["maximize"]:
            raise ValueError("the outer SGD step supports neither weight decay, dampening nor maximize")
        lr, momentum, nesterov = group["lr"], group["momentum"], group["nesterov"]
        state = self.optimizer.state[self.outer]
        fresh = momentum != 0 and state.get("momentum_buffer") is None
        if fresh and len(self.fragments) > 1:  # zeros: the fragments not averaged yet have no momentum
            state["momentum_buffer"], fresh = torch.zeros_like(self.outer), False
        elif fresh:  # torch starts the momentum buffer as a copy of the first gradient
            state["momentum_buffer"] = self.pseudo_grad.clone()
        for i, chunk in self._on(self.outer):  # the inner phase's weight decay, applied once (`set_weight_kept`)
            run = self._kept(i)[1]
            if run != 1.0:
                chunk.mul_(run)
        # spans small enough that the update's four passes over a span run in cache
        for start in range(self.span.start, self.span.stop, UPDATE_SPAN):
            span = slice(start, min(start + UPDATE_SPAN, self.span.stop))
            grad = self.pseudo_grad[span]
            if momentum != 0:
                buffer = state["momentum_buffer"][span]
                if not fresh:
                    buffer.mul_(momentum).add_(grad)
                grad = grad.add(buffer, alpha=momentum) if nesterov else buffer
            self.outer[span].add_(grad, alpha=-lr)

    @torch.no_grad()
    def eager_start(self, islands: int) -> None:
        """Eager outer steps (Kale, Douillard, Donchev 2025): move the inner weights to the outer step
        in flight as far as this island knows it, its own share of the average (held / islands)
        with the momentum, and remember that point as the phase's `start`. The same ops, in the
        same order, as `_outer_sgd_step` on that share, span by span, with the momentum buffer
        read and not written: with one island it is the outer step itself, bit for bit. Local:
        the outer weights and momentum, which every island shares, are not touched.

        This is Kale et al.'s eager update written against the shared outer weights: their
        island applies its current pseudo-gradient and the others' previous ones, which sums to
        the outer weights through the last landed step plus its own current share. Taking the
        others' previous share as a stand-in for their current one as well was measured worse
        (benchmarks/convergence.py seed 0: +20.7% against +7.3% behind data-parallel).

        The next pseudo-gradient is measured from `start`, not from the outer weights: it is the
        phase's own progress, so the estimate's error never enters an average (measured from the
        outer weights it does, and the outer step amplifies it step after step: the debug model
        diverged to a loss of 70 that way).
        """
        group = self.optimizer.param_groups[0]
        lr, momentum, nesterov = group["lr"], group["momentum"], group["nesterov"]
        buffer = self.optimizer.state[self.outer].get("momentum_buffer")
        for i, span, inner in self._spans():
            grad = self.held[span].mul(1.0 / islands)  # x 1.0 changes no bit: one island's share is the step's
            if momentum != 0:
                moved = grad.clone() if buffer is None else buffer[span].mul(momentum).add_(grad)
                grad = grad.add(moved, alpha=momentum) if nesterov else moved
            weights = self.outer[span].mul(self._kept(i)[1]).add_(grad, alpha=-lr)
            self.start[span].copy_(weights)
            inner.copy_(weights, non_blocking=True)
        if any(s.is_cuda for s in self._shards()):
            torch.cuda.synchronize()

    @torch.no_grad()
    def restore_inner(self, whole: bool = False) -> str:
        """Overwrite the selected inner weights (`whole`: all of them) with the outer weights,
        which stay as they are (a skipped outer step; with `whole`, an island reset after non-finite
        inner steps; the residual stays too); returns `state_digest()`."""
        self._scatter_outer(whole)
        return self.state_digest()

    @torch.no_grad()
    def broadcast_state(self, mean: GlobalMean, source: int) -> None:
        """Every island of `mean`'s epoch takes island `source`'s outer weights and momentum, and
        copies them into its inner weights (how a joiner catches up). Raw fp32 tensors only, in
        MAC-checked chunks (`GlobalMean.broadcast_`).

        Raises RuntimeError (gloo) on a dead or silent peer, RingError on a chunk whose MAC does
        not verify; this rank's state is then a mix of its own and the source's values until a
        later broadcast succeeds (never a byte from outside the epoch).
        """
        state = self.optimizer.state[self.outer]
        has_momentum = torch.tensor([int("momentum_buffer" in state)], dtype=torch.int64)
        mean.broadcast_([has_momentum], source)
        tensors = [self.outer]
        if has_momentum.item():
            state.setdefault("momentum_buffer", torch.zeros_like(self.outer))
            tensors.append(state["momentum_buffer"])
        else:
            state.pop("momentum_buffer", None)
        mean.broadcast_(tensors, source)
        self._kept_digests.clear()
        self._scatter_outer(whole=True)

    def served_buffers(self) -> dict[str, torch.Tensor]:
        """The live outer weights and momentum (if any yet), as a state transfer serves them."""
        buffer = self.optimizer.state[self.outer].get("momentum_buffer")
        return {"outer": self.outer, **({"momentum": buffer} if buffer is not None else {})}

    def transfer_buffers(self) -> dict[str, torch.Tensor]:
        """Buffers for a state transfer to fill: the outer weights and a momentum buffer; then `took_state`."""
        state = self.optimizer.state[self.outer]
        self._kept_digests.clear()  # the caller writes them
        return {"outer": self.outer, "momentum": state.setdefault("momentum_buffer", torch.zeros_like(self.outer))}

    @torch.no_grad()
    def took_state(self, has_momentum: bool) -> None:
        """A state transfer filled `transfer_buffers()`: keep the momentum only if the source had one,
        and copy the outer weights into the inner weights."""
        if not has_momentum:
            self.optimizer.state[self.outer].pop("momentum_buffer", None)
        self._kept_digests.clear()
        self._scatter_outer(whole=True)

    def state_dict(self) -> dict[str, Any]:
        """The outer weights and the outer momentum as fixed keys (the live buffers: copy before
        changing them), and with error feedback the residual ("error_feedback").

        The momentum is always present, zeros with has_momentum 0 before the first outer step:
        DCP loads only the keys the destination already has, so a key that exists only after a
        step would never be restored. The learning rate and momentum factor are not state: they
        come from the config (and `anneal`) at every outer step.
        """
        buffer = self.optimizer.state[self.outer].get("momentum_buffer")
        return {
            "outer": self.outer.detach(),
            "momentum": buffer if buffer is not None else torch.zeros_like(self.outer),
            "has_momentum": int(buffer is not None),
            **({"error_feedback": self.residual} if self.residual is not None else {}),
            **({"eager_start": self.start} if self.start is not None else {}),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the outer weights, momentum and residual (in place); the inner weights are the caller's.
        A checkpoint saved without error feedback cannot be loaded with it on: the checkpointer
        refuses it in one line (the key is missing); one saved with it loads without it, the residual dropped."""
        with torch.no_grad():
            self.outer.copy_(state_dict["outer"])
            if self.residual is not None:
                self.residual.copy_(state_dict["error_feedback"])
            if self.start is not None:
                self.start.copy_(state_dict["eager_start"])
        self._kept_digests.clear()
        state = self.optimizer.state[self.outer]
        if int(state_dict["has_momentum"]):
            state["momentum_buffer"] = state_dict["momentum"].detach().clone()
        else:
            state.pop("momentum_buffer", None)


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
