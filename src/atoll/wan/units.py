"""Parsing the WAN flags: link rates such as '100mbit' and delays such as '20ms'.

Units follow tc(8): rates in bit, kbit, mbit, gbit (powers of 1000, bits per second); delays in
us, ms or s. Failure semantics: a string that is not a positive number with one of these units
(zero is allowed for a delay) raises UserError naming the flag and giving an example; nothing else
is raised.
"""

from __future__ import annotations

import re

from atoll.errors import UserError

RATE_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9}
DELAY_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
_QUANTITY = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]+)\s*")


def _split(text: str) -> tuple[float, str] | None:
    match = _QUANTITY.fullmatch(text.lower())
    return (float(match.group(1)), match.group(2)) if match else None


def parse_rate(text: str, flag: str = "--wan-rate") -> int:
    """'100mbit' -> 100_000_000: a link rate in bits per second, at least 1 bit/s."""
    parsed = _split(text)
    if parsed is None or parsed[1] not in RATE_UNITS or round(parsed[0] * RATE_UNITS[parsed[1]]) < 1:
        raise UserError(
            f"{flag} {text!r} is not a link rate: write a positive number and a unit "
            f"({', '.join(RATE_UNITS)}), e.g. {flag} 100mbit"
        )
    return round(parsed[0] * RATE_UNITS[parsed[1]])


def parse_delay(text: str, flag: str = "--wan-delay") -> float:
    """'20ms' -> 0.02: a one-way delay in seconds (zero allowed)."""
    parsed = _split(text)
    if parsed is None or parsed[1] not in DELAY_UNITS:
        raise UserError(
            f"{flag} {text!r} is not a delay: write a number and a unit "
            f"({', '.join(DELAY_UNITS)}), e.g. {flag} 20ms"
        )
    return parsed[0] * DELAY_UNITS[parsed[1]]

