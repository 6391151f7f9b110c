"""Where an island listens and what it announces: bind address, port range, advertised address.

An island opens two kinds of listeners for its peers (the README's "Runs across the internet"):

- its state servers (`atoll.comm.transfer`), one per local rank, which joiners dial. They bind
  `mesh.serve_host` (else the address of `mesh.interface`, else this host's address on the route
  to the coordinator) on a port of `mesh.port_range` (else any free port), and the island
  announces `mesh.advertise_host` and the matching port of `mesh.advertise_port_range` to the
  coordinator: the address of a NAT or port-forwarding router in front of the island, which
  forwards each announced port to the bound one.
- gloo's sockets for the rings (`atoll.mesh.groups`). torch's gloo binds one listener per group
  on a port the kernel picks (its ephemeral range, net.ipv4.ip_local_port_range) of the address
  of `mesh.interface` (else GLOO_SOCKET_IFNAME, else `ring_host`), and
  publishes exactly that address through the rendezvous: it takes no port and announces no other
  address, and of each pair the side with the larger address dials the other. So the rings need
  islands that reach each other's bound addresses in both directions: public addresses or an
  overlay (WireGuard, Tailscale) selected by `mesh.interface`.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import ipaddress
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from atoll.errors import UserError
from atoll.mesh.client import parse_address

if TYPE_CHECKING:
    from atoll.config import MeshConfig

GLOO_SOCKET_IFNAME_ENV = "GLOO_SOCKET_IFNAME"
"""torch's own choice of gloo's interface, honoured when mesh.interface is not set."""
SIOCGIFADDR = 0x8915  # linux/sockios.h: an interface's IPv4 address
IFNAMSIZ = 16

T = TypeVar("T")


@dataclass(frozen=True)
class PortRange:
    """The TCP ports first..last (both included)."""

    first: int
    last: int

    def __len__(self) -> int:
        return self.last - self.first + 1

    def __str__(self) -> str:
        return f"{self.first}-{self.last}"


def parse_port_range(value: str | list[int] | tuple[int, ...]) -> PortRange:
    """A range given as "LOW-HIGH" (or one port, "PORT") or as [LOW, HIGH]; ValueError saying the form otherwise."""
    fix = 'not a port range: write "LOW-HIGH" or [LOW, HIGH] with 1 <= LOW <= HIGH <= 65535, e.g. "29500-29599"'
    if isinstance(value, str):
        low, sep, high = value.strip().partition("-")
        parts = [low, high] if sep else [low]
        if not all(p.strip().isdigit() for p in parts):
            raise ValueError(fix)
        bounds = [int(p) for p in parts]
    elif isinstance(value, (list, tuple)) and len(value) == 2 and all(type(v) is int for v in value):
        bounds = list(value)
    else:
        raise ValueError(fix)
    first, last = bounds[0], bounds[-1]
    if not 1 <= first <= last <= 65535:
        raise ValueError(fix)
    return PortRange(first, last)


@dataclass(frozen=True)
class Listening:
    """Where this island's state servers bind and what it announces for them."""

    host: str
    """The address they bind."""
    ports: PortRange | None
    """The ports they may bind (the first free one each); None: any free port."""
    advertise_host: str
    """The address peers dial."""
    advertise_ports: PortRange | None
    """The ports peers dial, the n-th for the n-th of `ports`; None: the bound port."""

    def advertised_port(self, bound: int) -> int:
        """The port peers dial to reach a listener bound on `bound`."""
        if self.ports is None or self.advertise_ports is None:
            return bound
        return self.advertise_ports.first + (bound - self.ports.first)


def is_wildcard(host: str) -> bool:
    """An address that binds every interface (0.0.0.0, ::): never one a peer can dial."""
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def listening(mesh: MeshConfig) -> Listening:
    """Resolve the settings of an island in a mesh (see the module docstring) into addresses. A
    missing interface, an unroutable coordinator or a wildcard bind address with no
    mesh.advertise_host is a UserError."""
    host = mesh.serve_host or (interface_address(mesh.interface) if mesh.interface else coordinator_route(mesh))
    announced = mesh.advertise_host or host
    if is_wildcard(announced):
        key = "mesh.advertise_host" if mesh.advertise_host else "mesh.serve_host"
        raise UserError(
            f"{key} {announced} means every address, none of which peers can dial: set mesh.advertise_host to the "
            "address they reach this island at"
        )
    ports = parse_port_range(mesh.port_range) if mesh.port_range else None
    advertised = parse_port_range(mesh.advertise_port_range) if mesh.advertise_port_range else None
    return Listening(host, ports, announced, advertised)


def ring_host(mesh: MeshConfig) -> str:
    """The address gloo's ring sockets bind when neither mesh.interface nor GLOO_SOCKET_IFNAME
    chooses: mesh.serve_host unless it is a wildcard, else this host's address on the route to
    the coordinator (never a host name that may resolve to loopback, as torch's default does)."""
    return mesh.serve_host if mesh.serve_host and not is_wildcard(mesh.serve_host) else coordinator_route(mesh)


def coordinator_route(mesh: MeshConfig) -> str:
    """This host's address on the route to mesh.coordinator."""
    if not mesh.coordinator:
        raise UserError("an island's listeners need mesh.coordinator (--coordinator host:port) to find their address")
    return route_address(*parse_address(mesh.coordinator))


@functools.lru_cache(maxsize=16)  # an island's addresses are fixed for its process: looked up at start, never mid-run
def route_address(host: str, port: int) -> str:
    """This host's address on the route to (host, port): what peers that reach `host` can reach
    (no packet is sent: a UDP socket's connect only picks the route). A host that does not
    resolve, or has no route, is a UserError naming it (and is asked again at the next call)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((host, port))
        except OSError as err:
            raise UserError(
                f"the coordinator address {host}:{port}: {err.strerror or err}; fix --coordinator (mesh.coordinator) to a "
                "host name or address this machine can reach, or set mesh.serve_host"
            ) from None
        return probe.getsockname()[0]


def interface_address(name: str) -> str:
    """The IPv4 address of network interface `name` (wg0, tailscale0, ...); UserError when this
    machine has no such interface or it has no IPv4 address."""
    if name not in {n for _, n in socket.if_nameindex()}:
        known = ", ".join(sorted(n for _, n in socket.if_nameindex()))
        raise UserError(f"mesh.interface {name!r}: no such network interface on this machine (it has: {known})")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            answer = fcntl.ioctl(probe.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:IFNAMSIZ - 1]))
        except OSError:
            raise UserError(f"mesh.interface {name!r} has no IPv4 address: bring it up (wg-quick up, tailscale up) or set mesh.serve_host") from None
    return socket.inet_ntoa(answer[20:24])


def bind_in_range(bind: Callable[[int], T], ports: PortRange | None) -> T:
    """`bind(port)` on the first port of `ports` that is free (port 0, any free port, when None).
    Only 'address in use' moves on to the next port; every port taken is a UserError naming mesh.port_range."""
    if ports is None:
        return bind(0)
    for port in range(ports.first, ports.last + 1):
        try:
            return bind(port)
        except OSError as err:
            if err.errno != errno.EADDRINUSE:
                raise
    raise UserError(f"mesh.port_range {ports}: every port is in use on this machine; widen the range (each local rank's state server takes one)")
