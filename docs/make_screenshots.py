"""The README's screenshots of the status page and of a report, made from real runs.

    python docs/make_screenshots.py             # writes docs/status.png and docs/report.png (needs Debian's chromium)
    python docs/make_screenshots.py report      # only docs/report.png

Runs `atoll simulate` with 3 islands of the debug model (H = 4, a validation loss every 8 steps):
island-2 is killed (-9) once outer step 4 is logged and island-3 starts after outer step 2 and
joins. Once island-3 is a member and island-2 is gone (the events then show a death and a join),
and every member has reported its numbers since, headless Chromium renders the page at 1280x900
into docs/status.png; then the run is stopped.

The report: `atoll simulate` of 3 islands of the debug model for 400 steps (H = 4, a validation
loss every 20 steps, a checkpoint every 100), island-3 started after outer step 4 and island-2
killed once outer step 40 is logged; then `atoll report` of its directory, rendered by headless
Chromium at 1280 pixels wide into docs/report.png.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "status.png"
REPORT_OUT = REPO / "docs" / "report.png"
TIMEOUT_S = 300


def main() -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("make_screenshots.py needs headless Chromium (Debian: apt-get install chromium)")
    which = sys.argv[1:] or ["status", "report"]
    if set(which) - {"status", "report"}:
        raise SystemExit("usage: python docs/make_screenshots.py [status] [report]")
    if "status" in which:
        status_page(chromium)
    if "report" in which:
        report(chromium)


def report(chromium: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = f"{tmp}/run"
        subprocess.run(
            [sys.executable, "-m", "atoll.cli", "simulate", "--islands", "3", "--run-dir", run_dir, "configs/debug.toml",
             "--train.steps", "400", "--diloco.inner_steps", "4", "--eval.every", "20", "--eval.batches", "1",
             "--checkpoint.every", "100", "--metrics.log_every", "4", "--mesh.heartbeat_interval_s", "0.5",
             "--mesh.heartbeat_timeout_s", "3", "--start", "island-3@4", "--signal", "island-2=kill@40"],
            cwd=REPO, check=True, stdout=subprocess.DEVNULL, timeout=TIMEOUT_S, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        subprocess.run([sys.executable, "-m", "atoll.cli", "report", run_dir, "--out", f"{tmp}/report.html"], cwd=REPO, check=True,
                       timeout=TIMEOUT_S)
        subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={tmp}/chromium",
             "--window-size=1280,2640", f"--screenshot={REPORT_OUT}", f"file://{tmp}/report.html"],
            check=True, capture_output=True, timeout=120,
        )
    print(f"wrote {REPORT_OUT.relative_to(REPO)}")


def status_page(chromium: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        command = [
            sys.executable, "-m", "atoll.cli", "simulate", "--islands", "3", "--run-dir", f"{tmp}/run", "configs/debug.toml",
            "--train.steps", "4000", "--diloco.inner_steps", "4", "--eval.every", "8", "--eval.batches", "1",
            "--checkpoint.at_end", "false", "--metrics.log_every", "4", "--mesh.heartbeat_interval_s", "0.5",
            "--mesh.heartbeat_timeout_s", "3", "--signal", "island-2=kill@4", "--start", "island-3@2",
        ]
        run = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
        lines: list[str] = []
        threading.Thread(target=lambda: lines.extend(run.stdout), daemon=True).start()
        try:
            url = wait("the status page's address", lambda: status_address(lines))
            wait("island-3 joined and island-2 gone, every member's numbers fresh", lambda: settled(url))
            subprocess.run(
                [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={tmp}/chromium",
                 "--window-size=1280,900", f"--screenshot={OUT}", url],
                check=True, capture_output=True, timeout=120,
            )
        finally:
            run.send_signal(signal.SIGTERM)  # simulate stops its islands
            try:
                run.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(run.pid, signal.SIGKILL)
                run.wait()
    print(f"wrote {OUT.relative_to(REPO)}")


def settled(url: str) -> bool:
    """island-3 is a member, island-2 is gone, and every member has sent a loss and a validation loss."""
    with urllib.request.urlopen(url + ".json", timeout=10) as response:
        members = {m["island"]: m for m in json.load(response)["members"]}
    joined = members.get("island-3", {}).get("in_epoch") and "island-2" not in members
    return bool(joined) and all("loss" in m and "val_loss" in m for m in members.values())


def status_address(lines: list[str]) -> str | None:
    for line in lines:
        found = re.search(r"(http://\S+/status)", line)
        if found:
            return found.group(1)
    return None


def wait(what: str, probe):
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.2)
    raise SystemExit(f"make_screenshots.py: not seen within {TIMEOUT_S}s: {what}")


if __name__ == "__main__":
    main()
