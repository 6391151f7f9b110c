"""The pipelined ring all-reduce in real processes: gloo over 127.0.0.1, a FileStore per run.

One run of 4 processes averages every case for worlds 2, 3 and 4 (islands 0..w-1 of it form
the world-w group): lengths 1, 7, 1009 and 100003 (primes) and one smaller than the world, every
codec, in 4 KB chunks so each segment is cut into many pipelined chunks, once more with a NaN, an
inf and an all-zero block on island 0, and int8 and int4 once more with their `dropped` tensors;
world 2 also averages 64 MiB + 4 bytes of fp32 in 4 MB chunks and runs two streams. Workers compare against references
themselves and send back only numbers and digests. Fault tests make one island SIGKILL or
SIGSTOP itself at a fixed encode mid-ring. Processes fork from a forkserver that imported torch
once (it exits with pytest); every run is bounded and kills what it started.
"""

from __future__ import annotations

import hashlib
import os
import queue
import signal
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from atoll.comm.allreduce import GlobalMean
from atoll.comm.codecs import CODECS, Codec, get_codec
from atoll.comm.ring import RingError, ring_all_reduce_mean_, ring_all_reduce_means_

CASE_LENGTHS = [1, 7, 1009, 100_003]
SMALL_CHUNK_BYTES = 4 * 1024
LARGE_NUMEL = 16 * 2**20 + 1  # 64 MiB of fp32, plus one value
LARGE_CHUNK_BYTES = 4 * 10**6
DEADLINE_S = 30.0
PROCESS_TIMEOUT_S = 120
EIGHT_BIT_BOUND = 0.01  # the bound on the all-reduced result's relative L2 error
FOUR_BIT_BOUND = 0.17  # int4 (FP4): ~10% per encoding, 12.4 / 15.0 / 16.4% after the ring at worlds 2 / 3 / 4
NON_FINITE_NUMEL = 1009
FAULT_AT_ENCODE = 40  # the faulty island's 40th encode happens during reduce-scatter step 1
FAULT_NUMEL = 100_003
STOP_DEADLINE_S = 3.0
SLACK_S = 5.0  # process scheduling on 2 loaded cores
WORLDS = [2, 3, 4]

ISLANDS = mp.get_context("forkserver")
ISLANDS.set_forkserver_preload(["torch", "torch.distributed", "atoll.comm.allreduce"])


def island_values(rank: int, numel: int) -> torch.Tensor:
    """A pseudo-gradient-like vector: independent Gaussian per island (the worst case for the
    mean's relative error), at a typical pseudo-gradient scale."""
    return 1e-3 * torch.randn(numel, generator=torch.Generator().manual_seed(1000 * rank + numel))


def ring_order_mean(inputs: list[torch.Tensor]) -> torch.Tensor:
    """The fp32 mean as the ring sums it: segment s starts at island s and travels right."""
    world = len(inputs)
    out = torch.empty_like(inputs[0])
    bounds = torch.arange(inputs[0].numel()).tensor_split(world)
    for s, index in enumerate(bounds):
        if index.numel():
            lo, hi = index[0].item(), index[-1].item() + 1
            total = inputs[s][lo:hi].clone()
            for k in range(1, world):
                total += inputs[(s + k) % world][lo:hi]
            out[lo:hi] = total / world
    return out


def relative_error(got: torch.Tensor, exact: torch.Tensor) -> float:
    return ((got.double() - exact).norm() / exact.norm()).item()


def digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.numpy().tobytes()).hexdigest()


def make_group(store: dist.Store, rank: int, world: int, prefix: str) -> dist.ProcessGroup:
    options = dist.ProcessGroupGloo._Options()
    options._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
    options._timeout = timedelta(seconds=PROCESS_TIMEOUT_S)  # rendezvous; ring transfers have their own deadline
    return dist.ProcessGroupGloo(dist.PrefixStore(prefix, store), rank, world, options)


def run_islands(world: int, target, store_path: Path, *args, reporting: int | None = None) -> tuple[list, list[int | None]]:
    """Run target(rank, world, store_path, results, *args) in `world` processes and collect the
    results of `reporting` of them (default all); then kill whatever still runs (a stopped
    island). Returns the results sorted by rank and every process's exit code."""
    results = ISLANDS.Queue()
    procs = [ISLANDS.Process(target=target, args=(r, world, str(store_path), results, *args)) for r in range(world)]
    for p in procs:
        p.start()
    out = []
    try:
        deadline = time.monotonic() + PROCESS_TIMEOUT_S
        while len(out) < (world if reporting is None else reporting) and time.monotonic() < deadline:
            try:
                out.append(results.get(timeout=1.0))
            except queue.Empty:
                if not any(p.is_alive() for p in procs):
                    break
        for rank, *_ in out:
            procs[rank].join(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=10)
    return sorted(out, key=lambda row: row[0]), [p.exitcode for p in procs]


def chunk_lengths(numel: int, world: int, chunk_bytes: int) -> list[int]:
    """The ring's plan: world near-equal segments, each cut into the same number of chunks of
    about chunk_bytes of fp32 (as many as the longest segment needs)."""
    segments = torch.arange(numel).tensor_split(world)
    chunks = max(1, -(-segments[0].numel() // (chunk_bytes // 4)))
    return [c.numel() for segment in segments for c in segment.tensor_split(chunks)]


# --- correctness: every length, every codec, worlds 2..4 (world 1 is a no-op) ------------------


def _average_every_case(rank: int, world: int, store_path: str, results) -> None:
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world)
    groups = {w: make_group(store, rank, w, f"world{w}/") for w in WORLDS if rank < w}
    rows = []
    for w, group in groups.items():
        cases = [(n, SMALL_CHUNK_BYTES, list(CODECS)) for n in sorted({*CASE_LENGTHS, w - 1})]
        if w == 2:
            cases.append((LARGE_NUMEL, LARGE_CHUNK_BYTES, ["fp32", "int8"]))
        sequence = 0
        for numel, chunk_bytes, names in cases:
            inputs = [island_values(r, numel) for r in range(w)]
            ordered, exact = ring_order_mean(inputs), torch.stack(inputs).double().mean(0)
            for name in names:
                values = inputs[rank].clone()
                sent, recv = ring_all_reduce_mean_(values, group, get_codec(name), DEADLINE_S, chunk_bytes, sequence)
                sequence += 1
                rows.append((w, numel, name, digest(values), torch.equal(values, ordered), relative_error(values, exact), sent, recv))
                if name in ("int8", "int4") and numel != LARGE_NUMEL:
                    rows.append((w, numel, f"dropped-{name}", *_dropped(group, inputs, values, name, chunk_bytes, sequence)))
                    sequence += 2
            del inputs, ordered, exact
        for name in CODECS:  # island 0 holds a NaN, an inf and an all-zero block
            values = island_values(rank, NON_FINITE_NUMEL)
            if rank == 0:
                values[3], values[300], values[500:564] = float("nan"), float("inf"), 0.0
            ring_all_reduce_mean_(values, group, get_codec(name), DEADLINE_S, SMALL_CHUNK_BYTES, sequence)
            sequence += 1
            rows.append((w, NON_FINITE_NUMEL, f"nonfinite-{name}", digest(values), values.isnan().any().item(), 0.0, 0, 0))
        if w == 3:
            rows.append(("pipelined", *_pipelined(group, rank, w, sequence)))
        if w == 2:
            rows.extend((w, *row) for row in _two_streams(store, rank, w))
    results.put((rank, rows))


def _dropped(group: dist.ProcessGroup, inputs: list[torch.Tensor], averaged: torch.Tensor, name: str, chunk_bytes: int,
             sequence: int) -> tuple:
    """The ring once more with a `dropped` tensor: (its result's digest, whether it is the bits of
    `averaged` (the same call without it), the relative gap between the islands' summed `dropped`
    and world x (exact mean - result), 0, 0)."""
    world, rank = group.size(), group.rank()
    values, dropped = inputs[rank].clone(), torch.full_like(averaged, float("nan"))  # every position must be written
    ring_all_reduce_mean_(values, group, get_codec(name), DEADLINE_S, chunk_bytes, sequence, dropped=dropped)
    total = dropped.clone()
    group.allreduce([total]).wait()
    lost = torch.stack(inputs).double().sum(0) - world * values.double()
    return digest(values), torch.equal(values, averaged), ((total.double() - lost).norm() / lost.norm()).item(), 0, 0


PIPELINED_LENGTHS = (5000, 17, 12_001)


def _pipelined(group: dist.ProcessGroup, rank: int, world: int, sequence: int) -> tuple:
    """Three tensors through ring_all_reduce_means_: the order in which their rings started and
    finished, whether fp32 gave each one's ring-order mean, and whether int8 gave the bits of one
    ring_all_reduce_mean_ call each."""
    events: list[str] = []
    inputs = [[island_values(r, n) for r in range(world)] for n in PIPELINED_LENGTHS]
    exact = True
    for name in ("fp32", "int8"):
        tensors = [case[rank].clone() for case in inputs]

        def given(i: int, tensors=tensors, name=name) -> torch.Tensor:
            events.append(f"{name} start {i}")
            return tensors[i]

        def done(i: int, tensor: torch.Tensor, name=name) -> None:
            events.append(f"{name} done {i}")

        codec = get_codec(name)
        ring_all_reduce_means_(given, len(tensors), group, codec, DEADLINE_S, SMALL_CHUNK_BYTES, sequence, None, done)
        sequence += len(tensors)
        for i, case in enumerate(inputs):
            if name == "fp32":
                want = ring_order_mean(case)
            else:
                want = case[rank].clone()
                ring_all_reduce_mean_(want, group, codec, DEADLINE_S, SMALL_CHUNK_BYTES, sequence)
                sequence += 1
            exact = exact and torch.equal(tensors[i], want)
    return -1, "pipelined", " / ".join(events), exact, 0.0, 0, 0


def _two_streams(store: dist.Store, rank: int, world: int) -> list[tuple]:
    """GlobalMean over two groups: each ring takes one half of the buffer, in its own thread."""
    groups = [make_group(store, rank, world, f"stream{s}/") for s in range(2)]
    numel = 100_003
    inputs = [island_values(r, numel) for r in range(world)]
    halves = [list(parts) for parts in zip(*(x.tensor_split(2) for x in inputs))]
    ordered = torch.cat([ring_order_mean(half) for half in halves])
    exact = torch.stack(inputs).double().mean(0)
    rows = []
    for name in ("fp32", "int8"):
        mean = GlobalMean(groups, get_codec(name), DEADLINE_S, SMALL_CHUNK_BYTES)
        values = inputs[rank].clone()
        mean.mean_(values)
        mean.mean_(values.clone())  # a second call on the same groups uses fresh tags
        rows.append((numel, f"streams2-{name}", digest(values), torch.equal(values, ordered), relative_error(values, exact),
                     mean.wire.bytes_sent, mean.wire.bytes_recv))
    return rows


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """world -> (numel, codec) -> one row per island: (digest, equals the ring-order fp32 mean,
    relative error, bytes sent, bytes received)."""
    out, codes = run_islands(max(WORLDS), _average_every_case, tmp_path_factory.mktemp("ring") / "store")
    assert codes == [0] * max(WORLDS) and len(out) == max(WORLDS), (codes, out)
    table: dict[int | str, dict[tuple[int, str], list[tuple]]] = {w: {} for w in WORLDS}
    for _, rows in out:
        for world, numel, name, *row in rows:
            table.setdefault(world, {}).setdefault((numel, name), []).append(tuple(row))
    return table.__getitem__


def test_world_of_one_is_a_no_op():
    group = dist.ProcessGroupGloo(dist.HashStore(), 0, 1, timedelta(seconds=5))
    values = island_values(0, 1009)
    before = values.clone()
    assert ring_all_reduce_mean_(values, group, get_codec("int8"), DEADLINE_S, SMALL_CHUNK_BYTES) == (0, 0)
    assert torch.equal(values, before)


@pytest.mark.timeout(PROCESS_TIMEOUT_S * 2)
@pytest.mark.parametrize("world", WORLDS)
def test_fp32_ring_equals_the_fp32_mean_summed_in_ring_order_bit_for_bit(results, world):
    # bitwise: the ring adds segment s's values from island s rightwards in fp32, then divides once;
    # the reference does exactly that, so any lost or doubled value, or a second rounding, shows
    table = results(world)
    for (numel, name), rows in table.items():
        if name == "fp32":
            for _, equal, error, _, _ in rows:
                assert equal, (numel, world)
                assert error < 1e-6


@pytest.mark.timeout(PROCESS_TIMEOUT_S * 2)
@pytest.mark.parametrize("world", WORLDS)
def test_every_codec_gives_bit_identical_results_on_every_island(results, world):
    table = results(world)
    assert {name for _, name in table} >= set(CODECS)
    for key, rows in table.items():
        assert len(rows) == world
        assert len({d for d, *_ in rows}) == 1, key


@pytest.mark.timeout(PROCESS_TIMEOUT_S * 2)
@pytest.mark.parametrize("world", WORLDS)
def test_non_finite_values_and_zero_blocks_give_bit_identical_results_on_every_island(results, world):
    table = results(world)
    for name in CODECS:
        rows = table[(NON_FINITE_NUMEL, f"nonfinite-{name}")]
        assert len(rows) == world and len({d for d, *_ in rows}) == 1, name
        assert all(has_nan for _, has_nan, *_ in rows), name  # a NaN is never averaged away


@pytest.mark.timeout(PROCESS_TIMEOUT_S * 2)
@pytest.mark.parametrize("world", WORLDS)
def test_dropped_adds_up_over_islands_to_what_the_ring_lost_and_changes_no_bit(results, world):
    for (numel, name), rows in results(world).items():
        if name.startswith("dropped-"):
            plain = {d for d, *_ in results(world)[(numel, name.removeprefix("dropped-"))]}
            assert {d for d, *_ in rows} == plain, (numel, name)
            assert all(same for _, same, *_ in rows), (numel, name)
            # fp32 sums of the losses against fp64: 1e-4 of what was lost (int8 loses ~1e-2 of the values)
            assert max(gap for _, _, gap, _, _ in rows) < 1e-4, (numel, name, world)


@pytest.mark.timeout(PROCESS_TIMEOUT_S * 2)
@pytest.mark.parametrize("world", WORLDS)
def test_8_bit_ring_error_is_within_one_percent_and_16_bit_within_their_precision(results, world):
    bounds = {"int8": EIGHT_BIT_BOUND, "int4": FOUR_BIT_BOUND, "codebook8": 0.03, "bf16": 0.004, "fp16": 0.0005}
    for (numel, name), rows in results(world).items():
        if name in bounds:
            assert max(error for _, _, error, _, _ in rows) <= bounds[name], (numel, name, world)


@pytest.mark.timeout(PROCESS_TIMEOUT_S * 2)
@pytest.mark.parametrize("world", WORLDS)
def test_wire_bytes_are_the_encoded_chunks_each_crossing_world_minus_one_hops_per_phase(results, world):
    for (numel, name), rows in results(world).items():
        if name.startswith(("streams", "dropped", "nonfinite")):
            continue
        codec = get_codec(name)
        chunk_bytes = LARGE_CHUNK_BYTES if numel == LARGE_NUMEL else SMALL_CHUNK_BYTES
        encoded = sum(codec.encoded_size(n) for n in chunk_lengths(numel, world, chunk_bytes) if n)
        sent, recv = sum(r[3] for r in rows), sum(r[4] for r in rows)
        assert sent == recv == 2 * (world - 1) * encoded, (numel, name)


@pytest.mark.timeout(PROCESS_TIMEOUT_S * 2)
def test_over_64_mib_on_two_islands_in_4_mb_chunks(results):
    table = results(2)
    fp32, int8 = table[(LARGE_NUMEL, "fp32")], table[(LARGE_NUMEL, "int8")]
    assert all(equal for _, equal, *_ in fp32)
    assert max(error for _, _, error, _, _ in int8) <= EIGHT_BIT_BOUND
    assert len({d for d, *_ in int8}) == 1
    # what 8 bits saved on the wire
    assert sum(r[3] for r in fp32) / sum(r[3] for r in int8) > 3.85


@pytest.mark.timeout(PROCESS_TIMEOUT_S * 2)
def test_pipelined_rings_start_the_next_before_the_last_is_done_and_give_each_calls_result(results):
    rows = results("pipelined")[(-1, "pipelined")]
    assert len(rows) == 3 and all(exact for _, exact, *_ in rows)
    order = "start 0 / {c} start 1 / {c} done 0 / {c} start 2 / {c} done 1 / {c} done 2"
    assert {events for events, *_ in rows} == {f"fp32 {order.format(c='fp32')} / int8 {order.format(c='int8')}"}


@pytest.mark.timeout(PROCESS_TIMEOUT_S * 2)
def test_two_streams_split_the_buffer_between_two_rings_and_give_the_same_mean(results):
    table = results(2)
    fp32, int8 = table[(100_003, "streams2-fp32")], table[(100_003, "streams2-int8")]
    assert all(equal for _, equal, *_ in fp32)  # each half summed in its own ring's order
    assert len({d for d, *_ in int8}) == 1
    assert max(error for _, _, error, _, _ in int8) <= EIGHT_BIT_BOUND
    # two calls of 100003 fp32 values on 2 islands: each value crosses once each way
    assert sum(r[3] for r in fp32) == 2 * 2 * 4 * 100_003


# --- failures: a killed or stopped island mid-ring ----------------------------------------------


class _FaultyCodec(Codec):
    """int8, but the island sends itself `signum` at its FAULT_AT_ENCODE-th encode."""

    name = "int8"

    def __init__(self, signum: int) -> None:
        self.inner, self.signum, self.encodes = get_codec("int8"), signum, 0

    def encoded_size(self, numel: int) -> int:
        return self.inner.encoded_size(numel)

    def encode(self, values: torch.Tensor) -> torch.Tensor:
        self.encodes += 1
        if self.encodes == FAULT_AT_ENCODE:
            os.kill(os.getpid(), self.signum)
        return self.inner.encode(values)

    def decode(self, data: torch.Tensor, numel: int) -> torch.Tensor:
        return self.inner.decode(data, numel)


def _island_with_fault(rank: int, world: int, store_path: str, results, faulty: int, signum: int, deadline_s: float) -> None:
    torch.set_num_threads(1)
    group = make_group(dist.FileStore(store_path, world), rank, world, "fault/")
    codec = _FaultyCodec(signum) if rank == faulty else get_codec("int8")
    values = island_values(rank, FAULT_NUMEL)
    start = time.monotonic()
    try:
        ring_all_reduce_mean_(values, group, codec, deadline_s, SMALL_CHUNK_BYTES)
        results.put((rank, "finished", "", time.monotonic() - start))
    except RingError as error:
        results.put((rank, "RingError", str(error), time.monotonic() - start))


def run_with_fault(tmp_path: Path, world: int, signum: int, deadline_s: float) -> tuple[list, list]:
    faulty = 1
    return run_islands(world, _island_with_fault, tmp_path / "store", faulty, signum, deadline_s, reporting=world - 1)


@pytest.mark.timeout(PROCESS_TIMEOUT_S)
def test_survivors_raise_ring_error_at_once_when_a_peer_is_killed_mid_ring(tmp_path):
    out, codes = run_with_fault(tmp_path, 4, signal.SIGKILL, DEADLINE_S)
    assert codes[1] == -signal.SIGKILL
    assert [rank for rank, *_ in out] == [0, 2, 3]  # island 3 is no neighbour of 1 in the ring
    for rank, outcome, message, elapsed in out:
        assert outcome == "RingError", (rank, message)
        assert elapsed < SLACK_S < DEADLINE_S  # a closed socket fails at once, not at the deadline
    assert codes[0] == codes[2] == codes[3] == 0


@pytest.mark.timeout(PROCESS_TIMEOUT_S)
def test_survivors_raise_ring_error_at_the_deadline_when_a_peer_stops(tmp_path):
    out, codes = run_with_fault(tmp_path, 3, signal.SIGSTOP, STOP_DEADLINE_S)
    assert codes[1] == -signal.SIGKILL  # stopped, so run_islands had to kill it
    assert [rank for rank, *_ in out] == [0, 2]
    elapsed = [e for *_, e in out]
    for rank, outcome, message, _ in out:
        assert outcome == "RingError", (rank, message)
    assert max(elapsed) >= STOP_DEADLINE_S  # someone waited out the deadline: nothing else ended it
    assert max(elapsed) < STOP_DEADLINE_S + SLACK_S
    assert any("Timed out" in message for *_, message, _ in out)


# --- authenticated payloads ------------------------------------------------------------------------

RING_KEY = bytes(range(32))


def _island_keyed(rank: int, world: int, store_path: str, results, keys: list[bytes | None]) -> None:
    torch.set_num_threads(1)
    group = make_group(dist.FileStore(store_path, world), rank, world, "keyed/")
    values = island_values(rank, 1009)
    try:
        sent, recv = ring_all_reduce_mean_(values, group, get_codec("int8"), DEADLINE_S, SMALL_CHUNK_BYTES, key=keys[rank])
        results.put((rank, "finished", digest(values), sent))
    except RingError as error:
        results.put((rank, "RingError", str(error), 0))


@pytest.mark.timeout(PROCESS_TIMEOUT_S)
def test_payloads_with_the_epoch_key_give_the_same_bits_plus_a_tag_per_transfer(tmp_path):
    plain, _ = run_islands(3, _island_keyed, tmp_path / "plain", [None] * 3)
    keyed, codes = run_islands(3, _island_keyed, tmp_path / "keyed", [RING_KEY] * 3)
    assert codes == [0, 0, 0]
    assert [row[1] for row in keyed] == ["finished"] * 3
    assert {row[2] for row in keyed} == {row[2] for row in plain} and len({row[2] for row in keyed}) == 1
    transfers = 2 * (3 - 1)  # one chunk per segment at this size
    assert [k[3] - p[3] for k, p in zip(keyed, plain)] == [transfers * 32] * 3


@pytest.mark.timeout(PROCESS_TIMEOUT_S)
def test_a_payload_without_the_epoch_key_is_refused_before_it_is_decoded(tmp_path):
    out, _ = run_islands(3, _island_keyed, tmp_path / "store", [RING_KEY, bytes(32), RING_KEY], reporting=3)
    by_rank = {rank: (outcome, message) for rank, outcome, message, _ in out}
    assert by_rank[2][0] == "RingError" and "MAC does not verify" in by_rank[2][1] and "from rank 1" in by_rank[2][1]
    assert all(outcome == "RingError" for outcome, _ in by_rank.values())  # nobody ends with accepted data
