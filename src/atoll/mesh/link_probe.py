"""Measuring the links of an epoch's ring candidates: round-trip time and throughput to every peer.

Run by local rank 0 of every member on its first global group right after the epoch is entered
(`MeshMember.measure_links`), when `comm.ring_order = "measured"`, and again every
`comm.link_probe_every` outer steps in a background thread while the inner phase trains
(`BackgroundProbe`, `MeshMember.measure_links_behind`). In round d (1 .. world - 1)
each member probes the member d ranks after it while the member d ranks before probes it, so
every directed link is measured once, one flow per island's egress at a time:
1. ping-pong of one value: the round-trip time;
2. `PROBE_BYTES` to the peer, one value back once they arrived, `PROBE_TRANSFERS` times: the
   throughput is the bytes over the fastest transfer's time less the round trip (the first
   transfer pays TCP's slow start, which says little about the link's rate; measured on the
   two-region example, one transfer without the subtraction told 10 from 40 Mbit/s by 4%).
Bounded: PROBE_TRANSFERS x (world - 1) x PROBE_BYTES sent per island and epoch. The bytes are zeros: a man in the
middle can only skew the figures, which order the ring but never decide what it computes.

Failure semantics: a dead peer makes the group's send or receive raise RuntimeError (gloo's
error); a silent one (stopped, or a link too slow to move PROBE_BYTES in time) raises RuntimeError
after PROBE_DEADLINE_S for one wait. The caller reports nothing then and the epoch's next
collective fails (at its own deadline) as it would have. Nothing is retried: the next epoch
measures again.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from atoll.mesh.ring_order import Link

PROBE_BYTES = 1 << 20
"""About one ring step's payload: a 4 MB fp32 chunk (comm.chunk_mb) encoded in int8."""
PROBE_TAG = 2**31 - 8
"""The probe's messages and (+ 1) their answers (the ring counts its tags up from 0: these come last)."""
PROBE_TRANSFERS = 2
PROBE_DEADLINE_S = 30.0
"""One round trip's limit: PROBE_BYTES take 8 s at 1 Mbit/s."""
MIN_TRANSFER_SHARE = 0.1
"""The round trip subtracted leaves at least this share of the transfer's time (a noisy RTT
larger than the transfer must not make the link look infinitely fast)."""


def probe_links(group: dist.ProcessGroup, members: tuple[str, ...], rank: int) -> dict[str, Link]:
    """{peer: the link from this member to it} for every other member of the group, whose rank
    order is `members`; every member must call it (see the module doc)."""
    world = len(members)
    links = {}
    for d in range(1, world):
        to, frm = (rank + d) % world, (rank - d) % world
        rtt = _round_trip(group, to, frm, torch.zeros(1), torch.zeros(1))
        out, into = torch.zeros(PROBE_BYTES, dtype=torch.uint8), torch.empty(PROBE_BYTES, dtype=torch.uint8)
        elapsed = min(_round_trip(group, to, frm, out, into) for _ in range(PROBE_TRANSFERS))
        links[members[to]] = Link(PROBE_BYTES / max(elapsed - rtt, MIN_TRANSFER_SHARE * elapsed), rtt)
    return links


class BackgroundProbe:
    """`probe_links` in a daemon thread, for epoch `epoch`: `links` when it ended with figures,
    `error` (one line) when a peer was dead or silent (see the module doc). The group must carry
    nothing else until the thread ends: the caller waits for it before the next outer step."""

    def __init__(self, group: dist.ProcessGroup, members: tuple[str, ...], rank: int, epoch: int) -> None:
        self.epoch = epoch
        self.links: dict[str, Link] | None = None
        self.error = ""
        self.thread = threading.Thread(target=self._run, args=(group, members, rank), name="atoll-link-remeasure", daemon=True)
        self.thread.start()

    def _run(self, group: dist.ProcessGroup, members: tuple[str, ...], rank: int) -> None:
        try:
            self.links = probe_links(group, members, rank)
        except RuntimeError as err:
            self.error = str(err).splitlines()[0]


def _round_trip(group: dist.ProcessGroup, to: int, frm: int, out: torch.Tensor, into: torch.Tensor) -> float:
    """Send `out` to rank `to` and time until its one-value answer arrives, while a thread
    receives the same from rank `frm` into `into` and answers it as soon as it is in (so the time
    is this link's, not the previous member's, and no wait around the ring closes a cycle).
    Receives are posted first; each wait is bounded by PROBE_DEADLINE_S."""
    deadline = timedelta(seconds=PROBE_DEADLINE_S)
    answer, answered = torch.zeros(1), torch.empty(1)
    incoming = group.recv([into], frm, PROBE_TAG)
    reply = group.recv([answered], to, PROBE_TAG + 1)
    failures: list[BaseException] = []

    def answer_it() -> None:
        try:
            incoming.wait(deadline)
            group.send([answer], frm, PROBE_TAG + 1).wait(deadline)
        except RuntimeError as err:  # re-raised by the caller's thread below
            failures.append(err)

    answering = threading.Thread(target=answer_it, name="atoll-link-probe", daemon=True)
    answering.start()
    start = time.perf_counter()
    sent = group.send([out], to, PROBE_TAG)
    reply.wait(deadline)
    elapsed = time.perf_counter() - start
    sent.wait(deadline)
    answering.join(PROBE_DEADLINE_S)
    if answering.is_alive():
        raise RuntimeError(f"link probe: rank {frm} sent nothing within {PROBE_DEADLINE_S:.0f}s")
    if failures:
        raise failures[0]
    return elapsed
