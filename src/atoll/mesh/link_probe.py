"""Measuring the links of an epoch's ring candidates: round-trip time and throughput to every peer.

Run by local rank 0 of every member on its first global group right after the epoch is entered
(`MeshMember.measure_links`), when `comm.ring_order = "measured"`. In round d (1 .. world - 1)
each member probes the member d ranks after it while the member d ranks before probes it, so
every directed link is measured once, one flow per island's egress at a time:
1. ping-pong of one value: the round-trip time;
2. `PROBE_BYTES` to the peer, one value back once they arrived: the throughput of one ring step
   (bytes over the elapsed time, which includes the round trip a ring step also waits).
Bounded: 2 x (world - 1) x PROBE_BYTES per island and epoch. The bytes are zeros: a man in the
middle can only skew the figures, which order the ring but never decide what it computes.

Failure semantics: a dead or silent peer makes the group's send or receive raise RuntimeError at
the group's timeout (mesh.collective_timeout_s), as in the ring; the caller reports nothing then
and the epoch's next collective fails as it would have. Nothing is retried: the next epoch
measures again.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from atoll.mesh.ring_order import Link

PROBE_BYTES = 1 << 20
"""About one ring step's payload: a 4 MB fp32 chunk (comm.chunk_mb) encoded in int8."""
PROBE_TAG = 2**31 - 8
"""The probe's messages and (+ 1) their answers (the ring counts its tags up from 0: these come last)."""
MIN_ELAPSED_S = 1e-6


def probe_links(group: dist.ProcessGroup, members: tuple[str, ...], rank: int) -> dict[str, Link]:
    """{peer: the link from this member to it} for every other member of the group, whose rank
    order is `members`; every member must call it (see the module doc)."""
    world = len(members)
    links = {}
    for d in range(1, world):
        to, frm = (rank + d) % world, (rank - d) % world
        rtt = _round_trip(group, to, frm, torch.zeros(1), torch.zeros(1))
        elapsed = _round_trip(group, to, frm, torch.zeros(PROBE_BYTES, dtype=torch.uint8), torch.empty(PROBE_BYTES, dtype=torch.uint8))
        links[members[to]] = Link(PROBE_BYTES / max(elapsed, MIN_ELAPSED_S), rtt)
    return links


def _round_trip(group: dist.ProcessGroup, to: int, frm: int, out: torch.Tensor, into: torch.Tensor) -> float:
    """Send `out` to rank `to` and time until its one-value answer arrives, while receiving the
    same from rank `frm` into `into` and answering it. Receives are posted first: no deadlock."""
    answer, answered = torch.zeros(1), torch.empty(1)
    incoming = group.recv([into], frm, PROBE_TAG)
    reply = group.recv([answered], to, PROBE_TAG + 1)
    start = time.perf_counter()
    sent = group.send([out], to, PROBE_TAG)
    incoming.wait()
    group.send([answer], frm, PROBE_TAG + 1).wait()
    reply.wait()
    elapsed = time.perf_counter() - start
    sent.wait()
    return elapsed
