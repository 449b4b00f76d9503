"""Keep N worker processes of one kind running; stop them all on SIGTERM/SIGINT.

Why: the ingester and the processors scale out as N identical processes (one event loop
per core; the kernel or the Kafka group spreads the work). A worker can die on its own:
an OOM kill, a crash, or on purpose (a processor exits when an agent fails, so that a
fresh process resumes from the last commit). Without a supervisor, a dead worker is
simply gone and the service runs on fewer processes, or none, until someone notices.

What `WorkerPool` guarantees:

- `start()` runs `count` processes from the spawn context, worker `i` running
  `target(*args_for(i))`; nothing is shared with the parent but those pickled arguments.
- A worker that exits while no shutdown was asked for is restarted in the same slot (same
  index, so the same arguments) after a backoff: `initial_s`, doubling up to `max_s`;
  the backoff starts again from `initial_s` once a worker had stayed up `healthy_after_s`.
  Every exit and restart is logged with the index, pid and exit code.
- Shutdown begins with the first SIGTERM/SIGINT (when `handle_signals`) or `stop()`: the
  signal goes to every live worker, no worker is started or restarted from then on, and
  after `stop_timeout_s` whatever still runs is SIGKILLed. Every wait is bounded.
- `run()` returns 0 when every worker running at the time shutdown began exited cleanly
  (0, or died of the forwarded signal: a worker still booting has no handler yet), else 1.
- Leaving the pool's `with` block, `run()` included, leaves no worker behind and restores
  the signal handlers it replaced.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import wait as wait_for_ready
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any

log = logging.getLogger("postback.workers")

#: Exit codes that mean "stopped as asked" once shutdown began, besides 0 and -signal.
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@dataclass(frozen=True)
class Backoff:
    """Delay before restarting a worker that exited: `initial_s`, doubling up to `max_s`.

    A worker that had run for `healthy_after_s` before it exited is restarted after
    `initial_s` again: one crash a day is not a crash loop.
    """

    initial_s: float = 0.5
    max_s: float = 30.0
    healthy_after_s: float = 60.0

    def __post_init__(self) -> None:
        if not 0 < self.initial_s <= self.max_s:
            raise ValueError(f"backoff needs 0 < initial_s <= max_s, got {self.initial_s} and {self.max_s}")


@dataclass
class _Slot:
    """One worker index: its current process and its restart state."""

    index: int
    process: BaseProcess | None = None
    started_at: float = 0.0
    delay_s: float = 0.0
    restart_at: float | None = None
    restarts: int = 0
    exit_codes: list[int | None] = field(default_factory=list)


class WorkerPool:
    """`count` processes running `target(*args_for(index))`, restarted when they die (see the module doc).

    Use it from the main thread (signal handlers can only be installed there) as
    `with WorkerPool(...) as pool: pool.start(); return pool.run()`, or call `supervise`.
    """

    def __init__(self, name: str, target: Callable[..., object], args_for: Callable[[int], tuple[Any, ...]],
                 count: int, *, backoff: Backoff = Backoff(), stop_timeout_s: float = 30.0,
                 handle_signals: bool = True) -> None:
        if count < 1:
            raise ValueError(f"a worker pool needs at least one worker, got {count}")
        self.name = name
        self.target = target
        self.args_for = args_for
        self.backoff = backoff
        self.stop_timeout_s = stop_timeout_s
        self.handle_signals = handle_signals
        self._ctx = multiprocessing.get_context("spawn")
        self._slots = [_Slot(i, delay_s=backoff.initial_s) for i in range(count)]
        self._signal = 0
        self._stop_deadline: float | None = None
        self._stopping_pids: set[int] = set()  # workers that were running when shutdown began
        self._failed = False  # a worker ended badly during shutdown (bad exit code, or killed)
        self._previous: dict[int, Any] = {}
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    # ------------------------------------------------------------------ state
    @property
    def stopping(self) -> bool:
        """True once shutdown began: nothing is started or restarted any more."""
        return self._stop_deadline is not None

    def pids(self) -> list[int | None]:
        """The pid of each index's live worker (None while it waits for its restart)."""
        return [s.process.pid if s.process is not None and s.process.is_alive() else None for s in self._slots]

    def restarts(self) -> list[int]:
        """How many times each index was restarted."""
        return [s.restarts for s in self._slots]

    def exit_codes(self) -> list[list[int | None]]:
        """Every exit code seen per index, oldest first (for diagnostics and tests)."""
        return [list(s.exit_codes) for s in self._slots]

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Install the signal handlers (if asked) and start every worker."""
        if self.handle_signals:
            for sig in _STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        for slot in self._slots:
            if not self.stopping:
                self._spawn(slot)

    def stop(self, signum: int = signal.SIGTERM) -> None:
        """Begin (or repeat) shutdown: send `signum` to every live worker; restart none from now on.

        Safe from a signal handler or another thread. The deadline for the workers to exit
        is set by the first call.
        """
        if self._stop_deadline is None:
            self._signal = signum
            self._stop_deadline = time.monotonic() + self.stop_timeout_s
        for slot in self._slots:
            proc = slot.process
            if proc is not None and proc.pid is not None and proc.exitcode is None:
                self._stopping_pids.add(proc.pid)
                try:
                    os.kill(proc.pid, signum)
                except ProcessLookupError:
                    pass
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):
            pass

    def step(self, timeout: float) -> bool:
        """Supervise for up to `timeout` seconds: reap exits, restart what is due, enforce the stop deadline.

        Returns False once shutdown began and no worker is left (then `run` is done).
        """
        now = time.monotonic()
        waits = [timeout]
        waits += [slot.restart_at - now for slot in self._slots if slot.restart_at is not None and not self.stopping]
        if self._stop_deadline is not None:
            waits.append(self._stop_deadline - now)
        sentinels: list[Any] = [s.process.sentinel for s in self._slots
                                if s.process is not None and s.process.exitcode is None]
        wait_for_ready([*sentinels, self._wake_r], timeout=max(0.0, min(waits)))
        try:
            while os.read(self._wake_r, 64):
                pass
        except (BlockingIOError, OSError):
            pass
        self._reap()
        now = time.monotonic()
        if self._stop_deadline is None:
            for slot in self._slots:
                if slot.restart_at is not None and now >= slot.restart_at and not self.stopping:
                    slot.restarts += 1
                    self._spawn(slot)
                    log.warning("%s worker %d restarted (pid %s, restart #%d)", self.name, slot.index,
                                slot.process.pid if slot.process else None, slot.restarts)
            return True
        if now >= self._stop_deadline:
            self._kill_all(f"did not exit within {self.stop_timeout_s:.0f}s of the stop signal")
        return any(s.process is not None for s in self._slots)  # an exited one is judged by the next _reap

    def run(self, poll_s: float = 1.0) -> int:
        """Supervise until shutdown is over; returns 0 when it was clean, else 1 (see the module doc)."""
        while self.step(poll_s):
            pass
        codes = [s.exit_codes[-1] if s.exit_codes else None for s in self._slots]
        if self._failed:
            log.error("%s workers did not all stop cleanly; last exit codes %s", self.name, codes)
            return 1
        log.info("%s workers stopped (exit codes %s)", self.name, codes)
        return 0

    def close(self) -> None:
        """Kill any worker still running, wait for it (bounded), restore the signal handlers. Idempotent."""
        if self._stop_deadline is None:
            self._stop_deadline = time.monotonic()
        self._kill_all("still running when the pool closed")
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._wake_r = self._wake_w = -1

    # ------------------------------------------------------------------ internals
    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if not self.stopping:
            log.info("%s: got signal %d; stopping %d worker(s)", self.name, signum, len(self._slots))
        self.stop(signum)

    def _spawn(self, slot: _Slot) -> None:
        proc = self._ctx.Process(target=self.target, args=self.args_for(slot.index),
                                 name=f"{self.name}-{slot.index}")
        proc.start()
        slot.process, slot.started_at, slot.restart_at = proc, time.monotonic(), None
        log.info("%s worker %d started (pid %s)", self.name, slot.index, proc.pid)
        if self.stopping and proc.pid is not None and proc.pid not in self._stopping_pids:
            self.stop(self._signal)  # the signal came while this one was being started: it stops too

    def _reap(self) -> None:
        """Note every worker that exited since the last look; schedule its restart unless stopping."""
        now = time.monotonic()
        for slot in self._slots:
            proc = slot.process
            if proc is None or slot.restart_at is not None or proc.is_alive():
                continue
            proc.join(0)
            code = proc.exitcode
            slot.exit_codes.append(code)
            slot.process = None
            if self.stopping:
                clean = code == 0 or (code is not None and -code in (self._signal, *_STOP_SIGNALS))
                if proc.pid in self._stopping_pids and not clean:
                    self._failed = True
                (log.info if clean else log.error)("%s worker %d (pid %s) exited with %s while stopping",
                                                   self.name, slot.index, proc.pid, code)
                continue
            if now - slot.started_at >= self.backoff.healthy_after_s:
                slot.delay_s = self.backoff.initial_s
            slot.restart_at = now + slot.delay_s
            log.error("%s worker %d (pid %s) exited with %s; restarting in %.1fs", self.name, slot.index,
                      proc.pid, code, slot.delay_s)
            slot.delay_s = min(slot.delay_s * 2, self.backoff.max_s)

    def _kill_all(self, why: str) -> None:
        for slot in self._slots:
            proc = slot.process
            if proc is None or proc.exitcode is not None:
                continue
            if proc.is_alive():
                log.error("%s worker %d (pid %s) %s; killing it", self.name, slot.index, proc.pid, why)
                self._failed = True
                proc.kill()
            proc.join(10)
        self._reap()


def supervise(name: str, target: Callable[..., object], args_for: Callable[[int], tuple[Any, ...]],
              count: int, **options: Any) -> int:
    """Run a `WorkerPool` until SIGTERM/SIGINT and its shutdown are over; returns its exit code.

    `options` are `WorkerPool`'s keyword arguments (backoff, stop_timeout_s, handle_signals).
    """
    with WorkerPool(name, target, args_for, count, **options) as pool:
        pool.start()
        return pool.run()

