"""The coordinator's read-only views of the run: /status, /status.json, /metrics, /healthz, `atoll status`.

In-process tests drive a coordinator on loopback with real protocol clients (islands as
`CoordinatorClient`s). The off-loopback test binds the coordinator inside a network namespace of
its own (root; it skips with the reason otherwise). The browser test runs a live `atoll simulate`
and loads its page in headless Chromium (Debian's `chromium`; it skips with the reason where
that is absent).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import REPO, free_port
from prometheus_client.parser import text_string_to_metric_families

from atoll.mesh.auth import status_key
from atoll.mesh.client import CoordinatorClient, Heartbeat, new_incarnation, register, wait_for_admission
from atoll.mesh.coordinator import Coordinator
from atoll.mesh.membership import Rules
from atoll.mesh.status import island_numbers, render_text
from atoll.wan.namespaces import create_namespace, delete_namespace, namespace_name, privilege_problem, run_in_namespace

LOOPBACK = "127.0.0.1"
TOKEN = "status-test-token"
POLL_S = 0.05
WAIT_S = 30.0
"""Longest wait for a state the coordinator reaches within seconds (a bounded poll, not a timing assertion)."""
BROWSER_TIMEOUT_S = 60
RUN_TIMEOUT_S = 180


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def status_json(address: str) -> dict:
    code, body = get(f"http://{address}/status.json")
    assert code == 200, body
    return json.loads(body)


def wait_for(what: str, probe, timeout_s: float = WAIT_S):
    """Poll `probe()` until it returns something truthy (bounded); fail saying `what` otherwise."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(POLL_S)
    pytest.fail(f"not seen within {timeout_s}s: {what}")


class Island:
    """An island as `join_mesh` makes it: registered, beating on its own connection."""

    def __init__(self, address: str, name: str) -> None:
        incarnation = new_incarnation()
        self.main = CoordinatorClient(address, name, incarnation, TOKEN, 5, 10.0, "main", log=lambda line: None)
        register(self.main, 1, {"model": "debug"})
        beat = CoordinatorClient(address, name, incarnation, TOKEN, 5, 10.0, "beat", log=lambda line: None)
        self.heartbeat = Heartbeat(beat, 0.2)

    def arrive(self, epoch: int, step: int, numbers: dict) -> threading.Thread:
        """Reach outer step `step`'s boundary barrier with `numbers`, in the background (it waits for the others)."""
        args = {"epoch": epoch, "name": f"outer-{step}", "numbers": numbers, "wait_s": 5}
        thread = threading.Thread(target=self.main.call, args=("barrier", args, 5), daemon=True)
        thread.start()
        return thread

    def die(self) -> None:
        """As kill -9 would: every connection closes, no deathrattle."""
        self.heartbeat.stop()
        self.main.close()


def members(snap: dict) -> dict[str, dict]:
    return {m["island"]: m for m in snap["members"]}


def status_when(address: str, what: str, holds, timeout_s: float = WAIT_S) -> dict:
    """The first /status.json for which `holds(snapshot)` (polled, bounded)."""
    def probe() -> dict | None:
        snap = status_json(address)
        return snap if holds(snap) else None

    return wait_for(what, probe, timeout_s)


def test_island_numbers_keep_known_finite_numbers_only():
    raw = {"loss": 2.5, "val_loss": float("nan"), "step": 8, "outer_step": True, "tokens_per_s": "fast", "secret": 1.0, "bytes_sent": 10**6}
    assert island_numbers(raw) == {"loss": 2.5, "step": 8, "bytes_sent": 10**6}
    assert island_numbers(["not", "a", "dict"]) == {}


def test_status_json_metrics_and_page_show_every_island_with_its_numbers_and_follow_a_death_a_join_and_a_restart(tmp_path):
    port = free_port()
    journal, events = tmp_path / "membership.journal", tmp_path / "membership.jsonl"

    def start() -> Coordinator:
        return Coordinator(LOOPBACK, port, 2, Rules(heartbeat_timeout_s=5), events, TOKEN, journal).start()

    coordinator = start()
    address = coordinator.address
    islands = []
    try:
        islands = [Island(address, "island-a"), Island(address, "island-b")]
        for island in islands:
            assert wait_for_admission(island.main, -1, lambda line: None).number == 0
        numbers = [{"loss": 3.25, "val_loss": 3.5, "step": 4, "outer_step": 1, "tokens_per_s": 5000.0, "utilization": 0.8, "bytes_sent": 2.5e6},
                   {"loss": 3.75, "step": 4, "outer_step": 1}]
        for thread in [island.arrive(0, 2, n) for island, n in zip(islands, numbers)]:
            thread.join(timeout=10)

        snap = status_json(address)
        assert (snap["run_id"], snap["epoch"], snap["world"]) == (coordinator.run_id, 0, 2)
        seen = members(snap)
        assert set(seen) == {"island-a", "island-b"}
        assert seen["island-a"]["state"] == "outer_step"  # at outer step 2's boundary, nothing committed yet
        assert (seen["island-a"]["loss"], seen["island-a"]["bytes_sent"], seen["island-b"]["loss"]) == (3.25, 2.5e6, 3.75)
        assert seen["island-a"]["incarnation"] == islands[0].main.incarnation and seen["island-a"]["address"] == LOOPBACK
        assert [e["reason"] for e in snap["events"]] == ["start"]

        code, text = get(f"http://{address}/metrics")
        families = {f.name: f for f in text_string_to_metric_families(text)}
        assert code == 200 and families["atoll_epoch"].samples[0].value == 0
        losses = {s.labels["island"]: s.value for s in families["atoll_island_loss"].samples}
        assert losses == {"island-a": 3.25, "island-b": 3.75}
        in_outer = {s.labels["island"] for s in families["atoll_island_state"].samples if s.labels["state"] == "outer_step" and s.value == 1}
        assert in_outer == {"island-a", "island-b"}
        assert families["atoll_island_sent_bytes"].type == "counter"

        code, page = get(f"http://{address}/status")
        assert code == 200 and "island-a" in page and "island-b" in page and "3.2500" in page and "<script" not in page
        assert get(f"http://{address}/healthz") == (200, "ok\n")
        assert "island-a" in render_text(snap) and "epoch 0" in render_text(snap)

        islands[1].die()  # b is dropped once its control connection stays closed past its grace
        snap = status_when(address, "island-b dropped", lambda s: "island-b" not in members(s))
        assert snap["epoch"] == 1 and snap["events"][-1]["left"] == {"island-b": "its control connection closed (process gone)"}

        joiner = Island(address, "island-c")
        islands.append(joiner)
        assert "fetch" in joiner.main.call("admission", {"after": -1, "wait_s": 0})
        assert members(status_json(address))["island-c"]["state"] == "fetching"
        joiner.main.call("ready", {"step": -1})
        assert (members(status_json(address))["island-c"]["state"], members(status_json(address))["island-c"]["in_epoch"]) == ("joining", False)
        islands[0].arrive(1, 3, {"loss": 3.0}).join(timeout=10)  # a member at the boundary admits the ready joiner
        snap = status_when(address, "island-c admitted", lambda s: members(s).get("island-c", {}).get("in_epoch"))
        assert (snap["epoch"], set(members(snap)), snap["events"][-1]["joined"]) == (2, {"island-a", "island-c"}, ["island-c"])

        boot = snap["boot"]
        coordinator.stop()  # a crash: every connection closes; a new coordinator takes up the journal
        coordinator = start()
        snap = status_json(address)
        assert (snap["run_id"], snap["epoch"], set(members(snap)), snap["coordinator"]["resumed"]) == (coordinator.run_id, 2, {"island-a", "island-c"}, True)
        assert snap["boot"] != boot
        assert [e["reason"] for e in snap["events"]] == ["start", "departed", "joined"]  # read back from membership.jsonl
        wait_for("the islands beat the restarted coordinator", lambda: all(m["address"] for m in status_json(address)["members"]))
    finally:
        for island in islands:
            island.die()
        coordinator.stop()


PROBLEM = privilege_problem()


@pytest.mark.skipif(PROBLEM is not None, reason=PROBLEM or "")
def test_the_read_paths_refuse_a_request_without_the_status_key_on_a_non_loopback_bind():
    namespace = namespace_name(0, "status")
    create_namespace(namespace)
    host = "10.77.0.1"  # not a loopback address, on the namespace's own lo: nothing outside reaches it
    subprocess.run(["ip", "-n", namespace, "addr", "add", f"{host}/32", "dev", "lo"], check=True, timeout=10)
    coordinators = []
    try:
        closed = run_in_namespace(namespace, lambda: Coordinator(host, 0, 1, token=TOKEN)).start()
        public = run_in_namespace(namespace, lambda: Coordinator(host, 0, 1, token=TOKEN, public_status=True)).start()
        coordinators += [closed, public]
        key = status_key(TOKEN)

        def ask(coordinator: Coordinator, path: str, headers: dict[str, str] | None = None) -> int:
            return run_in_namespace(namespace, lambda: get(f"http://{coordinator.address}{path}", headers))[0]

        for path in ("/status", "/status.json", "/metrics"):
            assert ask(closed, path) == 401
            assert ask(closed, path + "?key=wrong") == 401
            assert ask(closed, path, {"Authorization": f"Bearer {status_key('another token')}"}) == 401
            assert ask(closed, f"{path}?key={key}") == 200
            assert ask(closed, path, {"Authorization": f"Bearer {key}"}) == 200
            assert ask(public, path) == 200
        assert ask(closed, "/healthz") == 200  # says only that it serves
        assert closed.refused == 9 and "without the status key" in closed.refusals[-1]["what"]
        assert ask(closed, f"/status?key={key}") == 200
        page = run_in_namespace(namespace, lambda: get(f"http://{closed.address}/status?key={key}"))[1]
        assert f'href="/status.json?key={key}"' in page  # the page's links keep the key
    finally:
        for coordinator in coordinators:
            coordinator.stop()
        delete_namespace(namespace)


# --- a live run in a real browser ---------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def rendered(url: str, profile: Path) -> str:
    """The page's DOM after headless Chromium loaded it."""
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}", "--dump-dom", url],
        capture_output=True, text=True, timeout=BROWSER_TIMEOUT_S,
    )
    assert result.returncode == 0 and "<html" in result.stdout, result.stderr[-2000:]
    return result.stdout


def page_islands(dom: str) -> set[str]:
    return set(re.findall(r'<tr data-island="([^"]+)"', dom))


def island_pids(run_dir: Path, island: str) -> list[int]:
    """Processes of `island` in this run (their command lines name its run directory)."""
    needle = str(run_dir / island).encode()
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and needle in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def leftover(run_dir: Path) -> list[int]:
    return [pid for island in ("island-0", "island-1", "island-2", "island-3") for pid in island_pids(run_dir, island)]


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (Debian: apt-get install chromium)")
def test_the_status_page_of_a_live_run_in_a_browser_names_every_island_and_follows_a_kill_and_a_join(tmp_path):
    run_dir, profile = tmp_path / "run", tmp_path / "chromium"
    command = [
        sys.executable, "-m", "atoll.cli", "simulate", "--islands", "3", "--run-dir", str(run_dir), "configs/debug.toml",
        "--train.steps", "2000", "--diloco.inner_steps", "4", "--schedule.warmup_steps", "2", "--eval.every", "4",
        "--eval.batches", "1", "--checkpoint.at_end", "false", "--metrics.log_every", "4",
        "--mesh.heartbeat_interval_s", "0.5", "--mesh.heartbeat_timeout_s", "3",
        "--fault", "island-2=kill@inner:1000000",  # never fires: it makes island-2 one the run survives losing
        "--start", "island-3@2",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(run.stdout), daemon=True)
    reader.start()
    deadline = time.monotonic() + RUN_TIMEOUT_S
    try:
        line = wait_for("the status page's address", lambda: next((x for x in output if "status page http://" in x), None), 60)
        url = re.search(r"(http://\S+/status)", line).group(1)
        address = url.removeprefix("http://").removesuffix("/status")

        def all_three_with_losses(snap: dict) -> bool:
            seen = members(snap)
            return all("loss" in seen.get(i, {}) for i in ("island-0", "island-1", "island-2"))

        snap = status_when(address, "three islands with losses on the page", all_three_with_losses, 90)
        first = rendered(url, profile)
        assert {"island-0", "island-1", "island-2"} <= page_islands(first)
        epoch = re.search(r'<b id="epoch">(\d+)</b>', first).group(1)
        assert int(epoch) >= snap["epoch"]
        assert re.search(r'<td class="n">\d\.\d{4}</td>', first), "no loss on the page"

        code, text = get(f"http://{address}/metrics")
        families = {f.name: f for f in text_string_to_metric_families(text)}
        assert {s.labels["island"] for s in families["atoll_island_loss"].samples} >= {"island-0", "island-1", "island-2"}

        for pid in island_pids(run_dir, "island-2"):
            os.kill(pid, signal.SIGKILL)
        gone = status_when(address, "island-2 dropped", lambda s: "island-2" not in members(s))
        assert any("island-2" in e["left"] for e in gone["events"])
        after = rendered(url, profile)
        assert "island-2" not in page_islands(after) and {"island-0", "island-1"} <= page_islands(after)
        assert "island-2 left: its control connection closed" in after  # the events table says why
        assert int(re.search(r'<b id="epoch">(\d+)</b>', after).group(1)) > int(epoch)

        snap = status_when(address, "island-3 admitted", lambda s: members(s).get("island-3", {}).get("in_epoch"), max(1.0, deadline - time.monotonic()))
        assert any("island-3" in e["joined"] for e in snap["events"] if e["reason"] == "joined")

        shown = subprocess.run([sys.executable, "-m", "atoll.cli", "status", address], capture_output=True, text=True, timeout=60)
        assert shown.returncode == 0 and "island-3" in shown.stdout and "island-2 left" in shown.stdout, shown.stderr
    finally:
        if run.poll() is None:
            run.send_signal(signal.SIGTERM)  # simulate's clean-up stops its islands
            try:
                run.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(run.pid, signal.SIGKILL)
                run.wait()
        reader.join(timeout=10)
        left = leftover(run_dir)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        assert left == [], "".join(output[-50:])
