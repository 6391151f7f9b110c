"""The emulated WAN: its flags, the delay line, and delay and rate measured through real namespaces.

Tests that build namespaces need root and /dev/net/tun and skip with that reason otherwise. Their
probes are Python sockets created inside the test's own namespaces (`run_in_namespace`) and talk
only to addresses there, with bounded counts and socket timeouts; each such test checks that its
namespaces are gone afterwards.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import REPO
from test_simulate import descendants, run_simulate

from atoll.cli import main
from atoll.errors import UserError
from atoll.wan.delay_line import DelayLine, Link, uniform_delays
from atoll.wan.namespaces import list_namespaces, privilege_problem, remove_stale_namespaces, run_in_namespace
from atoll.wan.network import EmulatedWan, LinkShape, link_shape
from atoll.wan.units import parse_delay, parse_rate

DEBUG_CONFIG = str(REPO / "configs" / "debug.toml")
PROBLEM = privilege_problem()
needs_namespaces = pytest.mark.skipif(PROBLEM is not None, reason=PROBLEM or "")

ONE_WAY_S = 0.020
RATE_BPS = 100_000_000
IO_TIMEOUT_S = 10
ROUND_TRIPS = 20
BULK_BYTES = 25_000_000  # 2 s at 100 Mbit/s: long enough that TCP slow start is a few percent
SIMULATE_TIMEOUT_S = 240


# --- flag parsing --------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "bits"), [
    ("100mbit", 100_000_000), ("1gbit", 10**9), ("500kbit", 500_000), ("1.5Mbit", 1_500_000), (" 64bit ", 64),
])
def test_rates_are_bits_per_second_in_tc_units(text, bits):
    assert parse_rate(text) == bits


@pytest.mark.parametrize(("text", "seconds"), [("20ms", 0.020), ("0ms", 0.0), ("1.5s", 1.5), ("250us", 250e-6)])
def test_delays_are_seconds(text, seconds):
    assert parse_delay(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["100", "fast", "100mb", "100 mbps", "0mbit", "-5mbit", ""])
def test_a_bad_rate_names_the_flag_and_gives_an_example(text):
    with pytest.raises(UserError) as err:
        parse_rate(text)
    assert str(err.value) == (
        f"--wan-rate {text!r} is not a link rate: write a positive number and a unit (bit, kbit, mbit, gbit), "
        "e.g. --wan-rate 100mbit"
    )


@pytest.mark.parametrize("text", ["20", "-5ms", "20 minutes", "ms"])
def test_a_bad_delay_names_the_flag_and_gives_an_example(text):
    with pytest.raises(UserError) as err:
        parse_delay(text)
    assert str(err.value) == (
        f"--wan-delay {text!r} is not a delay: write a number and a unit (us, ms, s), e.g. --wan-delay 20ms"
    )


def test_simulate_with_a_bad_wan_flag_is_one_line_and_exit_2(capsys):
    code = main(["simulate", DEBUG_CONFIG, "--wan-rate", "100mb"])

    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    assert err.splitlines() == [
        "atoll: error: --wan-rate '100mb' is not a link rate: write a positive number and a unit "
        "(bit, kbit, mbit, gbit), e.g. --wan-rate 100mbit"
    ]


def test_demo_with_a_wan_but_without_root_says_so_in_one_line_and_exits_2(capsys, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)

    code = main(["demo", "--wan-delay", "20ms"])

    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    assert err.splitlines() == [
        "atoll: error: the emulated WAN (--wan-rate/--wan-delay) needs root to create network namespaces: "
        "run as root or drop the --wan-* flags"
    ]


# --- link settings -------------------------------------------------------------------------------


def test_link_mtu_is_a_millisecond_of_the_rate_clamped_and_tbf_buffers_one_round_trip():
    # 100 Mbit/s = 12.5 MB/s: MTU 12,500 B, burst 2 MTU, queue = burst + 12.5 MB/s x 40 ms
    assert link_shape(RATE_BPS, ONE_WAY_S) == LinkShape(mtu=12_500, burst_bytes=25_000, limit_bytes=525_000)
    assert link_shape(10**9, 0.005).mtu == 65_000
    assert link_shape(500_000, 0.0) == LinkShape(mtu=1_500, burst_bytes=3_000, limit_bytes=3_000 + 312)
    assert link_shape(None, ONE_WAY_S).mtu == 65_000


# --- the delay line, on datagram socket pairs standing in for TUN devices ------------------------


def ipv4_packet(dst: str, payload: bytes) -> bytes:
    """Enough of an IPv4 header for the delay line: version nibble and destination address."""
    return bytes([0x45]) + bytes(15) + socket.inet_aton(dst) + payload


def test_delay_line_holds_packets_for_the_pair_delay_keeps_their_order_and_drops_strangers():
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(2)]
    for ours, _ in pairs:
        ours.setblocking(False)
    links = [Link(ours.fileno(), f"10.77.0.{i + 1}") for i, (ours, _) in enumerate(pairs)]
    stop_read, stop_write = os.pipe()
    line = DelayLine(links, uniform_delays(2, ONE_WAY_S))
    thread = threading.Thread(target=line.run, args=(stop_read,), daemon=True)
    thread.start()
    try:
        island0, island1 = pairs[0][1], pairs[1][1]
        island1.settimeout(IO_TIMEOUT_S)
        sent = time.monotonic()
        island0.send(ipv4_packet("10.77.0.9", b"stranger"))
        island0.send(bytes([0x60]) + bytes(39))  # IPv6
        for i in range(5):
            island0.send(ipv4_packet("10.77.0.2", bytes([i])))
        received = [island1.recv(100)[-1] for _ in range(5)]
        elapsed = time.monotonic() - sent

        assert received == [0, 1, 2, 3, 4]
        assert ONE_WAY_S <= elapsed < ONE_WAY_S + 0.015
        assert select.select([island0, island1], [], [], 3 * ONE_WAY_S)[0] == []  # the strangers were dropped
    finally:
        os.close(stop_write)
        thread.join(timeout=IO_TIMEOUT_S)
        os.close(stop_read)
        for ours, theirs in pairs:
            ours.close()
            theirs.close()
    assert not thread.is_alive()


def test_delay_line_rejects_a_matrix_of_the_wrong_shape():
    with pytest.raises(ValueError, match="2x2"):
        DelayLine([Link(0, "10.77.0.1"), Link(1, "10.77.0.2")], [[0.0]])


# --- real namespaces -----------------------------------------------------------------------------


@pytest.fixture
def make_wan():
    """Start EmulatedWans; afterwards close them and check none of their namespaces is left."""
    started: list[EmulatedWan] = []

    def make(islands: int, rate_bps: int | None, delay_s: float) -> EmulatedWan:
        wan = EmulatedWan(islands, rate_bps, delay_s)
        started.append(wan)
        return wan.start()

    yield make
    for wan in started:
        wan.close()
        assert not set(wan.island_namespaces + [wan.coordinator_namespace]) & set(list_namespaces())
        assert wan.delay_line is None or wan.delay_line.poll() is not None


def listen_in(namespace: str, host: str) -> socket.socket:
    """A listening TCP socket on `host` (any port) inside `namespace`."""
    server = run_in_namespace(namespace, lambda: socket.create_server((host, 0)))
    server.settimeout(IO_TIMEOUT_S)
    return server


def connect_from(namespace: str, server: socket.socket) -> tuple[socket.socket, socket.socket]:
    """(client in `namespace`, accepted connection) for a server socket of another namespace."""
    client = run_in_namespace(namespace, lambda: socket.create_connection(server.getsockname(), timeout=IO_TIMEOUT_S))
    conn, _ = server.accept()
    conn.settimeout(IO_TIMEOUT_S)
    for sock in (client, conn):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return client, conn


def bulk_mbit_s(wan: EmulatedWan, sender: int, receiver: int, size: int) -> float:
    """Mbit/s of one TCP transfer of `size` bytes from island `sender` to island `receiver`."""
    server = listen_in(wan.island_namespaces[receiver], wan.island_address(receiver))
    client, conn = connect_from(wan.island_namespaces[sender], server)
    received = 0
    with server, client, conn:
        start = time.perf_counter()
        thread = threading.Thread(target=client.sendall, args=(bytes(size),), daemon=True)
        thread.start()
        while received < size:
            chunk = conn.recv(1 << 20)
            assert chunk, "connection closed early"
            received += len(chunk)
        elapsed = time.perf_counter() - start
        thread.join(timeout=IO_TIMEOUT_S)
    return size * 8 / elapsed / 1e6


def round_trips_s(client: socket.socket, conn: socket.socket) -> list[float]:
    """ROUND_TRIPS one-byte echoes, timed at the client."""
    def echo() -> None:
        for _ in range(ROUND_TRIPS):
            conn.sendall(conn.recv(1))

    echoer = threading.Thread(target=echo, daemon=True)
    echoer.start()
    times = []
    for _ in range(ROUND_TRIPS):
        start = time.perf_counter()
        client.sendall(b"x")
        assert client.recv(1) == b"x"
        times.append(time.perf_counter() - start)
    echoer.join(timeout=IO_TIMEOUT_S)
    return times


@needs_namespaces
@pytest.mark.timeout(60)
def test_round_trip_between_islands_and_to_the_coordinator_is_twice_the_one_way_delay(make_wan):
    wan = make_wan(2, None, ONE_WAY_S)
    for target_namespace, host in ((wan.island_namespaces[0], wan.island_address(0)),
                                   (wan.coordinator_namespace, wan.coordinator_host)):
        server = listen_in(target_namespace, host)
        client, conn = connect_from(wan.island_namespaces[1], server)
        with server, client, conn:
            times = round_trips_s(client, conn)
        print(f"round trip to {host}: median {statistics.median(times) * 1e3:.2f} ms, min {min(times) * 1e3:.2f} ms")

        assert min(times) >= 2 * ONE_WAY_S, times  # never early
        assert statistics.median(times) == pytest.approx(2 * ONE_WAY_S, abs=0.003), times


@needs_namespaces
@pytest.mark.timeout(60)
def test_islands_have_no_route_but_the_emulated_subnet(make_wan):
    wan = make_wan(2, None, ONE_WAY_S)
    for name in (*wan.island_namespaces, wan.coordinator_namespace):
        routes = subprocess.run(["ip", "-n", name, "-4", "route", "show"], capture_output=True, text=True, check=True)
        assert [line.split()[:3] for line in routes.stdout.splitlines()] == [["10.77.0.0/24", "dev", "wan0"]], name


@needs_namespaces
@pytest.mark.timeout(60)
def test_bulk_transfer_over_a_100mbit_20ms_link_runs_near_the_rate(make_wan):
    wan = make_wan(2, RATE_BPS, ONE_WAY_S)
    mbit_s = bulk_mbit_s(wan, 1, 0, BULK_BYTES)
    utilization = mbit_s * 1e6 / RATE_BPS
    print(f"bulk transfer: {mbit_s:.1f} Mbit/s ({utilization:.1%} of the rate)")
    # the cap is the property (the shaper holds the rate); the floor only says the delay line carries
    # bulk traffic at all: it is a Python process on the same 2 cores, measured at 64-95% of the rate
    # depending on the load, so the floor is loose (rates are benchmarks' business, not tests')
    assert 0.40 <= utilization <= 1.05


@needs_namespaces
@pytest.mark.timeout(60)
def test_namespaces_of_a_killed_earlier_run_are_removed_before_a_new_one(make_wan):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = f"atoll-{dead.pid}-0-island0"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    try:
        make_wan(1, None, 0.0)

        assert stale not in list_namespaces()
    finally:
        remove_stale_namespaces()


def run_namespaces(pid: int) -> list[str]:
    return [name for name in list_namespaces() if name.startswith(f"atoll-{pid}-")]


@needs_namespaces
@pytest.mark.timeout(SIMULATE_TIMEOUT_S + 30)
def test_simulated_islands_over_a_20ms_wan_sync_no_faster_than_the_round_trip(tmp_path):
    run_dir = tmp_path / "run"
    before = set(list_namespaces())
    try:
        result = run_simulate([
            "--islands", "2", DEBUG_CONFIG, "--run-dir", str(run_dir),
            "--train.steps", "4", "--diloco.inner_steps", "2", "--schedule.warmup_steps", "1", "--eval.every", "0",
            "--data.cache_dir", str(tmp_path / "cache"), "--wan-rate", "100mbit", "--wan-delay", "20ms",
        ], SIMULATE_TIMEOUT_S)
        assert result.returncode == 0, result.stdout + result.stderr
        assert [name for name in set(list_namespaces()) - before if name.startswith("atoll-")] == []
    finally:
        remove_stale_namespaces()  # only finds something if the run was killed on timeout

    digests = []
    for name in ("island-0", "island-1"):
        records = [json.loads(line) for line in (run_dir / name / "metrics.jsonl").read_text().splitlines()]
        outer = [r for r in records if "outer_step" in r]
        assert [r["outer_step"] for r in outer] == [1, 2], name
        # every outer step crosses the emulated link at least once each way (without it: milliseconds)
        assert all(r["sync_s"] >= 2 * ONE_WAY_S for r in outer), [r["sync_s"] for r in outer]
        digests.append([r["outer_digest"] for r in outer])
    assert digests[0] == digests[1]


@needs_namespaces
@pytest.mark.timeout(SIMULATE_TIMEOUT_S + 30)
def test_ctrl_c_during_a_wan_run_stops_the_islands_and_deletes_the_namespaces(tmp_path):
    log = (tmp_path / "simulate.log").open("w")  # a file, not a pipe nobody reads while the run goes on
    proc = subprocess.Popen(
        [sys.executable, "-m", "atoll.cli", "simulate", "--islands", "2", DEBUG_CONFIG, "--run-dir", str(tmp_path / "run"),
         "--train.steps", "100000", "--eval.every", "0", "--data.cache_dir", str(tmp_path / "cache"),
         "--wan-delay", "5ms"],
        cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + SIMULATE_TIMEOUT_S
        metrics = [tmp_path / "run" / f"island-{i}" / "metrics.jsonl" for i in range(2)]
        while not all(m.is_file() and m.stat().st_size for m in metrics):  # both islands are training
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "simulate.log").read_text()
            time.sleep(0.2)
        assert len(run_namespaces(proc.pid)) == 3
        islands = descendants(proc.pid)

        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)

        assert proc.returncode == 130
        assert run_namespaces(proc.pid) == []
        assert [pid for pid in islands if Path(f"/proc/{pid}").exists()] == []
    finally:
        for pid in descendants(proc.pid):
            os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        remove_stale_namespaces()
