"""Where an island listens and what it announces (atoll.mesh.addresses): no processes.

The emulated-WAN test of an island behind a NAT is test_nat.py.
"""

from __future__ import annotations

import errno
import socket

import pytest

from atoll.comm.transfer import ServedState, StateServer
from atoll.config import JobConfig, MeshConfig, load_config
from atoll.errors import UserError
from atoll.mesh import addresses
from atoll.mesh.addresses import GLOO_SOCKET_IFNAME_ENV, Listening, PortRange, bind_in_range, listening, parse_port_range, ring_host
from atoll.mesh.groups import gloo_device
from atoll.resume import ADDRESS_KEYS, config_fingerprint

COORDINATOR = "127.0.0.1:29400"
NEW_KEYS = ("interface", "advertise_host", "port_range", "advertise_port_range")


@pytest.mark.parametrize(("value", "expected"), [
    ("29500-29599", PortRange(29500, 29599)), (" 29500 - 29501 ", PortRange(29500, 29501)), ("29500", PortRange(29500, 29500)),
    ([40000, 40009], PortRange(40000, 40009)), ((1, 65535), PortRange(1, 65535)),
])
def test_port_ranges_are_low_high_text_or_a_pair(value, expected):
    assert parse_port_range(value) == expected


@pytest.mark.parametrize("value", ["", "abc", "29599-29500", "0-10", "65000-65536", "1-2-3", "-5", [1], [1, 2, 3], [1.5, 2], [True, 2]])
def test_a_bad_port_range_says_the_form(value):
    with pytest.raises(ValueError, match=r'not a port range: write "LOW-HIGH" or \[LOW, HIGH\]'):
        parse_port_range(value)


def test_port_ranges_are_recorded_as_low_high_and_a_bad_one_is_one_line_naming_the_key():
    mesh = load_config(None, {"mesh.port_range": [29500, 29503], "mesh.advertise_port_range": "40000-40003"}).mesh
    assert (mesh.port_range, mesh.advertise_port_range) == ("29500-29503", "40000-40003")
    with pytest.raises(UserError) as err:
        load_config(None, {"mesh.port_range": "29599-29500"})
    assert str(err.value) == ('config key \'mesh.port_range\' (in --mesh.port_range): not a port range: write "LOW-HIGH" or '
                              '[LOW, HIGH] with 1 <= LOW <= HIGH <= 65535, e.g. "29500-29599", got \'29599-29500\'')


@pytest.mark.parametrize(("overrides", "message"), [
    ({"mesh.advertise_port_range": "40000-40001"}, "needs mesh.port_range, the ports it forwards to"),
    ({"mesh.port_range": "29500-29502", "mesh.advertise_port_range": "40000-40001"},
     "2 ports for the 3 of mesh.port_range 29500-29502: give as many, the n-th forwarded to the n-th"),
])
def test_announced_ports_need_as_many_bound_ports(overrides, message):
    with pytest.raises(UserError, match="config key 'mesh.advertise_port_range'") as err:
        load_config(None, overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_the_listening_settings_are_per_island_and_not_part_of_the_resumed_config():
    assert set(NEW_KEYS) | {"serve_host"} <= MeshConfig.per_island
    assert set(NEW_KEYS) <= set(ADDRESS_KEYS)
    moved = JobConfig(mesh=MeshConfig(interface="wg0", advertise_host="203.0.113.7", port_range="29500-29509"))
    assert config_fingerprint(moved) == config_fingerprint(JobConfig())


def test_an_announced_port_is_the_one_forwarded_to_the_bound_port():
    forwarded = Listening("192.168.1.5", PortRange(29500, 29509), "203.0.113.7", PortRange(40000, 40009))
    assert [forwarded.advertised_port(p) for p in (29500, 29503, 29509)] == [40000, 40003, 40009]
    same_ports = Listening("192.168.1.5", PortRange(29500, 29509), "203.0.113.7", None)
    assert same_ports.advertised_port(29504) == 29504
    assert Listening("10.0.0.1", None, "10.0.0.1", None).advertised_port(41234) == 41234


def test_listeners_bind_serve_host_else_the_interface_else_the_route_to_the_coordinator_and_announce_advertise_host():
    assert listening(MeshConfig(coordinator=COORDINATOR)) == Listening("127.0.0.1", None, "127.0.0.1", None)
    assert listening(MeshConfig(coordinator=COORDINATOR, interface="lo")).host == "127.0.0.1"
    behind_nat = listening(MeshConfig(
        coordinator=COORDINATOR, interface="lo", serve_host="192.168.1.5", advertise_host="203.0.113.7",
        port_range="29500-29501", advertise_port_range="40000-40001",
    ))
    assert behind_nat == Listening("192.168.1.5", PortRange(29500, 29501), "203.0.113.7", PortRange(40000, 40001))
    assert listening(MeshConfig(coordinator=COORDINATOR, serve_host="0.0.0.0", advertise_host="203.0.113.7")).host == "0.0.0.0"


def test_binding_or_announcing_every_address_is_a_user_error_naming_the_key():
    with pytest.raises(UserError, match="mesh.serve_host 0.0.0.0 means every address, none of which peers can dial: set mesh.advertise_host"):
        listening(MeshConfig(coordinator=COORDINATOR, serve_host="0.0.0.0"))
    with pytest.raises(UserError, match="mesh.advertise_host :: means every address"):
        listening(MeshConfig(coordinator=COORDINATOR, advertise_host="::"))


def test_an_unknown_interface_is_a_user_error_listing_the_machines_interfaces():
    with pytest.raises(UserError, match=r"mesh.interface 'wg9': no such network interface on this machine \(it has: .*lo"):
        listening(MeshConfig(coordinator=COORDINATOR, interface="wg9"))


def test_gloo_binds_the_interface_else_torchs_choice_from_the_environment_else_the_ring_host(monkeypatch):
    monkeypatch.delenv(GLOO_SOCKET_IFNAME_ENV, raising=False)
    assert ring_host(MeshConfig(coordinator=COORDINATOR)) == "127.0.0.1"
    assert ring_host(MeshConfig(coordinator=COORDINATOR, serve_host="127.0.0.2")) == "127.0.0.2"
    assert ring_host(MeshConfig(coordinator=COORDINATOR, serve_host="0.0.0.0", advertise_host="203.0.113.7")) == "127.0.0.1"
    assert gloo_device(MeshConfig(coordinator=COORDINATOR, interface="lo")) is not None
    assert gloo_device(MeshConfig(coordinator=COORDINATOR)) is not None
    monkeypatch.setenv(GLOO_SOCKET_IFNAME_ENV, "lo")
    assert gloo_device(MeshConfig(coordinator=COORDINATOR)) is None
    assert gloo_device(MeshConfig(coordinator=COORDINATOR, interface="lo")) is not None  # the setting wins


def test_a_listener_takes_the_first_free_port_of_the_range_and_a_full_range_is_a_user_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        first = taken.getsockname()[1]
        ports = PortRange(first, first + 1)
        server = StateServer(Listening("127.0.0.1", ports, "203.0.113.7", PortRange(40000, 40001)), ServedState(1000))
        try:
            assert server.port == first + 1
            assert server.advertised == ("203.0.113.7", 40001)
            with pytest.raises(UserError, match=rf"mesh.port_range {first}-{first + 1}: every port is in use on this machine; widen the range"):
                StateServer(Listening("127.0.0.1", ports, "127.0.0.1", None), ServedState(1000))
        finally:
            server.stop()


def test_only_address_in_use_moves_on_to_the_next_port():
    tried = []

    def refuse(port: int) -> None:
        tried.append(port)
        raise OSError(errno.EACCES, "permission denied")

    with pytest.raises(PermissionError):
        bind_in_range(refuse, PortRange(80, 81))
    assert tried == [80]
    assert bind_in_range(lambda port: port, None) == 0  # any free port


def test_a_coordinator_address_with_no_route_is_a_user_error():
    # the broadcast address: refused without SO_BROADCAST, on any machine, with no name lookup
    with pytest.raises(UserError, match=r"the coordinator address 255.255.255.255:29400: .*; fix --coordinator \(mesh.coordinator\)"):
        addresses.route_address("255.255.255.255", 29400)
