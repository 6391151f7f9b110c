"""`atoll report RUN_DIR`: one self-contained HTML file of plots from a run directory.

RUN_DIR is a simulate (or demo) directory, whose islands write island-<id>/metrics.jsonl and whose
coordinator writes membership.jsonl, or one island's `atoll train` run directory (metrics.jsonl at
its top). `build_series()` turns the records into the plotted series (pure: tested on its own);
`render()` draws them with matplotlib into PNGs embedded as data: URIs, and keeps the series
themselves in the page as a JSON block (`<script id="atoll-report-data">`), so what a plot shows
can be read back. Nothing is fetched from the network: islands often have none.

A 42-day run logs ~100k records per island: an island's per-step series longer than MAX_POINTS are
averaged over buckets of consecutive records (each plotted point is a bucket's mean), per-outer-step
series likewise; rejected contributions and skipped outer steps are kept one by one (they are rare).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.json as pa_json

from atoll.config import tomllib
from atoll.errors import UserError
from atoll.jsonl import records, tail_lines

MAX_POINTS = 2000
"""Points per island and series in a plot (and in the page's JSON block)."""
MEMBERSHIP_FILE = "membership.jsonl"
DATA_ID = "atoll-report-data"
NUMBERS = ("time", "step", "loss", "val_loss", "tokens", "outer_step", "utilization", "sync_s", "bytes_sent", "world_size",
           "checkpoint_step", "checkpoint_s", "checkpoint_blocked_s")
"""The record fields a report plots (train.py writes them; `atoll.metrics`): read as float64, NaN where absent."""
SCHEMA = pa.schema([*((name, pa.float64()) for name in NUMBERS), ("skipped", pa.bool_()), ("rejected", pa.list_(pa.string()))])
TAIL_BYTES = 1 << 20
"""How much of a metrics file's end is searched for the last tokens_by_source."""


@dataclass
class IslandRecords:
    """One island's metrics as columns (NUMBERS as float64 arrays, NaN where a record lacks the
    field; `skipped` as bool; `rejected` as lists), the last tokens_by_source, and run.json's and
    config.toml's facts."""

    name: str
    columns: dict[str, Any]
    tokens_by_source: dict[str, int] = field(default_factory=dict)
    params: int | None = None
    inner_steps: int | None = None

    @property
    def count(self) -> int:
        return len(self.columns["time"])


@dataclass
class RunRecords:
    """Everything a report reads from a run directory."""

    run_dir: Path
    islands: list[IslandRecords]
    events: list[dict[str, Any]] = field(default_factory=list)


def columns_of(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The report's columns of parsed records (the slow path: a file pyarrow could not parse whole)."""
    cols: dict[str, Any] = {}
    for name in NUMBERS:
        values = [r.get(name) for r in records]
        cols[name] = np.array([v if isinstance(v, (int, float)) and not isinstance(v, bool) else np.nan for v in values], dtype=np.float64)
    cols["skipped"] = np.array([r.get("skipped") is True for r in records], dtype=bool)
    cols["rejected"] = [list(r["rejected"]) if isinstance(r.get("rejected"), list) else [] for r in records]
    return cols


def read_columns(path: Path) -> dict[str, Any]:
    """The report's columns of a metrics.jsonl, parsed by pyarrow's C++ JSON reader (4x Python's json
    on 100k-record files); a torn last line is cut, a file it cannot parse is read line by line."""
    data = path.read_bytes()
    data = data[:data.rfind(b"\n") + 1]
    try:
        table = pa_json.read_json(io.BytesIO(data), parse_options=pa_json.ParseOptions(explicit_schema=SCHEMA, unexpected_field_behavior="ignore"))
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return columns_of(list(records(data.splitlines())))
    cols: dict[str, Any] = {name: table.column(name).to_numpy(zero_copy_only=False).astype(np.float64) for name in NUMBERS}
    cols["skipped"] = table.column("skipped").fill_null(False).to_numpy(zero_copy_only=False).astype(bool)
    cols["rejected"] = [r or [] for r in table.column("rejected").to_pylist()]
    return cols


def last_tokens_by_source(path: Path) -> dict[str, int]:
    """The newest record's tokens_by_source among the last TAIL_BYTES of `path` (cumulative per source)."""
    for record in records(line for line in reversed(tail_lines(path, TAIL_BYTES)) if b"tokens_by_source" in line):
        found = record.get("tokens_by_source")
        if isinstance(found, dict):
            return {str(k): int(v) for k, v in found.items() if isinstance(v, (int, float))}
    return {}


def _island(name: str, island_dir: Path) -> IslandRecords:
    metrics = island_dir / "metrics.jsonl"
    island = IslandRecords(name, read_columns(metrics), last_tokens_by_source(metrics))
    try:
        island.params = int(json.loads((island_dir / "run.json").read_text())["params"]["total"])
    except (OSError, ValueError, KeyError, TypeError):
        pass  # an island killed before it wrote run.json: no data-parallel comparison for it
    try:
        island.inner_steps = int(tomllib.loads((island_dir / "config.toml").read_text())["diloco"]["inner_steps"])
    except (OSError, ValueError, KeyError, TypeError, tomllib.TOMLDecodeError):
        pass
    return island


def read_run(run_dir: Path) -> RunRecords:
    """The records of a simulate directory (island-*/) or of one island's run directory.

    Raises UserError when `run_dir` holds no metrics.jsonl at all."""
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a directory: give a run directory (atoll train --run-dir) or a simulate directory")
    if (run_dir / "metrics.jsonl").is_file():
        islands = [_island(run_dir.name, run_dir)]
    else:
        islands = [_island(d.name, d) for d in sorted(run_dir.iterdir()) if (d / "metrics.jsonl").is_file()]
    if not islands:
        raise UserError(f"{run_dir} holds no metrics.jsonl (nor island-*/metrics.jsonl): is it a run directory?")
    events = list(records((run_dir / MEMBERSHIP_FILE).read_bytes().splitlines())) if (run_dir / MEMBERSHIP_FILE).is_file() else []
    return RunRecords(run_dir, islands, events)


def ring_bytes(numel: int, element_size: int, world: int) -> int:
    """Bytes each member sends in a ring all-reduce: `atoll.comm.allreduce.ring_bytes`, restated so
    that a report does not import torch (seconds on a loaded machine)."""
    return 2 * (world - 1) * numel * element_size // world


def bucket_means(xs: np.ndarray, ys: np.ndarray, limit: int = MAX_POINTS) -> tuple[list[float], list[float]]:
    """(xs, ys) cut into at most `limit` buckets of consecutive points, each replaced by its means."""
    xs, ys = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    n = len(xs)
    if n > limit:
        starts = np.arange(0, n, math.ceil(n / limit))
        counts = np.diff(np.append(starts, n))
        xs, ys = np.add.reduceat(xs, starts) / counts, np.add.reduceat(ys, starts) / counts
    return [round(float(x), 6) for x in xs], [round(float(y), 6) for y in ys]


def _finite(*arrays: np.ndarray) -> np.ndarray:
    mask = np.ones(len(arrays[0]), dtype=bool)
    for a in arrays:
        mask &= np.isfinite(a)
    return mask


def _hours(t: np.ndarray, t0: float) -> np.ndarray:
    return (t - t0) / 3600


def start_time(run: RunRecords) -> float:
    """The run's first timestamp (its first record or membership event): time 0 of every plot."""
    times = [float(np.nanmin(i.columns["time"])) for i in run.islands if np.isfinite(i.columns["time"]).any()]
    times += [e["time"] for e in run.events[:1] if isinstance(e.get("time"), (int, float))]
    return min(times) if times else 0.0


def _loss_series(island: IslandRecords, key: str, t0: float) -> dict[str, list[float]]:
    c = island.columns
    keep = _finite(c[key], c["tokens"], c["time"])
    tokens, loss = bucket_means(c["tokens"][keep], c[key][keep])
    hours, _ = bucket_means(_hours(c["time"][keep], t0), c[key][keep])
    return {"tokens": tokens, "hours": hours, key: loss}


def _outer_series(island: IslandRecords) -> dict[str, Any]:
    """Per outer step: utilization, blocked sync seconds, bytes sent in it and data-parallel's for the
    same inner steps, plus the outer steps that rejected contributions or were skipped."""
    c = island.columns
    outer = np.isfinite(c["outer_step"])
    timed = outer & _finite(c["utilization"], c["sync_s"])
    o, u = bucket_means(c["outer_step"][timed], c["utilization"][timed])
    _, s = bucket_means(c["outer_step"][timed], c["sync_s"][timed])
    counted = outer & _finite(c["bytes_sent"], c["step"], c["world_size"])
    steps, sent, step, world = c["outer_step"][counted], c["bytes_sent"][counted], c["step"][counted], c["world_size"][counted]
    # bytes_sent counts from the process's start: a smaller value is a restarted island's first outer step
    delta = np.where(np.diff(sent, prepend=np.inf) >= 0, np.diff(sent, prepend=0.0), sent)
    # the first outer step (or a restarted island's) spans diloco.inner_steps: it may have begun before the island logged
    inner = np.where(np.diff(step, prepend=np.inf) > 0, np.diff(step, prepend=0.0), island.inner_steps or np.nan)
    ddp = inner * np.array([ring_bytes(island.params or 0, 4, int(w)) for w in world], dtype=np.float64)
    shown = _finite(ddp) & (world > 1) & (delta > 0) & bool(island.params)
    bo, b = bucket_means(steps[shown], delta[shown])
    _, d = bucket_means(steps[shown], ddp[shown])
    rejected = [{"outer_step": int(c["outer_step"][k]), "islands": c["rejected"][k]} for k in np.flatnonzero(outer) if c["rejected"][k]]
    skipped = [int(x) for x in c["outer_step"][outer & c["skipped"]]]
    return {"outer_step": o, "utilization": u, "sync_s": s, "bytes_outer_step": bo, "bytes_sent": b, "ddp_bytes": d,
            "rejected": rejected, "skipped": skipped}


def _world_series(run: RunRecords, t0: float) -> dict[str, Any]:
    """World size over time and the membership events: from the coordinator's log when there is one,
    else from the islands' own world_size fields (where it changes)."""
    if run.events:
        timed = [e for e in run.events if isinstance(e.get("time"), (int, float))]
        return {
            "hours": [round((e["time"] - t0) / 3600, 6) for e in timed], "world_size": [len(e.get("members", [])) for e in timed],
            "events": [{"hours": round((e["time"] - t0) / 3600, 6), "epoch": e.get("epoch"), "reason": e.get("reason", ""),
                        "joined": list(e.get("joined", [])), "left": dict(e.get("left", {}))} for e in timed],
        }
    t = np.concatenate([i.columns["time"] for i in run.islands])
    w = np.concatenate([i.columns["world_size"] for i in run.islands])
    keep = _finite(t, w)
    t, w = t[keep], w[keep]
    order = np.argsort(t, kind="stable")
    t, w = t[order], w[order]
    change = np.flatnonzero(np.diff(w, prepend=np.nan, append=np.nan) != 0) if len(w) else np.array([], dtype=int)
    change = change[change < len(w)]
    return {"hours": [round(float(x), 6) for x in _hours(t[change], t0)], "world_size": [int(x) for x in w[change]], "events": []}


def _checkpoint_series(island: IslandRecords, t0: float) -> dict[str, list[float]]:
    c = island.columns
    saves = _finite(c["checkpoint_step"], c["time"])
    blocked = _finite(c["checkpoint_blocked_s"], c["time"])
    bh, bs = bucket_means(_hours(c["time"][blocked], t0), c["checkpoint_blocked_s"][blocked])
    sh, ss = bucket_means(_hours(c["time"][saves], t0), c["checkpoint_s"][saves])
    _, step = bucket_means(_hours(c["time"][saves], t0), c["checkpoint_step"][saves])
    return {"save_hours": sh, "save_step": step, "save_s": ss, "blocked_hours": bh, "blocked_s": bs}


def _tokens_by_source(island: IslandRecords) -> dict[str, int]:
    """The island's cumulative tokens per data source, or all its tokens as 'data' (one source)."""
    if island.tokens_by_source:
        return island.tokens_by_source
    tokens = island.columns["tokens"][np.isfinite(island.columns["tokens"])]
    return {"data": int(tokens[-1])} if len(tokens) else {}


def build_series(run: RunRecords) -> dict[str, Any]:
    """Every plotted series of the report, as JSON-ready lists, per island where it is per island."""
    t0 = start_time(run)
    return {
        "run_dir": str(run.run_dir),
        "start_time": t0,
        "islands": [i.name for i in run.islands],
        "records": {i.name: i.count for i in run.islands},
        "loss": {i.name: _loss_series(i, "loss", t0) for i in run.islands},
        "val_loss": {i.name: _loss_series(i, "val_loss", t0) for i in run.islands},
        "outer": {i.name: _outer_series(i) for i in run.islands},
        "world": _world_series(run, t0),
        "checkpoints": {i.name: _checkpoint_series(i, t0) for i in run.islands},
        "tokens_by_source": {i.name: _tokens_by_source(i) for i in run.islands},
    }


def headline(series: dict[str, Any]) -> list[tuple[str, str]]:
    """The table at the top of the report: per island its records, last losses, outer steps, utilization."""
    rows = []
    for name in series["islands"]:
        loss, val, outer = series["loss"][name], series["val_loss"][name], series["outer"][name]
        parts = [f"{series['records'][name]:,} records"]
        if loss["loss"]:
            parts.append(f"loss {loss['loss'][-1]:.4f} at {loss['tokens'][-1]:,.0f} tokens")
        if val["val_loss"]:
            parts.append(f"val_loss {val['val_loss'][-1]:.4f}")
        if outer["utilization"]:
            parts.append(f"median utilization {statistics.median(outer['utilization']):.1%}")
        if outer["bytes_sent"]:
            ratio = sum(outer["ddp_bytes"]) / max(sum(outer["bytes_sent"]), 1)
            parts.append(f"{ratio:,.0f}x fewer bytes than data-parallel")
        if outer["rejected"] or outer["skipped"]:
            parts.append(f"{len(outer['rejected'])} outer step(s) with rejected contributions, {len(outer['skipped'])} skipped")
        rows.append((name, "; ".join(parts)))
    return rows


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    # fixed margins, not bbox_inches="tight": that draws every figure twice (half the report's time)
    fig.subplots_adjust(left=0.07, right=0.99, bottom=0.16, top=0.96, wspace=0.18)
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def time_unit(series: dict[str, Any]) -> tuple[str, float]:
    """(unit, hours per unit) that suits the run's length: minutes under 2 hours, days over 3 days."""
    hours = [h for name in series["islands"] for h in series["loss"][name]["hours"][-1:]] + series["world"]["hours"][-1:]
    longest = max(hours, default=0.0)
    if longest < 2:
        return "minutes", 1 / 60
    return ("days", 24.0) if longest > 72 else ("hours", 1.0)


def _figures(series: dict[str, Any]) -> list[tuple[str, str]]:
    """(title, PNG data URI) of every plot, in the report's order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    islands = series["islands"]
    figures = []
    unit, per = time_unit(series)
    when = f"{unit} since the run started"

    def t(hours: list[float]) -> list[float]:
        return [h / per for h in hours]

    fig, (by_tokens, by_time) = plt.subplots(1, 2, figsize=(13, 4))
    for name in islands:
        loss, val = series["loss"][name], series["val_loss"][name]
        line, = by_tokens.plot(loss["tokens"], loss["loss"], lw=1, label=f"{name} train")
        by_time.plot(t(loss["hours"]), loss["loss"], lw=1, color=line.get_color())
        if val["val_loss"]:
            by_tokens.plot(val["tokens"], val["val_loss"], "o--", ms=3, lw=1, color=line.get_color(), label=f"{name} val")
            by_time.plot(t(val["hours"]), val["val_loss"], "o--", ms=3, lw=1, color=line.get_color())
    by_tokens.set(xlabel="tokens (the island's own)", ylabel="loss")
    by_time.set(xlabel=when, ylabel="loss")
    by_tokens.legend(fontsize=7, ncol=2)
    figures.append(("Train and validation loss per island, against tokens and time", _png(fig)))

    fig, (util, sync) = plt.subplots(1, 2, figsize=(13, 3.5))
    for name in islands:
        outer = series["outer"][name]
        util.plot(outer["outer_step"], [u * 100 for u in outer["utilization"]], lw=1, label=name)
        sync.plot(outer["outer_step"], outer["sync_s"], lw=1, label=name)
    util.set(xlabel="outer step", ylabel="utilization %", ylim=(0, 100))
    sync.set(xlabel="outer step", ylabel="blocked in sync (s)")
    util.legend(fontsize=7)
    figures.append(("Compute utilization and time blocked in sync per outer step", _png(fig)))

    fig, ax = plt.subplots(figsize=(13, 3.5))
    for name in islands:
        outer = series["outer"][name]
        line, = ax.plot(outer["bytes_outer_step"], [b / 1e6 for b in outer["bytes_sent"]], lw=1, label=f"{name} sent")
        ax.plot(outer["bytes_outer_step"], [b / 1e6 for b in outer["ddp_bytes"]], ":", lw=1, color=line.get_color(),
                label=f"{name} data-parallel")
    ax.set(xlabel="outer step", ylabel="MB per outer step (log)", yscale="log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.legend(fontsize=7, ncol=2)
    figures.append(("Bytes sent per outer step, against data-parallel's for the same inner steps (fp32 ring all-reduce every step)", _png(fig)))

    world = series["world"]
    fig, ax = plt.subplots(figsize=(13, 3.5))
    ax.step(t(world["hours"]), world["world_size"], where="post", lw=1.5)
    for event in world["events"]:
        if event["joined"] or event["left"]:
            ax.axvline(event["hours"] / per, color="green" if event["joined"] else "red", lw=0.6, alpha=0.6)
    ax.set(xlabel=when, ylabel="islands in the epoch")
    ax.yaxis.get_major_locator().set_params(integer=True)
    figures.append(("World size over time (green: an island joined, red: one left)", _png(fig)))

    fig, (saves, blocked) = plt.subplots(1, 2, figsize=(13, 3.5))
    for name in islands:
        ckpt = series["checkpoints"][name]
        saves.plot(t(ckpt["save_hours"]), ckpt["save_s"], "o", ms=3, label=name)
        blocked.plot(t(ckpt["blocked_hours"]), ckpt["blocked_s"], ".", ms=3, label=name)
    saves.set(xlabel=when, ylabel="save took (s)")
    blocked.set(xlabel=when, ylabel="training blocked (s)")
    saves.legend(fontsize=7)
    figures.append(("Checkpoint saves: how long each took, and how long training was blocked", _png(fig)))

    fig, (rejected, source) = plt.subplots(1, 2, figsize=(13, 3.5))
    for k, name in enumerate(islands):
        outer = series["outer"][name]
        rejected.plot([r["outer_step"] for r in outer["rejected"]], [len(r["islands"]) for r in outer["rejected"]],
                      "x", ms=6, label=f"{name} rejected")
        rejected.plot(outer["skipped"], [0] * len(outer["skipped"]), "s", ms=5, label=f"{name} skipped")
        bottom = 0.0
        for src, tokens in sorted(series["tokens_by_source"][name].items()):
            source.bar(k, tokens, bottom=bottom, label=src if k == 0 else None)
            bottom += tokens
    rejected.set(xlabel="outer step", ylabel="contributions rejected")
    if not any(series["outer"][n]["rejected"] or series["outer"][n]["skipped"] for n in islands):
        rejected.text(0.5, 0.5, "no rejected contributions, no skipped outer steps", ha="center", transform=rejected.transAxes)
    source.set_xticks(range(len(islands)), islands, rotation=30, fontsize=7)
    source.set(ylabel="tokens by data source")
    if any(series["tokens_by_source"].values()):
        source.legend(fontsize=7)
    figures.append(("Rejected contributions (x) and skipped outer steps (square); tokens by data source", _png(fig)))
    return figures


def render(series: dict[str, Any]) -> str:
    """The report's HTML: a headline table, the plots as embedded PNGs and the series as JSON."""
    rows = "".join(f"<tr><th>{html.escape(n)}</th><td>{html.escape(t)}</td></tr>" for n, t in headline(series))
    plots = "".join(f'<h2>{html.escape(title)}</h2><img alt="{html.escape(title)}" src="{uri}">' for title, uri in _figures(series))
    data = json.dumps(series, separators=(",", ":")).replace("</", "<\\/")  # no "</script>" inside the block
    made = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return (
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>atoll report: "
        f"{html.escape(Path(series['run_dir']).name)}</title><style>"
        "body{font:14px system-ui,sans-serif;margin:2em;color:#222}img{max-width:100%}"
        "table{border-collapse:collapse}th,td{text-align:left;padding:2px 10px;border-bottom:1px solid #ddd}th{white-space:nowrap}"
        "</style></head><body>"
        f"<h1>atoll report: {html.escape(series['run_dir'])}</h1><p>made {made}; "
        f"{len(series['islands'])} island(s); series longer than {MAX_POINTS} points are bucket means</p>"
        f"<table>{rows}</table>{plots}"
        f'<script type="application/json" id="{DATA_ID}">{data}</script></body></html>'
    )


def read_series(html_text: str) -> dict[str, Any]:
    """The plotted series kept in a report's JSON block (for tests and scripts)."""
    start = html_text.index(f'id="{DATA_ID}">') + len(f'id="{DATA_ID}">')
    return json.loads(html_text[start:html_text.index("</script>", start)])


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    """Write the report of `run_dir` to `out` (default RUN_DIR/report.html); returns its path."""
    out = out or run_dir / "report.html"
    page = render(build_series(read_run(run_dir)))
    try:
        out.write_text(page)
    except OSError as err:
        raise UserError(f"cannot write the report to {out}: {err.strerror}: choose another --out") from None
    return out
