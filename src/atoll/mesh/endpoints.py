"""The coordinator's HTTP paths, on the bounded base of `atoll.mesh.service`.

    GET  /hello                 public facts (`atoll.mesh.protocol`)
    POST /rpc                   one authenticated request of the protocol, answered with a MAC
    GET  /status, /status.json, /metrics, /healthz
                                read-only views of the run (`atoll.mesh.status`)

One thread per connection. A connection whose request authenticated is a member's (it may idle
as long as a member does); a member's control connection closing tells the coordinator the
process may have died (`Coordinator.connection_closed`). Status requests never make a
connection trusted: a browser's idle connection is closed after `service.UNTRUSTED_IDLE_S`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from atoll.mesh import protocol, status
from atoll.mesh.auth import sign
from atoll.mesh.service import BoundedHandler, BoundedServer

if TYPE_CHECKING:
    from atoll.mesh.coordinator import Coordinator


class CoordinatorServer(BoundedServer):
    """The coordinator's service on `address`."""

    def __init__(self, address: tuple[str, int], coordinator: Coordinator) -> None:
        self.coordinator = coordinator
        super().__init__(address, _Handler)


class _Handler(BoundedHandler):
    server: CoordinatorServer

    def handle(self) -> None:
        try:
            super().handle()
        finally:
            self.server.coordinator.connection_closed(id(self))

    def do_GET(self) -> None:
        if self.path == protocol.HELLO_PATH:
            self._send(200, self.server.coordinator.hello())
            return
        page = status.answer(self.server.coordinator, self.path, self.headers.get("Authorization", ""), self.client_address[0])
        if page is None:
            self._send(404, {"error": "not found"})
            return
        code, body, content_type = page
        self.send_bytes(code, body, {"Content-Type": content_type, "Cache-Control": "no-store"})

    def do_POST(self) -> None:
        if self.path != protocol.RPC_PATH:
            self._send(404, {"error": "not found"})
            self.close_connection = True
            return
        body = self.read_body(protocol.MAX_BODY_BYTES)
        if body is None:
            return
        mac = self.headers.get(protocol.MAC_HEADER, "")
        coordinator = self.server.coordinator
        code, answer = coordinator.handle(body, mac, id(self), self.client_address[0])
        if code != protocol.REFUSED:
            self.trusted()
        self._send(code, answer, sign(coordinator.key, mac, protocol.canonical(answer)) if code == 200 else "")

    def _send(self, code: int, answer: dict[str, Any], mac: str = "") -> None:
        self.send_bytes(code, protocol.canonical(answer), {"Content-Type": "application/json", **({protocol.MAC_HEADER: mac} if mac else {})})
