"""Fault injection: an island kills, stops or terminates itself at a scripted point.

`atoll simulate --scenario` (see `atoll.simulate`) hands each island its faults in the
environment variable ATOLL_FAULTS, e.g. "kill@inner:7,stop@allreduce:3":

    kill    SIGKILL to the island's process group (a crash: no deathrattle, sockets close)
    stop    SIGSTOP to the island's process group (a hang: no heartbeat, sockets stay open)
    term    SIGTERM (a clean exit: the island writes its deathrattle and leaves)

at one of two points: `inner:N`, right after inner step N, or `allreduce:S`, when outer step S's
all-reduce starts (after the boundary barrier, with every peer already inside its ring). Only the
island's local rank 0 fires, once per fault. Deterministic by construction, as torchft's
injector is: the same scenario makes the same failures at the same steps.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

from atoll.errors import UserError

FAULTS_ENV = "ATOLL_FAULTS"
ACTIONS = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP, "term": signal.SIGTERM}
POINTS = ("inner", "allreduce")


@dataclass(frozen=True)
class Fault:
    action: str
    """kill, stop or term."""
    point: str
    """inner (after inner step `at`) or allreduce (as outer step `at` averages)."""
    at: int

    def to_text(self) -> str:
        return f"{self.action}@{self.point}:{self.at}"


def parse_faults(text: str) -> list[Fault]:
    """"kill@inner:7,stop@allreduce:3" -> Faults; a malformed entry is a UserError."""
    faults = []
    for entry in filter(None, (e.strip() for e in text.split(","))):
        action, _, rest = entry.partition("@")
        point, _, at = rest.partition(":")
        if action not in ACTIONS or point not in POINTS or not at.isdigit():
            raise UserError(f"fault {entry!r} is not ACTION@POINT:N with ACTION in {sorted(ACTIONS)} and POINT in {list(POINTS)}")
        faults.append(Fault(action, point, int(at)))
    return faults


class FaultInjector:
    """Fires this island's scripted faults (inert without ATOLL_FAULTS, and on local ranks > 0)."""

    def __init__(self, enabled: bool) -> None:
        self.faults = parse_faults(os.environ.get(FAULTS_ENV, "")) if enabled else []

    def at(self, point: str, n: int) -> None:
        """Called by the training loop at each inner step and each all-reduce start."""
        for fault in list(self.faults):
            if fault.point == point and fault.at == n:
                self.faults.remove(fault)
                # the wall time lets benchmarks/recovery.py measure from the fault itself
                print(f"atoll: injecting {fault.to_text()} at {time.time():.3f}", flush=True)
                if fault.action == "term":
                    os.kill(os.getpid(), signal.SIGTERM)
                else:
                    os.killpg(os.getpgrp(), ACTIONS[fault.action])
