"""What the run token protects, and how.

The run token is a shared secret given to the coordinator and every island (ATOLL_RUN_TOKEN, or
mesh.token). It never crosses the wire. From it and the run's public id (a random nonce the
coordinator draws when the run starts and keeps in its journal) comes the **run key**:
HMAC-SHA256(token, "atoll-run-key" || run_id). A token reused for another run gives another key.

Control plane (islands <-> coordinator, `atoll.mesh.coordinator` on `atoll.mesh.service`; the
state servers of `atoll.comm.transfer` stand on the same base): before anything is authenticated,
connections are capped per source and in all, idle ones closed and sizes bounded, and a
request's MAC is checked before a byte of it is parsed. Every request that reads or changes run
state carries (island id, incarnation, the coordinator's boot id, a sequence number)
and a MAC under the run key; the coordinator refuses, and counts in its log, any request whose
MAC does not verify, whose boot id is not its own (a request recorded before a restart), or
whose sequence number is not above the last one it accepted from that incarnation (a replay).
Every answer carries a MAC over the request's MAC and the answer, so an island only acts on what
this coordinator said in reply to this request. The epoch, the commit and every other decision
reach islands only inside such answers: nothing an outsider can write is ever read as a decision.

Data plane (island <-> island, `atoll.comm.ring`): every ring payload carries a MAC under the
**epoch key**, HMAC(run key, "atoll-epoch" || epoch number || members || incarnations), over the
transfer's identity (call and chunk; the step and sender of a partial sum, or the segment of an
owner's bytes in the all-gather) and its bytes; it is checked before a byte is decoded or summed.
The other collectives on the epoch's groups (validation statistics, the progress table, state
broadcasts: `atoll.comm.sealed`) carry such a MAC per contribution or chunk, checked before use.

Rendezvous (`atoll.mesh.rendezvous`): gloo's rendezvous of each epoch's groups is a
`torch.distributed.Store` whose every set and wait is a request of the control plane above. The
coordinator keeps the values in memory for the current epoch only, takes them only from that
epoch's members (island id and incarnation), bounds their size and number, and drops them when
the epoch is replaced. There is no rendezvous port: nobody without the token can write, read,
grow or slow the rendezvous, nor write the keys of a future epoch; a member writes only into its
own epoch. Where the rendezvous sends a member (the peers' addresses) is still only where they
listen: someone on the network path can redirect or alter those connections, which makes a
collective fail (handled like any failure), never makes an island accept its data.

Who can do what:
- An **outsider on the network** (no token) can read the public hello (run id, boot id), connect
  and send garbage within the caps (the coordinator answers members throughout; a burst of
  connections from one source fills that source's cap, not the members'), observe traffic
  (nothing is encrypted: tensors and epochs are readable on the wire), and, on the path between
  islands, break collectives by redirecting or resetting connections (a denial of service the
  run rides through as failures). It cannot register, leave, report, post results, touch the
  rendezvous, forge epochs or outcomes, replay old messages into this or another run, or get a
  byte into an average, nor be served a state server's bytes. Holding many source addresses, it
  can still fill a service's connection cap in all (512), which keeps new connections out
  (members' open ones are served) while it lasts.
- A **token holder** is a full member: it can register islands and take part in averages, and
  write the rendezvous of the epochs it is a member of.
- A **malicious token holder** can still send a plausible but wrong update: pseudo-gradient
  validation rejects non-finite and outsized contributions, but a well-scaled poisoned update
  passes. It can also report false failures (the culprit rule eventually evicts it) or stall.
  Use the token only with parties you trust; encrypt links (WireGuard, a VPN) if the data on
  them is secret.

Status (`atoll.mesh.status`): GET /status, /status.json and /metrics only read. On a loopback
bind they are open; on any other address they need the **status key**, HMAC(token,
"atoll-status-key"), a read-only key: it authenticates no request of the protocol and reveals
nothing of the token (`atoll status` derives it from ATOLL_RUN_TOKEN; the coordinator prints
it in its status address), unless the coordinator was told `--public-status`. GET /healthz is
always open and says only whether the coordinator serves.

An open run (no token anywhere) still MACs every message, under a key anyone can derive: it
protects against mistakes (a message from another run), not against anyone. `atoll coordinator`
refuses to listen on a non-loopback address without a token unless told `--insecure`.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import os
import secrets

TOKEN_ENV = "ATOLL_RUN_TOKEN"
MAC_BYTES = 32


def run_token(configured: str | None) -> str | None:
    """The configured token, else ATOLL_RUN_TOKEN, else None (an open run)."""
    return configured or os.environ.get(TOKEN_ENV) or None


def new_token() -> str:
    """A fresh random run token (what `atoll token` prints)."""
    return secrets.token_urlsafe(32)


def run_key(token: str | None, run_id: str) -> bytes:
    """The key every control message of run `run_id` is authenticated with."""
    return hmac.new((token or "").encode(), b"atoll-run-key" + run_id.encode(), hashlib.sha256).digest()


def status_key(token: str | None) -> str:
    """The read-only key of the status paths: derived from the token alone (so an operator's
    `atoll status` computes it without asking anyone), useless for anything else."""
    return hmac.new((token or "").encode(), b"atoll-status-key", hashlib.sha256).hexdigest()[:32]


def is_loopback(host: str) -> bool:
    """Whether `host` is a loopback address ("localhost" counts)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def epoch_key(key: bytes, number: int, members: tuple[str, ...], incarnations: tuple[str, ...]) -> bytes:
    """The key of epoch `number`'s ring payloads: only its members can derive it."""
    text = json.dumps([number, list(members), list(incarnations)])
    return hmac.new(key, b"atoll-epoch" + text.encode(), hashlib.sha256).digest()


def sign(key: bytes, *parts: bytes | str) -> str:
    """HMAC-SHA256 (hex) of the parts, each length-prefixed so no two splits collide."""
    mac = hmac.new(key, digestmod=hashlib.sha256)
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        mac.update(len(data).to_bytes(8, "big"))
        mac.update(data)
    return mac.hexdigest()


def verify(key: bytes, mac: str, *parts: bytes | str) -> bool:
    """Whether `mac` is the parts' signature under `key` (constant-time)."""
    return hmac.compare_digest(sign(key, *parts), mac)
