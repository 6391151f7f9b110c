"""Network namespaces, their TUN links and the kernel's rate limiter, through iproute2.

One namespace per island (and one for the coordinator), named `atoll-<pid>-<run>-<role>` after the
process that created it, so a later run can tell its own namespaces from those a killed run left.
Each namespace has its loopback up and one TUN device, `wan0`, whose other end is a file
descriptor held by the delay line (`atoll.wan.delay_line`): the namespace has no other interface
and no default route, so its traffic can only reach the other namespaces of the same run.

Failure semantics: missing root, /dev/net/tun or iproute2 is a UserError (one line, checked before
anything is created). A failing `ip`/`tc` command raises RuntimeError with its own message, except
the rate limiter, whose failure is returned as one line for the caller to print (the link then
runs at the delay line's speed). Deleting a namespace first kills every process left inside it
and never raises for one that is already gone.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import re
import shutil
import signal
import struct
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from atoll.errors import UserError

NETNS_DIR = Path("/run/netns")
NAME_PREFIX = "atoll"
STALE_NAME = re.compile(rf"{NAME_PREFIX}-(\d+)-")
TUN_DEVICE = "/dev/net/tun"
LINK_NAME = "wan0"
COMMAND_TIMEOUT_S = 10

# linux/if_tun.h and sched.h: a layer-3 TUN device without the 4-byte packet-info header.
TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
CLONE_NEWNET = 0x40000000

T = TypeVar("T")


def privilege_problem() -> str | None:
    """Why namespaces cannot be made here (one line), or None when they can."""
    if os.geteuid() != 0:
        return "the emulated WAN (--wan-rate/--wan-delay) needs root to create network namespaces: run as root or drop the --wan-* flags"
    if not os.access(TUN_DEVICE, os.R_OK | os.W_OK):
        return f"the emulated WAN (--wan-rate/--wan-delay) needs {TUN_DEVICE} (TUN support): load the tun module or drop the --wan-* flags"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"the emulated WAN (--wan-rate/--wan-delay) needs the `{tool}` command (iproute2): install it or drop the --wan-* flags"
    return None


def require_privileges() -> None:
    """Raise UserError saying what is missing when namespaces cannot be made here."""
    problem = privilege_problem()
    if problem is not None:
        raise UserError(problem)


def namespace_name(run: int, role: str) -> str:
    """The name of this process's namespace for `role` in its `run`-th emulated WAN."""
    return f"{NAME_PREFIX}-{os.getpid()}-{run}-{role}"


def _command(*args: str) -> str:
    result = subprocess.run(args, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise RuntimeError(f"`{' '.join(args)}` failed: {detail[0] if detail else f'exit {result.returncode}'}")
    return result.stdout


def list_namespaces() -> list[str]:
    """Names of all named network namespaces on this machine."""
    return sorted(p.name for p in NETNS_DIR.iterdir()) if NETNS_DIR.is_dir() else []


def create_namespace(name: str) -> None:
    """A fresh namespace with its loopback up; an old one of the same name is removed first."""
    if name in list_namespaces():
        delete_namespace(name)
    _command("ip", "netns", "add", name)
    _command("ip", "-n", name, "link", "set", "lo", "up")


def delete_namespace(name: str) -> None:
    """Kill every process inside `name`, then delete it (its TUN devices vanish with it)."""
    if name not in list_namespaces():
        return
    for pid in _command("ip", "netns", "pids", name).split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    _command("ip", "netns", "delete", name)


def remove_stale_namespaces() -> list[str]:
    """Delete the namespaces of earlier runs whose creating process is dead; returns their names."""
    stale = []
    for name in list_namespaces():
        match = STALE_NAME.match(name)
        if match and not _alive(int(match.group(1))):
            delete_namespace(name)
            stale.append(name)
    return stale


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_in_namespace(name: str, fn: Callable[[], T]) -> T:
    """Call `fn` in a thread that has entered namespace `name` and return its result.

    Sockets and devices that `fn` creates belong to that namespace for good; the caller's own
    thread never changes namespace. Exceptions from `fn` are re-raised here.
    """
    result: list[T] = []
    error: list[BaseException] = []

    def enter_and_call() -> None:
        try:
            with open(NETNS_DIR / name) as handle:
                if _libc().setns(handle.fileno(), CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns into network namespace {name} failed")
            result.append(fn())
        except BaseException as err:  # handed to the caller's thread
            error.append(err)

    thread = threading.Thread(target=enter_and_call, name=f"atoll-netns-{name}")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def open_tun(namespace: str) -> int:
    """Create TUN device `wan0` inside `namespace`; returns its file descriptor (non-blocking).

    The device lives as long as this descriptor (or a copy of it in another process) is open.
    """

    def create() -> int:
        fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", LINK_NAME.encode(), IFF_TUN | IFF_NO_PI))
        except OSError:
            os.close(fd)
            raise
        return fd

    return run_in_namespace(namespace, create)


def configure_link(namespace: str, address: str, prefix_len: int, mtu: int) -> None:
    """Give `wan0` in `namespace` its address and MTU and bring it up."""
    _command("ip", "-n", namespace, "addr", "add", f"{address}/{prefix_len}", "dev", LINK_NAME)
    _command("ip", "-n", namespace, "link", "set", LINK_NAME, "mtu", str(mtu), "up")


def limit_rate(namespace: str, rate_bps: int, burst_bytes: int, limit_bytes: int) -> str | None:
    """Shape `wan0`'s egress in `namespace` with tbf; returns None, or one line saying why not."""
    try:
        _command(
            "tc", "-n", namespace, "qdisc", "replace", "dev", LINK_NAME, "root", "tbf",
            "rate", f"{rate_bps}bit", "burst", str(burst_bytes), "limit", str(limit_bytes),
        )
    except (RuntimeError, subprocess.TimeoutExpired) as err:
        return f"atoll: tbf rate limit on {namespace} failed, link is not rate-limited ({err})"
    return None
