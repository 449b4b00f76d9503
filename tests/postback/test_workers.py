"""postback.workers.WorkerPool with real spawned processes: restart with backoff, shutdown, cleanup.

The workers' code lives in a module written to the test's tmp dir (spawned children import
their target by name; the parent's sys.path reaches them). Each worker start appends
"index pid monotonic-time" to a record file, so the tests see every (re)start.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest

from postback.workers import Backoff, WorkerPool

ROOT = Path(__file__).resolve().parents[2]
WAIT_S = 30.0  # bound of every wait here; the normal case takes well under a second or two

WORKER_CODE = '''
import os, signal, sys, time


def _record(path, index):
    with open(path, "a") as out:
        out.write(f"{index} {os.getpid()} {time.monotonic()}\\n")


def sleeper(path, index):
    """Runs until a signal; dies of SIGTERM (no handler), like a worker still booting."""
    _record(path, index)
    time.sleep(600)


def graceful(path, index, code_on_term=0):
    """Exits with `code_on_term` on SIGTERM."""
    signal.signal(signal.SIGTERM, lambda *_: os._exit(code_on_term))
    _record(path, index)
    time.sleep(600)


def crasher(path, index, crash_index, after_s=0.0):
    """Index `crash_index` exits with 3 after `after_s`; the others behave like `graceful`."""
    if index != crash_index:
        graceful(path, index)
        return
    _record(path, index)
    time.sleep(after_s)
    os._exit(3)


def stubborn(path, index):
    """Ignores SIGTERM: only SIGKILL ends it."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _record(path, index)
    time.sleep(600)
'''


@pytest.fixture
def helpers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """The workers' module, importable here and in the spawned children (a unique name per test)."""
    name = f"pool_workers_{os.getpid()}_{time.monotonic_ns()}"
    (tmp_path / f"{name}.py").write_text(WORKER_CODE)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module(name)
    yield module
    sys.modules.pop(name, None)


@pytest.fixture
def pools() -> Iterator[list[WorkerPool]]:
    """Pools made by a test; closed afterwards (kills and reaps whatever a failed test left)."""
    made: list[WorkerPool] = []
    yield made
    for pool in made:
        pool.close()


def starts(record: Path) -> list[tuple[int, int, float]]:
    """(index, pid, monotonic time) of every worker start so far."""
    if not record.exists():
        return []
    return [(int(i), int(p), float(t)) for i, p, t in (line.split() for line in record.read_text().splitlines())]


def step_until(pool: WorkerPool, predicate: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f}s waiting for {what}"
        pool.step(0.05)


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"


def make(pools: list[WorkerPool], target: Callable[..., object], args_for: Callable[[int], tuple], count: int,
         **options: object) -> WorkerPool:
    pool = WorkerPool("test", target, args_for, count, handle_signals=False, **options)  # type: ignore[arg-type]
    pools.append(pool)
    pool.start()
    return pool


def test_a_worker_that_dies_is_restarted_in_its_slot_after_the_backoff(helpers, pools, tmp_path) -> None:
    record = tmp_path / "starts"
    pool = make(pools, helpers.graceful, lambda i: (str(record), i), 2, backoff=Backoff(0.4, 5.0, 60.0))
    step_until(pool, lambda: len(starts(record)) == 2, "both workers to start")
    first = pool.pids()
    victim = first[0]
    assert victim and first[1]
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    step_until(pool, lambda: len(starts(record)) == 3, "a replacement worker")
    index, pid, started = starts(record)[-1]
    assert index == 0 and pid not in first
    assert started - killed_at >= 0.4 - 0.05  # not before the backoff
    assert pool.pids() == [pid, first[1]]  # the other worker was left alone
    assert pool.restarts() == [1, 0]
    assert pool.exit_codes() == [[-signal.SIGKILL], []]
    pool.stop()
    assert pool.run(0.1) == 0
    assert pool.exit_codes() == [[-signal.SIGKILL, 0], [0]]
    assert all(gone(p) for p in (victim, pid, first[1]))


def delays(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The backoff of every restart the pool announced, as logged ("0.2s", ...)."""
    return [r.getMessage().rsplit(" ", 1)[1] for r in caplog.records if "; restarting in " in r.getMessage()]


def test_a_crashing_worker_backs_off_exponentially_up_to_the_cap(helpers, pools, tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, "postback.workers")
    record = tmp_path / "starts"
    pool = make(pools, helpers.crasher, lambda i: (str(record), i, 0), 2, backoff=Backoff(0.2, 0.8, 60.0))
    step_until(pool, lambda: len([s for s in starts(record) if s[0] == 0]) >= 5, "five starts of worker 0")
    times = [t for i, _, t in starts(record) if i == 0]
    gaps = [b - a for a, b in zip(times, times[1:])]
    for gap, delay in zip(gaps, [0.2, 0.4, 0.8, 0.8]):  # doubling, capped at 0.8
        assert gap >= delay - 0.05, (gaps, delay)
    assert delays(caplog)[:4] == ["0.2s", "0.4s", "0.8s", "0.8s"]
    codes = pool.exit_codes()[0]
    assert len(codes) >= 4 and set(codes) == {3}
    assert pool.restarts()[1] == 0 and pool.pids()[1] is not None  # the healthy worker kept running

    pool.stop()
    at_stop = pool.restarts()
    began = time.monotonic()
    pool.run(0.1)  # 0 or 1: a crasher that was running when the signal came exits 3 (a failure while stopping)
    assert time.monotonic() - began < WAIT_S
    assert pool.restarts() == at_stop, "a worker was restarted after shutdown began"
    time.sleep(0.3)  # a worker spawned just before the stop may still be writing its record
    assert len(starts(record)) <= sum(at_stop) + 2  # every process ever started is one the pool started
    assert all(gone(pid) for _, pid, _ in starts(record))


def test_the_backoff_starts_over_after_a_worker_stayed_up(helpers, pools, tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, "postback.workers")
    record = tmp_path / "starts"
    # Worker 0 crashes after 0.5 s each time; it counts as healthy after 0.3 s, so every restart waits 0.2 s.
    pool = make(pools, helpers.crasher, lambda i: (str(record), i, 0, 0.5), 1, backoff=Backoff(0.2, 10.0, 0.3))
    step_until(pool, lambda: len(starts(record)) >= 5, "five starts")
    assert delays(caplog)[:4] == ["0.2s"] * 4  # without the reset: 0.2, 0.4, 0.8, 1.6
    pool.stop()
    pool.run(0.1)
    assert all(gone(pid) for _, pid, _ in starts(record))


def test_a_worker_that_ignores_sigterm_is_killed_after_the_timeout_and_the_code_says_so(helpers, pools,
                                                                                        tmp_path) -> None:
    record = tmp_path / "starts"
    pool = make(pools, helpers.stubborn, lambda i: (str(record), i), 2, stop_timeout_s=1.0)
    step_until(pool, lambda: len(starts(record)) == 2, "both workers to start")
    pids = pool.pids()
    began = time.monotonic()
    pool.stop()
    assert pool.run(0.1) == 1
    assert 0.9 <= time.monotonic() - began < WAIT_S
    assert pool.exit_codes() == [[-signal.SIGKILL], [-signal.SIGKILL]]
    assert all(gone(p) for p in pids if p)


def test_a_worker_failing_on_shutdown_makes_the_code_non_zero(helpers, pools, tmp_path) -> None:
    record = tmp_path / "starts"
    pool = make(pools, helpers.graceful, lambda i: (str(record), i, 0 if i else 5), 2)
    step_until(pool, lambda: len(starts(record)) == 2, "both workers to start")
    pool.stop()
    assert pool.run(0.1) == 1
    assert pool.exit_codes() == [[5], [0]]


def test_close_kills_and_reaps_every_worker(helpers, tmp_path) -> None:
    record = tmp_path / "starts"
    pool = WorkerPool("test", helpers.stubborn, lambda i: (str(record), i), 3, handle_signals=False)
    try:
        pool.start()
        step_until(pool, lambda: len(starts(record)) == 3, "three workers to start")
    finally:
        pool.close()
    assert all(gone(pid) for _, pid, _ in starts(record))
    pool.close()  # idempotent


SUPERVISOR = '''
import logging, sys
sys.path.insert(0, {tmp!r})
from postback.workers import Backoff, supervise
import {module} as helpers

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    sys.exit(supervise("demo", helpers.{target}, lambda i: ({record!r}, i), 2, backoff=Backoff(0.2, 1.0, 60.0),
                       stop_timeout_s=10.0))
'''


@pytest.mark.parametrize("target", ["sleeper", "graceful"])
def test_sigterm_to_the_parent_stops_every_worker_and_restarts_none(helpers, tmp_path, target: str) -> None:
    """The real thing: `supervise` in its own process, SIGTERM to it (workers without a handler
    die of the forwarded SIGTERM: a clean stop too). Also checks that a crash before that was
    restarted and logged with index, pid and exit code."""
    record = tmp_path / "starts"
    script = tmp_path / "supervisor.py"
    script.write_text(SUPERVISOR.format(tmp=str(tmp_path), module=helpers.__name__, target=target,
                                        record=str(record)))
    log = tmp_path / "supervisor.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(script)], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + WAIT_S
        while len(starts(record)) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        index, victim, _ = starts(record)[0]
        os.kill(victim, signal.SIGKILL)
        while len(starts(record)) < 3:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        stopped_at = time.monotonic()
        assert proc.wait(timeout=WAIT_S) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        for _, pid, _ in starts(record):  # never leave a worker behind, even when the test failed
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)
    text = log.read_text()
    assert f"demo worker {index} (pid {victim}) exited with -9; restarting in 0.2s" in text
    assert starts(record)[2][0] == index
    assert f"demo worker {index} restarted (pid {starts(record)[2][1]}, restart #1)" in text
    assert len(starts(record)) == 3 and all(t < stopped_at for _, _, t in starts(record))
    assert all(gone(pid) for _, pid, _ in starts(record))
