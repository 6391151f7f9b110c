"""Log lines of every atoll process: Python `logging`, with the UTC time to the millisecond, the
level and who speaks (island id and local rank, or the process's role: coordinator, simulate).

`configure()` gives the "atoll" logger one handler on standard output, where the per-step lines
go too, so a run's output stays in order; commands whose standard output is their result (sample,
eval, status --json, ...) log on stderr instead. The one line of an expected failure,
`errors.say`, is always on stderr. Text, for people:

    2026-12-04T03:22:14.123Z INFO  island-0/0 atoll: checkpoint saved: ...

JSON (`--log-format json`), for log collectors: one object a line with time, level, island,
rank, logger and message. The level and format reach child processes (torchrun's local ranks,
simulate's islands) through ATOLL_LOG_LEVEL and ATOLL_LOG_FORMAT. The per-step progress line of
`atoll.metrics` is not a log line: it stays as it is for people at a terminal.

`heartbeat`: while a process builds its model, prepares data, waits or runs a long step, it
says what it is doing whenever it has said nothing for HEARTBEAT_S seconds.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time

LEVEL_ENV = "ATOLL_LOG_LEVEL"
"""The log level (debug, info, warning, error), set by --log-level and inherited by child processes."""
FORMAT_ENV = "ATOLL_LOG_FORMAT"
"""The log format (text or json), set by --log-format and inherited by child processes."""
LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("text", "json")
HEARTBEAT_S = 30.0
"""Longest silence while a process works: the issue's 'never silent' bound."""

log = logging.getLogger("atoll")
_identity: dict[str, str | int | None] = {"island": None, "rank": None, "role": None}


def utc_stamp(created: float) -> str:
    """2026-12-04T03:22:14.123Z: a log record's creation time in UTC, to the millisecond."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created * 1000) % 1000:03d}Z"


def speaker() -> str:
    """Who a text line names: island/local-rank ('-' for an island alone, without an id), else the role, else '-'."""
    if _identity["rank"] is not None:
        return f"{_identity['island'] or '-'}/{_identity['rank']}"
    return str(_identity["role"] or "-")


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = f"{utc_stamp(record.created)} {record.levelname:<5} {speaker()} {record.getMessage()}"
        return line + ("\n" + self.formatException(record.exc_info) if record.exc_info else "")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": utc_stamp(record.created), "level": record.levelname, "island": _identity["island"],
            "rank": _identity["rank"], "role": _identity["role"], "logger": record.name, "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class ConsoleHandler(logging.StreamHandler):
    """Writes to the current sys.stdout, or sys.stderr (pytest swaps them), and tells the heartbeat
    that the process spoke."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)
        self.to_stderr = False

    def emit(self, record: logging.LogRecord) -> None:
        # not setStream: it flushes the old stream, which pytest may have closed
        self.stream = sys.stderr if self.to_stderr else sys.stdout
        heartbeat.spoke()
        super().emit(record)


def configure(level: str | None = None, fmt: str | None = None, role: str | None = None, to_stderr: bool = False) -> None:
    """Install the handler (once per process) at `level` in format `fmt`, defaulting to the
    inherited environment, else info and text; exported so that child processes log alike.
    `to_stderr`: the command's standard output is its result, keep log lines off it."""
    level = (level or os.environ.get(LEVEL_ENV) or "info").lower()
    fmt = (fmt or os.environ.get(FORMAT_ENV) or "text").lower()
    if level not in LEVELS or fmt not in FORMATS:  # a bad inherited value: the flags' choices are checked by argparse
        level, fmt = "info", "text"
    os.environ[LEVEL_ENV], os.environ[FORMAT_ENV] = level, fmt
    if role is not None:
        _identity["role"] = role
    handler = next((h for h in log.handlers if isinstance(h, ConsoleHandler)), None)
    if handler is None:
        handler = ConsoleHandler()
        log.addHandler(handler)
        log.propagate = False  # a host application's root handlers would print every line twice
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.to_stderr = to_stderr
    log.setLevel(level.upper())


def set_island(island: str | None, rank: int | None) -> None:
    """Name this process's island and local rank in every later line."""
    _identity["island"], _identity["rank"] = island, rank


def info(line: str) -> None:
    """Log one event line at INFO (the callable handed to modules that take a `log`)."""
    log.info(line)


class Heartbeat:
    """Says "still <what> (N s)" whenever the process has been silent HEARTBEAT_S seconds while
    doing `what`; `doing(None)` makes it quiet. One daemon thread, started on first use."""

    def __init__(self, every_s: float = HEARTBEAT_S) -> None:
        self.every_s = every_s
        self._what: str | None = None
        self._since = self._last = time.monotonic()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def doing(self, what: str | None) -> None:
        """What the process does now (e.g. "building the model"); None: nothing worth a line."""
        with self._lock:
            if what != self._what:
                self._since = time.monotonic()
            self._what = what
            if self._thread is None and what is not None:
                self._thread = threading.Thread(target=self._run, name="atoll-heartbeat", daemon=True)
                self._thread.start()

    def spoke(self) -> None:
        """The process just printed a line (a log line or a progress line): the silence restarts."""
        self._last = time.monotonic()

    def _run(self) -> None:
        while True:
            time.sleep(min(1.0, self.every_s / 4))
            with self._lock:
                now, what = time.monotonic(), self._what
                due = what is not None and now - self._last >= self.every_s
            if due:
                self._last = now
                log.info(f"atoll: still {what} ({now - self._since:.0f} s)")


heartbeat = Heartbeat()
