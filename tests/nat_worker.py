"""One island of test_nat.py, run inside its namespace of the emulated WAN.

argv[1] is the role:
- "behind-nat" (island 0): serves two local ranks' states from an address only it has (mesh.serve_host
  on its loopback), announcing the WAN address and other ports (mesh.advertise_host,
  mesh.advertise_port_range) that its namespace's DNAT rules forward; prints where it listens and
  what it announces (one JSON line), then enters a gloo ring on mesh.interface and prints the sum.
  Serves until its stdin closes.
- "joiner" (island 1), argv[2] the announced addresses: tries the bound address directly, fetches
  each rank's state through the announced ones, enters the ring; prints one JSON line.
"""

from __future__ import annotations

import json
import socket
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from atoll.comm.transfer import ServedState, Source, StateServer, fetch_state
from atoll.config import MeshConfig
from atoll.mesh.addresses import listening
from atoll.mesh.groups import gloo_device, global_groups
from atoll.mesh.membership import Epoch

KEY = b"k" * 32
NUMEL = 20_000
CHUNK_BYTES = 16_000
MEMBERS = ("island-0", "island-1")
COORDINATOR = "10.77.0.254:29400"  # only routed to (mesh.coordinator): no coordinator runs in this test
PRIVATE_HOST = "10.99.0.1"
WAN_HOST = "10.77.0.1"
BOUND_PORTS = "29500-29501"
ANNOUNCED_PORTS = "40000-40001"
STORE_PORT = 29400
TIMEOUT_S = 20


def state(rank: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(rank)
    return {"outer": torch.randn(NUMEL, generator=generator), "momentum": torch.randn(NUMEL, generator=generator)}


def ring_sum(mesh: MeshConfig, index: int) -> float:
    """Enter a two-island gloo ring on the device mesh.interface gives, all-reduce index + 1."""
    store = dist.TCPStore(WAN_HOST, STORE_PORT, is_master=index == 0, wait_for_workers=False, timeout=timedelta(seconds=TIMEOUT_S))
    [group] = global_groups(
        lambda prefix: dist.PrefixStore(prefix, store), Epoch(0, MEMBERS, 1), MEMBERS[index], 0, 1,
        timedelta(seconds=TIMEOUT_S), lambda: gloo_device(mesh),
    )
    value = torch.tensor([float(index + 1)])
    group.allreduce([value]).wait()
    return value.item()


def behind_nat() -> None:
    mesh = MeshConfig(
        coordinator=COORDINATOR, interface="wan0", serve_host=PRIVATE_HOST, advertise_host=WAN_HOST,
        port_range=BOUND_PORTS, advertise_port_range=ANNOUNCED_PORTS,
    )
    where = listening(mesh)
    servers = []
    for rank in range(2):
        served = ServedState(CHUNK_BYTES)
        served.publish(3, state(rank), step=30, samples=960)
        server = StateServer(where, served)
        server.key = KEY
        servers.append(server)
    print(json.dumps({"bound": [[s.host, s.port] for s in servers], "advertised": [list(s.advertised) for s in servers]}), flush=True)
    print(json.dumps({"ring_sum": ring_sum(mesh, 0)}), flush=True)
    sys.stdin.read()  # serve until the test closes our stdin
    for server in servers:
        server.stop()


def joiner(advertised: list[list]) -> None:
    try:
        socket.create_connection((PRIVATE_HOST, 29500), timeout=2).close()
        direct = "connected"
    except OSError as err:
        direct = type(err).__name__
    fetched = []
    for rank, (host, port) in enumerate(advertised):
        into = {name: torch.zeros(NUMEL) for name in ("outer", "momentum")}
        report = fetch_state([Source("island-0", host, port)], KEY, "island-1", into, timeout=TIMEOUT_S)
        fetched.append(all(torch.equal(into[name], value) for name, value in state(rank).items()) and report.manifest.version == 3)
    mesh = MeshConfig(coordinator=COORDINATOR, interface="wan0")
    print(json.dumps({"direct": direct, "fetched": fetched, "ring_sum": ring_sum(mesh, 1)}), flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    if sys.argv[1] == "behind-nat":
        behind_nat()
    else:
        joiner(json.loads(sys.argv[2]))
