"""The coordinator: hosts the run's rendezvous store and decides membership epochs.

It does no training and holds no weights. `atoll coordinator` runs one on any reachable host;
`atoll simulate` runs one in a thread. The key protocol is in `atoll.mesh.protocol`.

Failure semantics: the coordinator keeps no state outside its store, so a client that connects
and goes away changes nothing; if epoch 0 cannot form (islands disagree on their shape), the
reason is published under the epoch's error key and the waiting islands stop with that message.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import torch.distributed as dist

from atoll.mesh import protocol
from atoll.mesh.membership import Registration, first_epoch

POLL_INTERVAL_S = 0.05
STORE_TIMEOUT = timedelta(seconds=60)


class Coordinator:
    """Hosts a TCPStore on (host, port) and forms epoch 0 once `min_islands` have registered."""

    def __init__(self, host: str, port: int, min_islands: int) -> None:
        if min_islands < 1:
            raise ValueError(f"min_islands must be at least 1, got {min_islands}")
        self.min_islands = min_islands
        self.store = dist.TCPStore(host, port, is_master=True, wait_for_workers=False, timeout=STORE_TIMEOUT)
        self.host = host
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The port actually bound (useful when constructed with port 0)."""
        return self.store.port

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def registrations(self) -> list[Registration]:
        """Islands that have registered, in order of arrival."""
        if not self.store.check([protocol.REGISTRATIONS]):
            return []
        ids = [i for i in self.store.get(protocol.REGISTRATIONS).decode().split(",") if i]
        return [Registration.from_json(self.store.get(protocol.island_key(i))) for i in ids]

    def step(self) -> bool:
        """One round of decisions; True once epoch 0 is published (or has failed to form)."""
        if self.store.check([protocol.LATEST_EPOCH]) or self.store.check([protocol.epoch_error_key(0)]):
            return True
        try:
            epoch = first_epoch(self.registrations(), self.min_islands, time.time())
        except ValueError as err:
            self.store.set(protocol.epoch_error_key(0), str(err))
            return True
        if epoch is None:
            return False
        self.store.set(protocol.epoch_key(epoch.number), epoch.to_json())
        self.store.set(protocol.LATEST_EPOCH, str(epoch.number))
        return True

    def serve(self) -> None:
        """Make decisions until stop() is called."""
        while not self._stop.is_set():
            self.step()
            self._stop.wait(POLL_INTERVAL_S)

    def start(self) -> Coordinator:
        """Serve in a background thread (for `atoll simulate` and tests)."""
        self._thread = threading.Thread(target=self.serve, name="atoll-coordinator", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
