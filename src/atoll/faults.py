"""Fault injection: an island kills, stops or terminates itself, or corrupts its weights, at a scripted point.

`atoll simulate --scenario` (see `atoll.simulate`) hands each island its faults in the
environment variable ATOLL_FAULTS, e.g. "kill@inner:7,stop@allreduce:3,scale@inner:8:100":

    kill    SIGKILL to the island's process group (a crash: no deathrattle, sockets close)
    stop    SIGSTOP to the island's process group (a hang: no heartbeat, sockets stay open)
    term    SIGTERM (a clean exit: the island writes its deathrattle and leaves)
    nan     every weight of local rank 0's shard becomes NaN (what an overflow or a bad kernel does)
    scale   local rank 0's weights are multiplied by F, written `scale@POINT:N:F` (a runaway island)
    skew    local rank 0's outer weights move by 1e-3 (islands that disagree on the outer state)
    sleep   the island stalls for F seconds, written `sleep@POINT:N:F`, alive and heartbeating (a slow island)
    break   from then on, every all-reduce of the island fails at once (a peer it can never connect to)

at one of three points: `inner:N`, right after inner step N; `allreduce:S`, when outer step S's
all-reduce starts (after the boundary barrier, with every peer already inside its ring; a weights
fault there still comes before the pseudo-gradient; with overlap, the others fire in the thread
running the step behind training, so `sleep` there delays that thread, not training); or `serve:C`, when the island's state server
is about to send its C-th chunk to a joiner (a source dying mid-transfer, after C-1 chunks). Only the island's local rank 0 fires, once
per fault. Deterministic by construction, as torchft's injector is: the same scenario makes the
same failures at the same steps.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Collection
from dataclasses import dataclass

import torch
from torch import nn

from atoll.diloco import local_shard
from atoll.errors import UserError
from atoll.logs import info as log_line

FAULTS_ENV = "ATOLL_FAULTS"
ACTIONS = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP, "term": signal.SIGTERM}
WEIGHT_ACTIONS = ("nan", "scale", "skew")
"""Faults that corrupt the weights instead of signalling the process."""
SURVIVABLE_ACTIONS = (*WEIGHT_ACTIONS, "sleep")
"""Faults after which the island is expected to finish the run."""
FACTOR_ACTIONS = ("scale", "sleep")
"""Faults written with a number after the point: ACTION@POINT:N:F."""
ALL_ACTIONS = (*ACTIONS, *SURVIVABLE_ACTIONS, "break")
POINTS = ("inner", "allreduce", "serve")


@dataclass(frozen=True)
class Fault:
    action: str
    """kill, stop, term, nan or scale."""
    point: str
    """inner (after inner step `at`), allreduce (as outer step `at` averages) or serve (after chunk `at` served)."""
    at: int
    factor: float | None = None
    """scale: what the weights are multiplied by; sleep: seconds."""

    def to_text(self) -> str:
        return f"{self.action}@{self.point}:{self.at}" + (f":{self.factor!r}" if self.factor is not None else "")


def parse_faults(text: str) -> list[Fault]:
    """"kill@inner:7,stop@allreduce:3,scale@inner:8:100" -> Faults; a malformed entry is a UserError."""
    faults = []
    for entry in filter(None, (e.strip() for e in text.split(","))):
        action, _, rest = entry.partition("@")
        point, _, at = rest.partition(":")
        at, _, factor = at.partition(":")
        if action not in ALL_ACTIONS or point not in POINTS or not at.isdigit() or bool(factor) != (action in FACTOR_ACTIONS):
            raise UserError(
                f"fault {entry!r} is not ACTION@POINT:N (or {'/'.join(FACTOR_ACTIONS)}@POINT:N:F) with ACTION in "
                f"{sorted(ALL_ACTIONS)} and POINT in {list(POINTS)}"
            )
        try:
            faults.append(Fault(action, point, int(at), float(factor) if factor else None))
        except ValueError:
            raise UserError(f"fault {entry!r}: the number {factor!r} is not a number") from None
    return faults


class FaultInjector:
    """Fires this island's scripted faults (inert without ATOLL_FAULTS, and on local ranks > 0).

    `model` is what nan and scale corrupt (this rank's local shards); `outer` (set by the sync) is
    what skew moves. After a `break` fault, `ring_broken` is True for good.
    """

    def __init__(self, enabled: bool, model: nn.Module | None = None) -> None:
        self.faults = parse_faults(os.environ.get(FAULTS_ENV, "")) if enabled else []
        self.model = model
        self.outer: torch.Tensor | None = None
        self.ring_broken = False

    def at(self, point: str, n: int, actions: Collection[str] | None = None) -> None:
        """Called by the training loop at each inner step and each all-reduce start, and by the state
        server per chunk; `actions`: fire only these here (the rest stay due: an overlapped outer
        step fires the weight faults before its pseudo-gradient, the others behind training once
        its boundary barrier has passed)."""
        for fault in list(self.faults):
            if fault.point == point and fault.at == n and (actions is None or fault.action in actions):
                self.faults.remove(fault)
                # the wall time lets benchmarks/recovery.py measure from the fault itself
                log_line(f"atoll: injecting {fault.to_text()} at {time.time():.3f}")
                if fault.action in WEIGHT_ACTIONS:
                    self._corrupt(fault)
                elif fault.action == "sleep":
                    time.sleep(fault.factor)
                elif fault.action == "break":
                    self.ring_broken = True
                elif fault.action == "term":
                    os.kill(os.getpid(), signal.SIGTERM)
                else:
                    os.killpg(os.getpgrp(), ACTIONS[fault.action])

    @torch.no_grad()
    def _corrupt(self, fault: Fault) -> None:
        if fault.action == "skew":
            if self.outer is None:
                raise RuntimeError(f"fault {fault.to_text()} needs the outer weights: a DiLoCo island")
            self.outer.add_(1e-3)
            return
        if self.model is None:
            raise RuntimeError(f"fault {fault.to_text()} needs the model: give FaultInjector the model")
        for param in self.model.parameters():
            shard = local_shard(param)
            if fault.action == "nan":
                shard.fill_(float("nan"))
            else:
                shard.mul_(fault.factor)
