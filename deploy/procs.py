"""Process and port helpers shared by the local Kafka and ClickHouse services.

Every wait here is bounded: callers pass a timeout and get a `TimeoutError` that says
what was being waited for, never a hang.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    """An ephemeral port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def resolve_port(port: int, host: str = "127.0.0.1") -> int:
    """`port` itself, or a free ephemeral port when it is 0."""
    return port or free_port(host)


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def pid_alive(pid: int | None) -> bool:
    """True when `pid` runs and is not a zombie."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except (OSError, IndexError):
        return True


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def terminate(pid: int, timeout: float = 30.0) -> bool:
    """SIGTERM the process group led by `pid`, SIGKILL it after `timeout`.

    Returns True when it ended on SIGTERM. Services are started in their own session, so
    the group holds the service and anything it forked.
    """
    if not pid_alive(pid):
        return True
    _signal_group(pid, signal.SIGTERM)
    try:
        wait_until(lambda: not pid_alive(pid), timeout, f"pid {pid} to exit")
        return True
    except TimeoutError:
        _signal_group(pid, signal.SIGKILL)
        wait_until(lambda: not pid_alive(pid), 10.0, f"pid {pid} to die on SIGKILL")
        return False


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def stop_processes(procs: list, timeout: float = 30.0) -> None:
    """SIGTERM every still-running `subprocess.Popen` first, then wait for each; SIGKILL after `timeout`.

    Signalling all before waiting lets them shut down in parallel (test teardowns).
    """
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def die_with_parent() -> None:
    """`preexec_fn` for children that must not outlive their parent (test services).

    Linux's PR_SET_PDEATHSIG delivers SIGTERM to the child when the parent dies, even
    by SIGKILL, so a crashed test session leaks no broker or server.
    """
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1


def children(pid: int) -> list[int]:
    """Direct children of `pid` (listed per creating thread in /proc)."""
    kids: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return kids
    for tid in tasks:
        with contextlib.suppress(OSError, ValueError):
            kids.extend(int(k) for k in Path(f"/proc/{pid}/task/{tid}/children").read_text().split())
    return kids


def start_time(pid: int) -> str | None:
    """Start time of `pid` in clock ticks since boot: tells a process from a reused pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def alive_since(pid: int, started: str | None) -> bool:
    """`pid` is still the process we saw (same start time, unless `started` is None) and not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return False
    return stat[0] != "Z" and (started is None or stat[19] == started)


def cmdline(pid: int) -> str:
    """The command line of `pid`, space-separated; "" when it is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def tail(path: Path, lines: int = 30) -> str:
    """The last lines of a log file, for error messages."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"
