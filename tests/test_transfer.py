"""Peer-served state transfer (atoll.comm.transfer): servers in real processes on loopback."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

from atoll.comm.transfer import Manifest, ServedState, Source, StateServer, TransferError, _Peer, fetch_state
from atoll.mesh.auth import sign

KEY = b"k" * 32
NUMEL = 50_000
CHUNK = 16_000  # bytes: 13 chunks of the weights, 13 of the momentum

SERVER = textwrap.dedent("""
    import os, sys, time, torch
    from atoll.comm.transfer import ServedState, StateServer
    die_after = int(sys.argv[1])
    torch.manual_seed(0)
    outer, momentum = torch.randn({numel}), torch.randn({numel})
    state = ServedState({chunk})
    state.publish(7, {{"outer": outer, "momentum": momentum}}, step=140, samples=4480)
    def on_chunk(n):
        if die_after and n >= die_after:
            os._exit(9)  # the process dies mid-transfer, sockets and all
        time.sleep(0.02)  # slow enough that both sources serve
    server = StateServer("127.0.0.1", state, on_chunk)
    server.key = {key!r}
    print(server.port, flush=True)
    sys.stdin.read()  # until the test closes our stdin
""").format(numel=NUMEL, chunk=CHUNK, key=KEY)


def expected() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return torch.randn(NUMEL), torch.randn(NUMEL)


@pytest.fixture
def servers():
    procs: list[subprocess.Popen] = []

    def start(die_after: int = 0) -> Source:
        proc = subprocess.Popen([sys.executable, "-c", SERVER, str(die_after)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        port = int(proc.stdout.readline())
        return Source(f"island{len(procs)}", "127.0.0.1", port)

    yield start
    for proc in procs:
        proc.kill()
        proc.wait(timeout=10)


def buffers() -> dict[str, torch.Tensor]:
    return {"outer": torch.zeros(NUMEL), "momentum": torch.zeros(NUMEL)}


@pytest.mark.timeout(60)
def test_state_arrives_verified_from_two_sources_and_survives_one_dying_mid_transfer(servers):
    steady, dying = servers(), servers(die_after=4)
    into = buffers()
    report = fetch_state([steady, dying], KEY, "joiner", into, timeout=10)
    outer, momentum = expected()
    assert torch.equal(into["outer"], outer) and torch.equal(into["momentum"], momentum)
    assert report.manifest.version == 7 and (report.manifest.step, report.manifest.samples) == (140, 4480)
    assert len(report.manifest.hashes) == 26
    # the dying source delivered some chunks before it died; the steady one did the rest
    assert 0 < report.chunks_from["island2"] < 26 and report.chunks_from["island1"] + report.chunks_from["island2"] == 26
    # it died after the answer's headers went out: the joiner reads a short chunk, not a lying one
    assert "cut short" in report.dropped["island2"] or "reset" in report.dropped["island2"]
    assert "26 chunks verified" in report.describe() and "dropped 'island2'" in report.describe()


@pytest.mark.timeout(60)
def test_without_the_run_key_nothing_is_served(servers):
    source = servers()
    with pytest.raises(TransferError, match="HTTP 401"):
        fetch_state([source], b"x" * 32, "outsider", buffers(), timeout=10)


@pytest.mark.timeout(60)
def test_a_replayed_request_is_refused(servers):
    source = servers()
    peer = _Peer(source, KEY, "joiner", 10)
    status, _, _, _ = peer.get("/state/manifest")
    assert status == 200
    # one request with a fixed nonce, sent twice (the second is what an eavesdropper replays)
    target = peer.conn
    path = "/state/manifest?nonce=fixed"
    for expected_status in (200, 401):
        target.request("GET", path, headers={"X-Atoll-Mac": sign(KEY, path, "joiner"), "X-Atoll-Island": "joiner"})
        response = target.getresponse()
        response.read()
        assert response.status == expected_status
    peer.close()


@pytest.mark.timeout(60)
def test_a_source_that_sends_bytes_off_the_manifest_is_dropped_and_the_others_fill_in():
    outer, momentum = expected()
    honest = ServedState(CHUNK)
    honest.publish(7, {"outer": outer.clone(), "momentum": momentum.clone()}, 140, 4480)
    liar = ServedState(CHUNK)
    liar.publish(7, {"outer": outer.clone(), "momentum": momentum.clone()}, 140, 4480)
    liar.manifest()  # hashed over the true bytes, then the buffers change under it
    liar._tensors[0][1].add_(1.0)
    servers = [StateServer("127.0.0.1", honest, lambda n: threading.Event().wait(0.01)), StateServer("127.0.0.1", liar)]
    for server in servers:
        server.key = KEY
    try:
        into = buffers()
        report = fetch_state([Source("honest", "127.0.0.1", servers[0].port), Source("liar", "127.0.0.1", servers[1].port)], KEY, "joiner", into, 10)
        assert torch.equal(into["outer"], outer) and torch.equal(into["momentum"], momentum)
        assert "does not match the manifest's sha256" in report.dropped["liar"]
    finally:
        for server in servers:
            server.stop()


class SlowHashing(ServedState):
    """Hashes 20 ms a chunk and records how many chunks its server had sent at each hash."""

    server: StateServer | None = None
    sent_at_hash: list[int]

    def hashes(self, version):
        self.sent_at_hash = []
        for digest in super().hashes(version):
            threading.Event().wait(0.02)
            self.sent_at_hash.append(self.server.served_chunks if self.server else 0)
            yield digest


def serve_in_process(*states: ServedState) -> list[StateServer]:
    servers = [StateServer("127.0.0.1", state) for state in states]
    for server in servers:
        server.key = KEY
    return servers


@pytest.mark.timeout(60)
def test_chunks_travel_while_the_source_is_still_hashing_its_state():
    outer, momentum = expected()
    state = SlowHashing(CHUNK)
    state.publish(7, {"outer": outer, "momentum": momentum}, 140, 4480)
    [server] = serve_in_process(state)
    state.server = server
    try:
        into = buffers()
        report = fetch_state([Source("a", "127.0.0.1", server.port)], KEY, "joiner", into, 10)
        assert torch.equal(into["outer"], outer) and torch.equal(into["momentum"], momentum)
        # when it hashed its last chunk, the source had already sent most of the others
        assert len(state.sent_at_hash) == 26 and state.sent_at_hash[-1] >= 13, state.sent_at_hash
        assert report.manifest_s < report.hashed_s <= report.seconds
        # a later joiner of the same version is answered from the kept hashes
        assert fetch_state([Source("a", "127.0.0.1", server.port)], KEY, "joiner2", buffers(), 10).manifest == report.manifest
        assert len(state.sent_at_hash) == 26 and state._hashes == list(report.manifest.hashes)
    finally:
        server.stop()


@pytest.mark.timeout(60)
def test_a_source_whose_hashes_the_others_do_not_share_is_dropped():
    outer, momentum = expected()
    states = [ServedState(CHUNK) for _ in range(3)]
    for n, state in enumerate(states):  # the third holds other values under the same version
        state.publish(7, {"outer": outer + (n == 2), "momentum": momentum.clone()}, 140, 4480)
    servers = serve_in_process(*states)
    try:
        into = buffers()
        report = fetch_state([Source(f"i{n}", "127.0.0.1", s.port) for n, s in enumerate(servers)], KEY, "joiner", into, 10)
        assert torch.equal(into["outer"], outer) and torch.equal(into["momentum"], momentum)
        assert report.dropped == {"i2": "its hash of chunk 0 is not the one the others agree on"}
        assert set(report.chunks_from) == {"i0", "i1"} and sum(report.chunks_from.values()) == 26
    finally:
        for server in servers:
            server.stop()


@pytest.mark.timeout(60)
def test_a_version_withdrawn_mid_transfer_fails_the_fetch_and_the_buffers_do_not_fit_another_model():
    outer, momentum = expected()
    state = ServedState(CHUNK)
    state.publish(7, {"outer": outer, "momentum": momentum}, 140, 4480)

    def withdraw(n: int) -> None:
        if n == 3:
            with state.changing():
                pass  # an outer step is applied: version 7 is no longer served

    server = StateServer("127.0.0.1", state, withdraw)
    server.key = KEY
    try:
        with pytest.raises(TransferError, match="chunks missing: every source was dropped"):
            fetch_state([Source("a", "127.0.0.1", server.port)], KEY, "joiner", buffers(), 10)
        state.publish(8, {"outer": outer, "momentum": momentum}, 160, 5120)
        with pytest.raises(TransferError, match="does not fit"):
            fetch_state([Source("a", "127.0.0.1", server.port)], KEY, "joiner", {"outer": torch.zeros(10), "momentum": torch.zeros(10)}, 10)
    finally:
        server.stop()


def test_a_manifest_round_trips_and_a_truncated_one_is_refused():
    manifest = Manifest(3, 60, 960, (("outer", 10), ("momentum", 10)), 16, tuple(f"{i:064x}" for i in range(6)))
    assert [span for span in manifest.chunks()] == [(0, 0, 16), (0, 16, 32), (0, 32, 40), (1, 0, 16), (1, 16, 32), (1, 32, 40)]
    assert Manifest.from_json(manifest.to_json()) == manifest
    raw = json.loads(manifest.to_json())
    raw["hashes"] = raw["hashes"][:-1]
    with pytest.raises(ValueError, match="do not match its chunks"):
        Manifest.from_json(json.dumps(raw).encode())
