"""A rewritten rendezvous address: a failed collective and a retry, never accepted data.

The gloo rendezvous of each epoch's global groups goes through the coordinator's authenticated
protocol (`atoll.mesh.rendezvous`), which no outsider can write; but whoever sits on the network
path between two islands can still redirect their connection. Here that attacker is modelled by
a rendezvous store the test hosts and rewrites (gloo keeps member r's listening address under
`<group prefix>/0/<r>`), on loopback, so that the connection between two islands runs through
it, and flips one byte in the middle of every data message of a chosen size band that it relays
(gloo's own framing is left intact, so the altered bytes do arrive as data). The islands are real
processes built from the mesh's own pieces (`global_groups`, `GlobalMean`, `gather_stats`) and
make each attempt as `atoll.sync` does: on entering, the progress table and a state broadcast
from the holder (island 0; island 1 plays a joiner), then the outer step's statistics and ring.
A failed attempt ends the epoch, and the next attempt rendezvouses under the next epoch's prefix.
The ring uses the fp32 codec, so the honest result is known bit for bit.

Determinism: both island processes start and wait at a gate; island 0 goes first and blocks in
the rendezvous waiting for island 1's address; the outsider then writes island 1's address
(before island 1 has one, so island 0 never sees the real one) and island 0's, and only then
lets island 1 go. gloo decides which side of a pair
connects by comparing the two addresses, port included; the fake ports are chosen so that
island 0 connects (to the relay) and island 1 listens (for the relay, which connects on to it).

Bounds: every test has a hard timeout; every wait (store polls, accepts, socket reads, results)
is bounded in time; the relay binds 127.0.0.1 only; every process and socket is closed at the end.
"""

from __future__ import annotations

import os
import queue
import socket
import threading
import time
from collections.abc import Callable
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from test_ring import ISLANDS, digest, island_values, ring_order_mean

from atoll.comm.allreduce import GlobalMean
from atoll.comm.codecs import get_codec
from atoll.mesh.groups import global_groups, group_prefix
from atoll.mesh.membership import Epoch
from atoll.validation import ContributionStats, gather_stats

LOOPBACK = "127.0.0.1"
MEMBERS = ("island-a", "island-b")
EPOCHS = (1, 2)
"""The attempts each island makes; the outsider rewrites epoch 1's rendezvous only."""
EPOCH_KEYS = {1: bytes(range(32)), 2: bytes(range(32, 64))}
NUMEL = 100_003
CHUNK_BYTES = 64 * 1024
"""The ring's chunks and the broadcast's: fp32 ring payloads of 64 KB, and a smaller last one."""
STATE_NUMEL = 4096
"""The broadcast state: 16 KB of fp32, one chunk."""
SMALL, STATE, RING = (1, 1023), (1024, 32 * 1024 - 1), (32 * 1024, 2**40)
"""Size bands of gloo data messages: tables, statistics and MAC tags; the state broadcast (and the
ring's short last chunk, which comes later); the ring's full chunks."""
COLLECTIVE_TIMEOUT_S = 20.0
"""gloo's rendezvous and collective timeout, and the ring's progress deadline."""
STORE_WAIT_S = 30.0
START_WAIT_S = 60.0
"""For the island processes to start (imports) on two loaded cores."""
POLL_S = 0.01
IO_TIMEOUT_S = 30.0
RESULTS_WAIT_S = 90.0
TEST_TIMEOUT_S = 150

GLOO_HANDSHAKE_BYTES = 8
"""A connecting gloo pair first sends 8 bytes naming the pair (its sequence number)."""
GLOO_PREAMBLE_BYTES = 48
"""Every gloo TCP message starts with a 48-byte preamble whose first field (u64, little-endian)
is the message's size including the preamble; the message's data follows it."""
CONNECTING_PORTS = range(1024, 1024 + 16 * 256, 256)
"""gloo compares ports as stored (network byte order read as a host integer): these (0x0400,
0x0500, ...) read as 4, 5, ..., below any island's port, so an island that reads one as its
peer's port connects to it. The relay takes the first one free."""
LISTENING_PORT = 65535
"""Reads as the largest port there is: an island that reads it as its peer's port listens."""
AF_INET_LE = b"\x02\x00"

# the islands import atoll.validation (seconds on two loaded cores): once in the forkserver, if this module starts it
ISLANDS.set_forkserver_preload(["torch", "torch.distributed", "atoll.comm.allreduce", "atoll.validation", "atoll.mesh.groups"])


def gloo_key(epoch: int, rank: int) -> str:
    """Where gloo keeps member `rank`'s address record for local rank 0, stream 0 of `epoch`."""
    return f"{group_prefix(epoch, 0, 0)}/0/{rank}"


def _sockaddr_at(record: bytes) -> int:
    """Offset of the 127.0.0.1 IPv4 socket address (family, port, address) in a gloo address record."""
    loopback = socket.inet_aton(LOOPBACK)
    for at in range(len(record) - 8):
        if record[at:at + 2] == AF_INET_LE and record[at + 4:at + 8] == loopback:
            return at
    raise AssertionError(f"no 127.0.0.1 socket address in gloo's record {record.hex()}")


def with_port(record: bytes, port: int) -> bytes:
    at = _sockaddr_at(record) + 2
    return record[:at] + port.to_bytes(2, "big") + record[at + 2:]


def port_of(record: bytes) -> int:
    at = _sockaddr_at(record) + 2
    return int.from_bytes(record[at:at + 2], "big")


# --- the outsider ---------------------------------------------------------------------------------


class Alterer:
    """Walks one direction of a gloo TCP stream (an optional handshake, then messages) and flips
    one byte in the middle of the data of every message whose data size is in `band`."""

    def __init__(self, handshake: int, band: tuple[int, int]) -> None:
        self.skip = handshake
        self.band = band
        self.preamble = bytearray()
        self.left = self.position = 0
        self.flip_at: int | None = None
        self.altered = 0

    def feed(self, data: bytes) -> bytes:
        out = bytearray(data)
        i = 0
        while i < len(out):
            if self.skip:
                n = min(self.skip, len(out) - i)
                self.skip -= n
            elif self.left == 0:
                n = min(GLOO_PREAMBLE_BYTES - len(self.preamble), len(out) - i)
                self.preamble += out[i:i + n]
                if len(self.preamble) == GLOO_PREAMBLE_BYTES:
                    size = int.from_bytes(self.preamble[:8], "little")
                    assert GLOO_PREAMBLE_BYTES <= size < 2**40, f"not a gloo preamble: {self.preamble.hex()}"
                    self.left, self.position = size - GLOO_PREAMBLE_BYTES, 0
                    self.flip_at = self.left // 2 if self.band[0] <= self.left <= self.band[1] else None
                    self.preamble.clear()
            else:
                n = min(self.left, len(out) - i)
                if self.flip_at is not None and self.position <= self.flip_at < self.position + n:
                    out[i + self.flip_at - self.position] ^= 0xFF
                    self.altered += 1
                self.position += n
                self.left -= n
            i += n
        return bytes(out)


class Relay:
    """The outsider's man in the middle on 127.0.0.1 (a CONNECTING_PORTS port): accepts one connection,
    connects on to the real listener once `upstream()` knows it, and forwards both ways through
    an Alterer each. Every socket has a timeout; `close` ends everything."""

    def __init__(self, band: tuple[int, int]) -> None:
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        for port in CONNECTING_PORTS:
            try:
                self.listener.bind((LOOPBACK, port))
                break
            except OSError:
                continue
        else:
            self.listener.close()
            raise AssertionError(f"no free port among {list(CONNECTING_PORTS)} on {LOOPBACK} for the relay")
        self.port = port
        self.listener.listen(1)
        self.listener.settimeout(IO_TIMEOUT_S)
        self.alterers = [Alterer(GLOO_HANDSHAKE_BYTES, band), Alterer(0, band)]
        self.sockets: list[socket.socket] = [self.listener]
        self.threads: list[threading.Thread] = []

    @property
    def altered(self) -> int:
        return sum(a.altered for a in self.alterers)

    def start(self, upstream: Callable[[], int]) -> None:
        self._spawn(self._serve, upstream)

    def _spawn(self, target: Callable, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self.threads.append(thread)
        thread.start()

    def _serve(self, upstream: Callable[[], int]) -> None:
        try:
            downstream, _ = self.listener.accept()
            self.sockets.append(downstream)
            real = socket.create_connection((LOOPBACK, upstream()), timeout=IO_TIMEOUT_S)
            self.sockets.append(real)
        except OSError:
            return
        for sock in (downstream, real):
            sock.settimeout(IO_TIMEOUT_S)
        self._spawn(self._pipe, downstream, real, self.alterers[0])
        self._spawn(self._pipe, real, downstream, self.alterers[1])

    def _pipe(self, source: socket.socket, sink: socket.socket, alterer: Alterer) -> None:
        try:
            while data := source.recv(1 << 16):
                sink.sendall(alterer.feed(data))
        except OSError:
            pass
        finally:  # one side gone: the other learns it at once, as from a dead peer
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        for sock in self.sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in accept or recv (close alone does not)
            except OSError:
                pass
            sock.close()
        for thread in self.threads:
            thread.join(timeout=IO_TIMEOUT_S)


def wait_until(condition: Callable[[], bool], what: str, timeout: float = STORE_WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(POLL_S)


# --- the islands ----------------------------------------------------------------------------------


def island_stats(index: int) -> ContributionStats:
    return ContributionStats(finite=True, norm=1.5 + index, bucket_norms=(1.0 + index, 0.25 * (index + 1)))


def progress(index: int) -> torch.Tensor:
    """(holds the state?, outer step, inner step), as `atoll.sync` shares it: island 1 is a joiner."""
    return torch.tensor([1, 5, 40] if index == 0 else [0, 0, 0], dtype=torch.int64)


def held_state(index: int) -> torch.Tensor:
    return torch.randn(STATE_NUMEL, generator=torch.Generator().manual_seed(7)) if index == 0 else torch.zeros(STATE_NUMEL)


def _attempt(index: int, store_port: int, number: int, keyed: bool) -> tuple:
    """One attempt in epoch `number`, as `atoll.sync` makes it: rendezvous; entering (progress
    table, state broadcast from island 0); the outer step (statistics, ring). Returns all it got."""
    epoch = Epoch(number, MEMBERS, 1)
    store = dist.TCPStore(LOOPBACK, store_port, is_master=False, wait_for_workers=False, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    groups = global_groups(lambda prefix: dist.PrefixStore(prefix, store), epoch, MEMBERS[index], 0, 1, timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    mean = GlobalMean(groups, get_codec("fp32"), COLLECTIVE_TIMEOUT_S, CHUNK_BYTES, key=EPOCH_KEYS[number] if keyed else None)
    table = [row.tolist() for row in mean.all_gather(progress(index))]
    state = held_state(index)
    mean.broadcast_([state], 0)
    stats = gather_stats(island_stats(index), mean)
    values = island_values(index, NUMEL)
    mean.mean_(values)
    return table, digest(state), [s.norm for s in stats] + [n for s in stats for n in s.bucket_norms], digest(values)


def _island(index: int, store_port: int, keyed: bool, ready, go, results) -> None:
    """Says it is `ready`; once `go` is set, attempts in EPOCHS until one succeeds; every
    attempt's outcome goes to `results`."""
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    torch.set_num_threads(1)
    ready.set()
    if not go.wait(RESULTS_WAIT_S):
        return
    for number in EPOCHS:
        try:
            got = _attempt(index, store_port, number, keyed)
        except RuntimeError as err:  # RingError, or gloo's error on a broken group: the epoch failed
            results.put((index, number, type(err).__name__, str(err).splitlines()[0]))
            continue
        results.put((index, number, "ok", got))
        return


def honest_outcome() -> tuple:
    """What every island must end with: the true progress table, island 0's state, the true
    statistics and the exact fp32 ring mean."""
    stats = [island_stats(i) for i in range(len(MEMBERS))]
    mean = ring_order_mean([island_values(i, NUMEL) for i in range(len(MEMBERS))])
    return ([progress(i).tolist() for i in range(len(MEMBERS))], digest(held_state(0)),
            [s.norm for s in stats] + [n for s in stats for n in s.bucket_norms], digest(mean))


def run_attacked(tmp_path, keyed: bool, band: tuple[int, int]) -> tuple[dict[int, list[tuple]], Relay]:
    """Two islands whose epoch-1 connection an outsider relays, altering data messages in `band`;
    every attempt's outcome per island, and the relay (for what it altered)."""
    outsider = dist.TCPStore(LOOPBACK, 0, is_master=True, wait_for_workers=False,
                             timeout=timedelta(seconds=STORE_WAIT_S))  # the path the islands' rendezvous takes, the attacker's
    relay = Relay(band)
    results = ISLANDS.Queue()
    ready, gates = [ISLANDS.Event() for _ in MEMBERS], [ISLANDS.Event() for _ in MEMBERS]
    islands = [ISLANDS.Process(target=_island, args=(i, outsider.port, keyed, ready[i], gates[i], results))
               for i in range(len(MEMBERS))]
    outcomes: dict[int, list[tuple]] = {i: [] for i in range(len(MEMBERS))}
    try:
        for island in islands:
            island.start()
        # both started, imports done, before the attack: island 1 is then never late for island 0
        wait_until(lambda: all(r.is_set() for r in ready), "the island processes to start", START_WAIT_S)
        gates[0].set()
        wait_until(lambda: outsider.check([gloo_key(1, 0)]), "island 0's rendezvous address")
        record = outsider.get(gloo_key(1, 0))
        fake_peer = with_port(record, relay.port)
        outsider.set(gloo_key(1, 1), fake_peer)  # island 0, waiting for it, connects to the relay
        outsider.set(gloo_key(1, 0), with_port(record, LISTENING_PORT))  # island 1 will listen

        def island_1_port() -> int:
            wait_until(lambda: outsider.get(gloo_key(1, 1)) != fake_peer, "island 1's real address")
            return port_of(outsider.get(gloo_key(1, 1)))

        relay.start(island_1_port)
        gates[1].set()
        deadline = time.monotonic() + RESULTS_WAIT_S
        while time.monotonic() < deadline and not all(o and o[-1][2] == "ok" for o in outcomes.values()):
            try:
                index, number, kind, detail = results.get(timeout=1.0)
            except queue.Empty:
                if not any(p.is_alive() for p in islands):
                    break
                continue
            outcomes[index].append((number, kind, detail))
        for p in islands:
            p.join(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in islands:
            if p.is_alive():
                p.kill()
            p.join(timeout=10)
        relay.close()
    assert all(p.exitcode == 0 for p in islands), [p.exitcode for p in islands]
    return outcomes, relay


@pytest.mark.timeout(TEST_TIMEOUT_S)
@pytest.mark.parametrize(("band", "refused"), [
    (SMALL, "the all-gathered row of rank"),  # the first small data: the progress table on entering
    (STATE, "broadcast by rank 0"),  # the tables pass untouched, the state broadcast does not
    (RING, "ring all-reduce refused the payload"),  # everything passes untouched but the ring's chunks
], ids=["progress-table", "state-broadcast", "ring-payloads"])
def test_a_rewritten_rendezvous_address_fails_the_collective_and_the_retry_agrees(tmp_path, band, refused):
    outcomes, relay = run_attacked(tmp_path, keyed=True, band=band)
    assert relay.altered > 0  # the outsider did sit between the islands and alter what they sent
    for index, attempts in outcomes.items():
        assert [number for number, *_ in attempts] == list(EPOCHS), (index, attempts)
        first, retry = attempts
        assert first[1] != "ok", (index, first)  # the altered attempt failed ...
        assert retry[1] == "ok" and retry[2] == honest_outcome(), (index, retry)  # ... and the retry is exact
    refusals = [detail for attempts in outcomes.values() for _, kind, detail in attempts if kind == "RingError"]
    assert any(refused in detail and "MAC does not verify" in detail for detail in refusals), outcomes  # refused, not merely broken


@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_without_the_epoch_key_the_same_man_in_the_middle_gets_its_bytes_accepted(tmp_path):
    """The control: the relay's alterations do reach the islands as data, so the refusals above
    are the MAC's doing."""
    outcomes, relay = run_attacked(tmp_path, keyed=False, band=(SMALL[0], RING[1]))
    assert relay.altered > 0
    for index, attempts in outcomes.items():
        assert attempts[0][0] == 1 and attempts[0][1] == "ok", (index, attempts)
        assert attempts[0][2] != honest_outcome(), (index, attempts)
