"""The mesh: epoch decisions, the coordinator and its clients, and the global process groups.

Everything listens on 127.0.0.1 with port 0, so the OS picks free ports and tests never collide.
The coordinator is stepped by hand where the test is about its decisions (deterministic) and run
in its thread where the test is about it serving by itself.
"""

from __future__ import annotations

import multiprocessing
import queue
import random
import socket
import threading
import time
import traceback
from datetime import timedelta

import pytest

from atoll.comm.allreduce import ring_bytes
from atoll.errors import UserError
from atoll.mesh.client import MeshClient, parse_address
from atoll.mesh.coordinator import Coordinator
from atoll.mesh.membership import Epoch, Registration, first_epoch

LOOPBACK = "127.0.0.1"
CONNECT_TIMEOUT_S = 5
PROCESS_TIMEOUT_S = 60


@pytest.fixture
def coordinator():
    """A coordinator waiting for two islands, not serving: tests call step() themselves."""
    coord = Coordinator(LOOPBACK, 0, 2)
    yield coord
    coord.stop()


@pytest.fixture
def serving_coordinator():
    """A coordinator waiting for two islands, deciding in its own thread."""
    coord = Coordinator(LOOPBACK, 0, 2).start()
    yield coord
    coord.stop()


def free_port() -> int:
    """A port that nothing listens on (bound once by the OS, then released)."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def coordinator_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "atoll-coordinator"]


# --- first_epoch: the pure decision -------------------------------------------------------------


def test_first_epoch_waits_until_min_islands_have_registered():
    assert first_epoch([], 2, now=1.0) is None
    assert first_epoch([Registration("a", 1)], 2, now=1.0) is None


def test_first_epoch_takes_the_first_min_islands_in_arrival_order():
    arrived = [Registration("c", 2), Registration("a", 2), Registration("b", 2)]

    epoch = first_epoch(arrived, 2, now=123.5)

    assert epoch == Epoch(0, ("c", "a"), 2, "start")
    assert epoch.number == 0
    assert epoch.members == ("c", "a")
    assert epoch.local_ranks == 2
    assert epoch.started_at == 123.5


def test_first_epoch_ignores_the_shape_of_islands_beyond_min_islands():
    arrived = [Registration("a", 1), Registration("b", 1), Registration("late", 4)]

    assert first_epoch(arrived, 2, now=0.0).members == ("a", "b")


def test_first_epoch_refuses_islands_with_different_local_ranks_and_names_them():
    arrived = [Registration("alpha", 1), Registration("beta", 2)]

    with pytest.raises(ValueError, match="same number of local ranks") as err:
        first_epoch(arrived, 2, now=0.0)

    assert "alpha: 1" in str(err.value)
    assert "beta: 2" in str(err.value)


def test_epoch_and_registration_survive_a_json_round_trip():
    epoch = Epoch(3, ("x", "y", "z"), 4, "join", 1700000000.25)
    registration = Registration("island-7", 8)

    back = Epoch.from_json(epoch.to_json())
    assert back == epoch
    assert back.started_at == 1700000000.25  # not part of ==, so checked on its own
    assert Epoch.from_json(epoch.to_json().encode()) == epoch
    assert Registration.from_json(registration.to_json()) == registration
    assert Registration.from_json(registration.to_json().encode()) == registration


def test_epoch_index_of_is_the_rank_in_member_order_and_world_counts_members():
    epoch = Epoch(0, ("b", "a", "c"), 1)

    assert [epoch.index_of(i) for i in ("b", "a", "c")] == [0, 1, 2]
    assert epoch.world == 3
    with pytest.raises(ValueError):
        epoch.index_of("stranger")


# --- parse_address ------------------------------------------------------------------------------


@pytest.mark.parametrize("address", ["nohost", "host:", ":123", "h:99999", "h:abc", "h:0", "h:-1", ""])
def test_parse_address_rejects_malformed_addresses_with_a_user_error(address):
    with pytest.raises(UserError, match="is not host:port"):
        parse_address(address)


def test_parse_address_splits_host_and_port():
    assert parse_address("127.0.0.1:29400") == ("127.0.0.1", 29400)
    assert parse_address("coordinator.example.org:1") == ("coordinator.example.org", 1)
    assert parse_address("h:65535") == ("h", 65535)


def test_parse_address_takes_bracketed_ipv6_and_ascii_ports_only():
    assert parse_address("[::1]:5") == ("::1", 5)
    assert parse_address("::1:5") == ("::1", 5)
    with pytest.raises(UserError):
        parse_address("h:\u0663")  # an Arabic-Indic digit is not a port


# --- the coordinator and its clients, in-process ------------------------------------------------


def test_two_registered_islands_get_the_same_epoch_zero(coordinator):
    a = MeshClient(coordinator.address, "a", connect_timeout=CONNECT_TIMEOUT_S)
    b = MeshClient(coordinator.address, "b", connect_timeout=CONNECT_TIMEOUT_S)
    a.register(1)
    b.register(1)

    assert coordinator.step() is True

    epoch_a = a.wait_for_epoch(0, timeout=5)
    epoch_b = b.wait_for_epoch(0, timeout=5)
    # Two clients' appends reach the store in either order: members follow the store's order.
    assert epoch_a == epoch_b
    assert sorted(epoch_a.members) == ["a", "b"] and epoch_a.local_ranks == 1 and epoch_a.number == 0
    assert epoch_a.started_at == epoch_b.started_at > 0
    assert tuple(r.island_id for r in coordinator.registrations()) == epoch_a.members
    assert coordinator.step() is True  # once formed, epoch 0 stays as it is


def test_no_epoch_forms_before_enough_islands_and_the_wait_names_the_coordinator(coordinator):
    a = MeshClient(coordinator.address, "a", connect_timeout=CONNECT_TIMEOUT_S)
    assert coordinator.step() is False  # nobody yet
    a.register(1)

    assert coordinator.step() is False
    with pytest.raises(UserError, match="no epoch 0") as err:
        a.wait_for_epoch(0, timeout=0.3)
    assert coordinator.address in str(err.value)


def test_islands_with_different_local_ranks_are_told_why_the_run_cannot_start(coordinator):
    a = MeshClient(coordinator.address, "a", connect_timeout=CONNECT_TIMEOUT_S)
    b = MeshClient(coordinator.address, "b", connect_timeout=CONNECT_TIMEOUT_S)
    a.register(1)
    b.register(2)

    assert coordinator.step() is True  # decided: the error is published

    for client in (a, b):
        with pytest.raises(UserError, match="same number of local ranks") as err:
            client.wait_for_epoch(0, timeout=5)
        message = str(err.value)
        assert coordinator.address in message
        assert "a: 1" in message and "b: 2" in message


def test_unreachable_coordinator_is_a_user_error_naming_the_address():
    address = f"{LOOPBACK}:{free_port()}"
    start = time.monotonic()

    with pytest.raises(UserError) as err:
        MeshClient(address, "x", connect_timeout=1)

    assert time.monotonic() - start < 15  # bounded by connect_timeout and c10d's retry, not a hang
    message = str(err.value)
    assert address in message
    assert "atoll coordinator" in message
    assert "\n" not in message


def join_two_islands(address: str) -> Epoch:
    """Islands "a" and "b" register with a serving coordinator; both must see the same epoch 0."""
    a = MeshClient(address, "a", connect_timeout=CONNECT_TIMEOUT_S)
    b = MeshClient(address, "b", connect_timeout=CONNECT_TIMEOUT_S)
    a.register(1)
    b.register(1)
    epoch = a.wait_for_epoch(0, timeout=10)
    assert epoch == b.wait_for_epoch(0, timeout=10) and sorted(epoch.members) == ["a", "b"]
    return epoch


def test_serving_coordinator_forms_epoch_zero_by_itself_and_stops_promptly():
    coord = Coordinator(LOOPBACK, 0, 2).start()
    try:
        assert len(coordinator_threads()) == 1
        join_two_islands(coord.address)
    finally:
        coord.stop()
    assert coordinator_threads() == []


def test_garbage_and_idle_connections_do_not_stop_the_coordinator(serving_coordinator):
    port = serving_coordinator.port
    for seed in range(3):
        with socket.create_connection((LOOPBACK, port), timeout=5) as junk:
            junk.sendall(random.Random(seed).randbytes(4096))
    idle = socket.create_connection((LOOPBACK, port), timeout=5)  # connects, says nothing, stays
    try:
        join_two_islands(serving_coordinator.address)
        assert coordinator_threads() != []  # still serving
    finally:
        idle.close()


# --- the global group, across real processes ---------------------------------------------------


def _island_allreduce(address: str, island_id: str, value: float, results: multiprocessing.Queue) -> None:
    """One island process: join the coordinator's epoch 0 and average a tensor on its global group."""
    try:
        import torch

        from atoll.comm.allreduce import GlobalMean
        from atoll.comm.codecs import get_codec
        from atoll.mesh.groups import global_groups

        client = MeshClient(address, island_id, connect_timeout=CONNECT_TIMEOUT_S)
        client.register(1)
        epoch = client.wait_for_epoch(0, timeout=30)
        groups = global_groups(client.store, epoch, island_id, 0, 1, timedelta(seconds=20))
        tensor = torch.full((1000,), value)
        mean = GlobalMean(groups, get_codec("fp32"), deadline_s=20.0, chunk_bytes=1 << 20)
        mean.mean_(tensor)
        results.put((island_id, tensor.tolist(), mean.wire.bytes_sent, mean.wire.bytes_recv, groups[0].size()))
    except BaseException:
        results.put((island_id, "error", traceback.format_exc(), 0, 0))
        raise


def test_global_group_averages_a_tensor_across_two_island_processes(serving_coordinator):
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_island_allreduce, args=(serving_coordinator.address, f"island-{i}", float(i), results))
        for i in range(2)
    ]
    try:
        for proc in procs:
            proc.start()
        got = {}
        deadline = time.monotonic() + PROCESS_TIMEOUT_S
        while len(got) < 2:
            try:
                island, values, sent, recv, world = results.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"islands did not report within {PROCESS_TIMEOUT_S}s; got {sorted(got)}")
            assert values != "error", f"{island} failed:\n{sent}"
            got[island] = (values, sent, recv, world)
        for proc in procs:
            proc.join(timeout=PROCESS_TIMEOUT_S)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)

    assert [proc.exitcode for proc in procs] == [0, 0]
    assert ring_bytes(1000, 4, 2) == 4000
    for island, (values, sent, recv, world) in got.items():
        assert values == [0.5] * 1000, island
        assert sent == recv == 4000
        assert world == 2


# --- ring_bytes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("numel", "element_size", "world", "expected"),
    [
        (1000, 4, 1, 0),  # alone: nothing crosses the wire
        (1000, 4, 2, 4000),  # 2(n-1)/n = 1 x payload
        (1200, 4, 3, 6400),  # 4/3 x 4800 bytes
        (1000, 4, 4, 6000),  # 3/2 x 4000 bytes
        (1000, 1, 4, 1500),  # int8 payload
    ],
)
def test_ring_bytes_is_two_n_minus_one_over_n_times_the_payload(numel, element_size, world, expected):
    assert ring_bytes(numel, element_size, world) == expected


# --- the run token ---------------------------------------------------------------------------------

TOKEN = "s3cret-run-token"


def test_an_island_with_the_wrong_run_token_is_refused_in_one_line_and_the_right_one_gets_a_signed_epoch():
    coord = Coordinator(LOOPBACK, 0, 1, token=TOKEN).start()
    try:
        stranger = MeshClient(coord.address, "stranger", connect_timeout=CONNECT_TIMEOUT_S, token="guess")
        stranger.register(1)
        with pytest.raises(UserError) as err:
            stranger.wait_for_epoch(0, timeout=10)
        assert str(err.value).startswith("wrong run token") and "\n" not in str(err.value)

        friend = MeshClient(coord.address, "friend", connect_timeout=CONNECT_TIMEOUT_S, token=TOKEN)
        friend.register(1)
        epoch = friend.wait_for_epoch(0, timeout=10)
        assert epoch.members == ("friend",) and epoch.mac
    finally:
        coord.stop()


def test_an_epoch_forged_without_the_token_is_rejected():
    coord = Coordinator(LOOPBACK, 0, 1, token=TOKEN).start()
    try:
        island = MeshClient(coord.address, "a", connect_timeout=CONNECT_TIMEOUT_S, token=TOKEN)
        island.register(1)
        island.wait_for_epoch(0, timeout=10)
        coord.stop()  # the forger writes after the coordinator's last word
        forged = Epoch(0, ("a", "mallory"), 1, "start", 1.0, mac="00" * 32)
        island.store.set("atoll/epoch/0", forged.to_json())
        with pytest.raises(UserError, match="wrong run token"):
            island.epoch(0)
    finally:
        coord.stop()


def test_atoll_train_with_the_wrong_token_exits_2_with_one_line(monkeypatch, tmp_path):
    from conftest import run_atoll

    coord = Coordinator(LOOPBACK, 0, 1, token=TOKEN).start()
    try:
        monkeypatch.setenv("ATOLL_RUN_TOKEN", "not-the-token")
        result = run_atoll(["train", "configs/debug.toml", "--coordinator", coord.address, "--run-dir", str(tmp_path / "r"),
                            "--mesh.join_timeout_s", "20"], timeout=90)
    finally:
        coord.stop()
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("atoll: error: wrong run token"), result.stderr


def test_a_joiner_with_a_different_number_of_local_ranks_is_refused():
    coord = Coordinator(LOOPBACK, 0, 1).start()
    try:
        first = MeshClient(coord.address, "a", connect_timeout=CONNECT_TIMEOUT_S)
        first.register(2)
        first.wait_for_epoch(0, timeout=10)
        late = MeshClient(coord.address, "b", connect_timeout=CONNECT_TIMEOUT_S)
        late.register(1)
        with pytest.raises(UserError, match="--nproc 2"):
            late.wait_for_admission(timeout=10)
    finally:
        coord.stop()
