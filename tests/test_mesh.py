"""The mesh: epoch decisions, the coordinator's service and its clients, and the global groups.

Everything listens on 127.0.0.1 with port 0 (or a free port), so tests never collide. The
coordinator serves in its threads; islands are `CoordinatorClient`s in the test process, or real
processes where the behaviour is multi-process.
"""

from __future__ import annotations

import http.client
import json
import multiprocessing
import queue
import random
import socket
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest

from conftest import free_port

from atoll import errors
from atoll.comm.allreduce import ring_bytes
from atoll.errors import ExpectedFailure, UserError
from atoll.mesh import protocol
from atoll.mesh.auth import epoch_key, run_key, sign, verify
from atoll.mesh.client import CoordinatorClient, Heartbeat, new_incarnation, parse_address, register, wait_for_admission
from atoll.mesh.coordinator import RENDEZVOUS_VALUE_CHARS, Coordinator
from atoll.mesh.membership import RECONNECT_SLACK_S, Epoch, Registration, Rules, fingerprint_mismatch, first_epoch

LOOPBACK = "127.0.0.1"
CONNECT_TIMEOUT_S = 5
PROCESS_TIMEOUT_S = 60
TOKEN = "s3cret-run-token"
FINGERPRINT = {"model": "debug", "seq_len": 64}


@pytest.fixture
def serving_coordinator():
    """A coordinator waiting for two islands, serving in its own threads."""
    coord = Coordinator(LOOPBACK, 0, 2, token=TOKEN).start()
    yield coord
    coord.stop()


def coordinator_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("atoll-coordinator")]


def client(address: str, island: str, token: str | None = TOKEN, incarnation: str | None = None, channel: str = "main") -> CoordinatorClient:
    return CoordinatorClient(address, island, incarnation or new_incarnation(), token, CONNECT_TIMEOUT_S, 10.0, channel)


def joined(address: str, island: str, fingerprint: dict = FINGERPRINT, local_ranks: int = 1) -> tuple[CoordinatorClient, Heartbeat]:
    """An island process as `join_mesh` makes it: registered, beating on its own connection."""
    main = client(address, island)
    register(main, local_ranks, fingerprint)
    beat = client(address, island, incarnation=main.incarnation, channel="beat")
    return main, Heartbeat(beat, 0.2)


def admitted(main: CoordinatorClient, after: int = -1) -> Epoch:
    return wait_for_admission(main, after, lambda line: None)


def raw_rpc(address: str, body: bytes, mac: str) -> tuple[int, bytes]:
    """What an outsider can do: send any bytes to the service."""
    host, port = parse_address(address)
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request("POST", protocol.RPC_PATH, body=body, headers={protocol.MAC_HEADER: mac})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


# --- first_epoch, fingerprints, auth: the pure parts ---------------------------------------------


def test_first_epoch_waits_until_min_islands_have_registered():
    assert first_epoch([], 2, now=1.0) is None
    assert first_epoch([Registration("a", "i1", 1)], 2, now=1.0) is None


def test_first_epoch_takes_the_first_min_arrivals_and_orders_them_by_id_not_arrival():
    arrived = [Registration("c", "ic", 2), Registration("a", "ia", 2), Registration("b", "ib", 2)]

    epoch = first_epoch(arrived, 2, now=123.5)

    assert epoch == Epoch(0, ("a", "c"), 2, "start", ("ia", "ic"))
    assert epoch.started_at == 123.5
    assert first_epoch(list(reversed(arrived[:2])), 2, now=0.0).members == ("a", "c")  # order of arrival does not matter


def test_first_epoch_ignores_the_shape_of_islands_beyond_min_islands():
    arrived = [Registration("a", "", 1), Registration("b", "", 1), Registration("late", "", 4)]

    assert first_epoch(arrived, 2, now=0.0).members == ("a", "b")


def test_first_epoch_refuses_islands_with_different_local_ranks_and_names_them():
    arrived = [Registration("alpha", "", 1), Registration("beta", "", 2)]

    with pytest.raises(ValueError, match="same number of local ranks") as err:
        first_epoch(arrived, 2, now=0.0)

    assert "alpha: 1" in str(err.value)
    assert "beta: 2" in str(err.value)


def test_epoch_and_registration_survive_a_dict_round_trip():
    epoch = Epoch(3, ("x", "y", "z"), 4, "join", ("1", "2", "3"), 1700000000.25)
    registration = Registration("island-7", "abc", 8, {"seq_len": 64})

    back = Epoch.from_dict(json.loads(json.dumps(epoch.to_dict())))
    assert back == epoch
    assert back.started_at == 1700000000.25  # not part of ==, so checked on its own
    assert Registration.from_dict(json.loads(json.dumps(registration.to_dict()))).fingerprint == {"seq_len": 64}


def test_epoch_index_of_is_the_rank_in_member_order_and_has_checks_the_incarnation():
    epoch = Epoch(0, ("a", "b", "c"), 1, "start", ("i", "j", "k"))

    assert [epoch.index_of(i) for i in ("a", "b", "c")] == [0, 1, 2]
    assert epoch.world == 3
    assert epoch.has("b", "j") and not epoch.has("b", "old") and not epoch.has("stranger", "j")
    with pytest.raises(ValueError):
        epoch.index_of("stranger")


def test_fingerprint_mismatch_names_every_differing_key_with_both_values():
    run = {"seq_len": 64, "seed": 0, "codec": "int8"}
    island = {"seq_len": 128, "seed": 0, "streams": 2}

    assert fingerprint_mismatch(run, dict(run)) == []
    assert fingerprint_mismatch(run, island) == [
        "codec: run has 'int8', island has None",
        "seq_len: run has 64, island has 128",
        "streams: run has None, island has 2",
    ]


def test_macs_bind_the_key_and_every_part_and_keys_differ_by_run_and_epoch():
    key = run_key(TOKEN, "run-1")
    mac = sign(key, "ab", "c")

    assert verify(key, mac, "ab", "c")
    assert not verify(key, mac, "a", "bc")  # parts are length-prefixed: no re-splitting
    assert not verify(run_key(TOKEN, "run-2"), mac, "ab", "c")  # another run, another key
    assert not verify(run_key("guess", "run-1"), mac, "ab", "c")
    assert epoch_key(key, 1, ("a",), ("i",)) != epoch_key(key, 2, ("a",), ("i",)) != epoch_key(key, 1, ("a",), ("j",))


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


# --- the coordinator's service and its clients, in-process -----------------------------------------


def test_two_islands_are_admitted_to_the_same_epoch_zero_in_id_order(serving_coordinator):
    b, beat_b = joined(serving_coordinator.address, "b")
    a, beat_a = joined(serving_coordinator.address, "a")
    try:
        epoch_a, epoch_b = admitted(a), admitted(b)
    finally:
        beat_a.stop(), beat_b.stop()

    assert epoch_a == epoch_b
    assert epoch_a.members == ("a", "b") and epoch_a.incarnations == (a.incarnation, b.incarnation)
    assert epoch_a.number == 0 and epoch_a.local_ranks == 1 and epoch_a.started_at > 0


def test_a_waiting_island_hears_where_the_run_is_instead_of_an_epoch(serving_coordinator):
    a, beat = joined(serving_coordinator.address, "a")
    try:
        answer = a.call("admission", {"after": -1, "wait_s": 0.2}, 0.2)
    finally:
        beat.stop()
    assert answer == {"status": "waiting for 2 island(s) to start the run (1 arrived)"}


def test_an_island_with_another_shape_or_job_is_refused_naming_what_differs(serving_coordinator):
    a, beat = joined(serving_coordinator.address, "a")
    try:
        with pytest.raises(UserError, match="--nproc 1"):
            joined(serving_coordinator.address, "b", local_ranks=2)
        with pytest.raises(UserError) as err:
            joined(serving_coordinator.address, "c", fingerprint={"model": "debug", "seq_len": 128})
    finally:
        beat.stop()
    assert "seq_len: run has 64, island has 128" in str(err.value) and "\n" not in str(err.value)
    assert err.value.exit_code == errors.CONFIG_MISMATCH


def test_a_second_live_process_under_the_same_id_is_refused(serving_coordinator):
    first, beat = joined(serving_coordinator.address, "a")
    try:
        time.sleep(0.5)  # a couple of beats: the first is visibly alive
        with pytest.raises(UserError, match="in use by a live process") as err:
            joined(serving_coordinator.address, "a")
        assert err.value.exit_code == errors.DUPLICATE
    finally:
        beat.stop()


def test_a_new_incarnation_replaces_a_dead_member_at_once_and_never_enters_its_epoch():
    coord = Coordinator(LOOPBACK, 0, 2, token=TOKEN).start()
    try:
        a, beat_a = joined(coord.address, "a")
        b, beat_b = joined(coord.address, "b")
        assert admitted(a).members == ("a", "b")
        beat_a._stop.set(), beat_a._thread.join()
        beat_a._client.close()  # the process died: its control connection closes, no deathrattle
        start = time.monotonic()
        while coord.epoch.number == 0 and time.monotonic() - start < 10:
            time.sleep(0.01)
        grace = 2 * 0.2 + RECONNECT_SLACK_S  # no beat on a new connection within it: dead, before the heartbeat timeout
        assert grace <= time.monotonic() - start < grace + 2.0 < Rules().heartbeat_timeout_s
        assert coord.epoch.members == ("b",) and coord.epoch.reason == "departed"

        again, beat_again = joined(coord.address, "a")  # the restarted process: a joiner
        answer = again.call("admission", {"after": -1, "wait_s": 0.3}, 0.3)
        assert "epoch" not in answer  # epoch 0 and 1 were formed before it registered
        assert answer["fetch"] == {"step": 0, "sources": []}  # b serves no state in this test
        assert again.call("ready", {"step": -1}) == {}
        assert b.call("result", {"epoch": 1, "step": 1, "round": 0, "ok": True, "digest": "d", "wait_s": 5}, 5)["outcome"] == "commit"
        assert "epoch" not in again.call("admission", {"after": -1, "wait_s": 0.3}, 0.3)  # not at a commit
        assert b.call("barrier", {"epoch": 1, "name": "outer-2", "wait_s": 5}, 5) == {"dissolved": True}  # b at the boundary
        epoch = admitted(again)
        assert epoch.members == ("a", "b") and epoch.has("a", again.incarnation) and epoch.reason == "joined"
        beat_again.stop(), beat_b.stop()
    finally:
        coord.stop()


def test_unreachable_coordinator_is_a_user_error_naming_the_address():
    address = f"{LOOPBACK}:{free_port()}"
    start = time.monotonic()

    with pytest.raises(UserError) as err:
        CoordinatorClient(address, "x", "i", None, 1.0, 1.0)

    assert time.monotonic() - start < 5
    message = str(err.value)
    assert address in message and "atoll coordinator" in message and "\n" not in message


def test_serving_coordinator_stops_promptly():
    coord = Coordinator(LOOPBACK, 0, 2).start()
    assert len(coordinator_threads()) == 2
    coord.stop()
    assert coordinator_threads() == []


def test_garbage_and_idle_connections_do_not_stop_the_coordinator(serving_coordinator):
    port = serving_coordinator.port
    for seed in range(3):
        with socket.create_connection((LOOPBACK, port), timeout=5) as junk:
            junk.sendall(random.Random(seed).randbytes(4096))
    idle = socket.create_connection((LOOPBACK, port), timeout=5)  # connects, says nothing, stays
    try:
        a, beat_a = joined(serving_coordinator.address, "a")
        b, beat_b = joined(serving_coordinator.address, "b")
        assert admitted(a) == admitted(b)
        beat_a.stop(), beat_b.stop()
    finally:
        idle.close()


def test_a_burst_of_ten_thousand_connections_leaves_members_answered_within_a_second(serving_coordinator):
    a, beat = joined(serving_coordinator.address, "a")
    host, port = parse_address(serving_coordinator.address)
    done = threading.Event()

    def burst(count: int) -> None:
        for _ in range(count):
            try:
                socket.create_connection((host, port), timeout=5).close()
            except OSError:
                pass

    threads = [threading.Thread(target=burst, args=(2500,)) for _ in range(4)]
    for thread in threads:
        thread.start()
    slowest, answered = 0.0, 0
    try:
        while any(t.is_alive() for t in threads):
            start = time.monotonic()
            a.call("latest", {})
            slowest, answered = max(slowest, time.monotonic() - start), answered + 1
            time.sleep(0.05)
    finally:
        done.set()
        for thread in threads:
            thread.join(timeout=60)
        beat.stop()
    assert answered >= 5
    assert slowest < 1.0


# --- what an outsider without the token can and cannot do ------------------------------------------


def test_an_island_with_the_wrong_token_is_refused_in_one_line_and_counted(serving_coordinator):
    stranger = client(serving_coordinator.address, "stranger", token="guess")
    with pytest.raises(UserError) as err:
        register(stranger, 1, FINGERPRINT)
    assert str(err.value).startswith("wrong run token") and "\n" not in str(err.value)
    assert serving_coordinator.refused == 1
    assert "stranger" not in serving_coordinator.views


def test_forged_replayed_and_foreign_requests_change_nothing_and_are_counted(serving_coordinator):
    coord = serving_coordinator
    a, beat_a = joined(coord.address, "a")
    b, beat_b = joined(coord.address, "b")
    try:
        admitted(a)
        boot = a.hello["boot"]
        forgeries = [
            ("leave", "a", {"reason": "forged"}),
            ("report", "a", {"epoch": 0, "what": "forged", "blamed": "b"}),
            ("result", "b", {"epoch": 0, "step": 1, "round": 0, "ok": True, "digest": "x", "wait_s": 0}),
            ("register", "mallory", {"local_ranks": 1, "fingerprint": FINGERPRINT}),
        ]
        for op, island, args in forgeries:
            body = protocol.request_body(op, island, a.incarnation, "main", boot, 10**15, args)
            assert raw_rpc(coord.address, body, sign(run_key("guess", coord.run_id), body))[0] == protocol.REFUSED
            assert raw_rpc(coord.address, body, "")[0] == protocol.REFUSED
        # a message of another run (same token, other run id) does not verify here
        body = protocol.request_body("leave", "a", a.incarnation, "main", boot, 10**15, {"reason": "other run"})
        assert raw_rpc(coord.address, body, sign(run_key(TOKEN, "another-run"), body))[0] == protocol.REFUSED
        # a genuine request, captured and replayed
        body = protocol.request_body("latest", "a", a.incarnation, "spy", boot, 1, {})
        mac = sign(a.key, body)
        assert raw_rpc(coord.address, body, mac)[0] == 200
        assert raw_rpc(coord.address, body, mac)[0] == protocol.REFUSED
        assert coord.refused == 2 * len(forgeries) + 2
        assert coord.epoch.members == ("a", "b") and coord.epoch.number == 0
        assert all(v.leaving is None and v.failed_at is None and v.result is None for v in coord.views.values())
    finally:
        beat_a.stop(), beat_b.stop()


# --- a coordinator that restarts ------------------------------------------------------------------


def test_a_coordinator_restarted_with_its_journal_continues_the_run_and_islands_keep_their_place(tmp_path):
    port = free_port()
    journal = tmp_path / "coordinator.journal"
    first = Coordinator(LOOPBACK, port, 2, Rules(heartbeat_timeout_s=5), token=TOKEN, journal_path=journal).start()
    a, beat_a = joined(first.address, "a")
    b, beat_b = joined(first.address, "b")
    second = None
    try:
        epoch = admitted(a)
        assert a.call("result", {"epoch": 0, "step": 1, "round": 0, "ok": True, "digest": "d", "wait_s": 0}, 0) == {}
        first.stop()  # a crash between two requests: nothing in memory survives
        time.sleep(1.0)
        second = Coordinator(LOOPBACK, port, 2, Rules(heartbeat_timeout_s=5), token=TOKEN, journal_path=journal).start()
        assert second.run_id == first.run_id and second.boot != first.boot
        assert second.epoch == epoch
        # the islands' next requests go through (the clients say hello to the new boot) and decide
        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(lambda c: c.call("result", {"epoch": 0, "step": 1, "round": 0, "ok": True, "digest": "d", "wait_s": 5}, 5), (a, b)))
        assert [r["outcome"] for r in results] == ["commit", "commit"]
        time.sleep(1.0)
        assert second.epoch.number == 0 and second.epoch.members == ("a", "b")  # nobody was dropped by the restart
    finally:
        beat_a.stop(), beat_b.stop()
        if second is not None:
            second.stop()


# --- the global group, across real processes ---------------------------------------------------


def _island_allreduce(address: str, island_id: str, value: float, results: multiprocessing.Queue) -> None:
    """One island process: join the coordinator's epoch 0 and average a tensor on its global group."""
    try:
        import torch

        from atoll.comm.allreduce import GlobalMean
        from atoll.comm.codecs import get_codec
        from atoll.mesh.groups import global_groups
        from atoll.mesh.rendezvous import EpochStore

        main, beat = joined(address, island_id)
        epoch = admitted(main)
        groups = global_groups(lambda prefix: EpochStore(main, epoch.number, prefix, timedelta(seconds=20)), epoch, island_id, 0, 1, timedelta(seconds=20))
        tensor = torch.full((1000,), value)
        mean = GlobalMean(groups, get_codec("fp32"), deadline_s=20.0, chunk_bytes=1 << 20)
        mean.mean_(tensor)
        beat.stop()
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


# --- the command line: safe defaults ------------------------------------------------------------------


def test_coordinator_on_a_non_loopback_address_without_a_token_refuses_in_one_line(monkeypatch):
    from conftest import run_atoll

    monkeypatch.delenv("ATOLL_RUN_TOKEN", raising=False)
    result = run_atoll(["coordinator", "--host", "0.0.0.0", "--port", str(free_port()), "--islands", "1"], timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "without a run token" in lines[0] and "atoll token" in lines[0] and "--insecure" in lines[0]


def test_atoll_token_prints_a_fresh_token_each_time():
    from conftest import run_atoll

    tokens = [run_atoll(["token"], timeout=60).stdout.strip() for _ in range(2)]
    assert tokens[0] != tokens[1] and all(len(t) >= 40 for t in tokens)


def test_the_coordinator_listens_on_exactly_the_address_it_was_given():
    psutil = pytest.importorskip("psutil")
    coord = Coordinator(LOOPBACK, 0, 1, token=TOKEN)
    try:
        listening = {c.laddr for c in psutil.Process().net_connections("tcp") if c.status == psutil.CONN_LISTEN}
        ours = {addr for addr in listening if addr.port == coord.port}
        assert {addr.port for addr in ours} == {coord.port}  # no rendezvous port: it is the protocol's
        assert {addr.ip for addr in ours} == {LOOPBACK}
    finally:
        coord.stop()


def test_a_ready_joiner_is_never_made_the_run_when_every_member_is_gone(serving_coordinator):
    # the members hold the run's state; a joiner that fetched it is ready, then both members leave
    # before any boundary: the run has ended, and the joiner is told so instead of restarting it
    a, beat_a = joined(serving_coordinator.address, "a")
    b, beat_b = joined(serving_coordinator.address, "b")
    admitted(a)
    c, beat_c = joined(serving_coordinator.address, "c")
    try:
        assert admitted(c) == {"step": 0, "sources": []}  # wait_for_admission's fetch instructions
        assert c.call("ready", {"step": 0}) == {}
        for member, beat in ((a, beat_a), (b, beat_b)):
            member.call("leave", {"reason": "operator stop"})
            beat.stop()
        with pytest.raises(ExpectedFailure, match="has ended") as err:
            admitted(c)
        assert err.value.exit_code == errors.RUN_ENDED
        assert all("c" not in epoch.members for epoch in serving_coordinator.epochs.values())  # never an epoch of joiners alone
    finally:
        beat_c.stop()


# --- the rendezvous: members of the current epoch only ---------------------------------------------


def test_only_the_current_epochs_members_write_and_read_its_rendezvous_and_it_is_dropped_with_the_epoch(serving_coordinator):
    coord = serving_coordinator
    a, beat_a = joined(coord.address, "a")
    b, beat_b = joined(coord.address, "b")
    try:
        epoch = admitted(a)
        assert a.call("rendezvous_set", {"epoch": epoch.number, "key": "k/0/0", "value": "YQ=="}) == {}
        assert b.call("rendezvous_get", {"epoch": epoch.number, "keys": ["k/0/0"], "wait_s": 1}, 1) == {"values": {"k/0/0": "YQ=="}}
        future = a.call("rendezvous_set", {"epoch": epoch.number + 1, "key": "k/0/1", "value": "YQ=="})
        assert "not the current epoch" in future["refused"]
        big = a.call("rendezvous_set", {"epoch": epoch.number, "key": "k/0/2", "value": "A" * (RENDEZVOUS_VALUE_CHARS + 1)})
        assert "over" in big["refused"]
        stranger = client(coord.address, "a")  # a token holder, but not this incarnation
        assert "not a member" in stranger.call("rendezvous_set", {"epoch": epoch.number, "key": "k/0/0", "value": "Yg=="})["refused"]
        body = protocol.request_body("rendezvous_set", "a", a.incarnation, "x", a.hello["boot"], 10**15,
                                     {"epoch": epoch.number, "key": "k/0/0", "value": "Yg=="})
        assert raw_rpc(coord.address, body, sign(run_key("guess", coord.run_id), body))[0] == protocol.REFUSED  # an outsider
        assert b.call("rendezvous_get", {"epoch": epoch.number, "keys": ["k/0/0"], "wait_s": 0}) == {"values": {"k/0/0": "YQ=="}}
        assert b.call("rendezvous_get", {"epoch": epoch.number, "keys": ["k/0/9"], "wait_s": 0.2}, 0.2) == {}  # not set: the poll ends empty
        a.call("leave", {"reason": "operator stop"})
        deadline = time.monotonic() + 10
        while coord.epoch.number == epoch.number and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "not the current epoch" in b.call("rendezvous_get", {"epoch": epoch.number, "keys": ["k/0/0"], "wait_s": 0})["refused"]
        assert coord._rendezvous == {}
    finally:
        beat_a.stop(), beat_b.stop()
