"""The run as the coordinator sees it: the status page, /status.json, Prometheus /metrics, /healthz.

Paths of the coordinator's own HTTP service (`atoll.mesh.coordinator`), read-only: nothing here
changes the run.

    GET /status        a self-contained HTML page (no scripts, fonts or CDN: islands often have no
                       internet) that reloads itself every REFRESH_S: the run, its epoch, every
                       registered island with its state and numbers, the membership events of the
                       last EVENT_WINDOW_S, the refused requests
    GET /status.json   the same as data (`snapshot`)
    GET /metrics       the same as Prometheus text (`prometheus_text`, via prometheus_client)
    GET /healthz       "ok" (or "ended") while the coordinator serves; always open, reveals nothing

On a loopback bind the first three are open; on any other address they need the status key
(`atoll.mesh.auth.status_key`, from the run token), as `?key=KEY` or `Authorization: Bearer
KEY`, unless the coordinator runs with `--public-status`; a request without it is refused (401)
and counted with the protocol's refusals. `atoll status HOST:PORT` prints the same table.

An island's state, judged on the coordinator's clock (`island_state`): training; outer_step (it
reached an outer step's boundary barrier that has not committed); joining (registered, waiting
for the run to start or for the next boundary); fetching (a joiner fetching the run's state);
hung (no heartbeat for two beat intervals, or its control connection closed within its
reconnect grace); gone (left, or judged gone, and about to be dropped). An island dropped from
the run is no longer listed; the events say when and why it left.

The numbers per island (loss, val_loss, tokens/s, utilization, bytes sent, steps) are those of its
latest metrics record, sent with its next outer step's boundary barrier (an authenticated message
it sends anyway; `island_numbers` keeps only known keys with finite values): they lag the island
by up to an outer step. The page is built from a copy taken under the coordinator's lock (a few
dicts), rendered outside it.
"""

from __future__ import annotations

import hmac
import html
import http.client
import json
import math
import socket
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote, urlsplit

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from atoll import __version__
from atoll.errors import UserError
from atoll.mesh.membership import IslandView, departures

if TYPE_CHECKING:
    from atoll.mesh.coordinator import Coordinator

STATUS_PATH, STATUS_JSON_PATH, METRICS_PATH, HEALTH_PATH = "/status", "/status.json", "/metrics", "/healthz"
READ_PATHS = (STATUS_PATH, STATUS_JSON_PATH, METRICS_PATH)
"""The paths that need the status key off loopback."""
REFRESH_S = 2
EVENT_WINDOW_S = 6 * 3600.0
"""The page shows the membership events of the last six hours (at most events.RECENT_EVENTS)."""
ISLAND_NUMBERS = ("step", "outer_step", "loss", "val_loss", "tokens_per_s", "utilization", "bytes_sent")
"""What an island reports of its latest metrics record."""
STATES = {
    "training": "training", "outer_step": "in the outer step", "joining": "joining", "fetching": "fetching state",
    "hung": "hung", "gone": "gone",
}
"""State -> how the page and `atoll status` say it."""
TEXT_HTML, TEXT_PLAIN, JSON = "text/html; charset=utf-8", "text/plain; charset=utf-8", "application/json"
PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"


def island_numbers(raw: Any) -> dict[str, float]:
    """The ISLAND_NUMBERS of `raw` that are finite numbers (anything else is dropped): what an
    island sends of its metrics record, and what the coordinator keeps of what arrives."""
    if not isinstance(raw, dict):
        return {}
    return {
        key: raw[key] for key in ISLAND_NUMBERS
        if isinstance(raw.get(key), (int, float)) and not isinstance(raw[key], bool) and math.isfinite(raw[key])
    }


def at_barrier(view: IslandView, name: str, numbers: Any) -> None:
    """Note a member's arrival at barrier `name` ("outer-S" marks outer step S's boundary) with
    the numbers it sent (lock held)."""
    step = name.removeprefix("outer-")
    if step != name and step.isascii() and step.isdigit() and len(step) < 19:
        view.outer_step, view.numbers = int(step), {**view.numbers, **island_numbers(numbers)}


# --- what the coordinator knows, as data ------------------------------------------------------------


def island_state(coordinator: Coordinator, view: IslandView, now: float) -> tuple[str, str]:
    """(state, what it means here) of one registered incarnation (lock held); see the module doc."""
    island, epoch = view.registration.island_id, coordinator.epoch
    gone = departures((island,), {island: view}, now, coordinator.rules.heartbeat_timeout_s)
    if gone:
        return "gone", gone[island]
    if view.lost_at is not None:
        return "hung", f"its control connection closed {now - view.lost_at:.1f}s ago"
    if now - view.heard_at > 2 * view.beat_interval_s + 0.5:
        return "hung", f"no heartbeat for {now - view.heard_at:.1f}s"
    if epoch is None:
        return "joining", f"waiting for {coordinator.min_islands} island(s) to start the run"
    if island not in epoch.members:
        if view.ready is not None:
            return "joining", "holds the run's state: enters at the next outer step's boundary"
        return ("fetching", "fetching the run's state from the members") if view.fetching else ("joining", "registered")
    if view.outer_step > max(coordinator.committed, int(view.numbers.get("outer_step", 0))):
        return "outer_step", f"averaging outer step {view.outer_step}"
    return "training", ""


def snapshot(coordinator: Coordinator) -> dict[str, Any]:
    """The run as /status.json gives it (call with the coordinator's lock held: it copies, it
    renders nothing)."""
    now, wall = time.monotonic(), time.time()
    epoch = coordinator.epoch
    members = []
    for island, view in sorted(coordinator.views.items()):
        state, detail = island_state(coordinator, view, now)
        members.append({
            "island": island, "incarnation": view.registration.incarnation, "state": state, "detail": detail,
            "in_epoch": epoch is not None and island in epoch.members, "address": view.address,
            "heartbeat_age_s": round(now - view.heard_at, 3), "at_boundary": view.outer_step, **view.numbers,
        })
    return {
        "run_id": coordinator.run_id, "version": __version__, "boot": coordinator.boot, "time": wall,
        "coordinator": {"address": coordinator.address, "started": coordinator.started, "resumed": coordinator.resumed},
        "epoch": epoch.number if epoch else None, "epoch_reason": epoch.reason if epoch else None,
        "epoch_started": epoch.started_at if epoch else None, "world": epoch.world if epoch else 0,
        "min_islands": coordinator.min_islands, "committed_outer_step": coordinator.committed, "ended": coordinator.ended,
        "members": members,
        "events": coordinator.events.since(wall - EVENT_WINDOW_S),
        "refused": {
            "requests": coordinator.refused, "connections_turned_away": coordinator.server.turned_away,
            "recent": list(coordinator.refusals),
        },
    }


# --- the same, for people -----------------------------------------------------------------------------

TABLE_HEADER = ("island", "state", "incarnation", "outer step", "step", "loss", "val loss", "tokens/s", "util", "sent",
                "heard", "address", "")


def _number(value: Any, form: str) -> str:
    return "-" if value is None else format(value, form)


def _bytes(value: float | None) -> str:
    if value is None:
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value:.0f} B"


def member_rows(snap: dict[str, Any]) -> list[tuple[str, ...]]:
    """One row of TABLE_HEADER's cells per listed island (the page's and `atoll status`'s table)."""
    rows = []
    for m in snap["members"]:
        rows.append((
            m["island"], STATES.get(m["state"], m["state"]), m["incarnation"][:8], _number(m.get("outer_step"), "d"),
            _number(m.get("step"), "d"), _number(m.get("loss"), ".4f"), _number(m.get("val_loss"), ".4f"),
            _number(m.get("tokens_per_s"), ",.0f"), _number(m.get("utilization"), ".1%"), _bytes(m.get("bytes_sent")),
            f"{m['heartbeat_age_s']:.1f}s ago", m["address"] or "-", m["detail"],
        ))
    return rows


def _clock(wall: float | None) -> str:
    return "-" if wall is None else time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(wall))


def headline(snap: dict[str, Any]) -> str:
    """One line: run, epoch, world, committed step, the coordinator's age."""
    if snap["epoch"] is None:
        where = f"waiting for {snap['min_islands']} island(s) to start"
    else:
        where = (f"epoch {snap['epoch']} ({snap['world']} island(s), {snap['epoch_reason']}, since {_clock(snap['epoch_started'])}); "
                 f"last committed outer step {snap['committed_outer_step']}")
    ended = f"; ENDED: {snap['ended']}" if snap["ended"] else ""
    return f"run {snap['run_id']}: {where}{ended}"


def event_line(event: dict[str, Any]) -> str:
    """One membership event as a sentence."""
    parts = [f"epoch {event.get('epoch')} ({event.get('reason')})"]
    if event.get("joined") and event.get("reason") != "start":
        parts.append(", ".join(map(str, event["joined"])) + " joined")
    for island, why in (event.get("left") or {}).items():
        parts.append(f"{island} left: {why}")
    if event.get("members") is not None and event.get("reason") != "ended":
        parts.append(f"members {', '.join(map(str, event['members']))}")
    return "; ".join(parts)


def render_text(snap: dict[str, Any], events: int = 10) -> str:
    """What `atoll status` prints: the headline, the table, the last `events` events, the refusals."""
    rows = [TABLE_HEADER, *member_rows(snap)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_HEADER))]
    lines = [headline(snap), f"coordinator {snap['coordinator']['address']} (atoll {snap['version']}), up since "
             f"{_clock(snap['coordinator']['started'])}" + (", resumed from its journal" if snap["coordinator"]["resumed"] else ""), ""]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    if not snap["members"]:
        lines.append("(no island registered)")
    lines += ["", "membership events (newest last):"]
    lines += [f"  {_clock(e.get('time'))}  {event_line(e)}" for e in snap["events"][-events:]] or ["  (none)"]
    refused = snap["refused"]
    lines += ["", f"refused requests: {refused['requests']}; connections turned away: {refused['connections_turned_away']}"]
    lines += [f"  {_clock(r['time'])}  {r['what']}" for r in refused["recent"][-5:]]
    return "\n".join(lines)


PAGE_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#1b1f24;background:#fff}
h1{font-size:1.3em;margin:0 0 .2em}h2{font-size:1.05em;margin:1.4em 0 .4em}
.meta{color:#57606a}table{border-collapse:collapse}td,th{padding:.25em .7em;border-bottom:1px solid #d0d7de;text-align:left}
th{background:#f6f8fa}td.n{text-align:right;font-variant-numeric:tabular-nums}
.training{color:#1a7f37}.outer_step{color:#0969da}.joining,.fetching{color:#9a6700}.hung,.gone{color:#cf222e;font-weight:600}
.ended{color:#cf222e;font-weight:600}
"""
NUMERIC = {3, 4, 5, 6, 7, 8, 9, 10}
"""Columns of TABLE_HEADER aligned right."""


def render_html(snap: dict[str, Any], key: str = "") -> str:
    """The status page: self-contained, reloading itself every REFRESH_S; `key` goes into its links."""
    e = html.escape
    query = f"?key={quote(key)}" if key else ""
    head = "".join(f"<th>{e(h)}</th>" for h in TABLE_HEADER)
    body = []
    for member, row in zip(snap["members"], member_rows(snap)):
        cells = []
        for i, cell in enumerate(row):
            kind = ' class="n"' if i in NUMERIC else f' class="{e(member["state"])}"' if i == 1 else ""
            cells.append(f"<td{kind}>{e(cell)}</td>")
        body.append(f'<tr data-island="{e(member["island"])}">{"".join(cells)}</tr>')
    members = f"<table><tr>{head}</tr>{''.join(body)}</table>" if body else "<p>No island has registered yet.</p>"
    events = "".join(f"<tr><td>{e(_clock(ev.get('time')))}</td><td>{e(event_line(ev))}</td></tr>" for ev in reversed(snap["events"]))
    refused = snap["refused"]
    refusals = "".join(f"<tr><td>{e(_clock(r['time']))}</td><td>{e(r['what'])}</td></tr>" for r in reversed(refused["recent"]))
    coordinator = snap["coordinator"]
    epoch = "none yet" if snap["epoch"] is None else str(snap["epoch"])
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="{REFRESH_S}">
<title>atoll run {e(snap['run_id'][:8])}: epoch {e(epoch)}</title><style>{PAGE_STYLE}</style></head><body>
<h1>atoll run <code id="run-id">{e(snap['run_id'])}</code></h1>
<p>Epoch <b id="epoch">{e(epoch)}</b> &middot; <span id="headline">{e(headline(snap))}</span></p>
{f'<p class="ended">The run has ended: {e(snap["ended"])}</p>' if snap["ended"] else ""}
<p class="meta">Coordinator {e(coordinator['address'])} (atoll {e(snap['version'])}, boot {e(snap['boot'])}), up since
{e(_clock(coordinator['started']))}{", resumed from its journal" if coordinator['resumed'] else ""}. Page of
{e(_clock(snap['time']))}, reloads every {REFRESH_S} s. Numbers are each island's latest metrics record, sent with
its outer steps. <a href="{STATUS_JSON_PATH}{e(query)}">status.json</a> &middot; <a href="{METRICS_PATH}{e(query)}">metrics</a></p>
<h2>Islands</h2>
{members}
<h2>Membership events of the last {EVENT_WINDOW_S / 3600:.0f} hours</h2>
{f"<table><tr><th>time</th><th>event</th></tr>{events}</table>" if events else "<p>None.</p>"}
<h2>Refused requests</h2>
<p>{refused['requests']} request(s) refused (no or wrong token, replays, status requests without the key);
{refused['connections_turned_away']} connection(s) turned away over the caps.</p>
{f"<table><tr><th>time</th><th>what</th></tr>{refusals}</table>" if refusals else ""}
</body></html>
"""


# --- the same, for Prometheus ------------------------------------------------------------------------


class _SnapshotCollector(Collector):
    """The gauges and counters of one snapshot (a registry per request: nothing global)."""

    def __init__(self, snap: dict[str, Any]) -> None:
        self.snap = snap

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        snap = self.snap
        info = GaugeMetricFamily("atoll_run_info", "The run (value 1)", labels=["run_id", "version"])
        info.add_metric([snap["run_id"], snap["version"]], 1)
        yield info
        yield GaugeMetricFamily("atoll_epoch", "Current membership epoch (-1 before the first)", value=-1 if snap["epoch"] is None else snap["epoch"])
        yield GaugeMetricFamily("atoll_epoch_islands", "Islands in the current epoch", value=snap["world"])
        yield GaugeMetricFamily("atoll_committed_outer_step", "Last committed outer step", value=snap["committed_outer_step"])
        yield GaugeMetricFamily("atoll_run_ended", "1 once every member has left", value=1 if snap["ended"] else 0)
        yield CounterMetricFamily("atoll_refused_requests", "Requests refused (no or wrong token, replays)", value=snap["refused"]["requests"])
        yield CounterMetricFamily("atoll_turned_away_connections", "Connections closed over the caps", value=snap["refused"]["connections_turned_away"])
        state = GaugeMetricFamily("atoll_island_state", "1 for the island's current state", labels=["island", "state"])
        gauges = {
            "outer_step": GaugeMetricFamily("atoll_island_outer_step", "Last outer step the island logged", labels=["island"]),
            "step": GaugeMetricFamily("atoll_island_step", "Last inner step the island logged", labels=["island"]),
            "loss": GaugeMetricFamily("atoll_island_loss", "Training loss of its latest record", labels=["island"]),
            "val_loss": GaugeMetricFamily("atoll_island_val_loss", "Latest validation loss", labels=["island"]),
            "tokens_per_s": GaugeMetricFamily("atoll_island_tokens_per_second", "Training throughput", labels=["island"]),
            "utilization": GaugeMetricFamily("atoll_island_utilization", "compute / (compute + blocked sync) of its last outer step", labels=["island"]),
            "heartbeat_age_s": GaugeMetricFamily("atoll_island_heartbeat_age_seconds", "Since the coordinator last heard from it", labels=["island"]),
        }
        sent = CounterMetricFamily("atoll_island_sent_bytes", "Bytes the island sent to other islands", labels=["island"])
        for m in snap["members"]:
            for name in STATES:
                state.add_metric([m["island"], name], 1 if m["state"] == name else 0)
            for key, family in gauges.items():
                if m.get(key) is not None:
                    family.add_metric([m["island"]], m[key])
            if m.get("bytes_sent") is not None:
                sent.add_metric([m["island"]], m["bytes_sent"])
        yield state
        yield from gauges.values()
        yield sent


def prometheus_text(snap: dict[str, Any]) -> bytes:
    """The snapshot in Prometheus' text exposition format."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SnapshotCollector(snap))
    return generate_latest(registry)


# --- the HTTP side -----------------------------------------------------------------------------------


def _presented_key(query: str, authorization: str) -> str:
    if authorization.startswith("Bearer "):
        return authorization[len("Bearer "):].strip()
    return parse_qs(query).get("key", [""])[0]


def answer(coordinator: Coordinator, target: str, authorization: str, source: str) -> tuple[int, bytes, str] | None:
    """(status, body, content type) of a GET of `target` (path and query), or None if it is not a
    status path. Read-only; a read path off loopback without the status key is refused (401)."""
    url = urlsplit(target)
    if url.path == HEALTH_PATH:
        return 200, b"ended\n" if coordinator.ended else b"ok\n", TEXT_PLAIN
    if url.path not in READ_PATHS:
        return None
    key = _presented_key(url.query, authorization)
    if not coordinator.status_open and not hmac.compare_digest(key.encode(), coordinator.status_key.encode()):
        coordinator.refuse(f"a status request from {source or 'somewhere'} without the status key")
        return 401, b"the status paths need the run's status key: `atoll status` with ATOLL_RUN_TOKEN set, or the key the coordinator printed\n", TEXT_PLAIN
    snap = coordinator.status()
    if url.path == STATUS_JSON_PATH:
        return 200, json.dumps(snap).encode(), JSON
    if url.path == METRICS_PATH:
        return 200, prometheus_text(snap), PROMETHEUS
    return 200, render_html(snap, key if not coordinator.status_open else "").encode(), TEXT_HTML


def status_url(host: str, port: int, key: str | None) -> str:
    """The page's address as an operator opens it (with the key where one is needed)."""
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}{STATUS_PATH}" + (f"?key={key}" if key else "")


def read_status(host: str, port: int, key: str, timeout_s: float) -> dict[str, Any]:
    """GET /status.json from the coordinator at host:port with the status `key`: one attempt, at
    most `timeout_s` to connect and as long again for the answer, no retry (`atoll status --watch`
    asks again). An unreachable or silent coordinator, or a refusal, is a UserError saying which."""
    where = status_url(host, port, None).removesuffix(STATUS_PATH)
    conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
    try:
        conn.request("GET", STATUS_JSON_PATH, headers={"Authorization": f"Bearer {key}"})
        response = conn.getresponse()
        body = response.read()
    except (OSError, http.client.HTTPException) as err:
        reason = "no answer" if isinstance(err, socket.timeout) else str(err) or type(err).__name__
        raise UserError(f"cannot read the status of the coordinator at {where} ({reason}): is `atoll coordinator` running there?") from None
    finally:
        conn.close()
    if response.status == 401:
        raise UserError(f"the coordinator at {where} refused the status request: set the run's token in ATOLL_RUN_TOKEN")
    if response.status != 200:
        raise UserError(f"{where} answered HTTP {response.status} to {STATUS_JSON_PATH}: is it an atoll coordinator (atoll {__version__})?")
    try:
        return json.loads(body)
    except ValueError:
        raise UserError(f"{where} answered {STATUS_JSON_PATH} with something that is not JSON: is it an atoll coordinator?") from None
