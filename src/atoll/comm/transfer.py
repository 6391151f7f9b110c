"""Peer-served state transfer: a joiner fetches the run's outer state from live islands while they train.

Every local rank of every member island runs a `StateServer`: a small HTTP/1.1 service on an
ephemeral port of `mesh.serve_host` (by default this host's address on the route to the
coordinator), advertised to the coordinator at registration. It serves the rank's `ServedState`:
the outer weights and outer momentum of the last outer step it applied, as flat fp32 buffers,
plus the progress (inner step, sample cursor) of that step. No copy is taken: the outer state
only changes at an outer step, and `ServedState.changing()` withdraws it while it does, so a
request for an older version is answered 410 and the joiner starts over on the new one.

    GET /state/manifest?nonce=N        -> JSON `Manifest` (version, progress, tensors, sha256 of
                                          every chunk), MACed: X-Atoll-Mac = MAC(request MAC, body)
    GET /state/chunk?version=V&index=I,J,...&nonce=N
                                       -> those chunks' raw bytes back to back (each checked
                                          against the manifest): a batch, so that a round trip
                                          and TCP's restart after idle are paid once per batch

Requests carry X-Atoll-Island and X-Atoll-Mac = MAC under the run key of (path, island): only a
holder of the run token is served, and every path holds a fresh nonce the server remembers, so a
recorded request cannot be replayed. Nothing is unpickled: chunks are raw little-endian fp32
bytes, copied into buffers the joiner already has, after their sha256 matched the manifest.

`fetch_state` (the joiner's side, one call per local rank) takes the manifest that most sources
agree on, then pulls chunks from all of them at once (one connection and thread per source, from
one shared queue, CONNECTIONS_PER_SOURCE connections each so that round trips overlap), verifying
each. A source that dies, stalls past the timeout, answers 410 or
sends a chunk that does not verify is dropped and its chunk goes back to the queue for the
others; the fetch fails (TransferError) only when no source is left.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import queue
import secrets
import socket
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import torch

from atoll.mesh.auth import sign, verify

MANIFEST_PATH = "/state/manifest"
CHUNK_PATH = "/state/chunk"
MAC_HEADER = "X-Atoll-Mac"
ISLAND_HEADER = "X-Atoll-Island"
GONE = 410
"""The requested version is no longer served (an outer step was applied since)."""
REMEMBERED_NONCES = 1 << 16
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
        return json.dumps(asdict(self), sort_keys=True).encode()

    @staticmethod
    def from_json(data: bytes) -> Manifest:
        """Parse and check a manifest; ValueError if it is malformed."""
        raw = json.loads(data)
        manifest = Manifest(
            int(raw["version"]), int(raw["step"]), int(raw["samples"]),
            tuple((str(name), int(numel)) for name, numel in raw["tensors"]), int(raw["chunk_bytes"]),
            tuple(str(h) for h in raw["hashes"]),
        )
        if manifest.chunk_bytes <= 0 or len(manifest.hashes) != len(manifest.chunks()):
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
        self._manifest: Manifest | None = None
        self._spans: list[tuple[int, int, int]] = []
        self._hashing = threading.Lock()

    def publish(self, version: int, tensors: dict[str, torch.Tensor], step: int, samples: int) -> None:
        """Serve these contiguous CPU fp32 buffers as version `version` (the live ones: no copy)."""
        with self._lock:
            self._version, self._progress, self._manifest = version, (step, samples), None
            self._tensors = [(name, t.detach().reshape(-1)) for name, t in tensors.items()]

    @contextlib.contextmanager
    def changing(self) -> Iterator[None]:
        """Withdraw the state while the caller changes the buffers (an outer step, a resync):
        requests in the meantime are answered 410. Publish again afterwards."""
        with self._lock:
            self._version, self._manifest = None, None
        yield

    def _bytes(self, index: int, start: int, end: int) -> bytes:
        return self._tensors[index][1].view(torch.uint8)[start:end].numpy().tobytes()

    def manifest(self) -> Manifest | None:
        """The current version's manifest (hashed on first request, chunk by chunk, each under the
        lock); None while nothing is served or if the state changed while hashing."""
        with self._hashing:  # a second joiner waits for the first one's hashes
            return self._manifest_once()

    def _manifest_once(self) -> Manifest | None:
        with self._lock:
            if self._version is None:
                return None
            if self._manifest is not None:
                return self._manifest
            version = self._version
            draft = Manifest(version, *self._progress, tuple((n, t.numel()) for n, t in self._tensors), self.chunk_bytes, ())
        hashes = []
        for index, start, end in draft.chunks():
            with self._lock:  # released between chunks: training's outer step never waits for a whole hash
                if self._version != version:
                    return None
                hashes.append(hashlib.sha256(self._bytes(index, start, end)).hexdigest())
        with self._lock:
            if self._version != version:
                return None
            self._manifest = Manifest(draft.version, draft.step, draft.samples, draft.tensors, draft.chunk_bytes, tuple(hashes))
            self._spans = self._manifest.chunks()  # once per version, not once per chunk served
            return self._manifest

    def chunk(self, version: int, index: int) -> bytes | None:
        """Chunk `index` of version `version`, or None if that version is no longer served."""
        with self._lock:
            if self._version != version or self._manifest is None or not 0 <= index < len(self._manifest.hashes):
                return None
            tensor, start, end = self._spans[index]
            return self._bytes(tensor, start, end)

    def chunk_sizes(self, version: int, indices: list[int]) -> list[int] | None:
        """The byte sizes of those chunks of version `version`, or None if it is not served (or an index is out of range)."""
        with self._lock:
            if self._version != version or self._manifest is None or not all(0 <= i < len(self._manifest.hashes) for i in indices):
                return None
            return [self._spans[i][2] - self._spans[i][1] for i in indices]


class StateServer:
    """Serves one local rank's `ServedState` to token holders (see the module docstring).

    Listens on exactly (host, port 0 = any free port) from construction; refuses everything until
    `key` is set (the run key is known once the island has said hello to the coordinator).
    `on_chunk(n)` is called as the n-th chunk is about to be sent (fault injection's `serve` point).
    """

    def __init__(self, host: str, state: ServedState, on_chunk: Callable[[int], None] = lambda n: None) -> None:
        self.host = host
        self.state = state
        self.key: bytes | None = None
        self.on_chunk = on_chunk
        self.served_chunks = 0
        self.refused = 0
        self._nonces: OrderedDict[str, None] = OrderedDict()
        self._nonce_lock = threading.Lock()
        self._http = _Server((host, 0), self)
        self._thread = threading.Thread(target=self._http.serve_forever, name="atoll-state-server", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return self._http.server_address[1]

    def authorised(self, path: str, island: str, mac: str, nonce: str) -> bool:
        """A request MACed under the run key whose nonce was never seen (bounded memory)."""
        if self.key is None or not nonce or not verify(self.key, mac, path, island):
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


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], owner: StateServer) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.owner = owner
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 120
    disable_nagle_algorithm = True  # headers and body go out in two writes: Nagle would hold the body for the peer's delayed ACK (40 ms)
    server: _Server

    def do_GET(self) -> None:
        owner = self.server.owner
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        mac = self.headers.get(MAC_HEADER, "")
        if not owner.authorised(self.path, self.headers.get(ISLAND_HEADER, ""), mac, query.get("nonce", "")):
            owner.refused += 1
            self._send(401, b"refused")
            return
        try:
            if url.path == MANIFEST_PATH:
                manifest = owner.state.manifest()
                if manifest is None:
                    self._send(GONE, b"nothing served now")
                    return
                body = manifest.to_json()
                self._send(200, body, sign(owner.key, mac, body))
            elif url.path == CHUNK_PATH:
                self._send_chunks(int(query["version"]), [int(i) for i in query["index"].split(",")])
            else:
                self._send(404, b"not found")
        except (KeyError, ValueError):
            self._send(400, b"malformed")

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

    def _send(self, status: int, body: bytes, mac: str = "") -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        if mac:
            self.send_header(MAC_HEADER, mac)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


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
    """Of `seconds`, the wait for the manifests (the sources hash their state on the first request)."""

    def describe(self) -> str:
        spread = ", ".join(f"{n} from {island!r}" for island, n in self.chunks_from.items())
        dropped = "; dropped " + "; ".join(f"{i!r} ({why})" for i, why in self.dropped.items()) if self.dropped else ""
        rate = self.manifest.total_bytes / max(self.seconds, 1e-9) / 1e6
        return (f"fetched the state of outer step {self.manifest.version} ({self.manifest.total_bytes / 1e6:.1f} MB, "
                f"{len(self.manifest.hashes)} chunks verified: {spread}) in {self.seconds:.2f}s ({rate:.1f} MB/s; "
                f"manifests {self.manifest_s:.2f}s){dropped}")


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

    def manifest(self) -> Manifest:
        """This source's manifest; raises TransferError if it has none or it does not verify."""
        status, body, request_mac, answer_mac = self.get(MANIFEST_PATH)
        if status != 200:
            raise TransferError(f"HTTP {status}")
        if not verify(self.key, answer_mac, request_mac, body):
            raise TransferError("a manifest whose MAC does not verify")
        return Manifest.from_json(body)

    def close(self) -> None:
        self.conn.close()


def fetch_state(
    sources: list[Source], key: bytes, island: str, into: dict[str, torch.Tensor], timeout: float,
) -> FetchReport:
    """Fill `into` (name -> contiguous CPU fp32 buffer of the served size) from the sources.

    Failure semantics: a source that cannot be reached, stalls past `timeout`, answers 401/410 or
    sends a chunk whose sha256 is not the manifest's is dropped (never retried within this call)
    and its chunk is fetched from another; TransferError when no source agrees on a manifest that
    fits `into`, or every source was dropped before the last chunk. `into` is then partly
    written: the caller must not use it (it fetches again, or falls back to a broadcast).
    """
    start = time.perf_counter()
    peers, manifests, dropped = [], {}, {}
    for source in sources:
        peer = _Peer(source, key, island, timeout)
        try:
            manifests[source.island] = peer.manifest()
            peers.append(peer)
        except (OSError, http.client.HTTPException, ValueError, TransferError) as err:
            dropped[source.island] = f"manifest: {err}"
            peer.close()
    if not manifests:
        raise TransferError(f"no source served a manifest ({'; '.join(f'{i}: {w}' for i, w in dropped.items()) or 'no sources'})")
    manifest_s = time.perf_counter() - start
    # the manifest most sources agree on; a tie goes to the newest version
    chosen, _ = max(Counter(manifests.values()).items(), key=lambda item: (item[1], item[0].version))
    for peer in list(peers):
        if manifests[peer.source.island] != chosen:
            dropped[peer.source.island] = f"serves another state (version {manifests[peer.source.island].version})"
            peers.remove(peer)
            peer.close()
    sizes = {name: numel for name, numel in chosen.tensors}
    if set(sizes) - set(into) or any(into[name].numel() != numel for name, numel in sizes.items()):
        raise TransferError(f"the served state {sizes} does not fit this island's buffers "
                            f"{ {n: t.numel() for n, t in into.items()} } (another model or local rank count?)")
    targets = [into[name].reshape(-1).view(torch.uint8) for name, _ in chosen.tensors]
    spans = chosen.chunks()
    work: queue.SimpleQueue[int] = queue.SimpleQueue()
    for index in range(len(spans)):
        work.put(index)
    remaining = [len(spans)]
    counts = {peer.source.island: 0 for peer in peers}
    lock = threading.Lock()

    def pull(peer: _Peer) -> None:
        while True:
            with lock:  # done, or another connection to this source failed: it is gone
                if remaining[0] == 0 or peer.source.island in dropped:
                    return
            try:
                batch = [work.get(timeout=0.05)]
            except queue.Empty:
                continue
            while len(batch) < batch_chunks:
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
                    data = response.read(end - first)
                    if len(data) != end - first:  # the source closed mid-answer
                        raise TransferError(f"chunk {index} cut short ({len(data)} of {end - first} bytes)")
                    if hashlib.sha256(data).hexdigest() != chosen.hashes[index]:
                        raise TransferError(f"chunk {index} does not match the manifest's sha256")
                    targets[tensor][first:end].copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
                    done += 1
                    with lock:
                        remaining[0] -= 1
                        counts[peer.source.island] += 1
            except (OSError, http.client.HTTPException, TransferError) as err:
                peer.close()
                for index in batch[done:]:
                    work.put(index)
                with lock:
                    dropped[peer.source.island] = str(err).splitlines()[0] if str(err) else type(err).__name__
                return

    streams = [peer for peer in peers for _ in range(CONNECTIONS_PER_SOURCE)]
    batch_chunks = max(1, min(BATCH_BYTES // chosen.chunk_bytes, len(spans) // (2 * len(streams))))
    streams = [peer if n % CONNECTIONS_PER_SOURCE == 0 else _Peer(peer.source, key, island, timeout) for n, peer in enumerate(streams)]
    threads = [threading.Thread(target=pull, args=(peer,), name=f"atoll-fetch-{peer.source.island}", daemon=True) for peer in streams]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for peer in streams:
        peer.close()
    if remaining[0]:
        raise TransferError(f"{remaining[0]} of {len(spans)} chunks missing: every source was dropped ("
                            + "; ".join(f"{i}: {why}" for i, why in dropped.items()) + ")")
    return FetchReport(chosen, {i: n for i, n in counts.items() if n}, dropped, time.perf_counter() - start, manifest_s)


def route_address(host: str, port: int) -> str:
    """This host's address on the route to (host, port): what peers that reach `host` can reach
    (no packet is sent: a UDP socket's connect only picks the route)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect((host, port))
        return probe.getsockname()[0]
