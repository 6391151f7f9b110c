"""The bounded HTTP/1.1 service the coordinator and the state servers are built on.

Anyone who reaches a port can open connections and send bytes, so everything here is bounded
before a byte is parsed and before anyone is authenticated:

- **Connections**, counted as they are accepted, in the accepting thread (`verify_request`): at
  most `max_connections` in all and `max_per_source` from one address. One over the cap is
  closed at once, costing no thread. Established connections (the members') keep being served.
- **Time**: a connection that has not carried an authenticated request is closed after
  `UNTRUSTED_IDLE_S` without a byte (an idle or slowloris connection holds a slot that long at
  most per byte it trickles); once a request authenticated, the connection is a member's and may
  idle for `TRUSTED_IDLE_S` (an inner phase between outer steps).
- **Size**: the request line and headers are capped by `http.server` (64 KiB a line, 100
  headers, else 414/431); a body needs a well-formed `Content-Length` (ASCII digits, at most the
  handler's cap), else 400/413 and the connection closes, before any of it is read.

What a subclass does with the bytes (MAC first, then parsing) is its own: see
`atoll.mesh.coordinator` and `atoll.comm.transfer`.
"""

from __future__ import annotations

import socket
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MAX_CONNECTIONS = 512
"""Open connections in all, members' included (a member island holds two to the coordinator,
a joiner two per source to a state server)."""
MAX_PER_SOURCE = 64
"""Open connections from one address."""
UNTRUSTED_IDLE_S = 10.0
TRUSTED_IDLE_S = 3600.0
BAD_REQUEST, TOO_LARGE = 400, 413


class BoundedServer(ThreadingHTTPServer):
    """A thread per connection, for at most `max_connections` connections (`max_per_source` from
    one address); the rest are closed as they are accepted. `close_connections` ends every open
    one (as the death of the process would)."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 4096

    def __init__(
        self, address: tuple[str, int], handler: type[BoundedHandler],
        max_connections: int = MAX_CONNECTIONS, max_per_source: int = MAX_PER_SOURCE,
    ) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.max_connections, self.max_per_source = max_connections, max_per_source
        self.turned_away = 0
        self._open: dict[socket.socket, str] = {}
        self._per_source: Counter[str] = Counter()
        self._lock = threading.Lock()
        super().__init__(address, handler)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Admit a connection under the caps (runs in the accepting thread, before any read)."""
        source = client_address[0]
        with self._lock:
            if len(self._open) >= self.max_connections or self._per_source[source] >= self.max_per_source:
                self.turned_away += 1
                return False
            self._open[request] = source
            self._per_source[source] += 1
        return True

    def shutdown_request(self, request: Any) -> None:
        with self._lock:
            source = self._open.pop(request, None)
            if source is not None:
                self._per_source[source] -= 1
                if not self._per_source[source]:
                    del self._per_source[source]
        super().shutdown_request(request)

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._open)

    def close_connections(self) -> None:
        """End every open connection, as the death of the process would."""
        with self._lock:
            connections = list(self._open)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class BoundedHandler(BaseHTTPRequestHandler):
    """One connection: reads nothing it has not bounded; `trusted()` once a request authenticated."""

    protocol_version = "HTTP/1.1"
    timeout = UNTRUSTED_IDLE_S
    disable_nagle_algorithm = True  # headers and body go out in two writes: Nagle would hold the body for the peer's delayed ACK (40 ms)
    server: BoundedServer

    def handle(self) -> None:
        try:
            super().handle()
        except OSError:
            pass  # the peer reset or timed out: nothing to answer

    def trusted(self) -> None:
        """This connection carried an authenticated request: it may idle as long as a member does."""
        self.connection.settimeout(TRUSTED_IDLE_S)

    def read_body(self, max_bytes: int) -> bytes | None:
        """The request's body, once its Content-Length is ASCII digits and at most `max_bytes`;
        else None, after answering 400 or 413 and marking the connection to close."""
        text = self.headers.get("Content-Length", "")
        if not (text.isascii() and text.isdigit()) or len(text) > 12:
            self.send_bytes(BAD_REQUEST, b"a Content-Length of decimal digits is required")
            self.close_connection = True
            return None
        if int(text) > max_bytes:
            self.send_bytes(TOO_LARGE, f"at most {max_bytes} bytes".encode())
            self.close_connection = True
            return None
        body = self.rfile.read(int(text))
        if len(body) < int(text):
            self.close_connection = True
            return None
        return body

    def send_bytes(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        """One whole answer: status, headers, Content-Length and body."""
        self.send_response(status)
        for name, value in {"Content-Type": "application/octet-stream", **(headers or {})}.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the owners log decisions, not requests
