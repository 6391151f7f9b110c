"""Several islands on this machine: `atoll simulate` and `atoll demo`.

Starts a coordinator in a thread and N islands as child processes (each an `atoll train
--coordinator ...`, itself torchrun for L > 1 local ranks), prefixes their output with the island
id, and stops everything if any island fails. Each island writes RUN_DIR/island-<i>/.

With an emulated WAN (`--wan-rate`/`--wan-delay`, see `atoll.wan`) each island runs in its own
network namespace, its gloo bound to the emulated link, and the coordinator listens in a namespace
of its own on the emulated network; the namespaces are deleted when the run ends, however it ends.
If the delay line itself dies, the islands fail at their store or collective timeouts.

Rehearsing failures: a `Scenario` (a TOML file, `--scenario`, and/or `--fault`/`--start` flags)
kills (-9), stops (SIGSTOP) or terminates islands, or makes their weights NaN or scales them, at
given inner steps or as a given outer step's
all-reduce starts (each island fires its own faults, see `atoll.faults`), and starts new or
returning islands, or signals them from outside (`cont` wakes a stopped island; one the run has
dropped meanwhile exits, saying so), once the run has logged a given outer step. Islands with
signals or faults that end or stop them are expendable (nan and scale do neither: those islands
must finish like the others):
their death or hang is not a run failure, and the run succeeds when every other island finishes;
islands still stopped then are killed. The coordinator writes the membership event log to
RUN_DIR/membership.jsonl.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from atoll.atomic import atomic_write
from atoll.comm.allreduce import ring_bytes
from atoll.config import MeshConfig, tomllib
from atoll.errors import UserError
from atoll.faults import FAULTS_ENV, SURVIVABLE_ACTIONS, Fault, parse_faults
from atoll.logs import info as log_line
from atoll.logs import log
from atoll.mesh.auth import TOKEN_ENV, new_token, run_token
from atoll.mesh.coordinator import Coordinator
from atoll.mesh.membership import Rules
from atoll.mesh.status import status_url
from atoll.wan.namespaces import run_in_namespace
from atoll.wan.network import EmulatedWan

LOOPBACK = "127.0.0.1"
EVENTS_FILE = "membership.jsonl"
WAIT_INTERVAL_S = 0.2


@dataclass(frozen=True)
class Start:
    """Start island `island` (new, or one that left) once any island has logged outer step `after_outer`."""

    island: str
    after_outer: int


SIGNALS = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP, "cont": signal.SIGCONT}
STOPPING = ("kill", "stop")
"""The signals that take a member out of the run (what a scenario's keep_alive holds back)."""
COORDINATOR = "coordinator"
"""The target of the `restart` signal: the simulated coordinator is crashed and started again
on the same ports with the same journal (what an operator restarting it would do)."""


@dataclass(frozen=True)
class Signal:
    """Send `action` (kill, stop or cont) to island `island`'s processes once any island has logged outer step `after_outer`
    (a kill or stop later, while the scenario's keep_alive holds it)."""

    island: str
    action: str
    after_outer: int


@dataclass
class Scenario:
    """Scripted faults and starts for `atoll simulate`.

    TOML form:

        [[fault]]
        island = "island-1"
        action = "kill"          # kill (-9), stop (SIGSTOP), term (SIGTERM: a clean leave), nan or scale (weights)
        at = "allreduce:2"       # or "inner:N": after inner step N; scale takes a factor, "inner:8:100"

        [[start]]
        island = "island-3"      # a new id, or an id that left earlier (it comes back)
        after_outer = 2

        [[signal]]
        island = "island-1"
        action = "cont"          # kill, stop or cont, sent by the launcher
        after_outer = 4

        [[signal]]
        island = "coordinator"   # the coordinator: crashed and started again from its journal
        action = "restart"
        after_outer = 6

        keep_alive = 2           # a kill or stop waits until the run would keep this many members
    """

    faults: dict[str, list[Fault]] = field(default_factory=dict)
    starts: list[Start] = field(default_factory=list)
    signals: list[Signal] = field(default_factory=list)
    keep_alive: int = 0
    """A kill or stop signal waits (and every later signal with it) until the current epoch keeps at
    least this many members without its target: islands started by the scenario count only once
    admitted, however fast the others train."""

    def add_signal(self, island: str, action: str, after_outer: int) -> None:
        if island == COORDINATOR and action != "restart":
            raise UserError(f"signal {action!r} for the coordinator: it takes only restart")
        if island != COORDINATOR and action not in SIGNALS:
            raise UserError(f"signal {action!r} for {island}: choose from {sorted(SIGNALS)} (restart is for the coordinator)")
        self.signals.append(Signal(island, action, after_outer))

    def add_fault(self, island: str, spec: str) -> None:
        self.faults.setdefault(island, []).extend(parse_faults(spec))

    @staticmethod
    def parse(path: Path | None, fault_flags: list[str], start_flags: list[str], signal_flags: list[str] = ()) -> Scenario:
        """A scenario file plus `--fault ISLAND=ACTION@POINT:N`, `--start ISLAND@OUTER` and
        `--signal ISLAND=ACTION@OUTER` flags; bad input is a UserError."""
        scenario = Scenario()
        if path is not None:
            try:
                raw = tomllib.loads(path.read_text())
                for fault in raw.get("fault", []):
                    scenario.add_fault(str(fault["island"]), f"{fault['action']}@{fault['at']}")
                for start in raw.get("start", []):
                    scenario.starts.append(Start(str(start["island"]), int(start["after_outer"])))
                for sent in raw.get("signal", []):
                    scenario.add_signal(str(sent["island"]), str(sent["action"]), int(sent["after_outer"]))
                scenario.keep_alive = int(raw.get("keep_alive", 0))
            except (OSError, tomllib.TOMLDecodeError, KeyError, TypeError, ValueError) as err:
                raise UserError(f"scenario {path}: {type(err).__name__}: {err}") from None
        for flag in fault_flags:
            island, sep, spec = flag.partition("=")
            if not sep:
                raise UserError(f"--fault {flag!r} is not ISLAND=ACTION@POINT:N (e.g. island-1=kill@inner:5)")
            scenario.add_fault(island, spec)
        for flag in start_flags:
            island, sep, outer = flag.partition("@")
            if not sep or not outer.isdigit():
                raise UserError(f"--start {flag!r} is not ISLAND@OUTER_STEP (e.g. island-3@2)")
            scenario.starts.append(Start(island, int(outer)))
        for flag in signal_flags:
            island, sep, rest = flag.partition("=")
            action, at, outer = rest.partition("@")
            if not sep or not at or not outer.isdigit():
                raise UserError(f"--signal {flag!r} is not ISLAND=ACTION@OUTER_STEP (e.g. island-1=cont@4)")
            scenario.add_signal(island, action, int(outer))
        return scenario


def island_command(config: str | None, overrides: list[str], address: str, island: str, run_dir: Path, procs: int, resume: bool = False) -> list[str]:
    """The `atoll train` command line of one simulated island (with `resume`, resumed from its newest
    checkpoint when it has one; an island without checkpoints starts afresh and receives the run's state)."""
    has_checkpoints = any((run_dir / island / "checkpoints").glob("step-*"))
    return [
        sys.executable, "-m", "atoll.cli", "train", *([config] if config else []), *overrides,
        "--coordinator", address, "--island-id", island, "--run-dir", str(run_dir / island),
        "--nproc", str(procs), "--metrics.progress", "plain", *(["--resume"] if resume and has_checkpoints else []),
    ]


def _relay(stream: IO[str], prefix: str) -> None:
    for line in stream:
        sys.stdout.write(f"[{prefix}] {line}")
        sys.stdout.flush()


def simulate(
    config: str | None, overrides: list[str], islands: int, procs: int, run_dir: Path, wan: EmulatedWan | None = None,
    mesh: MeshConfig | None = None, scenario: Scenario | None = None, resume: bool = False,
) -> int:
    """Run `islands` islands of `procs` local ranks to completion; returns 0 if all succeeded.

    `resume` continues the stopped run in `run_dir`: the old coordinator's journal is set aside
    (membership.journal.N: that run ended, or its coordinator died with it) and a new coordinator
    forms epoch 0 of islands resumed from their checkpoints, which continue from the newest.
    `wan`, when given (not yet started), is started here and closed before returning. `mesh`
    gives the coordinator its heartbeat timeout and report grace; `scenario` scripts faults and
    late starts (islands with kill, stop or term faults may die or hang without failing the run).
    """
    # SIGTERM and Ctrl-C must unwind through the finally below, or the islands (own sessions)
    # outlive us; a parent that ignored or blocked SIGINT (a background job, a test harness) must not
    # take Ctrl-C away from the run.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    mesh = mesh or MeshConfig()
    scenario = scenario or Scenario()
    if wan is not None and scenario.starts:
        raise UserError("scripted starts cannot run on an emulated WAN (it has one namespace per initial island): drop --start or the --wan options")
    threads_per_rank = max(1, (os.cpu_count() or 1) // (islands * procs))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads_per_rank), "PYTHONUNBUFFERED": "1"}
    env.pop(FAULTS_ENV, None)
    env[TOKEN_ENV] = run_token(mesh.token) or new_token()  # a simulated run is authenticated too
    children: dict[str, subprocess.Popen] = {}
    retired: list[subprocess.Popen] = []
    relays = []
    coordinator = None
    expendable = {island for island, faults in scenario.faults.items() if any(f.action not in SURVIVABLE_ACTIONS for f in faults)}
    expendable |= {s.island for s in scenario.signals}
    failed: list[str] = []

    def launch(index: int, name: str) -> None:
        """Start island `name`; a returning island's new life runs without the scripted faults."""
        cmd = island_command(config, overrides, coordinator.address, name, run_dir, procs, resume and name not in children)
        returning = name in children
        faults = [] if returning else scenario.faults.get(name, [])
        child_env = {**env, FAULTS_ENV: ",".join(f.to_text() for f in faults)}
        if wan is not None:
            cmd, child_env = wan.island_command(index, cmd), {**child_env, **wan.island_env()}
        if returning:
            retired.append(children.pop(name))
            expendable.discard(name)
        child = subprocess.Popen(cmd, env=child_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        children[name] = child
        relay = threading.Thread(target=_relay, args=(child.stdout, name), daemon=True)
        relay.start()
        relays.append(relay)

    pending = sorted(scenario.starts, key=lambda s: s.after_outer)
    signals = sorted(scenario.signals, key=lambda s: s.after_outer)
    killed_in: int | None = None
    """The epoch in which the launcher last killed or stopped a member (keep_alive waits for a newer one)."""

    def start_due() -> None:
        if not signals and not pending:
            return  # nothing scripted: do not re-read every island's metrics on each tick
        reached = _outer_steps_logged(run_dir)
        nonlocal coordinator, killed_in
        while signals and signals[0].after_outer <= reached:
            epoch = coordinator.epoch
            if signal_waits(signals[0], epoch.members if epoch else (), epoch.number if epoch else None, scenario.keep_alive, killed_in):
                break  # on a later tick
            sent = signals.pop(0)
            if sent.action in STOPPING and epoch is not None and sent.island in epoch.members:
                killed_in = epoch.number
            if sent.island == COORDINATOR:
                log_line("atoll: restarting the coordinator")
                coordinator = _restart_coordinator(coordinator, islands, wan, mesh, run_dir / EVENTS_FILE, env[TOKEN_ENV])
                continue
            child = children.get(sent.island)
            if child is not None and child.poll() is None:
                log_line(f"atoll: sending {sent.action} to {sent.island}")
                os.killpg(child.pid, SIGNALS[sent.action])
        while pending and pending[0].after_outer <= reached:
            previous = children.get(pending[0].island)
            if previous is not None and previous.poll() is None:
                return  # its earlier life is still leaving: start it on a later tick
            launch(islands, pending.pop(0).island)

    if resume:
        set_aside_journal((run_dir / EVENTS_FILE).with_suffix(".journal"))
    try:
        if wan is not None:
            wan.start()
        coordinator = _start_coordinator(islands, wan, mesh, run_dir / EVENTS_FILE, env[TOKEN_ENV])
        key = None if coordinator.status_open else coordinator.status_key
        log_line(f"atoll: status page {status_url(coordinator.host, coordinator.port, key)} while the run lasts "
                 f"(or `atoll status {coordinator.address}`)")
        for i in range(islands):
            launch(i, f"island-{i}")
        failed = _wait_all(children, expendable, start_due, lambda: bool(pending))
    finally:
        for child in [*children.values(), *retired]:
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
        for relay in relays:
            relay.join(timeout=5)
        if coordinator is not None:
            coordinator.stop()
        if wan is not None:
            wan.close()
    if failed:
        log.error(f"atoll: {', '.join(failed)} failed; run dir {run_dir}")
        return 1
    return 0


def set_aside_journal(journal: Path) -> None:
    """Rename a stopped run's coordinator journal to the first free `<name>.N`, so a new coordinator starts afresh."""
    if not journal.is_file():
        return
    n = 1
    while journal.with_name(f"{journal.name}.{n}").exists():
        n += 1
    journal.rename(journal.with_name(f"{journal.name}.{n}"))


def _outer_steps_logged(run_dir: Path) -> int:
    """The highest outer step any island has logged so far (0 before the first)."""
    best = 0
    for path in run_dir.glob("island-*/metrics.jsonl"):
        for line in path.read_text().splitlines():
            if '"outer_step"' in line:
                try:
                    best = max(best, json.loads(line)["outer_step"])
                except (json.JSONDecodeError, KeyError):
                    continue  # a line being written
    return best


def signal_waits(sent: Signal, members: tuple[str, ...] | list[str], number: int | None, keep_alive: int, killed_in: int | None) -> bool:
    """Whether a kill or stop must wait under `keep_alive`: while the member the launcher last
    killed (in epoch `killed_in`) still counts, the current epoch being `number`; or while the
    current epoch's `members` without its target are fewer than `keep_alive` (a joiner not yet
    admitted)."""
    if not keep_alive or sent.action not in STOPPING:
        return False
    if killed_in is not None and (number is None or number <= killed_in):
        return True
    return len([m for m in members if m != sent.island]) < keep_alive


def _start_coordinator(
    islands: int, wan: EmulatedWan | None, mesh: MeshConfig, events: Path, token: str, port: int = 0,
) -> Coordinator:
    """On loopback; or, with a WAN, listening inside its own namespace on the emulated network."""
    rules = Rules(mesh.heartbeat_timeout_s, mesh.report_grace_s, mesh.evict_after)

    def make(host: str) -> Coordinator:
        return Coordinator(host, port, islands, rules, events, token, events.with_suffix(".journal"))

    if wan is None:
        return make(LOOPBACK).start()
    return run_in_namespace(wan.coordinator_namespace, lambda: make(wan.coordinator_host)).start()


def _restart_coordinator(old: Coordinator, islands: int, wan: EmulatedWan | None, mesh: MeshConfig, events: Path, token: str) -> Coordinator:
    """Crash `old` (every connection closes, its memory is gone) and start another on its port from its journal."""
    port = old.port
    old.stop()
    return _start_coordinator(islands, wan, mesh, events, token, port)


def _wait_all(
    children: dict[str, subprocess.Popen],
    expendable: set[str] = frozenset(),
    tick: Callable[[], None] = lambda: None,
    more_to_start: Callable[[], bool] = lambda: False,
) -> list[str]:
    """Wait until every island that is not expendable has exited (every island, if all are
    expendable), and nothing is left to start; on the first failure of one of them stop all the others. Returns the failed ids.

    `children` may gain islands while waiting (`tick` starts the scripted ones).
    """
    while True:
        tick()
        required = {name: child for name, child in children.items() if name not in expendable}
        for name, child in required.items():
            code = child.poll()
            if code not in (None, 0):
                for other in children.values():
                    if other.poll() is None:
                        os.killpg(other.pid, signal.SIGTERM)
                return [name]
        awaited = required or children  # when every island may fail, wait for them all to end
        if all(child.poll() is not None for child in awaited.values()) and not more_to_start():
            return []
        time.sleep(WAIT_INTERVAL_S)


def read_records(island_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (island_dir / "metrics.jsonl").read_text().splitlines()]


SUMMARY_FILE = "summary.json"


def island_summaries(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Per island: final loss and val_loss, bytes sent against data-parallel's, outer steps, median
    sync time (training blocked), median overlap time (the all-reduce behind training,
    diloco.overlap_steps), the fragments averaged (diloco.fragments) and mean utilization (`trained_steps` 0: a joiner that entered at the last
    outer step)."""
    out: dict[str, dict[str, Any]] = {}
    for island_dir in sorted(run_dir.glob("island-*")):
        if not (island_dir / "run.json").is_file() or not (records := read_records(island_dir)):
            continue  # an island killed before it logged anything
        if not (trained := [r for r in records if "loss" in r]):
            out[island_dir.name] = {"trained_steps": 0}
            continue
        info = json.loads((island_dir / "run.json").read_text())
        last = trained[-1]
        outer = [r for r in records if "outer_step" in r]
        val = [r["val_loss"] for r in records if "val_loss" in r]
        ddp_bytes = last["step"] * ring_bytes(info["params"]["total"], 4, last["world_size"])
        out[island_dir.name] = {
            "trained_steps": last["step"], "loss": last["loss"], "val_loss": val[-1] if val else None, "tokens": last.get("tokens"),
            "bytes_sent": last["bytes_sent"], "ddp_bytes": ddp_bytes, "outer_steps": len(outer),
            "fragments": len({r["fragment"] for r in outer if r.get("fragment") is not None}) or 1,
            "median_sync_s": statistics.median(r["sync_s"] for r in outer) if outer else None,
            "median_overlap_s": statistics.median(r.get("overlap_s", 0.0) for r in outer) if outer else None,
            "mean_utilization": statistics.mean(r["utilization"] for r in outer) if outer else None,
        }
    return out


def megabytes(count: int) -> str:
    """`count` bytes in MB: one decimal, or three significant digits under 1 MB (a topk run's
    outer steps send kilobytes, which one decimal shows as 0.0)."""
    mb = count / 1e6
    return f"{mb:.1f}" if mb >= 1 else f"{mb:.3g}"


def summary_line(name: str, s: dict[str, Any]) -> str:
    """One island's line of the run summary."""
    if not s["trained_steps"]:
        return f"{name}: entered at the run's last outer step; it trained no steps"
    line = (
        f"{name}: loss {s['loss']:.4f}" + (f", val_loss {s['val_loss']:.4f}" if s["val_loss"] is not None else "") + "; "
        f"sent {megabytes(s['bytes_sent'])} MB vs {megabytes(s['ddp_bytes'])} MB for data-parallel "
        f"({s['ddp_bytes'] / max(s['bytes_sent'], 1):.0f}x fewer)"
    )
    if s["outer_steps"]:
        overlap = f", overlap {s['median_overlap_s']:.3f} s" if s.get("median_overlap_s") else ""
        fragments = f" over {s['fragments']} fragments" if s.get("fragments", 1) > 1 else ""
        line += f"; {s['outer_steps']} outer steps{fragments}, median sync {s['median_sync_s']:.3f} s{overlap}, utilization {s['mean_utilization']:.1%}"
    return line


def summarize(run_dir: Path) -> str:
    """Final losses, bytes per island against data-parallel, sync time and utilization."""
    return "\n".join(summary_line(name, s) for name, s in island_summaries(run_dir).items())


def report_command(run_dir: Path) -> str:
    """The command that draws the run's plots (`atoll.report`)."""
    return f"atoll report {run_dir}"


def write_summary(run_dir: Path, outcome: str) -> Path:
    """RUN_DIR/summary.json: the summary's numbers per island, the outcome line and the report command."""
    path = run_dir / SUMMARY_FILE
    summary = {"outcome": outcome, "run_dir": str(run_dir), "islands": island_summaries(run_dir), "report": report_command(run_dir)}
    atomic_write(path, lambda f: f.write(json.dumps(summary, indent=2).encode()))
    return path
