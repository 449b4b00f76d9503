"""Crash recovery of a processor worker: SIGKILLed twice mid-backlog, its RocksDB state deleted
before each restart, and still every receipt gets exactly one outcome.

A backlog of signed raw postbacks (valid purchases, re-signed repeats of earlier orders,
forged signatures and postbacks whose click arrives after them) is written before the first
worker starts, keyed as the ingester keys them. The worker's whole process tree is SIGKILLed
as soon as it has written its first outcomes, its `--data-dir` is deleted (the tables must
come back from their changelog topics) and a new worker starts with the same arguments; the
restarted worker is killed the same way once its dedupe stage has recorded orders (a new
conversion or duplicate), so that the dedupe table too is rebuilt. A third worker finishes
the backlog. Then:

- every receipt has an outcome and no unknown receipt has one;
- each receipt has exactly one distinct outcome (at-least-once allows identical repeats of
  what a killed worker wrote after its last commit; different outcomes are a failure);
- valid and late-click postbacks are Conversions, one conversion per order; the Duplicates
  are exactly the repeats (reason `order_repeat`); the Rejections exactly the forged
  signatures (reason `bad_signature`);
- the processor group's commits reach the end of its inputs (a few ticks aside): no commit
  stalls behind, or passes over, a record that was never processed;
- no stream hole was accepted by the last worker, and it exits 0 on SIGTERM;
- both kills happened before the outcomes were complete (otherwise nothing was recovered).

This is the check `processors/runtime/consumer.py` (`ContiguousConsumer`) was fixed against; the
process benchmark (`python -m bench.process`) only measures.
"""

from __future__ import annotations

import collections
import contextlib
import os
import random
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from deploy.procs import children
from deploy.providers import unique_name
from postback.partner_view import order_key

from .conftest import Pipeline, click, raw_postback

POSTBACKS = 1500
MIX = {"valid": 0.8, "duplicate": 0.1, "bad_signature": 0.05, "late_click": 0.05}
KILLS = 2
LATE_CLICK_WAIT_S = 2.0
#: The leader's timer sends a tick to each partition of both internal topics every second; a
#: commit follows within a second, so a few ticks may be uncommitted at any moment.
TICKS_IN_FLIGHT = 24
POLL_S = 0.05


@dataclass
class Workload:
    receipts: set[str] = field(default_factory=set)
    kind_of: dict[str, str] = field(default_factory=dict)  # receipt -> kind
    order_of: dict[str, str] = field(default_factory=dict)  # receipt -> order id (not for bad_signature)

    def of_kind(self, kind: str) -> set[str]:
        return {r for r, k in self.kind_of.items() if k == kind}


def _prefill(pipeline: Pipeline, n: int, seed: int = 7) -> Workload:
    """Clicks of the valid postbacks, then `n` raw postbacks in `MIX`, then the late clicks; flushed."""
    rng = random.Random(seed)
    counts = {kind: int(share * n) for kind, share in MIX.items()}
    counts["valid"] += n - sum(counts.values())
    kinds = [kind for kind, count in counts.items() for _ in range(count)]
    rng.shuffle(kinds)
    kinds.remove("valid")
    kinds.insert(0, "valid")  # a duplicate repeats an earlier valid order
    now = int(time.time() * 1000)
    base_ms = now - (n + 120) * 1000  # one second per postback, all in the past: a repeat is re-signed later
    work = Workload()
    valid_orders: list[tuple[str, str, str]] = []
    late_clicks: list[str] = []
    for i, kind in enumerate(kinds):
        receipt = f"CR{i:05d}"
        if kind == "duplicate":
            click_id, order_id, amount = rng.choice(valid_orders)
        else:
            click_id, order_id, amount = f"CRC{i:05d}", f"CRO{i:05d}", f"{rng.randrange(1, 500)}.{i % 100:02d}"
        params = [("advertiser_id", "demo"), ("event", "purchase"), ("click_id", click_id),
                  ("order_id", order_id), ("amount", amount), ("currency", "USD")]
        record = raw_postback(params, receipt, base_ms + i * 1000)
        if kind == "bad_signature":
            record["params"][-1] = {"key": "sig", "value": f"{rng.getrandbits(256):064x}"}
        if kind == "valid":
            valid_orders.append((click_id, order_id, amount))
            pipeline.send_click(click(click_id, base_ms - 60_000))
        elif kind == "late_click":
            late_clicks.append(click_id)
        keyed = order_key("demo", "purchase", order_id, None, click_id, ())
        assert keyed is not None
        pipeline.send_raw(record, key=keyed[0])
        work.receipts.add(receipt)
        work.kind_of[receipt] = kind
        if kind != "bad_signature":
            work.order_of[receipt] = order_id
    for click_id in late_clicks:
        pipeline.send_click(click(click_id, base_ms - 60_000))
    pipeline.flush()
    return work


class OutcomeCounter:
    """Outcome records so far (sums of high watermarks), with one long-lived consumer so that
    polling it often is cheap."""

    def __init__(self, pipeline: Pipeline) -> None:
        self._consumer = Consumer({"bootstrap.servers": pipeline.kafka.bootstrap_servers,
                                   "group.id": unique_name("crash-count")})
        self._topics = pipeline.topics

    def _count(self, *specs: Any) -> int:
        return sum(self._consumer.get_watermark_offsets(TopicPartition(spec.name, p), timeout=10, cached=False)[1]
                   for spec in specs for p in range(spec.partitions))

    def total(self) -> int:
        """Conversions, rejections and duplicates."""
        return self._count(self._topics.conversions, self._topics.rejections, self._topics.duplicates)

    def past_dedupe(self) -> int:
        """Conversions and duplicates: outcomes of postbacks the dedupe stage has recorded in its table."""
        return self._count(self._topics.conversions, self._topics.duplicates)

    def close(self) -> None:
        self._consumer.close()


def _kill_tree(proc: subprocess.Popen[str]) -> None:
    """SIGKILL the worker and every process below it, and reap it."""
    todo, pids = [proc.pid], []
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo.extend(children(pid))
    for pid in reversed(pids):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=30)


def _wait(predicate: Callable[[], bool], timeout: float, what: str, pipeline: Pipeline) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        for proc in pipeline.procs:
            if proc.poll() not in (None, -signal.SIGKILL, 0):
                raise AssertionError(f"a worker exited with {proc.returncode}:\n{pipeline.logs()[-3000:]}")
        assert time.monotonic() < deadline, f"{what} not within {timeout:.0f}s:\n{pipeline.logs()[-3000:]}"
        time.sleep(POLL_S)


def _check_outcomes(out: dict[str, list[tuple[str, dict[str, Any]]]], work: Workload) -> None:
    """What `out` (receipt -> every record read back for it) must be for this workload."""
    assert not work.receipts - set(out), f"{len(work.receipts - set(out))} receipts have no outcome"
    assert not set(out) - work.receipts, f"unknown receipts: {sorted(set(out) - work.receipts)[:5]}"
    conflicting = {r: {(name, rec.get("conversion_id"), rec.get("version"), rec.get("reason"),
                        rec.get("attribution")) for name, rec in records}
                   for r, records in out.items()}
    conflicting = {r: d for r, d in conflicting.items() if len(d) != 1}
    assert not conflicting, f"{len(conflicting)} receipts with different outcomes, e.g. {list(conflicting.items())[:2]}"

    expected = {"valid": "Conversion", "late_click": "Conversion", "duplicate": "Duplicate",
                "bad_signature": "Rejection"}
    wrong = collections.Counter(f"{work.kind_of[r]}->{records[0][0]}" for r, records in out.items()
                                if records[0][0] != expected[work.kind_of[r]])
    assert not wrong, f"outcome kinds not as expected: {dict(wrong)}"

    conversion_ids_per_order: dict[str, set[str]] = collections.defaultdict(set)
    for records in out.values():
        name, rec = records[0]
        if name == "Conversion":
            conversion_ids_per_order[rec["order_id"]].add(rec["conversion_id"])
    orders = {work.order_of[r] for r in work.of_kind("valid") | work.of_kind("late_click")}
    assert set(conversion_ids_per_order) == orders
    several = {o: ids for o, ids in conversion_ids_per_order.items() if len(ids) != 1}
    assert not several, f"orders with several conversions: {list(several.items())[:3]}"

    def reasons(kind: str) -> collections.Counter[str]:
        return collections.Counter(out[r][0][1]["reason"] for r in work.of_kind(kind))

    assert reasons("duplicate") == collections.Counter({"order_repeat": len(work.of_kind("duplicate"))})
    assert reasons("bad_signature") == collections.Counter({"bad_signature": len(work.of_kind("bad_signature"))})


def _committed_to_the_end(lag: dict[str, int]) -> bool:
    return (lag["raw-postbacks"] == 0 and lag["clicks"] == 0
            and lag["processor-dedupe"] + lag["processor-attribute"] <= TICKS_IN_FLIGHT)


def test_two_sigkills_with_state_deleted_give_every_receipt_exactly_one_outcome(pipeline: Pipeline,
                                                                                tmp_path) -> None:
    work = _prefill(pipeline, POSTBACKS)
    data = tmp_path / "state"
    counter = OutcomeCounter(pipeline)
    try:
        worker = pipeline.start_worker(data, late_click_wait=LATE_CLICK_WAIT_S)
        # On a backlog the stages run one after another. Kill 1 comes with the first outcomes (the
        # verify stage's rejections: only the clicks table has state); kill 2 once the restarted
        # worker's dedupe stage has recorded orders (new conversions or duplicates), so the dedupe
        # table, too, must come back from its changelog for the repeats after it.
        outputs_at_kill: list[int] = []
        past_dedupe_at_kill: list[int] = []
        _wait(lambda: counter.total() > 0, 90, "the first worker's first outcome", pipeline)
        for kill in range(KILLS):
            if kill:
                before = past_dedupe_at_kill[-1]
                _wait(lambda before=before: counter.past_dedupe() > before, 90,
                      f"worker {kill}'s first conversion or duplicate", pipeline)
            _kill_tree(worker)
            outputs_at_kill.append(counter.total())
            past_dedupe_at_kill.append(counter.past_dedupe())
            shutil.rmtree(data, ignore_errors=True)  # local RocksDB gone: the tables come back from changelogs
            worker = pipeline.start_worker(data, late_click_wait=LATE_CLICK_WAIT_S)
        # Each kill must interrupt the backlog, or there was nothing to recover (records at a kill may
        # include repeats, so this is necessary, not sufficient; the run's logs show the rest).
        expected_past_dedupe = len(work.receipts - work.of_kind("bad_signature"))
        assert outputs_at_kill[-1] < POSTBACKS and past_dedupe_at_kill[-1] < expected_past_dedupe, (
            f"a kill came after the backlog was done: outcome records at the kills {outputs_at_kill}, "
            f"conversions and duplicates {past_dedupe_at_kill}")

        try:
            out = pipeline.wait_for(work.receipts, timeout=120)
        except AssertionError as exc:
            raise AssertionError(f"after kills at {outputs_at_kill} outcome records ({past_dedupe_at_kill} "
                                 f"conversions and duplicates): {exc}") from None
        _check_outcomes(out, work)

        lag: dict[str, int] = {}

        def caught_up() -> bool:
            lag.update(pipeline.group_lag())
            return _committed_to_the_end(lag)

        with contextlib.suppress(AssertionError):
            _wait(caught_up, 30, "commits at the end of the inputs", pipeline)
        assert _committed_to_the_end(lag), f"the processor group's commits did not reach the end: {lag}"

        with urllib.request.urlopen(f"http://127.0.0.1:{pipeline.web_ports[-1]}/metrics", timeout=10) as resp:
            metrics = resp.read().decode()
        assert 'postback_processor_stream_holes_total{outcome="agent"}' not in metrics  # nothing lost inside faust
        assert 'postback_processor_stream_holes_total{outcome="accepted"}' not in metrics  # nothing committed over

        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=60) == 0, pipeline.logs()[-3000:]
    finally:
        counter.close()
