"""The sparse all-gather (topk payloads) in real processes: gloo over 127.0.0.1, a FileStore per run.

One run of 4 processes averages every case for worlds 2, 3 and 4 (islands 0..w-1 form the world-w
group) under an epoch key: lengths 0, 1, 4097 and 100003 in 4 KB chunks (so 100003 values travel
as 25 pieces), topk at 1, 2 and 4 bits, with `dropped`, once more with a NaN, an inf and a zero
chunk on island 0, and through `GlobalMean` with two streams and three buckets (also on work
buffers, as with an `abandoned` check). Every worker rebuilds every island's input (seeded),
encodes it itself and checks that its result is those payloads decoded and added in island order,
bit for bit, then sends back flags and digests. Fault runs make island 1 SIGKILL or SIGSTOP itself
at a fixed encode, or send payloads under the wrong key, replayed from another call, passed off as
another island's or altered after they were tagged. Processes come from test_ring's forkserver;
every run is bounded and kills what it started.
"""

from __future__ import annotations

import os
import signal
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from test_ring import DEADLINE_S, PROCESS_TIMEOUT_S, SLACK_S, STOP_DEADLINE_S, digest, island_values, make_group, run_islands

from atoll.comm import allgather
from atoll.comm.allgather import sparse_all_gather_mean_
from atoll.comm.allreduce import ABANDONED, GlobalMean
from atoll.comm.codecs import TOPK_CHUNK, Codec, TopkCodec, get_codec
from atoll.comm.ring import SEQUENCE_TAG_PERIOD, TAG_BYTES, RingError, ring_all_reduce_mean_

WORLDS = [2, 3, 4]
LENGTHS = [0, 1, 4097, 100_003]
CHUNK_BYTES = 4 * 1024  # pieces of one topk chunk (4096 values)
KEY = bytes(range(32))
NON_FINITE_NUMEL = 3 * TOPK_CHUNK + 5
FAULT_NUMEL = 100_003
FAULT_AT_ENCODE = 10  # island 1's 10th encode: the others are already waiting for its pieces


def expected_mean(inputs: list[torch.Tensor], codec: Codec, step: int = TOPK_CHUNK) -> torch.Tensor:
    """The all-gather's mean as specified: per piece, every island's payload decoded and added in
    island order into zeros, then divided by the world once."""
    out = torch.zeros_like(inputs[0])
    for start in range(0, out.numel(), step):
        piece = out[start : start + step]
        for values in inputs:
            codec.decode_add_(codec.encode(values[start : start + step].contiguous()), piece)
        piece.div_(len(inputs))
    return out


def wire_bytes(numel: int, world: int, codec: Codec, keyed: bool) -> int:
    """What each island sends (and receives): world - 1 copies of each piece's payload and tag."""
    pieces = [min(TOPK_CHUNK, numel - start) for start in range(0, numel, TOPK_CHUNK)]
    return (world - 1) * sum(codec.encoded_size(n) + (TAG_BYTES if keyed else 0) for n in pieces)


# --- correctness: every length, 1/2/4 bits, worlds 2..4 ------------------------------------------


def _gather_every_case(rank: int, world: int, store_path: str, results) -> None:
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world)
    groups = {w: make_group(store, rank, w, f"world{w}/") for w in WORLDS if rank < w}
    rows = []
    for w, group in groups.items():
        sequence = 0
        for numel in LENGTHS:
            inputs = [island_values(r, numel) for r in range(w)]
            for bits in (1, 2, 4):
                codec = get_codec("topk", topk_bits=bits)
                values, dropped = inputs[rank].clone(), torch.full((numel,), float("nan"))
                sent, recv = sparse_all_gather_mean_(values, group, codec, DEADLINE_S, CHUNK_BYTES, sequence, KEY, dropped)
                sequence += 1
                lost = inputs[rank] - codec.decode(codec.encode(inputs[rank]), numel)
                rows.append((w, f"{numel}/{bits}", digest(values), torch.equal(values, expected_mean(inputs, codec)),
                             torch.equal(dropped, lost), (sent, recv) == (wire_bytes(numel, w, codec, True),) * 2))
        inputs = [island_values(r, NON_FINITE_NUMEL) for r in range(w)]
        inputs[0][3], inputs[0][TOPK_CHUNK + 7], inputs[0][2 * TOPK_CHUNK : 3 * TOPK_CHUNK] = float("nan"), float("inf"), 0.0
        values = inputs[rank].clone()
        sparse_all_gather_mean_(values, group, get_codec("topk"), DEADLINE_S, CHUNK_BYTES, sequence, KEY)
        sequence += 1
        want = expected_mean(inputs, get_codec("topk"))
        rows.append((w, "nonfinite", digest(values), torch.equal(values.view(torch.int32), want.view(torch.int32)),
                     bool(values[:TOPK_CHUNK].isnan().any() & values[TOPK_CHUNK : 2 * TOPK_CHUNK].isnan().any()),
                     bool(values[2 * TOPK_CHUNK :].isnan().any())))
        if w == 2:
            rows.extend((w, *row) for row in _global_mean(store, rank, w))
    results.put((rank, rows))


def _global_mean(store: dist.Store, rank: int, world: int) -> list[tuple]:
    """GlobalMean with topk over two streams, three buckets, in place and on work buffers: each
    bucket's half k is averaged on stream k as one all-gather call of its own."""
    groups = [make_group(store, rank, world, f"stream{s}/") for s in range(2)]
    numel = 5 * TOPK_CHUNK + 11
    inputs = [island_values(r, numel) for r in range(world)]
    buckets = [slice(0, 2 * TOPK_CHUNK), slice(2 * TOPK_CHUNK, 2 * TOPK_CHUNK + 3), slice(2 * TOPK_CHUNK + 3, numel)]
    codec = get_codec("topk")
    want = torch.empty(numel)
    for bucket in buckets:
        halves = [list(x[bucket].tensor_split(2)) for x in inputs]
        want[bucket] = torch.cat([expected_mean([h[k].contiguous() for h in halves], codec) for k in range(2)])
    rows = []
    for way, abandoned in (("in place", None), ("work buffers", lambda: False)):
        mean = GlobalMean(groups, codec, DEADLINE_S, CHUNK_BYTES, abandoned=abandoned, key=KEY)
        values, dropped = inputs[rank].clone(), torch.full((numel,), float("nan"))
        mean.mean_buckets_(values, buckets, dropped)
        rows.append((f"global mean {way}", digest(values), torch.equal(values, want), not dropped.isnan().any().item(),
                     mean.wire.bytes_sent == mean.wire.bytes_recv > 0))
    return rows


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """world -> case -> one row per island: (digest, flags...)."""
    out, codes = run_islands(max(WORLDS), _gather_every_case, tmp_path_factory.mktemp("gather") / "store")
    assert codes == [0] * max(WORLDS) and len(out) == max(WORLDS), (codes, out)
    table: dict[int, dict[str, list[tuple]]] = {w: {} for w in WORLDS}
    for _, rows in out:
        for world, case, *row in rows:
            table[world].setdefault(case, []).append(tuple(row))
    return table.__getitem__


@pytest.mark.timeout(PROCESS_TIMEOUT_S * 2)
@pytest.mark.parametrize("world", WORLDS)
def test_every_island_ends_with_the_payloads_summed_in_island_order_bit_for_bit(results, world):
    table = results(world)
    assert {f"{n}/{b}" for n in LENGTHS for b in (1, 2, 4)} <= set(table)
    for case, rows in table.items():
        assert len(rows) == world, case
        assert len({d for d, *_ in rows}) == 1, case  # the same bits everywhere
        assert all(row[1] for row in rows), case  # and they are the specified sum


@pytest.mark.timeout(PROCESS_TIMEOUT_S * 2)
@pytest.mark.parametrize("world", WORLDS)
def test_dropped_is_exactly_what_each_islands_own_encoding_lost(results, world):
    for case, rows in results(world).items():
        if "/" in case:
            assert all(row[2] for row in rows), case


@pytest.mark.timeout(PROCESS_TIMEOUT_S * 2)
@pytest.mark.parametrize("world", WORLDS)
def test_each_island_sends_and_receives_world_minus_one_copies_of_every_payload_and_its_tag(results, world):
    for case, rows in results(world).items():
        if "/" in case:
            assert all(row[3] for row in rows), case


@pytest.mark.timeout(PROCESS_TIMEOUT_S * 2)
@pytest.mark.parametrize("world", WORLDS)
def test_a_nan_inf_and_zero_chunk_give_nan_where_kept_and_the_same_bits_everywhere(results, world):
    rows = results(world)["nonfinite"]
    assert len({d for d, *_ in rows}) == 1
    assert all(same and nan_first for _, same, nan_first, _ in rows)  # a NaN or inf is never averaged away
    assert not any(nan_later for *_, nan_later in rows)  # nor does it spill past its chunk (the zero chunk and after)


@pytest.mark.timeout(PROCESS_TIMEOUT_S * 2)
def test_global_mean_sends_topk_through_the_all_gather_on_every_stream_and_bucket(results):
    table = results(2)
    for way in ("in place", "work buffers"):
        rows = table[f"global mean {way}"]
        assert len({d for d, *_ in rows}) == 1, way
        assert all(same and dropped_written and counted for _, same, dropped_written, counted in rows), way
    assert {d for d, *_ in table["global mean in place"]} == {d for d, *_ in table["global mean work buffers"]}


def test_a_world_of_one_is_a_no_op_and_the_ring_refuses_sparse_payloads():
    group = dist.ProcessGroupGloo(dist.HashStore(), 0, 1, timedelta(seconds=5))
    values, dropped = island_values(0, 5000), torch.full((5000,), float("nan"))
    before = values.clone()
    assert sparse_all_gather_mean_(values, group, get_codec("topk"), DEADLINE_S, CHUNK_BYTES, dropped=dropped) == (0, 0)
    assert torch.equal(values, before) and torch.equal(dropped, torch.zeros(5000))
    with pytest.raises(ValueError, match="do not add up along a ring"):
        ring_all_reduce_mean_(values, group, get_codec("topk"), DEADLINE_S, CHUNK_BYTES)
    with pytest.raises(ValueError, match="int8 goes through the ring"):
        sparse_all_gather_mean_(values, group, get_codec("int8"), DEADLINE_S, CHUNK_BYTES)


# --- failures: a killed or stopped island, and payloads that must be refused ---------------------


class _FaultyTopk(TopkCodec):
    """topk, but the island sends itself `signum` at its FAULT_AT_ENCODE-th encode."""

    def __init__(self, signum: int) -> None:
        super().__init__()
        self.signum, self.encodes = signum, 0

    def encode(self, values: torch.Tensor) -> torch.Tensor:
        self.encodes += 1
        if self.encodes == FAULT_AT_ENCODE:
            os.kill(os.getpid(), self.signum)
        return super().encode(values)


def _misbehave(fault: str) -> None:
    """Make this island's payloads wrong on the wire in the way `fault` names (island 1 only)."""
    honest = allgather._Gather.mac
    if fault == "impostor":  # tags its payloads as island 2's
        allgather._Gather.mac = lambda self, piece, sender, payload: honest(self, piece, (sender + 1) % self.world, payload)
    elif fault == "tamper":  # its payloads change after they were tagged
        def tampered(self, piece: int, sender: int, payload: torch.Tensor) -> bytes:
            altered = payload.clone()
            if sender == self.rank:
                altered[-1] ^= 1
            return honest(self, piece, sender, altered)

        allgather._Gather.mac = tampered


MAC_FAULTS = ("key", "replay", "impostor", "tamper")


def _island(rank: int, world: int, store_path: str, results, fault: str, deadline_s: float) -> None:
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world)
    group = make_group(store, rank, world, "fault/")
    faulty = rank == 1
    codec = _FaultyTopk({"kill": signal.SIGKILL, "stop": signal.SIGSTOP}[fault.split("-")[0]]) \
        if faulty and fault.startswith(("kill", "stop")) else get_codec("topk")
    if faulty:
        _misbehave(fault)
    key = bytes(32) if faulty and fault == "key" else KEY
    sequence = SEQUENCE_TAG_PERIOD if faulty and fault == "replay" else 0  # the same gloo tags, another call's MACs
    values = island_values(rank, FAULT_NUMEL)
    start = time.monotonic()
    try:
        if fault == "stop-abandon":  # the coordinator dissolves the epoch after 1 s
            mean = GlobalMean([group], codec, deadline_s, CHUNK_BYTES, abandoned=lambda: time.monotonic() > start + 1.0, key=key)
            mean.mean_(values)
        else:
            sparse_all_gather_mean_(values, group, codec, deadline_s, CHUNK_BYTES, sequence, key)
        results.put((rank, "finished", "", time.monotonic() - start))
    except RingError as error:
        results.put((rank, "RingError", str(error), time.monotonic() - start))
    if fault in MAC_FAULTS:  # nobody leaves before all have reported: a peer's exit would fail the others' sends first
        store.set(f"reported/{rank}", "1")
        store.wait([f"reported/{r}" for r in range(world)], timedelta(seconds=PROCESS_TIMEOUT_S / 2))


def run_with_fault(tmp_path: Path, world: int, fault: str, deadline_s: float = DEADLINE_S) -> tuple[dict, list]:
    reporting = world if fault in MAC_FAULTS else world - 1
    out, codes = run_islands(world, _island, tmp_path / "store", fault, deadline_s, reporting=reporting)
    return {rank: (outcome, message, elapsed) for rank, outcome, message, elapsed in out}, codes


@pytest.mark.timeout(PROCESS_TIMEOUT_S)
def test_survivors_raise_ring_error_at_once_when_a_peer_is_killed_mid_gather(tmp_path):
    out, codes = run_with_fault(tmp_path, 3, "kill")
    assert codes[1] == -signal.SIGKILL
    assert sorted(out) == [0, 2]  # every island hears from every other: both notice
    for rank, (outcome, message, elapsed) in out.items():
        assert outcome == "RingError", (rank, message)
        assert elapsed < SLACK_S < DEADLINE_S  # a closed socket fails at once, not at the deadline
    # the first to notice names the dead island (the other may then lose its connection to the first)
    assert any("rank 1" in message for _, message, _ in out.values())
    assert codes[0] == codes[2] == 0


@pytest.mark.timeout(PROCESS_TIMEOUT_S)
def test_survivors_raise_ring_error_at_the_deadline_when_a_peer_stops(tmp_path):
    out, codes = run_with_fault(tmp_path, 3, "stop", STOP_DEADLINE_S)
    assert codes[1] == -signal.SIGKILL  # stopped, so run_islands had to kill it
    assert sorted(out) == [0, 2]
    for rank, (outcome, message, _) in out.items():
        assert outcome == "RingError", (rank, message)
    elapsed = [e for *_, e in out.values()]
    assert STOP_DEADLINE_S <= max(elapsed) < STOP_DEADLINE_S + SLACK_S  # someone waited out the deadline: nothing else ended it
    assert any("Timed out" in message for _, message, _ in out.values())


@pytest.mark.timeout(PROCESS_TIMEOUT_S)
def test_a_dissolved_epoch_abandons_a_gather_stuck_on_a_stopped_peer_before_the_deadline(tmp_path):
    out, _ = run_with_fault(tmp_path, 3, "stop-abandon", DEADLINE_S)
    assert sorted(out) == [0, 2]
    for rank, (outcome, message, elapsed) in out.items():
        assert outcome == "RingError" and ABANDONED in message, (rank, message)
        assert elapsed < 1.0 + SLACK_S < DEADLINE_S


@pytest.mark.timeout(PROCESS_TIMEOUT_S)
@pytest.mark.parametrize("fault", MAC_FAULTS)
def test_a_payload_without_the_key_replayed_from_another_call_passed_off_or_altered_is_refused(tmp_path, fault):
    out, _ = run_with_fault(tmp_path, 3, fault)
    for rank in (0, 2):  # both refuse island 1's payloads before decoding them
        outcome, message, _ = out[rank]
        assert outcome == "RingError" and "MAC does not verify" in message and "from rank 1" in message, (rank, message)
