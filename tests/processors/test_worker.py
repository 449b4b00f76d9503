"""The faust workers end to end on the real broker: every receipt gets exactly one outcome."""

from __future__ import annotations

import collections
import shutil
import signal
import time
import urllib.request

import pytest

from .conftest import Pipeline, click, handled_events, raw_postback


def test_outcomes_attribution_late_and_missing_clicks(pipeline: Pipeline, tmp_path) -> None:
    now = int(time.time() * 1000)
    pipeline.send_click(click("C1", now - 60_000, "aff-7"))
    base = [("advertiser_id", "demo"), ("event", "purchase"), ("click_id", "C1"), ("order_id", "O1"),
            ("amount", "10.50"), ("currency", "USD"), ("status", "pending")]
    pipeline.send_raw(raw_postback(base, "R-first", now), key="C1")
    pipeline.send_raw(raw_postback(base, "R-retry", now), key="C1")  # identical signed request
    pipeline.send_raw(raw_postback(base, "R-repeat", now + 2000), key="C1")  # re-signed repeat
    approved = [p if p[0] != "status" else ("status", "approved") for p in base]
    pipeline.send_raw(raw_postback(approved, "R-approved", now + 3000), key="C1")
    pipeline.send_raw(raw_postback(base[:2] + [("order_id", "O2"), ("ts", str(now // 1000)), ("sig", "0" * 64)],
                                   "R-forged", now, sign=False))
    pipeline.send_raw(raw_postback([("advertiser_id", "demo"), ("event", "lead"), ("click_id", "LATE")],
                                   "R-late", now), key="LATE")
    pipeline.send_raw(raw_postback([("advertiser_id", "demo"), ("event", "lead"), ("click_id", "NEVER")],
                                   "R-never", now), key="NEVER")
    pipeline.flush()
    pipeline.start_worker(tmp_path / "w0", late_click_wait=4.0)
    time.sleep(1.0)
    pipeline.send_click(click("LATE", now - 1000))
    pipeline.flush()

    out = pipeline.wait_for({"R-first", "R-retry", "R-repeat", "R-approved", "R-forged", "R-late", "R-never"})
    one = {receipt: records[0] for receipt, records in out.items()}
    assert all(len(set(r["receipt_id"] for _, r in records)) == 1 for records in out.values())
    kind, first = one["R-first"]
    assert kind == "Conversion" and first["attributed"] and first["affiliate_id"] == "aff-7"
    assert first["version"] == 1 and first["status"] == "pending"
    assert one["R-retry"][0] == "Duplicate" and one["R-retry"][1]["reason"] == "retry"
    assert one["R-repeat"][0] == "Duplicate" and one["R-repeat"][1]["reason"] == "order_repeat"
    kind, upd = one["R-approved"]
    assert kind == "Conversion" and upd["version"] == 2 and upd["conversion_id"] == first["conversion_id"]
    assert one["R-forged"][0] == "Rejection" and one["R-forged"][1]["reason"] == "bad_signature"
    assert one["R-late"][1]["attribution"] == "attributed"
    assert one["R-never"][1]["attribution"] == "no_click"

    # The worker's own account, on its web port: what it handled and emitted.
    with urllib.request.urlopen(f"http://127.0.0.1:{pipeline.web_ports[0]}/metrics", timeout=10) as resp:
        metrics = resp.read().decode()
    assert 'postback_processor_events_total{agent="verify"} 7.0' in metrics
    assert 'postback_processor_outputs_total{kind="rejection"} 1.0' in metrics
    assert 'postback_processor_outputs_total{kind="duplicate"} 2.0' in metrics
    assert 'postback_processor_outputs_total{kind="conversion"} 4.0' in metrics
    assert "postback_processor_publish_failures_total 0.0" in metrics


def _workload(pipeline: Pipeline, orders: int, now: int) -> tuple[set[str], dict[str, str]]:
    """`orders` purchases plus 10% repeats; returns (all receipts, receipt -> order)."""
    receipts: set[str] = set()
    order_of: dict[str, str] = {}
    for i in range(orders):
        cid = f"CK{i}"
        if i % 2 == 0:  # clicks for odd i come late (i % 4 == 1) or never (i % 4 == 3: no_click after the wait)
            pipeline.send_click(click(cid, now - 10_000))
        params = [("advertiser_id", "demo"), ("event", "purchase"), ("click_id", cid), ("order_id", f"ORD{i}"),
                  ("amount", f"{i % 50}.25"), ("currency", "USD")]
        receipt = f"R{i:06d}"
        pipeline.send_raw(raw_postback(params, receipt, now + i), key=cid)
        receipts.add(receipt)
        order_of[receipt] = f"ORD{i}"
        if i % 10 == 0:  # a repeat, re-signed later: must become a Duplicate
            repeat = f"RR{i:06d}"
            pipeline.send_raw(raw_postback(params, repeat, now + orders + i), key=cid)
            receipts.add(repeat)
            order_of[repeat] = f"ORD{i}"
    for i in range(1, orders, 4):  # late clicks: they arrive after their conversions (attributed on arrival)
        pipeline.send_click(click(f"CK{i}", now - 5_000))
    pipeline.flush()
    return receipts, order_of


def _assert_exactly_once(out: dict, receipts: set[str], order_of: dict[str, str], orders: int) -> None:
    assert set(out) == receipts
    for receipt, records in out.items():
        distinct = {(kind, rec.get("conversion_id"), rec.get("version"), rec.get("reason")) for kind, rec in records}
        assert len(distinct) == 1, f"{receipt} has different outcomes: {distinct}"
    conversions = {rec["conversion_id"]: rec for records in out.values() for kind, rec in records
                   if kind == "Conversion"}
    per_order = collections.Counter(rec["order_id"] for rec in conversions.values())
    assert len(per_order) == orders and set(per_order.values()) == {1}
    duplicates = {r for r, records in out.items() if records[0][0] == "Duplicate"}
    assert duplicates == {r for r in receipts if r.startswith("RR")}


@pytest.mark.parametrize("state", ["kept", "wiped"])
def test_sigkill_mid_stream_then_restart(pipeline: Pipeline, tmp_path, state: str) -> None:
    orders = 3000
    receipts, order_of = _workload(pipeline, orders, int(time.time() * 1000))
    data = tmp_path / "state"
    worker = pipeline.start_worker(data, late_click_wait=2.0)
    deadline = time.monotonic() + 120
    while len(pipeline.outputs()) < len(receipts) // 4:
        assert time.monotonic() < deadline, pipeline.logs()
        time.sleep(0.3)
    worker.send_signal(signal.SIGKILL)
    worker.wait(timeout=30)
    if state == "wiped":
        shutil.rmtree(data)  # local RocksDB gone: tables must come back from their changelogs
    pipeline.start_worker(data, late_click_wait=2.0)
    out = pipeline.wait_for(receipts, timeout=240)
    _assert_exactly_once(out, receipts, order_of, orders)
    _assert_offsets_reach_the_end(pipeline)
    with urllib.request.urlopen(f"http://127.0.0.1:{pipeline.web_ports[-1]}/metrics", timeout=10) as resp:
        metrics = resp.read().decode()
    assert 'postback_processor_stream_holes_total{outcome="agent"}' not in metrics  # no record lost inside faust
    assert 'postback_processor_stream_holes_total{outcome="accepted"}' not in metrics  # nothing committed over


def _wait_until_each_owns_partitions(pipeline: Pipeline, timeout: float = 90.0) -> None:
    """Until every worker handles ticks (the leader sends one to every partition each second):
    then each has partitions of its own and has restored their tables."""
    deadline = time.monotonic() + timeout
    while not all(handled_events(port, "attribute") > 0 for port in pipeline.web_ports):
        assert time.monotonic() < deadline, pipeline.logs()
        time.sleep(0.5)


def test_two_workers_one_killed_the_other_takes_its_partitions_over(pipeline: Pipeline, tmp_path) -> None:
    """Scale-out (`postback process --workers 2` runs the same group): both workers share the
    partitions; one is SIGKILLed mid-stream, the group rebalances after its session times out,
    and the survivor restores the moved partitions' tables from their changelogs and finishes."""
    orders = 3000
    survivor = pipeline.start_worker(tmp_path / "a", late_click_wait=2.0)
    victim = pipeline.start_worker(tmp_path / "b", late_click_wait=2.0)
    _wait_until_each_owns_partitions(pipeline)  # both share the partitions before there is work
    receipts, order_of = _workload(pipeline, orders, int(time.time() * 1000))
    deadline = time.monotonic() + 120
    while len(pipeline.outputs()) < len(receipts) // 4 or handled_events(pipeline.web_ports[1], "verify") == 0:
        assert time.monotonic() < deadline, pipeline.logs()
        time.sleep(0.3)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    out = pipeline.wait_for(receipts, timeout=240)
    _assert_exactly_once(out, receipts, order_of, orders)
    _assert_offsets_reach_the_end(pipeline)
    assert survivor.poll() is None


def test_clicks_past_the_click_horizon_are_forgotten(pipeline: Pipeline, tmp_path) -> None:
    """The clicks table is bounded: a click older than the horizon is deleted by the sweep (and
    from the changelog), so its conversion ends unattributed (`no_click`) after the late-click
    wait; a click within the horizon still attributes its conversion."""
    now = int(time.time() * 1000)
    day = 86_400_000
    pipeline.send_click(click("OLD", now - 3 * day))  # within offer-1's 7-day window, past a 2-day horizon
    pipeline.send_click(click("NEW", now - 60_000))
    pipeline.flush()
    pipeline.start_worker(tmp_path / "state", late_click_wait=2.0,
                          extra_args=["--click-horizon-days", "2", "--cleanup-interval", "1"])
    deadline = time.monotonic() + 90
    metrics = ""
    while 'postback_processor_expired_entries_total{table="clicks"} 1.0' not in metrics:
        assert time.monotonic() < deadline, (metrics, pipeline.logs())
        time.sleep(0.5)
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{pipeline.web_ports[0]}/metrics", timeout=5) as resp:
                metrics = resp.read().decode()
        except OSError:  # the worker's web server is not up yet
            continue
    for receipt, click_id in (("R-old", "OLD"), ("R-new", "NEW")):
        params = [("advertiser_id", "demo"), ("event", "lead"), ("click_id", click_id)]
        pipeline.send_raw(raw_postback(params, receipt, now), key=click_id)
    pipeline.flush()
    out = pipeline.wait_for({"R-old", "R-new"})
    assert out["R-new"][0][1]["attribution"] == "attributed"
    assert out["R-old"][0][1]["attribution"] == "no_click"


def test_trickled_input_is_all_processed_and_committed(pipeline: Pipeline, tmp_path) -> None:
    """Records arriving while a batch is being published (batches flushed by time, not size):
    each must be processed once, and the group's offsets must reach the end of every input.

    Regression: setting `Stream.current_event` from the agent paired new values with old
    events inside `take_events`; records were skipped and commits stalled for good.
    """
    orders, now = 1200, int(time.time() * 1000)
    receipts: set[str] = set()
    order_of: dict[str, str] = {}
    for i in range(orders):
        pipeline.send_click(click(f"CT{i}", now - 10_000))
    pipeline.flush()
    pipeline.start_worker(tmp_path / "state", late_click_wait=2.0)
    sent = 0
    for i in range(orders):
        params = [("advertiser_id", "demo"), ("event", "purchase"), ("click_id", f"CT{i}"),
                  ("order_id", f"TORD{i}"), ("amount", "5.00"), ("currency", "USD")]
        for receipt, at in [(f"T{i:05d}", now + i)] + ([(f"RR{i:05d}", now + orders + i)] if i % 10 == 0 else []):
            pipeline.send_raw(raw_postback(params, receipt, at), key=f"CT{i}")
            receipts.add(receipt)
            order_of[receipt] = f"TORD{i}"
            sent += 1
            if sent % 10 == 0:  # a steady stream in small bursts: batches close on their time limit
                pipeline.flush()
                time.sleep(0.004)
    pipeline.flush()
    out = pipeline.wait_for(receipts, timeout=180)
    _assert_exactly_once(out, receipts, order_of, orders)
    assert all(records[0][1].get("attributed", True) for records in out.values())

    _assert_offsets_reach_the_end(pipeline)


def _assert_offsets_reach_the_end(pipeline: Pipeline) -> None:
    """Nothing is left uncommitted: no commit stalls behind a record that was never processed."""
    def caught_up(lag: dict[str, int]) -> bool:
        # Ticks (one per partition of each internal topic per second) keep their lag at a few records.
        return lag["raw-postbacks"] == 0 and lag["processor-dedupe"] <= 12 and lag["processor-attribute"] <= 12

    lag: dict[str, int] = {}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        lag = pipeline.group_lag()
        if caught_up(lag):
            break
        time.sleep(1.0)
    assert caught_up(lag), lag
