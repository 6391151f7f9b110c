"""The request/response protocol between islands and the coordinator.

The coordinator is a small HTTP/1.1 service (`atoll.mesh.coordinator`). Everything is JSON;
nothing is unpickled. Its endpoints:

    GET  /hello   public facts: {"run_id", "boot", "version"}; no authentication, no state
    GET  /status, /status.json, /metrics, /healthz
                  read-only views of the run for operators (`atoll.mesh.status`)
    POST /rpc     one authenticated request: the body is a JSON object
                  {"op", "island", "incarnation", "channel", "boot", "seq", "args"} and the header
                  X-Atoll-Mac holds its MAC under the run key (see `atoll.mesh.auth`); the answer
                  is a JSON object whose X-Atoll-Mac is the MAC of (request MAC, answer body).

Sequence numbers count up per channel (each thread of an island talks on its own channel and
connection), so the coordinator can refuse a replay without requiring ordering across threads.

Status codes: 200 answered; 401 refused (bad MAC, replayed or out-of-order sequence number: the
coordinator counts it and changes nothing); 409 the request names another boot of the
coordinator (it restarted: fetch /hello again and resend); 400 malformed.

Ops (args -> answer). Waits are long-polls: the coordinator answers as soon as the awaited event
happens, or after `wait_s` with nothing, and the island asks again (so waits are event-driven,
yet no request outlives a restart of either side by long).

    preflight   {}                               -> {} | {"refused": why, "refused_as": "duplicate"}: asked
                                                    before an island builds its model (is its id
                                                    held by a live process?)
    register    {local_ranks, fingerprint, serve}
                                                 -> {} | {"refused": why, "refused_as": "duplicate" |
                                                    "mismatch" | "ended"}; serve: {"host", "ports"},
                                                    where its local ranks serve the run's state
    beat        {seen, wait_s}                   -> {"latest", "ended", "known"}: a heartbeat that
                                                    waits up to wait_s for an epoch newer than
                                                    `seen`; the connection it arrives on is this
                                                    incarnation's control connection, and its
                                                    closing tells the coordinator the process died
    latest      {}                               -> {"latest", "ended", "known"} (no waiting; for the
                                                    island's other local ranks)
    leave       {reason}                         -> {}  (the deathrattle)
    admission   {after, wait_s}                  -> {"epoch" | "fetch" | "ended" | "refused" | "status"}:
                                                    the newest epoch after `after` that has this
                                                    incarnation as a member; or, to a joiner of a
                                                    started run that is not ready, at once:
                                                    "fetch": {"step", "sources": [{"island",
                                                    "host", "ports"}]} (see `atoll.comm.transfer`)
    ready       {step}                           -> {} | {"stale": committed}: a joiner holds the
                                                    state of outer step `step` (-1: it takes it
                                                    by broadcast on entering); it is admitted at
                                                    the next boundary barrier
    barrier     {epoch, name, wait_s, numbers}   -> {"passed"} | {"dissolved"} | {}; at an outer step's
                                                    boundary ("outer-S") numbers holds the island's
                                                    latest metrics for the status page (loss, ...:
                                                    `atoll.mesh.status.island_numbers`, the rest dropped)
    report      {epoch, what, blamed, abandoned} -> {}  (a global collective of epoch failed; blamed:
                                                    the peer the error names; abandoned: the
                                                    rings were left because the epoch ended)
    result      {epoch, step, round, ok, digest, wait_s}
                                                 -> {"outcome": "commit"|"resync"|"abort", "next",
                                                    "source"} | {}
    next_epoch  {epoch, wait_s}                  -> {"next": n} | {}
    epoch       {number}                         -> {"epoch"}
    rendezvous_set {epoch, key, value}           -> {} | {"refused": why}: one gloo rendezvous value
                                                    (base64) of the current epoch, from a member
    rendezvous_get {epoch, keys, wait_s}         -> {"values": {key: base64}} | {"refused": why} | {}:
                                                    once every key is set (see `atoll.mesh.rendezvous`)
    links       {links: {peer: {throughput, rtt}}} -> {}: the links this island measured to its
                                                    peers (bytes/s, s), for the ring order
                                                    (`atoll.mesh.ring_order`); replaces older figures

Ops are idempotent where a retry may repeat them (register of the same incarnation, barrier
arrivals, reports, results), so an island that lost an answer to a blip or a coordinator
restart simply asks again.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

HELLO_PATH = "/hello"
RPC_PATH = "/rpc"
MAC_HEADER = "X-Atoll-Mac"
REFUSED, STALE_BOOT, MALFORMED = 401, 409, 400
MAX_BODY_BYTES = 1 << 20
MAX_SEQ = 1 << 63
MAX_NAME_CHARS = 256
OPS = (
    "preflight", "register", "beat", "latest", "leave", "admission", "ready", "barrier", "report", "result", "next_epoch", "epoch",
    "rendezvous_set", "rendezvous_get", "links",
)


@dataclass(frozen=True)
class Request:
    """One request's envelope, its fields checked (`parse_request`); `args` is the op's to check."""

    op: str
    island: str
    incarnation: str
    channel: str
    boot: str
    seq: int
    args: dict[str, Any]


def canonical(obj: Any) -> bytes:
    """The one byte form of a JSON message that MACs are computed over."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def request_body(op: str, island: str, incarnation: str, channel: str, boot: str, seq: int, args: dict[str, Any]) -> bytes:
    """A request; `seq` counts up on each (island, incarnation, channel): one channel per thread."""
    return canonical({"op": op, "island": island, "incarnation": incarnation, "channel": channel, "boot": boot, "seq": seq, "args": args})


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"a number out of range: {text[:20]}")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


def parse_request(body: bytes) -> Request | None:
    """The request in `body` (whose MAC the caller has checked), or None if it is not one: not
    UTF-8 JSON, nested past the parser's depth, a number that is not finite, an unknown op, a
    field of the wrong type or size, a sequence number outside [0, 2**63)."""
    try:
        raw = json.loads(body, parse_float=_finite, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        return None
    if not isinstance(raw, dict) or not isinstance(raw.get("args"), dict) or raw.get("op") not in OPS:
        return None
    names = [raw.get(k) for k in ("island", "incarnation", "channel", "boot")]
    seq = raw.get("seq")
    if not all(isinstance(n, str) and len(n) <= MAX_NAME_CHARS for n in names):
        return None
    if not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq < MAX_SEQ:
        return None
    return Request(raw["op"], *names, seq, raw["args"])
