"""Sparse all-gather mean: how payloads that do not add up along a ring (topk, a codec whose
`summable` is False) are averaged across islands, with bit-identical results.

A sparse payload names the positions it keeps; two islands keep different ones, so a partial sum
re-encoded at each hop of a ring would drop most of what it carries. Instead every island encodes
its own tensor once and its payload reaches every other island unchanged: each island sends it
straight to each peer (gloo's connections within a group are a full mesh already), one hop where
a ring all-gather takes world - 1, moving the same bytes: world - 1 copies of its payload up and
world - 1 payloads down. Each island then adds the decoded payloads of islands 0, 1, ...,
world - 1 (its own decoded from the bytes it sent) in fp32 into zeros, position by position, and
divides once by world: the same bytes added in the same order, so the result is bit-identical on
every island. Positions no island kept average to 0.

Pipelining: the tensor is cut into pieces of about `chunk_bytes` of fp32 (whole topk chunks).
Receives of every piece from every peer are posted first; each piece is sent as soon as it is
encoded, and piece c is summed as soon as its payloads are in while later pieces are still on the
wire. `sparse_all_gather_means_` averages many tensors (DiLoCo's buckets) and encodes and sends
bucket i+1 before it sums bucket i, so the link does not idle between buckets.

Authentication: with a `key` (the epoch key, `atoll.mesh.auth.epoch_key`), every payload is
followed by a 32-byte HMAC-SHA256 tag over its identity (call sequence, piece, sender, world and
the piece's length) and its bytes, computed once by its sender and checked by every receiver
before a byte is decoded. A payload altered on the way, injected without the key, replayed from
another call (even SEQUENCE_TAG_PERIOD calls later, when gloo's tags repeat), moved to another
piece or passed off as another sender's, or sent in another epoch (another key) raises RingError,
as does one whose offsets are malformed (`TopkCodec.decode_add_`): the group failed.

What the codec dropped (for error feedback, `atoll.diloco`): each island encodes each position of
its tensor exactly once, so with a `dropped` tensor it writes x - decode(encode(x)) there. In the
ring's units (`comm/ring.py`) the islands' `dropped` tensors add up to world x (exact mean -
result), up to fp32 rounding.

Failure semantics, as in the ring: `deadline_s` bounds every single wait for a transfer (a
progress deadline). A dead peer (closed socket) raises RingError at once; a silent one after
`deadline_s`; gloo then closes the group's connections, so the other members fail promptly too.
There are no retries: after a RingError the tensors being averaged (at most two) are undefined
and the group is unusable, so the caller ends the epoch and the next one (after a restart or a
membership change) starts from fresh groups and call sequences. A hung peer is given up on sooner
by `GlobalMean`'s `abandoned` check, which leaves this call's thread behind.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

from atoll.comm.codecs import TOPK_CHUNK, Codec
from atoll.comm.ring import FP32_BYTES, MAC_MESSAGE, MESSAGE_TAG_BITS, SEQUENCE_TAG_PERIOD, TAG_BYTES, RingError


def sparse_all_gather_mean_(
    tensor: torch.Tensor,
    group: dist.ProcessGroup,
    codec: Codec,
    deadline_s: float,
    chunk_bytes: int,
    sequence: int = 0,
    key: bytes | None = None,
    dropped: torch.Tensor | None = None,
) -> tuple[int, int]:
    """Replace a contiguous 1-D CPU fp32 tensor by the mean over `group` of every member's encoded
    tensor, in place, bit-identical on every member (see the module doc).

    Every member must call with the same numel, codec, chunk_bytes, `sequence` (the index of this
    call on this group: it picks the tags and enters the MACs) and `key` (None: no MACs). With
    `dropped` (like `tensor`), every position of it is overwritten with what this member's encoding
    lost there (zeros at world 1). Returns (bytes sent, bytes received) on the wire, MACs included.
    World 1 is a no-op returning (0, 0). Raises RingError at once on a dead peer, after
    `deadline_s` without progress on a silent one, and on a payload that fails its MAC or is
    malformed; `tensor` is then undefined and the group unusable (no retry here).
    """
    return sparse_all_gather_means_(
        lambda _: tensor, 1, group, codec, deadline_s, chunk_bytes, sequence, key, dropped=None if dropped is None else lambda _: dropped,
    )


def sparse_all_gather_means_(
    tensors: Callable[[int], torch.Tensor],
    count: int,
    group: dist.ProcessGroup,
    codec: Codec,
    deadline_s: float,
    chunk_bytes: int,
    first_sequence: int = 0,
    key: bytes | None = None,
    done: Callable[[int, torch.Tensor], None] = lambda index, tensor: None,
    dropped: Callable[[int], torch.Tensor] | None = None,
) -> tuple[int, int]:
    """`sparse_all_gather_mean_` of `count` tensors in turn, call sequences `first_sequence + i`,
    with the contract of `ring_all_reduce_means_` (`comm/ring.py`), so `GlobalMean` runs either:
    `tensors(i)` (and `dropped(i)`) are asked for just before tensor i is encoded and sent, which
    happens before tensor i-1 is summed (it must not share memory with it); `done(i, tensor)` runs
    once tensor i holds its mean; either may raise to stop. Returns the total (bytes sent, bytes
    received). Failures as in `sparse_all_gather_mean_`; the tensors in flight when it fails (at
    most two) are then undefined.
    """
    if codec.summable:
        raise ValueError(f"the sparse all-gather is for codecs whose payloads do not add up; {codec.name} goes through the ring")
    if chunk_bytes < FP32_BYTES:
        raise ValueError(f"chunk_bytes must hold at least one fp32 value, got {chunk_bytes}")

    def checked(index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        tensor = tensors(index)
        lost = dropped(index) if dropped is not None else None
        for what, t in (("tensor", tensor), ("dropped tensor", lost)):
            if t is not None and (t.dtype != torch.float32 or t.dim() != 1 or not t.is_contiguous() or t.is_cuda or t.shape != tensor.shape):
                raise ValueError(f"the sparse all-gather's {what} must be contiguous 1-D CPU fp32 of {tensor.numel()} values, "
                                 f"got {t.dtype} {tuple(t.shape)} on {t.device}")
        return tensor, lost

    if group.size() == 1:  # the mean of one is itself, and nothing was encoded
        for index in range(count):
            tensor, lost = checked(index)
            if lost is not None:
                lost.zero_()
            done(index, tensor)
        return 0, 0

    deadline = timedelta(seconds=deadline_s)

    def started(index: int) -> _Gather:
        gather = _Gather(*checked(index), group, codec, deadline, chunk_bytes, first_sequence + index, key)
        gather.start()
        return gather

    sent = received = 0
    gathers: list[_Gather | None] = [started(0)] if count else []
    for index in range(count):
        if index + 1 < count:  # its encoding overlaps this one's payloads arriving
            gathers.append(started(index + 1))
        moved = gathers[index].finish()
        sent, received = sent + moved[0], received + moved[1]
        done(index, gathers[index].tensor)
        gathers[index] = None  # its buffers go now
    return sent, received


class _Gather:
    """One call's pieces, payloads and in-flight transfers."""

    def __init__(
        self, tensor: torch.Tensor, dropped: torch.Tensor | None, group: dist.ProcessGroup, codec: Codec, deadline: timedelta,
        chunk_bytes: int, sequence: int, key: bytes | None,
    ) -> None:
        self.tensor, self.group, self.codec, self.deadline, self.sequence, self.key = tensor, group, codec, deadline, sequence, key
        self.world, self.rank = group.size(), group.rank()
        # pieces of whole topk chunks, so that cutting the tensor adds no partial chunk
        step = max(1, chunk_bytes // FP32_BYTES // TOPK_CHUNK) * TOPK_CHUNK
        # an empty tensor has no pieces: nothing is sent, and both ends know it
        self.pieces = list(tensor.split(step)) if tensor.numel() else []
        self.dropped = list(dropped.split(step)) if dropped is not None and tensor.numel() else None
        if len(self.pieces) > MAC_MESSAGE:
            raise ValueError(f"{len(self.pieces)} pieces exceed {MAC_MESSAGE} messages: raise chunk_bytes")
        self.tag_base = (sequence % SEQUENCE_TAG_PERIOD) << MESSAGE_TAG_BITS
        self.peers = [(self.rank + k) % self.world for k in range(1, self.world)]
        """Every other member, starting at the right neighbour, so that not every island sends to member 0 first."""
        self.payloads: list[list[torch.Tensor | None]] = [[None] * self.world for _ in self.pieces]
        """Per piece, every member's payload (this member's own as it was sent)."""
        self.macs: list[list[torch.Tensor | None]] = [[None] * self.world for _ in self.pieces]
        self.receiving: list[list[tuple[int, dist.Work, dist.Work | None]]] = [[] for _ in self.pieces]
        self.sending: list[dist.Work] = []
        self.sent = self.received = 0

    @contextmanager
    def failing_as(self, what: str) -> Iterator[None]:
        """Turn gloo's errors (RuntimeError: closed socket, timeout) into a RingError saying where."""
        try:
            yield
        except RuntimeError as error:
            raise RingError(f"sparse all-gather failed while {what} (rank {self.rank} of {self.world}): {error}") from error

    def mac(self, piece: int, sender: int, payload: torch.Tensor) -> bytes:
        """The tag of `payload` as sent by `sender` for `piece` of this call (see the module doc)."""
        identity = f"sparse/{self.sequence}/{piece}/{sender}/{self.world}/{self.pieces[piece].numel()}/"
        mac = hmac.new(self.key, identity.encode(), hashlib.sha256)
        mac.update(memoryview(payload.numpy()))
        return mac.digest()

    def start(self) -> None:
        """Post every receive, then encode each piece and send it to every peer. A peer already
        gone fails the posting with RingError; nothing waits here, so no deadline applies yet."""
        for piece, values in enumerate(self.pieces):
            size = self.codec.encoded_size(values.numel())
            for peer in self.peers:
                payload = self.payloads[piece][peer] = torch.empty(size, dtype=torch.uint8)
                with self.failing_as(f"posting the receive of piece {piece} from rank {peer}"):
                    work = self.group.recv([payload], peer, self.tag_base + piece)
                    mac_work = None
                    if self.key is not None:
                        self.macs[piece][peer] = torch.empty(TAG_BYTES, dtype=torch.uint8)
                        mac_work = self.group.recv([self.macs[piece][peer]], peer, self.tag_base + MAC_MESSAGE + piece)
                self.receiving[piece].append((peer, work, mac_work))
        for piece, values in enumerate(self.pieces):
            payload = self.payloads[piece][self.rank] = self.codec.encode(values)
            if self.dropped is not None:  # x - decode(encode(x)), changed only where the payload kept a value
                self.codec.decode_add_(payload, self.dropped[piece].copy_(values), -1)
            outgoing = [payload]
            if self.key is not None:
                outgoing.append(torch.frombuffer(bytearray(self.mac(piece, self.rank, payload)), dtype=torch.uint8))
            for peer in self.peers:
                with self.failing_as(f"posting the send of piece {piece} to rank {peer}"):
                    for offset, message in zip((0, MAC_MESSAGE), outgoing):
                        self.sending.append(self.group.send([message], peer, self.tag_base + offset + piece))
                self.sent += sum(m.numel() for m in outgoing)

    def finish(self) -> tuple[int, int]:
        """Sum every piece as its payloads arrive (after `start`), then wait for the sends.
        Returns (bytes sent, bytes received). RingError at once on a dead peer, after the deadline
        of one wait on a silent one, or on a payload that fails its MAC or is malformed; never retried."""
        for piece, values in enumerate(self.pieces):
            for peer, work, mac_work in self.receiving[piece]:
                for w in (work, mac_work):
                    if w is not None:
                        with self.failing_as(f"waiting for piece {piece} from rank {peer}"):
                            w.wait(self.deadline)
                self.received += self.payloads[piece][peer].numel() + (TAG_BYTES if mac_work is not None else 0)
                self.verify(piece, peer)
            values.zero_()
            for sender in range(self.world):  # island order: the same additions on every island
                try:
                    self.codec.decode_add_(self.payloads[piece][sender], values)
                except ValueError as error:
                    raise RingError(f"sparse all-gather refused piece {piece} from rank {sender} (rank {self.rank} of {self.world}): {error}") from error
            values.div_(self.world)
            self.payloads[piece] = self.macs[piece] = None  # summed: its buffers go
        for work in self.sending:
            with self.failing_as("waiting for this member's sends"):
                work.wait(self.deadline)
        return self.sent, self.received

    def verify(self, piece: int, sender: int) -> None:
        """RingError unless the payload of `piece` from `sender` carries its tag (with a key)."""
        if self.key is None:
            return
        expected = self.mac(piece, sender, self.payloads[piece][sender])
        if not hmac.compare_digest(expected, self.macs[piece][sender].numpy().tobytes()):
            raise RingError(
                f"sparse all-gather refused the payload of piece {piece} from rank {sender} (rank {self.rank} of "
                f"{self.world}): its MAC does not verify under the epoch key"
            )
