"""Bounded before parsed: what outsiders' bytes and connections can do to the coordinator and a
state server (`atoll.mesh.service`), on loopback, every loop bounded in count and time.

The parsing of a request is a pure function tested without sockets; the services are tested in
the test process, with stderr checked for tracebacks (a handler's exception is printed there).
"""

from __future__ import annotations

import json
import socket
import socketserver
import threading
import time

import pytest
import torch
from test_mesh import joined, raw_rpc, serving_coordinator  # noqa: F401 - a fixture

from atoll.comm.transfer import ISLAND_HEADER, MAC_HEADER, MAX_MANIFEST_LINE_BYTES, ServedState, Source, StateServer, TransferError, _Peer, fetch_state
from atoll.mesh import protocol
from atoll.mesh.auth import sign
from atoll.mesh.service import MAX_PER_SOURCE, BoundedHandler, BoundedServer

LOOPBACK = "127.0.0.1"
KEY = b"k" * 32
BURST = 10_000
BURST_S = 60.0


def request(**fields) -> bytes:
    base = {"op": "latest", "island": "a", "incarnation": "i", "channel": "main", "boot": "b", "seq": 1, "args": {}}
    return json.dumps({**base, **fields}).encode()


# --- parse_request: pure -----------------------------------------------------------------------------


def test_a_well_formed_request_parses_into_its_fields():
    parsed = protocol.parse_request(protocol.request_body("beat", "a", "inc", "beat", "boot", 7, {"interval": 0.5}))
    assert parsed == protocol.Request("beat", "a", "inc", "beat", "boot", 7, {"interval": 0.5})


@pytest.mark.parametrize("body", [
    b"\xff\xfe garbage", b"[]", b"{}", b"null", b"[" * 100_000 + b"]" * 100_000,
    request(seq=1e999), request(seq=-1), request(seq=2**63), request(seq=True), request(seq="1"),
    request(op="__init__"), request(island=["a"]), request(island="a" * 10_000), request(args=[]),
    request(args={"wait_s": float("nan")}), request(args={"wait_s": float("inf")}),
])
def test_garbage_nesting_and_numbers_out_of_range_are_not_requests(body):
    assert protocol.parse_request(body) is None


# --- the coordinator -------------------------------------------------------------------------------


def raw(address: str, data: bytes, timeout: float = 10.0) -> bytes:
    """Send raw bytes on a fresh connection; whatever comes back before the server closes or 2 s pass."""
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(data)
        sock.settimeout(2.0)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except TimeoutError:
            pass
    return answer


def post(body: bytes, mac: str, length: str | None = None) -> bytes:
    head = f"POST {protocol.RPC_PATH} HTTP/1.1\r\nHost: x\r\n{protocol.MAC_HEADER}: {mac}\r\nConnection: close\r\n"
    head += f"Content-Length: {len(body) if length is None else length}\r\n" if length != "" else ""
    return head.encode() + b"\r\n" + body


def test_bad_content_length_garbage_nested_json_and_huge_numbers_get_answers_not_tracebacks(serving_coordinator, capfd):
    coord = serving_coordinator
    a, beat = joined(coord.address, "a")
    try:
        boot = a.hello["boot"]
        for length in ("abc", "-1", "1e3", "99999999999999999999", "", "0x10"):
            assert raw(coord.address, post(b"{}", "", length)).startswith(b"HTTP/1.1 400")
        assert raw(coord.address, post(b"", "", str(protocol.MAX_BODY_BYTES + 1))).startswith(b"HTTP/1.1 413")
        assert b"400 - Bad request syntax" in raw(coord.address, b"\x00\xff" * 5000 + b"\r\n\r\n")  # answered as HTTP/0.9
        assert raw(coord.address, b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 414")
        for body in (b"[" * 200_000 + b"]" * 200_000, request(boot=boot, seq=1e999), request(boot=boot, seq=10**40)):
            assert raw_rpc(coord.address, body, "")[0] == protocol.REFUSED  # no MAC: nothing parsed
            assert raw_rpc(coord.address, body, sign(a.key, body))[0] == protocol.MALFORMED  # a token holder's garbage
        inf = protocol.request_body("admission", "a", a.incarnation, "x", boot, 10**15, {"after": 1e308 * 10, "wait_s": 0})
        assert raw_rpc(coord.address, inf, sign(a.key, inf))[0] == protocol.MALFORMED
        big = protocol.request_body("admission", "a", a.incarnation, "x", boot, 10**15 + 1, {"after": 10**4000, "wait_s": 0})
        assert raw_rpc(coord.address, big, sign(a.key, big))[0] in (200, protocol.MALFORMED)
        assert a.call("latest", {})["known"]
    finally:
        beat.stop()
    assert "Traceback" not in capfd.readouterr().err


def test_connections_over_the_cap_from_one_source_are_turned_away_and_members_keep_theirs(serving_coordinator):
    coord = serving_coordinator
    a, beat = joined(coord.address, "a")
    held = []
    try:
        for _ in range(MAX_PER_SOURCE + 20):  # a slowloris: connections that say nothing
            held.append(socket.create_connection((LOOPBACK, coord.port), timeout=5))
        deadline = time.monotonic() + 10
        while coord.server.turned_away < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert coord.server.turned_away >= 20 and coord.server.open_connections <= MAX_PER_SOURCE
        assert a.call("latest", {})["known"]  # its connection was open before: served throughout
    finally:
        for sock in held:
            sock.close()
        beat.stop()


def test_an_idle_unauthenticated_connection_is_closed_and_frees_its_slot(serving_coordinator, monkeypatch):
    from atoll.mesh import service

    monkeypatch.setattr(service.BoundedHandler, "timeout", 0.5)
    with socket.create_connection((LOOPBACK, serving_coordinator.port), timeout=5) as idle:
        idle.sendall(b"GET /hel")  # a slowloris' first bytes, then nothing
        idle.settimeout(5)
        assert idle.recv(100) == b""  # closed by the server
    deadline = time.monotonic() + 5
    while serving_coordinator.server.open_connections and time.monotonic() < deadline:
        time.sleep(0.05)
    assert serving_coordinator.server.open_connections == 0


def connection_burst(port: int, count: int, stop: threading.Event) -> None:
    for _ in range(count):
        if stop.is_set():
            return
        try:
            socket.create_connection((LOOPBACK, port), timeout=5).close()
        except OSError:
            pass


@pytest.mark.timeout(120)
def test_a_burst_of_connections_against_a_state_server_leaves_a_joiner_served(capfd):
    state = ServedState(16_000)
    state.publish(3, {"outer": torch.arange(40_000, dtype=torch.float32)}, step=12, samples=96)
    server = StateServer(LOOPBACK, state)
    server.key = KEY
    stop = threading.Event()
    threads = [threading.Thread(target=connection_burst, args=(server.port, BURST // 4, stop)) for _ in range(4)]
    try:
        for thread in threads:
            thread.start()
        target = {"outer": torch.zeros(40_000)}
        report = fetch_state([Source("s", LOOPBACK, server.port)], KEY, "joiner", target, 30.0)
        assert report.manifest.version == 3 and torch.equal(target["outer"], torch.arange(40_000, dtype=torch.float32))
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=BURST_S)
        server.stop()
    assert "Traceback" not in capfd.readouterr().err


def test_a_state_server_parses_nothing_of_an_unauthenticated_target(capfd):
    server = StateServer(LOOPBACK, ServedState(16_000))
    server.key = KEY
    try:
        for target in ("/state/chunk?" + "&".join(f"f{i}=1" for i in range(5000)), "/state/chunk?version=1e999&index=9" + "9" * 5000):
            for mac in ("", sign(KEY, target, "j")):
                answer = raw(f"{LOOPBACK}:{server.port}", f"GET {target} HTTP/1.1\r\n{MAC_HEADER}: {mac}\r\n{ISLAND_HEADER}: j\r\n\r\n".encode())
                assert answer.startswith((b"HTTP/1.1 401", b"HTTP/1.1 400")), answer[:40]
        assert server.refused >= 2
    finally:
        server.stop()
    assert "Traceback" not in capfd.readouterr().err


class _EndlessLine(socketserver.BaseRequestHandler):
    """A source that answers a manifest request with one line that never ends."""

    def handle(self) -> None:
        self.request.recv(65536)
        self.request.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
        try:
            for _ in range(64):  # 64 MiB at most, then it closes
                self.request.sendall(b"x" * (1 << 20))
        except OSError:
            pass


def test_a_joiner_reads_no_manifest_line_past_its_cap_before_checking_it():
    with socketserver.ThreadingTCPServer((LOOPBACK, 0), _EndlessLine) as liar:
        liar.daemon_threads = True
        threading.Thread(target=liar.serve_forever, daemon=True).start()
        peer = _Peer(Source("liar", LOOPBACK, liar.server_address[1]), KEY, "joiner", 10.0)
        try:
            with pytest.raises(TransferError, match=f"over {MAX_MANIFEST_LINE_BYTES} bytes"):
                next(peer.manifest_lines())
        finally:
            peer.close()
            liar.shutdown()


def test_a_bounded_server_counts_each_connection_once_per_source():
    server = BoundedServer((LOOPBACK, 0), BoundedHandler, max_connections=3, max_per_source=2)
    try:
        assert server.verify_request("s1", ("10.0.0.1", 1)) and server.verify_request("s2", ("10.0.0.1", 2))
        assert not server.verify_request("s3", ("10.0.0.1", 3))  # per source
        assert server.verify_request("s4", ("10.0.0.2", 1))
        assert not server.verify_request("s5", ("10.0.0.3", 1))  # in all
        assert server.turned_away == 2 and server.open_connections == 3
    finally:
        server.server_close()
