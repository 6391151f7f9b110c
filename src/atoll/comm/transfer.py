"""Peer-served state transfer: a joiner fetches the run's outer state from live islands while they train.

Every local rank of every member island runs a `StateServer`: a small HTTP/1.1 service on
`mesh.serve_host` (by default this host's address on the route to the coordinator) and a port of
`mesh.port_range` (by default any free one), announced to the coordinator at registration as
`mesh.advertise_host` and port (a NAT's, by default the bound ones: `atoll.mesh.addresses`). It
serves the rank's `ServedState`: the outer weights and outer momentum of the last outer step it
applied, as flat fp32 buffers, plus the progress (inner step, sample cursor) of that step. No copy is taken: the outer state
only changes at an outer step, and `ServedState.changing()` withdraws it while it does, so a
request for an older version is answered 410 and the joiner starts over on the new one.

    GET /state/manifest?nonce=N        -> the `Manifest` as lines, streamed: first its header
                                          (version, progress, tensors, chunk size) as JSON, then
                                          "index:sha256" of every chunk as the server hashes it;
                                          each line is "payload<TAB>MAC(request MAC, payload)"
    GET /state/chunk?version=V&index=I,J,...&nonce=N
                                       -> those chunks' raw bytes back to back (each checked
                                          against the manifest): a batch, so that a round trip
                                          and TCP's restart after idle are paid once per batch

Requests carry X-Atoll-Island and X-Atoll-Mac = MAC under the run key of (path, island): only a
holder of the run token is served, and every path holds a fresh nonce the server remembers, so a
recorded request cannot be replayed. The server is an `atoll.mesh.service.BoundedServer`
(connections capped per source and in all, idle ones closed, before anyone is authenticated), and
the MAC over the raw request target is checked before the target is parsed; a joiner reads no
manifest line longer than MAX_MANIFEST_LINE_BYTES before checking its MAC. Nothing is unpickled: chunks are raw little-endian fp32
bytes, copied into buffers the joiner already has, after their sha256 matched the manifest.

A server hashes its state on the first manifest request (and keeps the hashes for later joiners
of the same version), one chunk at a time: the joiner fetches chunk i as soon as its hash is
known, so hashing runs alongside the transfer instead of before it (sha256 runs at 0.2 GB/s per
core without SHA extensions: seconds per GB, as long as the transfer itself on a fast link).

`fetch_state` (the joiner's side, one call per local rank) reads every source's manifest at once
and takes the header most sources agree on; a chunk's hash counts once every source still in
the transfer has sent it (the most common one wins; a source that sent another is dropped).
It pulls chunks from all sources at once (from one shared queue, CONNECTIONS_PER_SOURCE
connections each so that round trips overlap), verifying each. A source that dies, stalls past
the timeout, answers 410, ends its manifest early or sends a chunk that does not verify is
dropped and its chunks go back to the queue for the others; the fetch fails (TransferError)
only when no source is left.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import itertools
import json
import queue
import secrets
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any
from urllib.parse import parse_qs, urlsplit

import torch

from atoll.mesh.addresses import Listening, bind_in_range
from atoll.mesh.auth import sign, verify
from atoll.mesh.service import BoundedHandler, BoundedServer

MANIFEST_PATH = "/state/manifest"
CHUNK_PATH = "/state/chunk"
MAC_HEADER = "X-Atoll-Mac"
ISLAND_HEADER = "X-Atoll-Island"
GONE = 410
"""The requested version is no longer served (an outer step was applied since)."""
REMEMBERED_NONCES = 1 << 16
MAX_QUERY_FIELDS = 4
MAX_MANIFEST_LINE_BYTES = 1 << 20
"""The longest manifest line a joiner reads (the header lists a few tensors; a hash line is ~80 bytes)."""
CONNECTIONS_PER_SOURCE = 2
"""Chunk requests in flight per source: one waits out the round trip while the other streams."""
BATCH_BYTES = 32 << 20
"""At most about how many bytes one request asks for (whole chunks, at least one; and at most a
fair share, so that every source gets work)."""


class TransferError(RuntimeError):
    """The state could not be fetched from any source."""


@dataclass(frozen=True)
class Manifest:
    """What a server holds for one version: enough for the joiner to check every byte it receives."""

    version: int
    """The outer steps applied (the joiner's `outer_steps` once it holds this state)."""
    step: int
    """The inner step at that outer step."""
    samples: int
    """The run-wide sample cursor at that outer step."""
    tensors: tuple[tuple[str, int], ...]
    """(name, number of fp32 values) of each served buffer, in chunk order."""
    chunk_bytes: int
    hashes: tuple[str, ...]
    """sha256 (hex) of each chunk: the buffers' bytes cut every chunk_bytes, buffer after buffer."""

    def chunks(self) -> list[tuple[int, int, int]]:
        """(tensor index, first byte, end byte) of every chunk, in hash order."""
        spans = []
        for index, (_, numel) in enumerate(self.tensors):
            size = numel * 4
            spans += [(index, start, min(start + self.chunk_bytes, size)) for start in range(0, size, self.chunk_bytes)]
        return spans

    @property
    def total_bytes(self) -> int:
        return sum(numel * 4 for _, numel in self.tensors)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()

    @staticmethod
    def from_json(data: bytes, header: bool = False) -> Manifest:
        """Parse and check a manifest (a header: one without hashes); ValueError if it is malformed."""
        raw = json.loads(data)
        manifest = Manifest(
            int(raw["version"]), int(raw["step"]), int(raw["samples"]),
            tuple((str(name), int(numel)) for name, numel in raw["tensors"]), int(raw["chunk_bytes"]),
            tuple(str(h) for h in raw["hashes"]),
        )
        if manifest.chunk_bytes <= 0 or any(numel < 0 for _, numel in manifest.tensors):
            raise ValueError("a manifest with a non-positive chunk size or a negative tensor size")
        if len(manifest.hashes) != (0 if header else len(manifest.chunks())):
            raise ValueError("a manifest whose hashes do not match its chunks")
        return manifest


class ServedState:
    """One local rank's outer state as its `StateServer` serves it; changed only through `publish`
    and `changing`, under one lock with every read."""

    def __init__(self, chunk_bytes: int) -> None:
        self.chunk_bytes = chunk_bytes
        self._lock = threading.Lock()
        self._version: int | None = None
        self._tensors: list[tuple[str, torch.Tensor]] = []
        self._progress = (0, 0)
        self._spans: list[tuple[int, int, int]] = []
        self._hashes: list[str] = []
        """sha256 of the current version's first len(_hashes) chunks (hashed once, for every joiner)."""
        self._hashing = threading.Lock()

    def publish(self, version: int, tensors: dict[str, torch.Tensor], step: int, samples: int) -> None:
        """Serve these contiguous CPU fp32 buffers as version `version` (the live ones: no copy)."""
        with self._lock:
            self._version, self._progress, self._hashes = version, (step, samples), []
            self._tensors = [(name, t.detach().reshape(-1)) for name, t in tensors.items()]
            self._spans = self._header().chunks()

    @contextlib.contextmanager
    def changing(self) -> Iterator[None]:
        """Withdraw the state while the caller changes the buffers (an outer step, a resync):
        requests in the meantime are answered 410 or cut short. Publish again afterwards."""
        with self._lock:
            self._version, self._hashes = None, []
        yield

    def _header(self) -> Manifest:
        return Manifest(self._version or 0, *self._progress, tuple((n, t.numel()) for n, t in self._tensors), self.chunk_bytes, ())

    def _view(self, index: int) -> memoryview:
        tensor, start, end = self._spans[index]
        return memoryview(self._tensors[tensor][1].view(torch.uint8)[start:end].numpy())

    def header(self) -> Manifest | None:
        """The current version's manifest without hashes; None while nothing is served."""
        with self._lock:
            return None if self._version is None else self._header()

    def hashes(self, version: int) -> Iterator[str]:
        """sha256 (hex) of each chunk of `version`, in order, hashed on first request one chunk at
        a time under the lock (an outer step waits at most one chunk's hash) and kept for later
        requests; stops early once `version` is withdrawn."""
        with self._lock:
            count = len(self._spans) if self._version == version else 0
        for index in range(count):
            with self._hashing, self._lock:  # a second joiner waits for the first one's hash
                if self._version != version:
                    return
                if index == len(self._hashes):
                    self._hashes.append(hashlib.sha256(self._view(index)).hexdigest())
                digest = self._hashes[index]
            yield digest

    def manifest(self) -> Manifest | None:
        """The current version's whole manifest (hashing what is not hashed yet); None while
        nothing is served or if the state changed meanwhile."""
        header = self.header()
        if header is None:
            return None
        hashes = tuple(self.hashes(header.version))
        return replace(header, hashes=hashes) if len(hashes) == len(header.chunks()) else None

    def chunk(self, version: int, index: int) -> bytes | None:
        """Chunk `index` of version `version` (a copy, taken under the lock), or None if that
        version is no longer served."""
        with self._lock:
            if self._version != version or not 0 <= index < len(self._spans):
                return None
            return self._view(index).tobytes()

    def chunk_sizes(self, version: int, indices: list[int]) -> list[int] | None:
        """The byte sizes of those chunks of version `version`, or None if it is not served (or an index is out of range)."""
        with self._lock:
            if self._version != version or not all(0 <= i < len(self._spans) for i in indices):
                return None
            return [self._spans[i][2] - self._spans[i][1] for i in indices]


class StateServer:
    """Serves one local rank's `ServedState` to token holders (see the module docstring).

    Listens from construction on `listening.host`, on the first free port of `listening.ports`
    (any free port when None; every port taken is a UserError), and is reached by peers at
    `advertised` (`atoll.mesh.addresses`: a NAT in front of it may forward another address and
    port to it). Refuses everything until `key` is set (the run key is known once the island has
    said hello to the coordinator). `on_chunk(n)` is called as the n-th chunk is about to be sent
    (fault injection's `serve` point).
    """

    def __init__(self, listening: Listening | str, state: ServedState, on_chunk: Callable[[int], None] = lambda n: None) -> None:
        self.listening = Listening(listening, None, listening, None) if isinstance(listening, str) else listening
        self.host = self.listening.host
        self.state = state
        self.key: bytes | None = None
        self.on_chunk = on_chunk
        self.served_chunks = 0
        self.refused = 0
        self._nonces: OrderedDict[str, None] = OrderedDict()
        self._nonce_lock = threading.Lock()
        self._http = bind_in_range(lambda port: _Server((self.host, port), self), self.listening.ports)
        self._thread = threading.Thread(target=self._http.serve_forever, name="atoll-state-server", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        """The port it listens on."""
        return self._http.server_address[1]

    @property
    def advertised(self) -> tuple[str, int]:
        """(host, port) peers dial to reach it: what the island announces to the coordinator."""
        return self.listening.advertise_host, self.listening.advertised_port(self.port)

    def authentic(self, path: str, island: str, mac: str) -> bool:
        """A request target MACed under the run key (checked before the target is parsed)."""
        return self.key is not None and verify(self.key, mac, path, island)

    def fresh(self, nonce: str) -> bool:
        """A nonce never seen before (bounded memory): the request is not a replay."""
        if not nonce:
            return False
        with self._nonce_lock:
            if nonce in self._nonces:
                return False
            self._nonces[nonce] = None
            if len(self._nonces) > REMEMBERED_NONCES:
                self._nonces.popitem(last=False)
        return True

    def stop(self) -> None:
        self._http.shutdown()
        self._http.server_close()
        self._thread.join(timeout=5)


class _Server(BoundedServer):
    def __init__(self, address: tuple[str, int], owner: StateServer) -> None:
        self.owner = owner
        super().__init__(address, _Handler)


class _Handler(BoundedHandler):
    server: _Server

    def do_GET(self) -> None:
        """MAC over the raw target first, then the target is parsed, then the nonce checked."""
        owner = self.server.owner
        mac = self.headers.get(MAC_HEADER, "")
        query = None
        if owner.authentic(self.path, self.headers.get(ISLAND_HEADER, ""), mac):
            with contextlib.suppress(ValueError):
                url = urlsplit(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query, max_num_fields=MAX_QUERY_FIELDS).items()}
        if query is None or not owner.fresh(query.get("nonce", "")):
            owner.refused += 1
            self._send(401, b"refused")
            return
        self.trusted()
        try:
            if url.path == MANIFEST_PATH:
                self._send_manifest(mac)
            elif url.path == CHUNK_PATH:
                self._send_chunks(int(query["version"]), [int(i) for i in query["index"].split(",")])
            else:
                self._send(404, b"not found")
        except (KeyError, ValueError):
            self._send(400, b"malformed")

    def _send_manifest(self, request_mac: str) -> None:
        """The header, then each chunk's hash as it is computed, each line MACed and bound to this
        request; the stream ends at the last hash, or short of it if the version is withdrawn
        (the joiner drops this source)."""
        owner = self.server.owner
        header = owner.state.header()
        if header is None:
            self._send(GONE, b"nothing served now")
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Connection", "close")  # its end is the end of the connection
        self.end_headers()
        self.close_connection = True
        lines = itertools.chain([header.to_json().decode()], (f"{i}:{h}" for i, h in enumerate(owner.state.hashes(header.version))))
        for line in lines:
            self.wfile.write(f"{line}\t{sign(owner.key, request_mac, line)}\n".encode())

    def _send_chunks(self, version: int, indices: list[int]) -> None:
        """The chunks back to back; a version withdrawn mid-batch closes the connection short of
        its length, which the joiner reads as a failed request (it re-queues what it lacks)."""
        owner = self.server.owner
        sizes = owner.state.chunk_sizes(version, indices)
        if sizes is None:
            self._send(GONE, b"version no longer served")
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(sum(sizes)))
        self.end_headers()
        for index in indices:
            data = owner.state.chunk(version, index)
            if data is None:
                self.close_connection = True
                return
            owner.served_chunks += 1
            owner.on_chunk(owner.served_chunks)
            self.wfile.write(data)

    def _send(self, status: int, body: bytes) -> None:
        self.send_bytes(status, body)


# --- the joiner's side ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """One serving local rank: the island it belongs to and where it listens."""

    island: str
    host: str
    port: int


@dataclass
class FetchReport:
    """What one `fetch_state` did."""

    manifest: Manifest
    chunks_from: dict[str, int]
    """Island -> chunks it delivered (verified)."""
    dropped: dict[str, str] = field(default_factory=dict)
    """Island -> why it was dropped mid-transfer."""
    seconds: float = 0.0
    manifest_s: float = 0.0
    """Of `seconds`, the wait for the sources' manifest headers (before any chunk could be asked for)."""
    hashed_s: float = 0.0
    """Seconds from the start until the last chunk's hash was agreed: the sources hash their state
    on the first request, while chunks whose hashes are known already travel."""

    def describe(self) -> str:
        spread = ", ".join(f"{n} from {island!r}" for island, n in self.chunks_from.items())
        dropped = "; dropped " + "; ".join(f"{i!r} ({why})" for i, why in self.dropped.items()) if self.dropped else ""
        rate = self.manifest.total_bytes / max(self.seconds, 1e-9) / 1e6
        return (f"fetched the state of outer step {self.manifest.version} ({self.manifest.total_bytes / 1e6:.1f} MB, "
                f"{len(self.manifest.hashes)} chunks verified: {spread}) in {self.seconds:.2f}s ({rate:.1f} MB/s; "
                f"the sources' hashes complete at {self.hashed_s:.2f}s){dropped}")


class _Peer:
    """An authenticated HTTP connection to one source."""

    def __init__(self, source: Source, key: bytes, island: str, timeout: float) -> None:
        self.source, self.key, self.island, self.timeout = source, key, island, timeout
        self.conn = http.client.HTTPConnection(source.host, source.port, timeout=timeout)

    def open(self, path: str, params: dict[str, Any] | None = None) -> tuple[http.client.HTTPResponse, str]:
        """Send one request; (the response, still to be read; this request's MAC). Raises
        OSError/HTTPException on a broken connection (the connection is then closed)."""
        query = "&".join([*(f"{k}={v}" for k, v in (params or {}).items()), f"nonce={secrets.token_hex(12)}"])
        target = f"{path}?{query}"
        mac = sign(self.key, target, self.island)
        try:
            self.conn.request("GET", target, headers={MAC_HEADER: mac, ISLAND_HEADER: self.island})
            return self.conn.getresponse(), mac
        except BaseException:
            self.conn.close()
            raise

    def get(self, path: str, params: dict[str, Any] | None = None) -> tuple[int, bytes, str, str]:
        """(status, body, this request's MAC, the answer's MAC header); raises as `open`."""
        response, mac = self.open(path, params)
        try:
            return response.status, response.read(), mac, response.getheader(MAC_HEADER, "")
        except BaseException:
            self.conn.close()
            raise

    def manifest_lines(self) -> Iterator[str]:
        """This source's manifest as it streams in, line by line (the header first), each checked
        against its MAC. TransferError on a refusal, a line cut short or one that does not verify;
        OSError/HTTPException on a broken or silent (past the timeout) connection."""
        response, request_mac = self.open(MANIFEST_PATH)
        if response.status != 200:
            response.read()
            raise TransferError(f"HTTP {response.status}")
        while line := response.readline(MAX_MANIFEST_LINE_BYTES + 1):
            if not line.endswith(b"\n"):
                raise TransferError(f"its manifest was cut short mid-line, or has a line over {MAX_MANIFEST_LINE_BYTES} bytes")
            payload, _, mac = line.decode().rstrip("\n").partition("\t")
            if not verify(self.key, mac, request_mac, payload):
                raise TransferError("a manifest line whose MAC does not verify")
            yield payload

    def close(self) -> None:
        self.conn.close()


class _Agreement:
    """The chunk hashes the sources still in the transfer agree on, settled in chunk order as
    their manifests stream in. Not thread-safe: the caller holds one lock around every call."""

    def __init__(self, count: int, live: set[str], work: queue.SimpleQueue[int], dropped: dict[str, str]) -> None:
        self.hashes: list[str] = []
        self.count, self.live, self.work, self.dropped = count, live, work, dropped
        self.votes: list[dict[str, str]] = [{} for _ in range(count)]
        self.settled_at = 0.0

    def report(self, island: str, index: int, digest: str) -> None:
        self.votes[index][island] = digest
        self._settle()

    def drop(self, island: str, why: str) -> None:
        """Take `island` out of the transfer (the first reason given is kept)."""
        self.dropped.setdefault(island, why)
        self.live.discard(island)
        self._settle()

    def _settle(self) -> None:
        """Settle every chunk that all live sources have hashed: the most common hash wins (a tie
        goes to the first sent); a source that sent another is dropped. The settled chunk goes
        on the work queue."""
        while len(self.hashes) < self.count and self.live:
            index = len(self.hashes)
            votes = {island: digest for island, digest in self.votes[index].items() if island in self.live}
            if set(votes) != self.live:
                return
            winner = Counter(votes.values()).most_common(1)[0][0]
            for island, digest in votes.items():
                if digest != winner:
                    self.dropped.setdefault(island, f"its hash of chunk {index} is not the one the others agree on")
                    self.live.discard(island)
            self.hashes.append(winner)
            self.work.put(index)
        if len(self.hashes) == self.count and not self.settled_at:
            self.settled_at = time.perf_counter()


def fetch_state(
    sources: list[Source], key: bytes, island: str, into: dict[str, torch.Tensor], timeout: float,
) -> FetchReport:
    """Fill `into` (name -> contiguous CPU fp32 buffer of the served size) from the sources.

    Failure semantics: a source that cannot be reached, stalls past `timeout`, answers 401/410,
    ends its manifest early, sends a hash the others do not agree on or a chunk whose sha256 is
    not the agreed one is dropped (never retried within this call) and its chunks are fetched
    from the others; TransferError when no source serves a manifest header that fits `into`, or
    every source was dropped before the last chunk. `into` is then partly written: the caller
    must not use it (it fetches again, or falls back to a broadcast).
    """
    start = time.perf_counter()
    lock = threading.Lock()
    headers: dict[str, Manifest | Exception] = {}
    header_in = [threading.Event() for _ in sources]
    chosen_box: list[tuple[Manifest, _Agreement]] = []
    go = threading.Event()  # set once the header is chosen (or the fetch gave up)

    def follow(n: int, source: Source) -> None:
        """Read one source's manifest: its header, then (if chosen) its hashes into the agreement."""
        peer = _Peer(source, key, island, timeout)
        try:
            try:
                lines = peer.manifest_lines()
                headers[source.island] = Manifest.from_json(next(lines).encode(), header=True)
            except StopIteration:
                headers[source.island] = TransferError("an empty manifest")
            except (OSError, http.client.HTTPException, ValueError, TransferError) as err:
                headers[source.island] = err
            header_in[n].set()
            go.wait()
            if not chosen_box or headers[source.island] != chosen_box[0][0]:
                return
            agreement = chosen_box[0][1]
            try:
                for expected, payload in enumerate(lines):
                    index, _, digest = payload.partition(":")
                    if int(index) != expected or expected >= agreement.count or len(digest) != 64:
                        raise TransferError(f"a malformed manifest line {payload[:80]!r}")
                    with lock:
                        if source.island not in agreement.live:
                            return
                        agreement.report(source.island, expected, digest)
                with lock:
                    if len(agreement.votes) and source.island not in agreement.votes[-1]:
                        raise TransferError("its manifest ended early (the state changed while it hashed)")
            except (OSError, http.client.HTTPException, ValueError, TransferError) as err:
                with lock:
                    agreement.drop(source.island, f"manifest: {str(err).splitlines()[0] if str(err) else type(err).__name__}")
        finally:
            peer.close()

    followers = [threading.Thread(target=follow, args=(n, s), name=f"atoll-manifest-{s.island}", daemon=True) for n, s in enumerate(sources)]
    for thread in followers:
        thread.start()
    for event in header_in:
        event.wait()
    manifest_s = time.perf_counter() - start
    dropped: dict[str, str] = {i: f"manifest: {h}" for i, h in headers.items() if isinstance(h, Exception)}
    served = {i: h for i, h in headers.items() if isinstance(h, Manifest)}
    try:
        if not served:
            raise TransferError(f"no source served a manifest ({'; '.join(f'{i}: {w}' for i, w in dropped.items()) or 'no sources'})")
        # the header most sources agree on; a tie goes to the newest version
        chosen, _ = max(Counter(served.values()).items(), key=lambda item: (item[1], item[0].version))
        sizes = {name: numel for name, numel in chosen.tensors}
        if set(sizes) - set(into) or any(into[name].numel() != numel for name, numel in sizes.items()):
            raise TransferError(f"the served state {sizes} does not fit this island's buffers "
                                f"{ {n: t.numel() for n, t in into.items()} } (another model or local rank count?)")
        for other, header in served.items():
            if header != chosen:
                dropped[other] = f"serves another state (version {header.version})"
        work: queue.SimpleQueue[int] = queue.SimpleQueue()
        spans = chosen.chunks()
        agreement = _Agreement(len(spans), {i for i, h in served.items() if h == chosen}, work, dropped)
        chosen_box.append((chosen, agreement))
    finally:
        go.set()  # followers of unchosen sources (or of a failed fetch) close and return
    targets = [into[name].reshape(-1).view(torch.uint8) for name, _ in chosen.tensors]
    remaining = [len(spans)]
    counts = {i: 0 for i in agreement.live}

    def pull(peer: _Peer) -> None:
        while True:
            with lock:  # done, or this source is out of the transfer
                if remaining[0] == 0 or peer.source.island not in agreement.live:
                    return
            try:
                batch = [work.get(timeout=0.05)]
            except queue.Empty:
                continue
            with lock:  # at most a fair share of what is queued: no stream should end long after the others
                live_streams = sum(1 for other in streams if other.source.island in agreement.live)
            share = min(batch_chunks, -(-(work.qsize() + 1) // max(1, live_streams)))
            while len(batch) < share:
                try:
                    batch.append(work.get_nowait())
                except queue.Empty:
                    break
            done = 0
            try:
                response, _ = peer.open(CHUNK_PATH, {"version": chosen.version, "index": ",".join(map(str, batch))})
                if response.status != 200:
                    response.read()
                    raise TransferError(f"HTTP {response.status} for chunks {batch}")
                for index in batch:
                    tensor, first, end = spans[index]
                    # straight into the buffer and hashed there: a chunk that fails is fetched again over it
                    target = memoryview(targets[tensor][first:end].numpy())
                    got = _read_into(response, target)
                    if got != end - first:  # the source closed mid-answer
                        raise TransferError(f"chunk {index} cut short ({got} of {end - first} bytes)")
                    if hashlib.sha256(target).hexdigest() != agreement.hashes[index]:
                        raise TransferError(f"chunk {index} does not match the manifest's sha256")
                    done += 1
                    with lock:
                        remaining[0] -= 1
                        counts[peer.source.island] += 1
            except (OSError, http.client.HTTPException, TransferError) as err:
                peer.close()
                for index in batch[done:]:
                    work.put(index)
                with lock:
                    agreement.drop(peer.source.island, str(err).splitlines()[0] if str(err) else type(err).__name__)
                return

    live = [s for s in sources if s.island in agreement.live]
    streams = [_Peer(source, key, island, timeout) for source in live for _ in range(CONNECTIONS_PER_SOURCE)]
    batch_chunks = max(1, min(BATCH_BYTES // chosen.chunk_bytes, len(spans) // (2 * max(1, len(streams)))))
    threads = [threading.Thread(target=pull, args=(peer,), name=f"atoll-fetch-{peer.source.island}", daemon=True) for peer in streams]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for peer in streams:
        peer.close()
    for thread in followers:
        thread.join(timeout)
    if remaining[0]:
        raise TransferError(f"{remaining[0]} of {len(spans)} chunks missing: every source was dropped ("
                            + "; ".join(f"{i}: {why}" for i, why in dropped.items()) + ")")
    hashed_s = agreement.settled_at - start
    return FetchReport(replace(chosen, hashes=tuple(agreement.hashes)), {i: n for i, n in counts.items() if n},
                       dropped, time.perf_counter() - start, manifest_s, hashed_s)


def _read_into(response: http.client.HTTPResponse, target: memoryview) -> int:
    """Fill `target` from the response; the bytes read (fewer only at the end of the stream)."""
    got = 0
    while got < len(target):
        n = response.readinto(target[got:])
        if not n:
            break
        got += n
    return got
