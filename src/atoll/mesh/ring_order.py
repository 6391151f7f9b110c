"""Topology-aware ring order: the cyclic order of islands whose slowest link is the fastest.

A ring all-reduce moves every chunk over every link of the ring in lockstep, so one outer step
takes as long as its slowest directed link (island -> the next one in the ring) allows. Given the
links the islands measured, `best_ring` picks the cycle that maximises that bottleneck (the
bottleneck travelling-salesman problem on a directed graph), ties broken on the smallest total
round-trip time, then on the ids, so the same measurements always give the same order.

Exact for up to `EXACT_MAX_ISLANDS` islands (every cycle with the smallest id first: 7! = 5040 at
8); beyond, a heuristic: greedy nearest-fastest-neighbour tours from every island, improved by
segment reversals and moves until none helps (PRIME solved the symmetric case with Held-Karp over
iperf figures; PCCL measures every directed link and solves the asymmetric TSP). Pure functions:
the coordinator calls them, tests drive them directly.

Ring direction: island ring[i] sends to ring[i + 1] (and the last to the first), as
`atoll.comm.ring` sends to rank + 1; links are directed because WAN paths are often asymmetric.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

EXACT_MAX_ISLANDS = 8
"""Up to this many islands every cycle is tried; beyond, the heuristic."""
REORDER_GAIN = 1.2
"""A running epoch is re-formed for a measured order only when its slowest link is this many times
the current order's (re-forming costs a rendezvous; measurements are noisy)."""
MAX_REPORTED_PEERS = 1024
"""Peers one link report may name (it is parsed after authentication, but still bounded)."""
RING_ORDER_KEY = "comm.ring_order"
"""The run's policy in its fingerprint (`atoll.fingerprint`): "id" or "measured"."""


@dataclass(frozen=True)
class Link:
    """One directed link as measured by its sending island."""

    throughput: float
    """Bytes per second the sender pushed to the receiver."""
    rtt: float
    """Round-trip time in seconds."""

    def to_dict(self) -> dict[str, float]:
        return {"throughput": self.throughput, "rtt": self.rtt}

    @staticmethod
    def from_dict(raw: Mapping[str, float]) -> Link:
        return Link(float(raw["throughput"]), float(raw["rtt"]))


Links = Mapping[tuple[str, str], Link]
"""Measured links by (sender, receiver)."""


def canonical(ring: Sequence[str]) -> tuple[str, ...]:
    """The same cycle rotated to start at its smallest id (direction kept: links are directed)."""
    start = ring.index(min(ring))
    return tuple(ring[start:]) + tuple(ring[:start])


def edges(ring: Sequence[str]) -> list[tuple[str, str]]:
    """The directed links a ring uses: each island to the next, the last to the first."""
    return [(ring[i], ring[(i + 1) % len(ring)]) for i in range(len(ring))] if len(ring) > 1 else []


def bottleneck(ring: Sequence[str], links: Links) -> float:
    """The slowest link's throughput on `ring` (bytes/s; inf for a ring of one island)."""
    return min((links[e].throughput for e in edges(ring)), default=float("inf"))


def total_rtt(ring: Sequence[str], links: Links) -> float:
    return sum(links[e].rtt for e in edges(ring))


def complete(islands: Sequence[str], links: Links) -> bool:
    """Every directed pair of distinct islands has a measurement."""
    return all((a, b) in links for a in islands for b in islands if a != b)


def _key(ring: tuple[str, ...], links: Links) -> tuple[float, float, tuple[str, ...]]:
    """Smaller is better: the fastest bottleneck, then the least total RTT, then the smallest ids."""
    return (-bottleneck(ring, links), total_rtt(ring, links), ring)


def best_ring(islands: Sequence[str], links: Links) -> tuple[str, ...]:
    """The ring order of `islands` for the measured `links`, canonical (`canonical`).

    Id order (sorted) when any directed pair is unmeasured: a guess about a missing link could put
    the slowest pair in the ring, and every caller must get the same answer from the same input.
    """
    ids = tuple(sorted(islands))
    if len(ids) <= 2 or not complete(ids, links):
        return ids
    if len(ids) <= EXACT_MAX_ISLANDS:
        return _exact(ids, links)
    return _heuristic(ids, links)


def _exact(ids: tuple[str, ...], links: Links) -> tuple[str, ...]:
    """Every cycle with the smallest id first (already canonical)."""
    first, rest = ids[0], ids[1:]
    return min(((first, *p) for p in itertools.permutations(rest)), key=lambda ring: _key(ring, links))


def _heuristic(ids: tuple[str, ...], links: Links) -> tuple[str, ...]:
    """The best of id order and a greedy tour from every island, each improved locally."""
    starts = [ids, *(_greedy(s, ids, links) for s in ids)]
    return min((canonical(_improve(list(t), links)) for t in starts), key=lambda ring: _key(ring, links))


def _greedy(start: str, ids: tuple[str, ...], links: Links) -> tuple[str, ...]:
    """From `start`, always on to the unvisited island with the fastest link (then lowest RTT, id)."""
    tour, left = [start], set(ids) - {start}
    while left:
        here = tour[-1]
        step = min(left, key=lambda b: (-links[(here, b)].throughput, links[(here, b)].rtt, b))
        tour.append(step)
        left.remove(step)
    return tuple(tour)


def _improve(tour: list[str], links: Links) -> tuple[str, ...]:
    """Local search: reverse a segment or move one island elsewhere while the key strictly improves
    (each pass is O(n^3) key terms; it ends because the key only decreases)."""
    best = canonical(tour)
    best_key = _key(best, links)
    improved = True
    while improved:
        improved = False
        for candidate in _neighbours(list(best)):
            key = _key(canonical(candidate), links)
            if key < best_key:
                best, best_key, improved = canonical(candidate), key, True
                break
    return best


def _neighbours(tour: list[str]) -> Iterator[tuple[str, ...]]:
    """Every segment reversal and every single-island move of `tour`."""
    n = len(tour)
    for i in range(n - 1):
        for j in range(i + 2, n + 1):
            yield tuple(tour[:i] + tour[i:j][::-1] + tour[j:])
    for i in range(n):
        rest = tour[:i] + tour[i + 1:]
        for j in range(n - 1):
            if j != i:
                yield tuple(rest[:j] + [tour[i]] + rest[j:])


def ring_for(members: Sequence[str], links: Links, policy: str) -> tuple[str, ...]:
    """The ring order of an epoch's members under the run's policy ("id": sorted; "measured": `best_ring`)."""
    return best_ring(members, links) if policy == "measured" else tuple(sorted(members))


def better_ring(current: Sequence[str], links: Links, previous: Links | None = None) -> tuple[str, ...] | None:
    """A measured order worth re-forming the epoch for (its slowest link at least `REORDER_GAIN`
    times the current order's), or None: every link of both measured, or it is not worth it.

    With `previous` (each pair's measurement before the latest one, where there is one), a link
    counts at the lower of its two figures on the new order and at the higher on the current one:
    the gain must show in both measurements, so one noisy round cannot flap the ring (on loopback
    single probes of one link range over 0.4-90 Gbit/s)."""
    ids = tuple(current)
    if len(ids) <= 2 or not complete(ids, links):
        return None
    best = best_ring(ids, links)
    earlier = previous or {}
    low = {pair: min(link, earlier.get(pair, link), key=lambda kept: kept.throughput) for pair, link in links.items()}
    high = {pair: max(link, earlier.get(pair, link), key=lambda kept: kept.throughput) for pair, link in links.items()}
    return best if bottleneck(best, low) >= REORDER_GAIN * bottleneck(ids, high) else None


def parse_report(sender: str, raw: object, known: set[str]) -> dict[tuple[str, str], Link]:
    """An island's report of its links ({peer: {"throughput", "rtt"}}) as directed links from
    `sender`. Peers not in `known` (gone since it measured) are left out; ValueError for more than
    `MAX_REPORTED_PEERS` peers, or a throughput that is not finite and positive or an RTT that is
    not finite and non-negative (a broken island: the coordinator refuses the report)."""
    if not isinstance(raw, dict) or len(raw) > MAX_REPORTED_PEERS:
        raise ValueError(f"links must be an object of at most {MAX_REPORTED_PEERS} peers")
    links = {}
    for peer, measured in raw.items():
        link = Link.from_dict(measured)
        if not (math.isfinite(link.throughput) and link.throughput > 0 and math.isfinite(link.rtt) and link.rtt >= 0):
            raise ValueError(f"the link to {str(peer)[:64]!r} has throughput {link.throughput} and rtt {link.rtt}")
        if peer in known and peer != sender:
            links[(sender, peer)] = link
    return links


def links_to_json(links: Links, members: Sequence[str]) -> dict[str, dict[str, dict[str, float]]]:
    """{sender: {receiver: link}} of the links among `members` (what the journal keeps)."""
    kept: dict[str, dict[str, dict[str, float]]] = {}
    for (a, b), link in sorted(links.items()):
        if a in members and b in members:
            kept.setdefault(a, {})[b] = link.to_dict()
    return kept


def links_from_json(raw: Mapping[str, Mapping[str, Mapping[str, float]]]) -> dict[tuple[str, str], Link]:
    return {(a, b): Link.from_dict(link) for a, row in raw.items() for b, link in row.items()}
