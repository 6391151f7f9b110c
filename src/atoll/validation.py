"""Validation of pseudo-gradients: which islands' contributions an outer step accepts.

One NaN or one runaway island must not poison every island: int8 turns a block holding a NaN into
NaNs, the ring sums them, every island decodes the same bytes, the digests agree and the step
commits. So before the ring each island computes cheap statistics of its pseudo-gradient
(`ContributionStats`: finite?, norm, per-bucket norms, over the whole island), the islands
all-gather them (each row MAC-checked under the epoch key, `atoll.comm.sealed`: no one outside
the epoch can alter the table), and every island runs the same pure decision (`decide`) on the same table:

- a non-finite contribution is always rejected;
- a finite one is rejected when its norm, or the norm of one of its buckets, is more than
  `diloco.max_norm_ratio` times the median of the same norm over the other finite islands: the
  upper median of an even count, an actual value, and with two others the larger one, so that
  one outlier cannot make an honest island look large (a median of 0 rejects nothing: islands
  that did not move are no yardstick);
- an island that joined at this boundary (`fresh`: it has not trained since it took the run's
  state, so its pseudo-gradient is zero) contributes nothing and is no yardstick, without being
  rejected;
- if fewer than `diloco.min_accepted` (capped at the number of islands that trained) remain, the
  step is skipped by every island alike.

Rejected islands contribute zeros (written with `zero_`, since 0 x NaN is NaN) and the accepted
ones scale theirs by world / accepted before the ring, whose mean divides by the world size, so
the result is the mean over the accepted islands. Every island, the rejected ones included, then
applies the same averaged update and stays bit-identical with the others. With error feedback
(`atoll.diloco`), a rejected island's residual is discarded with its pseudo-gradient, and a
skipped step leaves every residual as it was.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import median_high
from typing import Any

import torch
import torch.distributed as dist

from atoll.comm.allreduce import GlobalMean, run_abandonable
from atoll.config import DilocoConfig
from atoll.diloco import DiLoCo
from atoll.island import Island


@dataclass(frozen=True)
class ContributionStats:
    """What an island tells the others about its pseudo-gradient (the whole island's, all local ranks)."""

    finite: bool
    """False if any value on any local rank is NaN or infinite."""
    norm: float
    """L2 norm over the island (NaN or inf when not finite)."""
    bucket_norms: tuple[float, ...]
    """L2 norm of each per-layer bucket (`DiLoCo.buckets`), over the island."""
    fresh: bool = False
    """The island joined at this boundary and has not trained: it contributes nothing."""

    def to_tensor(self) -> torch.Tensor:
        """fp64 [finite, norm, bucket norms..., fresh]: the all-gathered form."""
        return torch.tensor([float(self.finite), self.norm, *self.bucket_norms, float(self.fresh)], dtype=torch.float64)

    @staticmethod
    def from_tensor(values: torch.Tensor) -> ContributionStats:
        finite, norm, *buckets, fresh = values.tolist()
        return ContributionStats(bool(finite), norm, tuple(buckets), bool(fresh))


@dataclass(frozen=True)
class Decision:
    """Which islands an outer step averages; identical on every island given identical stats."""

    accepted: tuple[str, ...]
    """Accepted island ids, sorted."""
    rejected: dict[str, str]
    """Rejected island id -> why, sorted by id."""
    skip: bool
    """Too few accepted: nobody contributes, the outer step is not applied."""
    norms: dict[str, float | None]
    """Every island's pseudo-gradient norm (None when not finite), sorted by id."""
    fresh: tuple[str, ...] = ()
    """Islands that joined at this boundary: neither accepted nor rejected, they contribute nothing."""

    @property
    def applies(self) -> bool:
        return not self.skip

    @property
    def accepted_factor(self) -> float:
        """What an accepted island multiplies its pseudo-gradient by (world / accepted; 0 when skipped)."""
        if self.skip:
            return 0.0
        return (len(self.accepted) + len(self.rejected) + len(self.fresh)) / len(self.accepted)

    def factor(self, island: str) -> float:
        """What island `island` multiplies its pseudo-gradient by before the ring's mean over all."""
        if self.skip or island in self.rejected or island in self.fresh:
            return 0.0
        return self.accepted_factor

    def note(self, outer_step: int) -> str | None:
        """A log line when anything was rejected, else None."""
        if not self.rejected:
            return None
        why = "; ".join(f"{island}: {reason}" for island, reason in self.rejected.items())
        outcome = "outer step skipped, too few accepted" if self.skip else f"averaged over {len(self.accepted)}"
        return f"outer step {outer_step}: rejected contributions ({why}); {outcome}"


def decide(stats_by_island: Mapping[str, ContributionStats], max_norm_ratio: float, min_accepted: int) -> Decision:
    """The pure decision rule (see the module docstring); independent of the mapping's order."""
    fresh = tuple(sorted(i for i, stats in stats_by_island.items() if stats.fresh))
    islands = sorted(i for i in stats_by_island if i not in fresh)
    rejected: dict[str, str] = {}
    for island in islands:
        mine = stats_by_island[island]
        if not mine.finite:
            rejected[island] = "non-finite"
            continue
        others = [stats_by_island[o] for o in islands if o != island and stats_by_island[o].finite]
        if not others:
            continue
        reference = median_high(o.norm for o in others)
        if reference > 0 and mine.norm > max_norm_ratio * reference:
            rejected[island] = f"norm {mine.norm:.4g} > {max_norm_ratio:g} x the others' median {reference:.4g}"
            continue
        for bucket, norm in enumerate(mine.bucket_norms):
            reference = median_high(o.bucket_norms[bucket] for o in others)
            if reference > 0 and norm > max_norm_ratio * reference:
                rejected[island] = f"bucket {bucket} norm {norm:.4g} > {max_norm_ratio:g} x the others' median {reference:.4g}"
                break
    accepted = tuple(i for i in islands if i not in rejected)
    return Decision(
        accepted=accepted,
        rejected=rejected,
        skip=len(accepted) < min(min_accepted, len(islands)) or not accepted,
        norms={i: (stats_by_island[i].norm if stats_by_island[i].finite else None) for i in sorted(stats_by_island)},
        fresh=fresh,
    )


@torch.no_grad()
def island_stats(
    pseudo_grad: torch.Tensor, buckets: Sequence[slice], island: Island, fresh: bool = False,
    residual: torch.Tensor | None = None,
) -> ContributionStats:
    """Statistics of this island's pseudo-gradient: this rank's shard, summed over the local ranks.

    One fp64 pass per bucket: squares of finite fp32 values cannot overflow fp64, so the sums are
    finite exactly when every value is. With error feedback `pseudo_grad` holds the island's
    `residual` too: the norms are then of what the island trained (pseudo_grad - residual, one
    bucket-sized temporary at a time), because a residual is the codec's backlog, not the island's
    health: with topk it is most of the contribution (norm 2.4 -> 13.7 over 10 outer steps of the
    debug model), and a veteran's would exceed `max_norm_ratio` times a recent joiner's (whose
    residual starts at zero). Finiteness is of the whole contribution, what the ring would carry.
    On a multi-rank island: one all-reduce over the island's gloo control group (a dead local rank
    ends the whole island through torchrun).
    """
    def trained(b: slice) -> torch.Tensor:
        return pseudo_grad[b] if residual is None else pseudo_grad[b] - residual[b]

    squares = torch.stack([torch.linalg.vector_norm(trained(b), dtype=torch.float64) ** 2 for b in buckets])
    sent = squares if residual is None else torch.stack(
        [torch.linalg.vector_norm(pseudo_grad[b], dtype=torch.float64) for b in buckets])
    payload = torch.cat([(~torch.isfinite(sent)).any().to(torch.float64).reshape(1), squares])
    if island.world > 1:
        dist.all_reduce(payload, op=dist.ReduceOp.SUM, group=island.control)
    squares = payload[1:]
    return ContributionStats(
        finite=payload[0].item() == 0,
        norm=math.sqrt(squares.sum().item()),
        bucket_norms=tuple(math.sqrt(s) for s in squares.tolist()),
        fresh=fresh,
    )


def gather_stats(mine: ContributionStats, mean: GlobalMean) -> list[ContributionStats]:
    """Every island's stats, indexed by its rank in `mean.control_group` (the epoch's order), the
    same on all, each row checked against its sender's MAC (`GlobalMean.all_gather`).

    Raises RuntimeError (gloo) on a dead peer at once and on a silent one at the group's timeout
    (mesh.collective_timeout_s), RingError on a row whose MAC does not verify; the caller treats
    either as a failed attempt, like a broken ring. With `mean.abandoned`, a wait on a hung peer
    is left (RingError) as soon as the epoch is dissolved, as the rings are: a gloo wait cannot be
    interrupted, so it runs in a daemon thread that is left behind (it writes only into its own
    buffers).
    """
    payload = mine.to_tensor()
    if mean.abandoned is None:
        everyone = mean.all_gather(payload)
    else:
        everyone = run_abandonable(lambda: mean.all_gather(payload), mean.abandoned, "the contribution statistics were being shared")
    return [ContributionStats.from_tensor(t) for t in everyone]


def average_accepted(
    diloco: DiLoCo, mean: GlobalMean, island: Island, cfg: DilocoConfig, members: Sequence[str], fresh: bool = False,
) -> Decision:
    """The validated version of `DiLoCo.average`: pseudo-gradient, stats shared over
    `mean.control_group` (whose rank i is `members[i]`; `fresh`: this island joined at this
    boundary and contributes nothing), the decision, this island's scaling, and
    the ring over the accepted contributions (no ring when the step is skipped: the buffer is then
    zeros on every island, so the agreement digests still match).

    Raises RuntimeError from the all-gather or the ring (dead or silent peer); nothing outside the
    pseudo-gradient buffer has changed then, and the next attempt recomputes it.
    """
    pseudo_grad = diloco.pseudo_gradient()
    return average_validated(diloco, mean, cfg, members, island_stats(pseudo_grad, diloco.buckets, island, fresh, diloco.residual))


def average_validated(diloco: DiLoCo, mean: GlobalMean, cfg: DilocoConfig, members: Sequence[str], mine: ContributionStats) -> Decision:
    """The cross-island half of `average_accepted`, for a pseudo-gradient already in its buffer
    with this island's statistics `mine`: no local-rank collective, so it can run behind training
    (`atoll.outer_step`). Fails as `average_accepted` does."""
    table = gather_stats(mine, mean)
    decision = decide(dict(zip(members, table)), cfg.max_norm_ratio, cfg.min_accepted)
    diloco.scale_contribution(decision.factor(members[mean.control_group.rank()]))
    if decision.applies:
        diloco.mean_pseudo_gradient(mean, decision.accepted_factor)
    return decision


def decision_fields(decision: Decision | None) -> dict[str, Any]:
    """The outer-step metrics: `rejected` (island ids) and `contribution_norms` (id -> norm or
    null); both null when no decision was reached (every attempt failed)."""
    if decision is None:
        return {"rejected": None, "contribution_norms": None}
    return {"rejected": list(decision.rejected), "contribution_norms": decision.norms}
