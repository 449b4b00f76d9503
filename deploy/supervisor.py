"""Supervise the pipeline's processes: start, restart with backoff, report, stop in order.

Why a supervisor of our own: `postback run` must work on a bare machine (no systemd, no
Docker) and stop cleanly on Ctrl-C. A child that exits unexpectedly is restarted after
1, 2, 4 ... 30 s (the backoff resets once it has run for a minute). Stopping sends
SIGTERM in pipeline order (ingester first, so nothing new is accepted; the sink last,
so it writes what the processors emitted) and SIGKILLs only after a timeout.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("supervisor")

BACKOFF_MAX_S = 30.0
HEALTHY_AFTER_S = 60.0


@dataclass
class Child:
    name: str
    argv: list[str]
    log_file: Path
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    backoff_s: float = 1.0
    started_at: float = 0.0
    restart_at: float | None = None
    exit_codes: list[int] = field(default_factory=list)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Supervisor:
    def __init__(self, children: Sequence[Child], env: dict[str, str]) -> None:
        self.children = list(children)
        self.env = env
        self.stopping = False

    def _spawn(self, child: Child) -> None:
        child.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(child.log_file, "ab") as out:
            child.proc = subprocess.Popen(child.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, start_new_session=True)
        child.started_at = time.monotonic()
        child.restart_at = None
        log.info("started %s (pid %d), log %s", child.name, child.proc.pid, child.log_file)

    def start_all(self) -> None:
        for child in self.children:
            self._spawn(child)

    def check(self) -> list[str]:
        """Restart what died (after its backoff); returns human-readable events."""
        events = []
        now = time.monotonic()
        for child in self.children:
            if self.stopping or child.proc is None or child.running:
                continue
            if child.restart_at is None:
                code = child.proc.returncode
                child.exit_codes.append(code)
                if now - child.started_at > HEALTHY_AFTER_S:
                    child.backoff_s = 1.0
                child.restart_at = now + child.backoff_s
                events.append(f"{child.name} exited with {code}; restarting in {child.backoff_s:.0f}s")
                child.backoff_s = min(child.backoff_s * 2, BACKOFF_MAX_S)
            elif now >= child.restart_at:
                child.restarts += 1
                self._spawn(child)
                events.append(f"{child.name} restarted (restart #{child.restarts})")
        return events

    def stop_all(self, timeout: float = 30.0) -> dict[str, int | None]:
        """SIGTERM each child in order, waiting for each; SIGKILL after `timeout`. Returns exit codes."""
        self.stopping = True
        codes: dict[str, int | None] = {}
        for child in self.children:
            if child.proc is None:
                continue
            if child.running:
                try:
                    os.killpg(child.proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
                try:
                    child.proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    log.warning("%s did not stop in %.0fs; killing it", child.name, timeout)
                    os.killpg(child.proc.pid, signal.SIGKILL)
                    child.proc.wait(timeout=10)
            codes[child.name] = child.proc.returncode
        return codes
