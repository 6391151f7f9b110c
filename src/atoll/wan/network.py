"""The emulated WAN of one run: namespaces, links, rate limits and the delay line, as one object.

Address plan (10.77.0.0/24, private to the run's namespaces): island i is 10.77.0.<i+1> on its
`wan0`, the coordinator has its own namespace at 10.77.0.254, reached through the delay line like
any island (so store traffic sees the same delay), but without a rate limit (it carries only
small control messages). Every link's egress from an island is shaped by tbf to the given rate;
the delay line then holds each packet for the one-way delay. A round trip between two islands is
therefore 2 x delay plus serialization at the rate.

With a topology (`--wan-topology`, `atoll.wan.topology`) each directed pair of islands has its own
rate and delay, both applied by the delay line (no tbf: it shapes an island's egress to every peer
alike); the coordinator's links take the smallest island delay and no rate limit.

Link settings, and why:
- MTU: one millisecond of the link rate, clamped to [1500, 65000] bytes. Large packets keep the
  Python delay line at about a thousand packets per second per 100 Mbit/s; the clamp to 1 ms
  keeps one packet from holding a slow link (and the ACKs queued behind it) for long.
- tbf burst: two MTUs. It must hold at least one whole packet or nothing passes; two let a data
  packet and the ACK behind it leave together, and keep the burst at about 2 ms of line rate.
- tbf queue limit: one round trip at the rate (the bandwidth-delay product, at least 5 ms) on top
  of the burst: enough buffer for a single TCP flow to keep the link busy after a loss, without
  adding more than one round trip of queueing delay.

Failure semantics: `start` raises UserError without root or /dev/net/tun (nothing is created),
removes namespaces left by dead earlier runs, and on any failure tears down what it made before
re-raising. `close` (also on exceptions, SIGTERM unwinding, Ctrl-C) stops the delay line, kills
processes left in the namespaces and deletes them; a namespace that cannot be deleted is reported
in one line on stderr and the others are still deleted (the next run removes it as stale). It is
safe to call twice.
"""

from __future__ import annotations

import itertools
import os
import subprocess
from dataclasses import dataclass

from atoll.errors import UserError
from atoll.logs import log
from atoll.mesh.addresses import GLOO_SOCKET_IFNAME_ENV
from atoll.wan import namespaces
from atoll.wan.delay_line import Link, command
from atoll.wan.topology import Topology

SUBNET = "10.77.0."
PREFIX_LEN = 24
COORDINATOR_HOST = 254
MAX_ISLANDS = 250
MIN_MTU = 1500
MAX_MTU = 65000
MTU_AT_RATE_S = 0.001
BURST_MTUS = 2
MIN_QUEUE_S = 0.005
STOP_TIMEOUT_S = 5
COORDINATOR_ROLE = "coordinator"

_runs = itertools.count()


@dataclass(frozen=True)
class LinkShape:
    """How one island's link is set up: MTU and, when rate-limited, tbf's burst and queue."""

    mtu: int
    burst_bytes: int
    limit_bytes: int


def link_shape(rate_bps: int | None, delay_s: float) -> LinkShape:
    """The MTU and tbf parameters for a link of `rate_bps` and one-way `delay_s` (see module doc)."""
    if rate_bps is None:
        return LinkShape(MAX_MTU, 0, 0)
    mtu = int(min(max(rate_bps / 8 * MTU_AT_RATE_S, MIN_MTU), MAX_MTU))
    burst = BURST_MTUS * mtu
    return LinkShape(mtu, burst, burst + int(rate_bps / 8 * max(2 * delay_s, MIN_QUEUE_S)))


class EmulatedWan:
    """Islands 0..n-1 and a coordinator, each in its own namespace, joined through a delay line."""

    def __init__(self, islands: int, rate_bps: int | None, delay_s: float, topology: Topology | None = None) -> None:
        """With `topology`, `rate_bps` and `delay_s` are ignored: every pair has its own."""
        if not 1 <= islands <= MAX_ISLANDS:
            raise UserError(f"the emulated WAN supports 1 to {MAX_ISLANDS} islands, got --islands {islands}")
        self.islands = islands
        self.topology = topology
        self.rate_bps = rate_bps if topology is None else None
        self.delay_s = delay_s if topology is None else min(topology_delays(topology), default=0.0)
        fastest = max((r for i, row in enumerate(topology.rates_bps) for j, r in enumerate(row) if i != j), default=None) if topology else None
        self.shape = link_shape(rate_bps if topology is None else fastest, self.delay_s)
        run = next(_runs)
        self.island_namespaces = [namespaces.namespace_name(run, f"island{i}") for i in range(islands)]
        self.coordinator_namespace = namespaces.namespace_name(run, COORDINATOR_ROLE)
        self.delay_line: subprocess.Popen | None = None
        self._control_fd: int | None = None
        self._created: list[str] = []

    @staticmethod
    def island_address(index: int) -> str:
        """Island `index`'s address on the emulated network."""
        return f"{SUBNET}{index + 1}"

    @property
    def coordinator_host(self) -> str:
        """The coordinator's address on the emulated network (inside `coordinator_namespace`)."""
        return f"{SUBNET}{COORDINATOR_HOST}"

    def island_command(self, index: int, cmd: list[str]) -> list[str]:
        """`cmd` run inside island `index`'s namespace."""
        return ["ip", "netns", "exec", self.island_namespaces[index], *cmd]

    @staticmethod
    def island_env() -> dict[str, str]:
        """Environment an island process needs: gloo must bind to the emulated link."""
        return {GLOO_SOCKET_IFNAME_ENV: namespaces.LINK_NAME}

    def start(self) -> EmulatedWan:
        """Create namespaces and links, shape them and start the delay line."""
        namespaces.require_privileges()
        namespaces.remove_stale_namespaces()
        fds: list[int] = []
        try:
            links = []
            for index, name in enumerate(self.island_namespaces):
                links.append(self._make_link(name, self.island_address(index), fds))
                if self.rate_bps is not None:
                    problem = namespaces.limit_rate(name, self.rate_bps, self.shape.burst_bytes, self.shape.limit_bytes)
                    if problem is not None:
                        log.warning(problem)
            links.append(self._make_link(self.coordinator_namespace, self.coordinator_host, fds))
            control_read, self._control_fd = os.pipe()
            fds.append(control_read)
            # Own session: Ctrl-C reaches only simulate, which then stops the delay line by closing the pipe.
            self.delay_line = subprocess.Popen(
                command(links, self.delay_s, control_read, self._pairs()), pass_fds=fds, stdin=subprocess.DEVNULL, start_new_session=True,
            )
        except BaseException:
            self.close()
            raise
        finally:
            for fd in fds:  # the delay line holds its copies; the devices live as long as it does
                os.close(fd)
        return self

    def _pairs(self) -> tuple[list[list[float]], list[list[int]]] | None:
        """(delays_s, rates_bps) over the islands' links and the coordinator's (last), or None
        without a topology (the delay line's uniform delay then, and tbf)."""
        if self.topology is None:
            return None
        n = self.islands
        delays = [[*row, self.delay_s] for row in self.topology.delays_s] + [[self.delay_s] * n + [0.0]]
        rates = [[*row, 0] for row in self.topology.rates_bps] + [[0] * (n + 1)]
        for i in range(n + 1):
            delays[i][i], rates[i][i] = 0.0, 0
        return delays, rates

    def _make_link(self, name: str, address: str, fds: list[int]) -> Link:
        self._created.append(name)
        namespaces.create_namespace(name)
        fd = namespaces.open_tun(name)
        fds.append(fd)
        namespaces.configure_link(name, address, PREFIX_LEN, self.shape.mtu)
        return Link(fd, address)

    def close(self) -> None:
        """Stop the delay line, then delete the namespaces (killing what still runs inside)."""
        if self._control_fd is not None:
            os.close(self._control_fd)
            self._control_fd = None
        if self.delay_line is not None:
            try:
                self.delay_line.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.delay_line.kill()
                self.delay_line.wait()
        for name in self._created:
            try:
                namespaces.delete_namespace(name)
            except (RuntimeError, subprocess.TimeoutExpired) as err:  # keep deleting the others
                log.warning(f"atoll: could not delete network namespace {name}: {err}")
        self._created = []

    def __enter__(self) -> EmulatedWan:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def topology_delays(topology: Topology) -> list[float]:
    """The one-way delays between distinct islands."""
    return [d for i, row in enumerate(topology.delays_s) for j, d in enumerate(row) if i != j]
