"""The run token: a shared secret that keeps strangers from joining a run or forging its epochs.

Threat model, honestly: the coordinator's TCPStore is unauthenticated and unencrypted, and so are
the gloo connections between islands. Anyone who can reach the coordinator's port can read every
key, write any key (barriers, results, outcomes, deathrattles) and so disturb or stop a run, and
anyone on the path can read the tensors. What the token does buy: an island must present
HMAC-SHA256(token, island_id) to register, so the coordinator never admits an island that lacks
the token (it is refused: "wrong run token", exit 2); and every epoch the coordinator publishes
carries HMAC-SHA256(token, epoch), so islands reject an epoch written by someone without the
token (e.g. one that would add a stranger to the global groups). The token itself never crosses
the wire. Run the coordinator and islands on a network you trust, or behind a VPN/WireGuard.

The token comes from mesh.token or, preferably (it is not written to the run directory then),
the ATOLL_RUN_TOKEN environment variable. No token anywhere means an open run (no checks).
"""

from __future__ import annotations

import hashlib
import hmac
import os

TOKEN_ENV = "ATOLL_RUN_TOKEN"


def run_token(configured: str | None) -> str | None:
    """The configured token, else ATOLL_RUN_TOKEN, else None (an open run)."""
    return configured or os.environ.get(TOKEN_ENV) or None


def sign(token: str | None, text: str) -> str:
    """HMAC-SHA256 of `text` under `token` (hex); empty for an open run."""
    if token is None:
        return ""
    return hmac.new(token.encode(), text.encode(), hashlib.sha256).hexdigest()


def verify(token: str | None, text: str, mac: str) -> bool:
    """Whether `mac` is `text`'s signature under `token` (constant-time)."""
    return hmac.compare_digest(sign(token, text), mac)
