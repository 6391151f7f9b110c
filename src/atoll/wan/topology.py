"""Per-pair rates and delays for the emulated WAN: `atoll simulate --wan-topology FILE`.

A TOML file says how every directed pair of islands (by index, as `--islands` numbers them) is
linked. Regions give the common case; pairs override single directions:

    [regions]                      # every island in exactly one region
    eu = [0, 1]
    us = [2, 3]
    [within]                       # links inside a region
    rate = "1gbit"
    delay = "1ms"                  # one way
    [between]                      # links across regions (and every link when there are no regions)
    rate = "50mbit"
    delay = "40ms"
    [[pair]]                       # one direction, overriding the above
    from = 0
    to = 3
    rate = "10mbit"
    delay = "60ms"

Units as `--wan-rate` / `--wan-delay` (`atoll.wan.units`). The delay line applies each pair's
rate and delay (`atoll.wan.delay_line`): the kernel's tbf shapes one island's egress to all
peers alike, so it cannot give two peers two rates.

Failure semantics: a missing or unreadable file, bad TOML, an unknown key, an island outside
0 .. islands - 1 or in two regions, or a bad rate or delay raises UserError naming the file and
what to fix; nothing else is raised.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from atoll.errors import UserError
from atoll.wan.units import parse_delay, parse_rate

KEYS = {"regions", "within", "between", "pair"}
LINK_KEYS = {"rate", "delay"}
PAIR_KEYS = {"from", "to", "rate", "delay"}


@dataclass(frozen=True)
class Topology:
    """Rates (bit/s) and one-way delays (s) of every directed pair of islands; [i][i] is unused."""

    rates_bps: list[list[int]]
    delays_s: list[list[float]]

    @property
    def islands(self) -> int:
        return len(self.rates_bps)


def load_topology(path: Path, islands: int) -> Topology:
    """The topology in `path` for `islands` islands (see the module doc)."""
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise UserError(f"--wan-topology {path}: cannot read it as TOML ({err})") from err
    return parse_topology(raw, islands, str(path))


def parse_topology(raw: dict, islands: int, where: str = "--wan-topology") -> Topology:
    """The topology a parsed file describes; UserError naming `where` for anything wrong."""
    def fail(what: str) -> UserError:
        return UserError(f"{where}: {what} (see `atoll simulate --help` for the format)")

    unknown = set(raw) - KEYS
    if unknown:
        raise fail(f"unknown keys {sorted(unknown)}; expected {sorted(KEYS)}")
    if "between" not in raw:
        raise fail("a [between] table with rate and delay is required (links across regions)")
    region_of = _regions(raw.get("regions", {}), islands, fail)
    if region_of and "within" not in raw:
        raise fail("[regions] needs a [within] table with rate and delay (links inside a region)")
    between = _link(raw["between"], "[between]", fail)
    within = _link(raw["within"], "[within]", fail) if "within" in raw else between
    links = [
        [within if region_of and region_of[i] == region_of[j] else between for j in range(islands)] for i in range(islands)
    ]
    for pair in raw.get("pair", []):
        if not isinstance(pair, dict) or set(pair) != PAIR_KEYS:
            raise fail(f"each [[pair]] needs exactly {sorted(PAIR_KEYS)}, got {pair!r}")
        i, j = _island(pair["from"], islands, fail), _island(pair["to"], islands, fail)
        if i == j:
            raise fail(f"a [[pair]] from island {i} to itself")
        links[i][j] = _link(pair, f"the [[pair]] {i} -> {j}", fail)
    return Topology([[rate for rate, _ in row] for row in links], [[delay for _, delay in row] for row in links])


def _regions(raw: object, islands: int, fail) -> dict[int, str]:
    if not isinstance(raw, dict):
        raise fail("[regions] must map region names to lists of island indices")
    region_of: dict[int, str] = {}
    for name, members in raw.items():
        if not isinstance(members, list):
            raise fail(f"region {name!r} must be a list of island indices")
        for island in members:
            index = _island(island, islands, fail)
            if index in region_of:
                raise fail(f"island {index} is in regions {region_of[index]!r} and {name!r}")
            region_of[index] = name
    if raw and len(region_of) != islands:
        raise fail(f"islands {sorted(set(range(islands)) - set(region_of))} are in no region")
    return region_of


def _link(raw: object, what: str, fail) -> tuple[int, float]:
    if not isinstance(raw, dict) or not LINK_KEYS <= set(raw):
        raise fail(f"{what} needs a rate and a delay")
    if not isinstance(raw["rate"], str) or not isinstance(raw["delay"], str):
        raise fail(f"{what}: write rate and delay as strings with a unit, e.g. rate = \"50mbit\", delay = \"40ms\"")
    return parse_rate(raw["rate"], f"{what} rate"), parse_delay(raw["delay"], f"{what} delay")


def _island(value: object, islands: int, fail) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < islands:
        raise fail(f"island {value!r} is not an index from 0 to {islands - 1} (--islands {islands})")
    return value
