"""The gloo rendezvous of an epoch's global groups, through the coordinator's authenticated protocol.

gloo forms a group by each rank writing its listening address to a store and reading the
others' (`set`, `wait`, `get`: nothing else). `EpochStore` is that store: a `torch.distributed.Store`
whose every call is a request of the island's own coordinator client (MACed under the run key,
see `atoll.mesh.auth`), naming the epoch. The coordinator keeps the values of the current epoch
only, in memory, accepts them only from that epoch's members (this very incarnation), bounds
their size and number, and drops them when the epoch is replaced. So there is no rendezvous port:
an outsider cannot write, read, grow or slow the rendezvous, nor write a future epoch's keys, and
a member can only write into its own epoch.

Failure semantics: `wait` is a long-poll repeated until every key is there, raising
RuntimeError at the store's timeout or at once when the epoch has been replaced (gloo's group
construction then fails, and the island reports it like any failed entry: `atoll.sync`). The
client retries through blips and pauses (`CoordinatorClient.call`); a coordinator that restarted
meanwhile has lost the values, so a call that finds another boot raises RuntimeError at once (the
epoch is entered again); a coordinator lost for good raises its ExpectedFailure through gloo.
"""

from __future__ import annotations

import base64
import time
from datetime import timedelta

import torch.distributed as dist

from atoll.mesh.client import CoordinatorClient

POLL_S = 5.0
"""Longest single long-poll of a `wait` (it is repeated until the store's timeout)."""


class EpochStore(dist.Store):
    """gloo's rendezvous store for the groups of epoch `epoch` under `prefix`, via `client`."""

    def __init__(self, client: CoordinatorClient, epoch: int, prefix: str, timeout: timedelta) -> None:
        super().__init__()
        self._client, self._epoch, self._prefix = client, epoch, prefix
        self._timeout_s = timeout.total_seconds()
        self._boot = client.hello["boot"]

    def set(self, key: str, value: bytes) -> None:
        self._checked(self._client.call("rendezvous_set", {"epoch": self._epoch, "key": self._prefix + key, "value": _text(value)}))

    def get(self, key: str) -> bytes:
        return self._values([key], self._timeout_s)[key]

    def wait(self, keys: list[str], timeout: timedelta | None = None) -> None:
        self._values(keys, self._timeout_s if timeout is None else timeout.total_seconds())

    def check(self, keys: list[str]) -> bool:
        return self._ask(keys, 0.0) is not None

    def set_timeout(self, timeout: timedelta) -> None:
        self._timeout_s = timeout.total_seconds()

    def _ask(self, keys: list[str], wait_s: float) -> dict[str, bytes] | None:
        """The keys' values once all are set (waiting up to wait_s), else None."""
        named = [self._prefix + key for key in keys]
        answer = self._checked(self._client.call("rendezvous_get", {"epoch": self._epoch, "keys": named, "wait_s": wait_s}, wait_s))
        if "values" not in answer:
            return None
        return {key: base64.b64decode(answer["values"][name]) for key, name in zip(keys, named)}

    def _checked(self, answer: dict) -> dict:
        """The answer, unless it refuses or came from another boot of the coordinator (RuntimeError)."""
        if "refused" in answer:
            raise RuntimeError(f"rendezvous of epoch {self._epoch}: {answer['refused']}")
        if self._client.hello["boot"] != self._boot:
            raise RuntimeError(f"rendezvous of epoch {self._epoch}: the coordinator restarted and lost it")
        return answer

    def _values(self, keys: list[str], timeout_s: float) -> dict[str, bytes]:
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            values = self._ask(keys, max(0.0, min(POLL_S, remaining)))
            if values is not None:
                return values
            if remaining <= 0:
                raise RuntimeError(f"rendezvous of epoch {self._epoch}: {keys} not set within {timeout_s:.0f}s (a member did not come)")


def _text(value: bytes | str) -> str:
    return base64.b64encode(value.encode() if isinstance(value, str) else value).decode()
