"""An island behind a NAT, in the emulated WAN: it binds one address and announces another.

Island 0's state servers bind an address only its own namespace has (10.99.0.1 on its loopback:
no other namespace has a route to it, and the delay line drops packets for it), and it announces
its WAN address with other ports, which DNAT rules in its namespace forward to the bound ones, as
a router with port forwarding would. Island 1 fetches both local ranks' states through the
announced addresses, verified byte for byte, and the two form a gloo ring on `mesh.interface`
(wan0). Needs root, /dev/net/tun and nft (nftables), and skips with that reason otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO

from atoll.mesh.addresses import GLOO_SOCKET_IFNAME_ENV
from atoll.wan.namespaces import list_namespaces, privilege_problem
from atoll.wan.network import EmulatedWan

WORKER = str(REPO / "tests" / "nat_worker.py")
PROBLEM = privilege_problem() or (None if shutil.which("nft") else "the NAT test needs the `nft` command (nftables) for its DNAT rules")
ONE_WAY_S = 0.002
PROCESS_TIMEOUT_S = 45
# prerouting DNAT, as a port-forwarding router does it: announced port -> (private address, bound port)
DNAT_RULES = """
table ip nat {
  chain prerouting {
    type nat hook prerouting priority dstnat;
    tcp dport 40000 counter dnat to 10.99.0.1:29500
    tcp dport 40001 counter dnat to 10.99.0.1:29501
  }
}
"""


def forwarded_packets(namespace: str) -> list[int]:
    """The packet counters of the DNAT rules, in rule order."""
    listed = subprocess.run(["ip", "netns", "exec", namespace, "nft", "-j", "list", "table", "ip", "nat"],
                            capture_output=True, text=True, check=True, timeout=10)
    return [item["rule"]["expr"][1]["counter"]["packets"] for item in json.loads(listed.stdout)["nftables"] if "rule" in item]


@pytest.mark.skipif(PROBLEM is not None, reason=PROBLEM or "")
@pytest.mark.timeout(PROCESS_TIMEOUT_S * 2)
def test_a_joiner_fetches_state_through_the_announced_address_of_an_island_behind_a_nat_and_the_ring_forms():
    wan = EmulatedWan(2, None, ONE_WAY_S)
    env = {k: v for k, v in os.environ.items() if k != GLOO_SOCKET_IFNAME_ENV}  # mesh.interface alone picks wan0
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    procs: list[subprocess.Popen] = []
    try:
        wan.start()
        nat = wan.island_namespaces[0]
        subprocess.run(["ip", "-n", nat, "addr", "add", "10.99.0.1/32", "dev", "lo"], check=True, timeout=10)
        subprocess.run(["ip", "netns", "exec", nat, "nft", "-f", "-"], input=DNAT_RULES, text=True, check=True, timeout=10)

        behind = subprocess.Popen(wan.island_command(0, [sys.executable, WORKER, "behind-nat"]), env=env, cwd=REPO,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        procs.append(behind)
        where = json.loads(behind.stdout.readline())
        joiner = subprocess.Popen(wan.island_command(1, [sys.executable, WORKER, "joiner", json.dumps(where["advertised"])]),
                                  env=env, cwd=REPO, stdout=subprocess.PIPE, text=True)
        procs.append(joiner)
        joined = json.loads(joiner.communicate(timeout=PROCESS_TIMEOUT_S)[0])
        behind_out, _ = behind.communicate("", timeout=PROCESS_TIMEOUT_S)

        assert where == {"bound": [["10.99.0.1", 29500], ["10.99.0.1", 29501]], "advertised": [["10.77.0.1", 40000], ["10.77.0.1", 40001]]}
        assert joined["direct"] != "connected"  # the bound address is not reachable: only the forwarding is
        assert joined["fetched"] == [True, True]
        assert all(count > 0 for count in forwarded_packets(nat))
        assert joined["ring_sum"] == json.loads(behind_out)["ring_sum"] == 3.0
        assert behind.returncode == 0 and joiner.returncode == 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
        wan.close()  # kills whatever is left in its namespaces
    assert not set(wan.island_namespaces + [wan.coordinator_namespace]) & set(list_namespaces())
