"""The delay line: a userspace forwarder that gives the emulated links their propagation delay.

This kernel has no netem, so delay is added here. Each island (and the coordinator) has a TUN
device in its own namespace whose file descriptor this process holds. Every IPv4 packet read from
link `src` is held until `arrival + delay[src][dst]` and then written to the TUN of link `dst`,
the one owning the packet's destination address. Packets of one (src, dst) pair keep their order
(their release times never decrease); the delay is looked up per pair so that a per-pair delay
matrix needs no change here. A uniform rate is not done here: the kernel's tbf shapes each
island's egress before its packets reach this process. Per-pair rates (`--wan-topology`) are:
a pair's packets leave one after another at its rate (each released `delay` after its last bit
left), and a packet that would wait longer than the pair's queue (one round trip, at least
`MIN_QUEUE_S`, as tbf's limit in `atoll.wan.network`) is dropped, as a full tbf queue drops it.

Cost: one read, one heap push/pop and one write per packet; links use a large MTU so that
100 Mbit/s is about a thousand packets per second. Timers use select(), which sleeps with
microsecond resolution, so packets are released within a fraction of a millisecond of their
due time while the process is not saturated. Memory held is what is in flight: rate x delay.

Failure semantics: packets that are not IPv4, or whose destination is no link of this run, are
dropped (nothing leaves the run's namespaces); a write that fails (a link being torn down) drops
that packet. The process exits, closing every TUN and so deleting the devices, as soon as its
control pipe reaches end-of-file, i.e. when the process that started it closes the pipe or dies.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import os
import select
import socket
import sys
import time
from dataclasses import dataclass

MAX_PACKET_BYTES = 65536
READS_PER_WAKEUP = 64  # bounded so that one busy link cannot starve the others' timers
IPV4_VERSION = 4
IPV4_DST = slice(16, 20)
MIN_QUEUE_S = 0.005


@dataclass(frozen=True)
class Link:
    """One emulated link: the TUN descriptor of one namespace and that namespace's address."""

    fd: int
    address: str


class DelayLine:
    """Forwards packets between `links`, holding each for `delays_s[src][dst]` seconds, paced at
    `rates_bps[src][dst]` bit/s where that is not 0 (see the module doc)."""

    def __init__(self, links: list[Link], delays_s: list[list[float]], rates_bps: list[list[int]] | None = None) -> None:
        rates_bps = rates_bps if rates_bps is not None else [[0] * len(links) for _ in links]
        for name, matrix in (("delays_s", delays_s), ("rates_bps", rates_bps)):
            if len(matrix) != len(links) or any(len(row) != len(links) for row in matrix):
                raise ValueError(f"{name} must be a {len(links)}x{len(links)} matrix")
        if any(d < 0 for row in delays_s for d in row) or any(r < 0 for row in rates_bps for r in row):
            raise ValueError("delays and rates must be >= 0")
        self.links = links
        self.delays_s = delays_s
        self.rates_bps = rates_bps
        self._free = [[0.0] * len(links) for _ in links]
        """When each paced pair's last packet has left (its next may start then)."""
        self._by_address = {socket.inet_aton(link.address): i for i, link in enumerate(links)}
        self._source = {link.fd: i for i, link in enumerate(links)}

    def run(self, control_fd: int) -> None:
        """Forward until `control_fd` is readable (end-of-file or data), then return."""
        due: list[tuple[float, int, int, bytes]] = []  # (release time, sequence, dst fd, packet)
        sequence = itertools.count()
        readable = [control_fd, *self._source]
        while True:
            now = time.monotonic()
            while due and due[0][0] <= now:
                _, _, fd, packet = heapq.heappop(due)
                try:
                    os.write(fd, packet)
                except OSError:  # the destination link is going away: the packet is lost
                    pass
            timeout = max(due[0][0] - now, 0.0) if due else None
            ready, _, _ = select.select(readable, [], [], timeout)
            if control_fd in ready:
                return
            arrival = time.monotonic()
            for fd in ready:
                self._read_into(fd, arrival, due, sequence)

    def _read_into(self, fd: int, arrival: float, due: list, sequence: itertools.count) -> None:
        src = self._source[fd]
        for _ in range(READS_PER_WAKEUP):
            try:
                packet = os.read(fd, MAX_PACKET_BYTES)
            except BlockingIOError:
                return
            if not packet or packet[0] >> 4 != IPV4_VERSION:
                continue
            dst = self._by_address.get(packet[IPV4_DST])
            if dst is None:
                continue
            release = self.release_time(src, dst, len(packet), arrival)
            if release is not None:
                heapq.heappush(due, (release, next(sequence), self.links[dst].fd, packet))

    def release_time(self, src: int, dst: int, size: int, arrival: float) -> float | None:
        """When a packet of `size` bytes that arrived from `src` for `dst` is delivered; None: its
        pair's queue is full and it is dropped."""
        rate = self.rates_bps[src][dst]
        if not rate:
            return arrival + self.delays_s[src][dst]
        start = max(arrival, self._free[src][dst])
        if start - arrival > max(2 * self.delays_s[src][dst], MIN_QUEUE_S):
            return None
        self._free[src][dst] = start + size * 8 / rate
        return self._free[src][dst] + self.delays_s[src][dst]


def uniform_delays(links: int, one_way_s: float) -> list[list[float]]:
    """The same one-way delay between every pair of distinct links."""
    return [[0.0 if i == j else one_way_s for j in range(links)] for i in range(links)]


def command(links: list[Link], one_way_s: float, control_fd: int, pairs: tuple[list[list[float]], list[list[int]]] | None = None) -> list[str]:
    """The command line that runs a delay line over inherited descriptors (see `main`); `pairs`:
    (delays_s, rates_bps) per pair of links in place of the uniform `one_way_s`."""
    matrices = ["--pairs", json.dumps({"delays_s": pairs[0], "rates_bps": pairs[1]})] if pairs is not None else []
    return [
        sys.executable, "-m", "atoll.wan.delay_line", "--control-fd", str(control_fd), "--delay-s", repr(one_way_s), *matrices,
        *(f"--link={link.fd}={link.address}" for link in links),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="atoll's WAN delay line (started by `atoll simulate --wan-*`)")
    parser.add_argument("--control-fd", type=int, required=True, help="exit when this descriptor reaches end-of-file")
    parser.add_argument("--delay-s", type=float, required=True, help="one-way delay between any two links")
    parser.add_argument("--link", action="append", required=True, help="FD=IPV4: an inherited TUN descriptor and its address")
    parser.add_argument("--pairs", help='JSON {"delays_s", "rates_bps"}: per-pair matrices over the links, in place of --delay-s')
    args = parser.parse_args(argv)
    links = [Link(int(fd), address) for fd, address in (spec.split("=", 1) for spec in args.link)]
    if args.pairs is not None:
        pairs = json.loads(args.pairs)
        DelayLine(links, pairs["delays_s"], pairs["rates_bps"]).run(args.control_fd)
    else:
        DelayLine(links, uniform_delays(len(links), args.delay_s)).run(args.control_fd)


if __name__ == "__main__":
    main()
