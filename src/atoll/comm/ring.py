"""Pipelined ring all-reduce (mean) with compressed transfers and bit-identical results.

The tensor is split into `world` near-equal segments (any length; empty ones when numel < world)
and every segment into the same number of chunks of about `chunk_bytes` of fp32. The ring runs
2(world-1) steps over point-to-point sends to the right neighbour and receives from the left:

- reduce-scatter (steps 0..world-2): receive a chunk of a partial sum, decode it, add the local
  chunk in fp32, encode, send it on. After the last step each island owns one fully summed
  segment, divides it by world, encodes it ONCE and replaces its own copy by the decoded bytes.
- all-gather (steps world-1..2world-3): receive an owner's encoded chunk, decode it in place
  and forward the very same bytes. Every island therefore decodes the same bytes for every
  segment: the result is bit-identical everywhere (PRIME re-quantised at every hop instead).

Pipelining: receives are posted one step ahead into two buffers per chunk, and each chunk is
sent as soon as it is ready, so while chunk c is on the wire chunk c+1 is being decoded, summed
and encoded. Encoded chunk sizes depend only on numel, world, chunk_bytes and the codec, so the
receiver preallocates its buffers. Tags encode (call sequence, step, chunk), so successive calls
on a group never match each other's messages; different groups have their own connections.

Authentication: with a `key` (the epoch key, `atoll.mesh.auth.epoch_key`), every payload is
followed by a 32-byte HMAC-SHA256 tag over its identity and its bytes, and the receiver checks
it before a byte is decoded or summed. In reduce-scatter the identity is (call, step, chunk,
sender): each hop tags the partial sum it made. In all-gather it is (call, segment, chunk): the
owner tags its encoded chunk once and every forwarder passes bytes and tag on unchanged, so each
island checks the owner's tag (an island that re-tagged would only spend a hash per hop; the
owner's bytes are the only right ones for that segment, so a valid pair cannot be misplaced).
The call is the whole `sequence`, not the gloo tag, which wraps. A payload that fails the check
(injected by someone without the key, replayed from another call, step, segment or epoch)
raises RingError: the group failed, like any failure.

Cost of the MAC (`benchmarks/allreduce.py --mac`): the tag travels as its own message right
after its payload, so a payload goes on the wire before its tag is computed (the hash runs while
gloo sends) and is never copied to append a tag. What remains on the critical path is the check
of each received chunk before it is decoded, which overlaps the next chunk's transfer. Measured
(64 MiB, int8, 2 and 3 islands, 2-core VM without SHA instructions): within the run-to-run noise
on the 100 Mbit/s emulated WAN (MAC / no MAC 0.95-1.08); about 2x on loopback, where the ring is
CPU-bound and HMAC-SHA256 (~150-300 MB/s here) runs over every byte at its sender and receiver.

What the codec dropped (for error feedback, `atoll.diloco`): every island encodes every position
of the tensor exactly once per call, either as a reduce-scatter hop (its own values at step 0, a
partial sum later) or as the owner of the averaged segment. With a `dropped` tensor, the ring
writes there, position by position, what that one encoding lost, in units of the sum over islands:
x - decode(encode(x)) for a hop, world x (x - decode(encode(x))) for the owner's encoding of the
mean x. The islands' `dropped` tensors then add up to world x (exact mean - result), up to fp32
rounding, so an island that adds its share back into its next contribution gives back all the
codec lost. It costs one decode and one subtraction per encoded chunk (the owner decodes anyway).

Failure semantics: `deadline_s` bounds every single wait for a transfer (a progress deadline, not
one for the whole call, which may take longer while data keeps flowing). A dead peer (closed
socket) makes the ring raise `RingError` at once; a silent one after `deadline_s`. gloo then
closes the group's connections, so the other members fail promptly too. After a RingError the
tensor's contents are undefined and the group is unusable: the caller ends the epoch.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from atoll.comm.codecs import Codec

FP32_BYTES = 4
TAG_BYTES = 32
MESSAGE_TAG_BITS = 20
"""gloo tags are (call sequence << 20) | message, where a message is a payload (steps x chunks of
them, below MAC_MESSAGE) or, at MAC_MESSAGE + the same index, the MAC tag that follows it."""
MAC_MESSAGE = 1 << (MESSAGE_TAG_BITS - 1)
SEQUENCE_TAG_PERIOD = 2 ** (31 - MESSAGE_TAG_BITS)
"""gloo tags are non-negative int32; call sequences wrap after this many calls, long after any
older call's messages are gone (calls on a group are sequential)."""


class RingError(RuntimeError):
    """A transfer of the ring failed or missed its deadline; the group cannot be used again."""


def ring_all_reduce_mean_(
    tensor: torch.Tensor,
    group: dist.ProcessGroup,
    codec: Codec,
    deadline_s: float,
    chunk_bytes: int,
    sequence: int = 0,
    key: bytes | None = None,
    dropped: torch.Tensor | None = None,
) -> tuple[int, int]:
    """Replace a contiguous 1-D CPU fp32 tensor by its mean over `group`, in place.

    Every member must call with the same numel, codec, chunk_bytes and `sequence` (the index of
    this call on this group; it picks the tags), and the same `key` (None: payloads carry no
    MAC). With `dropped` (a tensor like `tensor`), every position of it is overwritten with
    what this member's encoding of that position lost (see the module doc; zeros at world 1).
    Returns (bytes sent, bytes received): encoded
    payload bytes this member put on and took off the wire. World 1 is a no-op returning (0, 0).
    Raises RingError on a dead peer at once and on a silent one after `deadline_s` without
    progress, or on a payload whose MAC does not verify; `tensor` is then undefined.
    """
    return ring_all_reduce_means_(
        lambda _: tensor, 1, group, codec, deadline_s, chunk_bytes, sequence, key, dropped=None if dropped is None else lambda _: dropped,
    )


def ring_all_reduce_means_(
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
    """`ring_all_reduce_mean_` of `count` tensors in turn, call sequences `first_sequence + i`,
    pipelined across them: ring i+1 puts its first step on the wire as ring i begins its second
    (measured on the 100 Mbit/s, 40 ms emulated WAN, 3 islands, 42 buckets: 1.30x faster than one
    ring after another; 1.24x starting with ring i's first step, 1.20x with its last), so the link
    does not idle while a ring drains. The results are those of one call each.

    `tensors(i)` gives the i-th tensor, asked for just before its ring starts (while ring i-1
    still runs: it must not share memory with it); `done(i, tensor)` runs once ring i has
    finished. Either may raise to stop (the error propagates). `dropped(i)`, if given, is ring i's
    `dropped` tensor (asked for with `tensors(i)`; `done` runs once both are written). Returns the total (bytes sent,
    bytes received). Failures as in `ring_all_reduce_mean_`; the tensors of the rings running
    when it fails (at most two) are then undefined.
    """
    if not codec.summable:
        raise ValueError(f"{codec.name} payloads do not add up along a ring: average them with comm/allgather.py")
    if chunk_bytes < FP32_BYTES:
        raise ValueError(f"chunk_bytes must hold at least one fp32 value, got {chunk_bytes}")
    deadline = timedelta(seconds=deadline_s)

    def checked(index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        tensor = tensors(index)
        if tensor.dtype != torch.float32 or tensor.dim() != 1 or not tensor.is_contiguous() or tensor.is_cuda:
            raise ValueError(f"the ring averages contiguous 1-D CPU fp32 tensors, got {tensor.dtype} {tuple(tensor.shape)} on {tensor.device}")
        lost = dropped(index) if dropped is not None else None
        if lost is not None and (lost.dtype != torch.float32 or lost.shape != tensor.shape or not lost.is_contiguous() or lost.is_cuda):
            raise ValueError(f"the ring's dropped tensor must be contiguous CPU fp32 of shape {tuple(tensor.shape)}, got {lost.dtype} {tuple(lost.shape)}")
        return tensor, lost

    if group.size() == 1:  # the mean of one is itself, and nothing was encoded
        for index in range(count):
            tensor, lost = checked(index)
            if lost is not None:
                lost.zero_()
            done(index, tensor)
        return 0, 0

    def started(index: int) -> _Ring:
        ring = _Ring(*checked(index), group, codec, deadline, chunk_bytes, first_sequence + index, key)
        ring.start()
        return ring

    sent = received = 0
    rings: list[_Ring | None] = [started(0)]
    for index in range(count):
        more = index + 1 < count
        moved = rings[index].finish(lambda: rings.append(started(index + 1)) if more else None)
        sent, received = sent + moved[0], received + moved[1]
        done(index, rings[index].tensor)
        rings[index] = None  # its buffers go now, not at the end of the call
    return sent, received


@dataclass(frozen=True)
class _Receive:
    """One posted receive of a chunk's payload and, with a key, of the MAC tag that follows it."""

    work: dist.Work
    buffer: torch.Tensor
    mac_work: dist.Work | None
    mac_buffer: torch.Tensor | None

    @property
    def nbytes(self) -> int:
        return self.buffer.numel() + (self.mac_buffer.numel() if self.mac_buffer is not None else 0)


class _Ring:
    """One call's schedule and in-flight transfers."""

    def __init__(
        self, tensor: torch.Tensor, dropped: torch.Tensor | None, group: dist.ProcessGroup, codec: Codec, deadline: timedelta,
        chunk_bytes: int, sequence: int, key: bytes | None,
    ) -> None:
        self.tensor, self.group, self.codec, self.deadline, self.key = tensor, group, codec, deadline, key
        self.world, self.rank = group.size(), group.rank()
        self.left, self.right = (self.rank - 1) % self.world, (self.rank + 1) % self.world
        segments = tensor.tensor_split(self.world)
        self.num_chunks = max(1, -(-segments[0].numel() // (chunk_bytes // FP32_BYTES)))  # segment 0 is the longest
        self.chunks = [segment.tensor_split(self.num_chunks) for segment in segments]
        self.dropped = None if dropped is None else [s.tensor_split(self.num_chunks) for s in dropped.tensor_split(self.world)]
        """What this member's encodings lost, chunk by chunk like `chunks` (see the module doc)."""
        self.steps = 2 * (self.world - 1)
        if self.steps * self.num_chunks > MAC_MESSAGE:
            raise ValueError(f"{self.steps * self.num_chunks} ring messages exceed {MAC_MESSAGE}: raise chunk_bytes")
        self.sequence = sequence
        self.tag_base = (sequence % SEQUENCE_TAG_PERIOD) << MESSAGE_TAG_BITS
        # two receive buffers per chunk index (steps alternate), sized for the longest chunk
        longest = [max(self.chunks[s][c].numel() for s in range(self.world)) for c in range(self.num_chunks)]
        self.buffers = [[torch.empty(codec.encoded_size(n), dtype=torch.uint8) for _ in range(2)] for n in longest]
        self.mac_buffers = [[torch.empty(TAG_BYTES, dtype=torch.uint8) for _ in range(2)] for _ in longest] if key is not None else None
        self.scratch = torch.empty(max(longest))
        """A received partial sum, decoded before it is added (reduce-scatter)."""
        self.receiving: dict[int, _Receive] = {}
        self.sending: dict[int, list[tuple[int, list[dist.Work], list[torch.Tensor]]]] = {c: [] for c in range(self.num_chunks)}
        self.sent = self.received = 0

    def send_segment(self, step: int, rank: int | None = None) -> int:
        """The segment this member (or `rank`) sends at `step` (it receives the one before it)."""
        rank = self.rank if rank is None else rank
        if step < self.world - 1:
            return (rank - step) % self.world
        return (rank + 1 - (step - self.world + 1)) % self.world

    def recv_segment(self, step: int) -> int:
        return (self.send_segment(step) - 1) % self.world

    def tag(self, step: int, chunk: int) -> int:
        return self.tag_base + step * self.num_chunks + chunk

    def post_recv(self, step: int, chunk: int) -> None:
        numel = self.chunks[self.recv_segment(step)][chunk].numel()
        if numel:
            buffer = self.buffers[chunk][step % 2][: self.codec.encoded_size(numel)]
            with self.failing_as(f"posting the receive of step {step} chunk {chunk} from rank {self.left}"):
                work = self.group.recv([buffer], self.left, self.tag(step, chunk))
                mac_buffer = mac_work = None
                if self.mac_buffers is not None:
                    mac_buffer = self.mac_buffers[chunk][step % 2]
                    mac_work = self.group.recv([mac_buffer], self.left, self.tag(step, chunk) + MAC_MESSAGE)
            self.receiving[chunk] = _Receive(work, buffer, mac_work, mac_buffer)

    def mac(self, step: int, chunk: int, payload: torch.Tensor, sender: int) -> bytes:
        """The tag of `payload` as sent by `sender` at (step, chunk) of this call (see the module doc)."""
        # the whole sequence, not the gloo tag: a payload recorded SEQUENCE_TAG_PERIOD calls ago must fail
        if step < self.world - 1:  # reduce-scatter: the sender's partial sum
            identity = f"sum/{self.sequence}/{step}/{chunk}/{sender}/{self.world}/"
        else:  # all-gather: the owner's bytes of the segment, whoever forwards them
            identity = f"owned/{self.sequence}/{self.send_segment(step, sender)}/{chunk}/{self.world}/"
        mac = hmac.new(self.key, identity.encode(), hashlib.sha256)
        mac.update(memoryview(payload.numpy()))  # hashlib releases the GIL while it hashes a large buffer
        return mac.digest()

    def verified(self, step: int, chunk: int, received: _Receive) -> torch.Tensor:
        """The payload of a received chunk, once its tag checks out (RingError if it does not)."""
        if received.mac_buffer is not None:
            expected = self.mac(step, chunk, received.buffer, self.left)
            if not hmac.compare_digest(expected, received.mac_buffer.numpy().tobytes()):
                raise RingError(
                    f"ring all-reduce refused the payload of step {step} chunk {chunk} from rank {self.left} "
                    f"(rank {self.rank} of {self.world}): its MAC does not verify under the epoch key"
                )
        return received.buffer

    def verified_or_flushed(self, step: int, chunk: int, received: _Receive) -> torch.Tensor:
        """`verified`, but before a refusal propagates, the sends already posted are let out (each
        bounded by the deadline; a dead or hung neighbour ends the wait, not the refusal): the
        neighbour then judges this member's bytes by its own check instead of seeing a socket
        that closed under them as this process exits."""
        try:
            return self.verified(step, chunk, received)
        except RingError:
            for c in range(self.num_chunks):
                with suppress(RingError):
                    self.wait_sends(c, self.steps)
            raise

    def post_send(self, step: int, chunk: int, payload: torch.Tensor, forwarded_mac: torch.Tensor | None = None) -> None:
        """Send `payload`, then (with a key) its tag: `forwarded_mac` as received, or computed now."""
        with self.failing_as(f"posting the send of step {step} chunk {chunk} to rank {self.right}"):
            works, tensors = [self.group.send([payload], self.right, self.tag(step, chunk))], [payload]
            if self.key is not None:
                # computed while the payload is already on its way; the receiver waits for both
                mac = forwarded_mac if forwarded_mac is not None else torch.frombuffer(
                    bytearray(self.mac(step, chunk, payload, self.rank)), dtype=torch.uint8)
                works.append(self.group.send([mac], self.right, self.tag(step, chunk) + MAC_MESSAGE))
                tensors.append(mac)
        self.sending[chunk].append((step, works, tensors))
        self.sent += sum(t.numel() for t in tensors)

    def wait(self, work: dist.Work, what: str) -> None:
        with self.failing_as(f"waiting for the {what}"):
            work.wait(self.deadline)

    @contextmanager
    def failing_as(self, what: str) -> Iterator[None]:
        """Turn gloo's errors (RuntimeError: closed socket, timeout) into a RingError saying where."""
        try:
            yield
        except RuntimeError as error:
            raise RingError(f"ring all-reduce failed while {what} (rank {self.rank} of {self.world}): {error}") from error

    def wait_sends(self, chunk: int, before_step: int) -> None:
        """Wait for this chunk's sends of steps < before_step (freeing their buffers)."""
        pending = self.sending[chunk]
        while pending and pending[0][0] < before_step:
            step, works, _ = pending.pop(0)
            for work in works:
                self.wait(work, f"send of step {step} chunk {chunk} to rank {self.right}")

    def start(self) -> None:
        """Post the first step: every chunk's receive, and the send of this member's own segment."""
        for c in range(self.num_chunks):
            self.post_recv(0, c)
            values = self.chunks[self.send_segment(0)][c]
            if values.numel():
                self.post_send(0, c, self.encoded(values, self.send_segment(0), c))

    def finish(self, start_next: Callable[[], None]) -> tuple[int, int]:
        """Run every step to the end (after `start`); `start_next()` runs as the second step
        begins (this member's first sends are out). Returns (bytes sent, bytes received)."""
        for step in range(self.steps):
            if step == min(1, self.steps - 1):
                start_next()
            segment = self.recv_segment(step)
            for c in range(self.num_chunks):
                values = self.chunks[segment][c]
                if values.numel():  # empty chunks (numel < world x chunks) are skipped by both ends
                    received = self.receiving.pop(c)
                    for work in (received.work, received.mac_work):
                        if work is not None:
                            self.wait(work, f"receive of step {step} chunk {c} from rank {self.left}")
                    self.received += received.nbytes
                    payload = self.combine(step, values, self.verified_or_flushed(step, c, received), segment, c)
                    if step + 1 < self.steps:
                        # an all-gather hop forwards the owner's bytes with the owner's tag
                        self.post_send(step + 1, c, payload, received.mac_buffer if step > self.world - 2 else None)
                if step + 1 < self.steps:
                    # the other buffer of this chunk was forwarded at this step: free it, then refill it
                    self.wait_sends(c, step + 1)
                    self.post_recv(step + 1, c)
        for c in range(self.num_chunks):
            self.wait_sends(c, self.steps)
        return self.sent, self.received

    def encoded(self, values: torch.Tensor, segment: int, chunk: int) -> torch.Tensor:
        """The payload of a reduce-scatter hop's `values`, noting in `dropped` what it loses."""
        payload = self.codec.encode(values)
        if self.dropped is not None:
            lost = self.dropped[segment][chunk]
            self.codec.decode_into(payload, lost)
            torch.sub(values, lost, out=lost)
        return payload

    def combine(self, step: int, values: torch.Tensor, buffer: torch.Tensor, segment: int, chunk: int) -> torch.Tensor:
        """Fold a received chunk of `segment` into `values`; return what to send at the next step."""
        if step > self.world - 2:  # all-gather: keep the owner's values, forward its bytes
            self.codec.decode_into(buffer, values)
            return buffer
        received = self.scratch[: values.numel()]
        self.codec.decode_into(buffer, received)
        values.add_(received)
        if step < self.world - 2:
            return self.encoded(values, segment, chunk)
        values.div_(self.world)  # this member now owns the segment's sum: the one and only division
        owned = self.codec.encode(values)
        lost = self.dropped[segment][chunk] if self.dropped is not None else None
        if lost is not None:
            lost.copy_(values)
        self.codec.decode_into(owned, values)
        if lost is not None:  # lost from the mean: world times that from the sum
            lost.sub_(values).mul_(self.world)
        return owned
