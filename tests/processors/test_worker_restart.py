"""`postback process --workers 2` on the real broker: a worker that dies is replaced.

One worker process is SIGKILLed mid-stream. The parent must start a new process for the
same index (a new pid, its "started" line in the log again), and every receipt posted
before and after the kill must still end with exactly one outcome.
"""

from __future__ import annotations

import os
import re
import signal
import time

from deploy.procs import alive_since, children, cmdline, start_time

from .conftest import Pipeline, click, handled_events, raw_postback

#: Bounds of the waits here (seconds).
START_TIMEOUT_S = 120.0
RESTART_TIMEOUT_S = 60.0
OUTCOMES_TIMEOUT_S = 240.0


def _workers(parent: int) -> dict[int, str | None]:
    """The worker processes (multiprocessing spawn children) of a `postback process` parent: pid -> start time."""
    return {pid: start_time(pid) for pid in children(parent) if "spawn_main" in cmdline(pid)}


def _send_orders(pipeline: Pipeline, tag: str, orders: int, now: int) -> set[str]:
    """`orders` purchases, half of them with a click sent first, every tenth repeated; returns the receipts."""
    receipts: set[str] = set()
    for i in range(orders):
        cid = f"{tag}C{i}"
        if i % 2 == 0:
            pipeline.send_click(click(cid, now - 10_000))
        params = [("advertiser_id", "demo"), ("event", "purchase"), ("click_id", cid), ("order_id", f"{tag}O{i}"),
                  ("amount", "3.50"), ("currency", "USD")]
        pipeline.send_raw(raw_postback(params, f"{tag}R{i:05d}", now + i), key=cid)
        receipts.add(f"{tag}R{i:05d}")
        if i % 10 == 0:  # re-signed later: a Duplicate
            pipeline.send_raw(raw_postback(params, f"{tag}RR{i:05d}", now + orders + i), key=cid)
            receipts.add(f"{tag}RR{i:05d}")
    pipeline.flush()
    return receipts


def _wait(predicate, timeout: float, what: str, pipeline: Pipeline):  # noqa: ANN001, ANN202
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; logs:\n{pipeline.logs()[-4000:]}")
        time.sleep(0.3)


def test_a_killed_worker_is_restarted_and_every_receipt_has_one_outcome(pipeline: Pipeline, tmp_path) -> None:
    log = pipeline.tmp / f"worker-{len(pipeline.procs)}.log"
    parent = pipeline.start_worker(tmp_path / "state", late_click_wait=2.0, extra_args=["--workers", "2"])
    base_port = pipeline.web_ports[-1]  # worker i serves on base_port + i
    first = _wait(lambda: (lambda w: w if len(w) == 2 else None)(_workers(parent.pid)), START_TIMEOUT_S,
                  "two worker processes", pipeline)
    # Both own partitions (the leader ticks every partition each second) before there is work.
    _wait(lambda: all(handled_events(base_port + i, "attribute") > 0 for i in range(2)), START_TIMEOUT_S,
          "both workers to handle events", pipeline)

    now = int(time.time() * 1000)
    before = _send_orders(pipeline, "B", 600, now)
    _wait(lambda: len(pipeline.outputs()) >= len(before) // 4 and handled_events(base_port + 1, "verify") > 0,
          OUTCOMES_TIMEOUT_S, "outcomes from both workers", pipeline)
    victim = _pid_serving(first, base_port + 1) or sorted(first)[-1]
    os.kill(victim, signal.SIGKILL)
    after = _send_orders(pipeline, "A", 600, now + 1_000_000)

    def replaced() -> dict[int, str | None] | None:
        now_workers = _workers(parent.pid)
        new = {pid: st for pid, st in now_workers.items() if pid not in first or first[pid] != st}
        return now_workers if len(now_workers) == 2 and new else None

    current = _wait(replaced, RESTART_TIMEOUT_S, f"a new worker process in place of pid {victim}", pipeline)
    assert not alive_since(victim, first[victim])
    survivor = next(pid for pid in first if pid != victim)
    assert survivor in current and alive_since(survivor, first[survivor]), "the surviving worker was restarted too"
    assert parent.poll() is None
    (new_pid,) = set(current) - set(first)
    text = log.read_text(errors="replace")
    assert f"(pid {victim}) exited with -9; restarting in" in text, text[-3000:]  # the parent reported it
    # The replacement runs a faust worker again (its own announcement) and rejoins the group.
    announced = _wait(lambda: re.search(rf"processor worker \d+ started \(pid {new_pid}, web 127\.0\.0\.1:(\d+)\)",
                                        log.read_text(errors="replace")), START_TIMEOUT_S,
                      f"the replacement (pid {new_pid}) to start its worker", pipeline)
    _wait(lambda: handled_events(int(announced.group(1)), "attribute") > 0, START_TIMEOUT_S,
          "the replacement to handle events", pipeline)

    receipts = before | after
    out = pipeline.wait_for(receipts, timeout=OUTCOMES_TIMEOUT_S)
    assert set(out) == receipts
    for receipt, records in out.items():  # redelivered after the kill: the same outcome again, never another
        distinct = {(kind, rec.get("conversion_id"), rec.get("version"), rec.get("reason")) for kind, rec in records}
        assert len(distinct) == 1, f"{receipt} has different outcomes: {distinct}"
    duplicates = {r for r, records in out.items() if records[0][0] == "Duplicate"}
    assert duplicates == {r for r in receipts if "RR" in r}

    assert parent.poll() is None
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=60) == 0, pipeline.logs()[-4000:]
    for pid, started in current.items():
        assert not alive_since(pid, started), f"worker {pid} outlived its parent"


def _pid_serving(workers: dict[int, str | None], web_port: int) -> int | None:
    """The worker pid that listens on `web_port` (from /proc/net/tcp and the workers' socket inodes)."""
    inodes: set[str] = set()
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].split(":")[1], 16) == web_port:
                inodes.add(fields[9])
    for pid in workers:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    return pid
        except OSError:
            continue
    return None
