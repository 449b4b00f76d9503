"""The ClickHouse writer and the lifecycle router against the real broker and the real ClickHouse."""

from __future__ import annotations

import collections
import time
from datetime import date
from decimal import Decimal
from pathlib import Path

import pytest
from confluent_kafka import Consumer

from deploy.clickhouse_local import ClickHouseOptions, LocalClickHouse
from deploy.procs import free_port
from deploy.providers import ClickHouseService, KafkaService, unique_name
from postback.config import Settings
from schemas.codec import Codec

from .conftest import NOW, SinkHarness, conversion, wait_until_rows


def _rejection(i: int) -> dict:
    raw = {"receipt_id": f"X{i}", "received_at_ms": NOW, "remote_ip": "127.0.0.1", "method": "GET",
           "path": "/postback", "content_type": None, "params": [{"key": "advertiser_id", "value": "acme"}],
           "body": b"", "headers": [], "ingester_id": "t"}
    return {"receipt_id": f"X{i}", "received_at_ms": NOW, "processed_at_ms": NOW + 20, "advertiser_id": "acme",
            "event": "purchase", "reason": "bad_signature", "detail": "no match", "raw": raw}


def _duplicate(i: int) -> dict:
    return {"receipt_id": f"D{i}", "first_receipt_id": f"R{i}-1-purchase", "received_at_ms": NOW,
            "processed_at_ms": NOW + 10, "advertiser_id": "acme", "event": "purchase", "order_id": f"O{i}",
            "dedupe_key": f"acme|purchase|O{i}", "reason": "order_repeat"}


def _db_client(service: ClickHouseService, database: str):
    """A client on the sink's database (created here if the sink has not yet; it migrates idempotently)."""
    service.client().command(f"CREATE DATABASE IF NOT EXISTS {database}")
    return service.client(database)


def _fill(sink: SinkHarness, n: int) -> None:
    t = sink.topics
    for i in range(n):
        sink.produce(t.conversions.name, "Conversion", conversion(i), f"conv-purchase-O{i}")
    sink.flush()


def test_rows_outcomes_refunds_and_status_changes(sink: SinkHarness, clickhouse: ClickHouseService) -> None:
    t = sink.topics
    for i in range(20):
        sink.produce(t.conversions.name, "Conversion", conversion(i, amount="10.00"), f"k{i}")
    sink.produce(t.conversions.name, "Conversion", conversion(0, amount="10.00"), "k0")  # replayed record
    sink.produce(t.conversions.name, "Conversion",  # order O1 moves approved -> rejected (version 2)
                 conversion(1, status="rejected", version=2, receipt="R1-upd"), "k1")
    sink.produce(t.conversions.name, "Conversion",  # refund of O2, nets its revenue
                 conversion(2, event="refund", sign=-1, amount="10.00", receipt="R2-refund"), "k2r")
    for i in range(3):
        sink.produce(t.rejections.name, "Rejection", _rejection(i), f"X{i}")
        sink.produce(t.duplicates.name, "Duplicate", _duplicate(i), f"D{i}")
    sink.produce(t.clicks.name, "Click", {"click_id": "C1", "clicked_at_ms": NOW - 60_000, "offer_id": "offer-1",
                                          "affiliate_id": "aff-1", "campaign_id": None, "sub1": "s", "sub2": None,
                                          "sub3": None, "sub4": None, "sub5": None, "ip": None, "user_agent": None,
                                          "referer": None, "source": "redirect", "extras": []}, "C1")
    sink.flush()
    sink.start("--only", "clickhouse")
    client = _db_client(clickhouse, sink.database)
    wait_until_rows(client, "SELECT count() FROM postback_outcomes FINAL", 20 + 2 + 6, harness=sink)
    assert client.query("SELECT count() FROM conversions FINAL").result_rows[0][0] == 21  # 20 orders + 1 refund
    net = client.query("SELECT sum(signed_amount) FROM v_conversions_net").result_rows[0][0]
    # 20 x 10.00 approved, O1 rejected (-10), O2 refunded (-10)
    assert net == Decimal("180.000000")
    outcomes = dict(client.query("SELECT outcome, count() FROM postback_outcomes FINAL GROUP BY outcome").result_rows)
    assert outcomes == {"accepted": 22, "rejected": 3, "duplicate": 3}
    assert client.query("SELECT count() FROM clicks FINAL").result_rows[0][0] == 1
    status = client.query("SELECT status, version FROM conversions FINAL WHERE order_id = 'O1' "
                          "AND event = 'purchase'").result_rows
    assert status == [("rejected", 2)]


def test_crash_between_insert_and_commit_gives_each_row_once(sink: SinkHarness,
                                                              clickhouse: ClickHouseService) -> None:
    _fill(sink, 3000)
    crashed = sink.start("--only", "clickhouse", "--batch-rows", "1000",
                         env={"POSTBACK_SINK_FAULT": "crash-after-insert"})
    assert crashed.wait(timeout=120) == 86, sink.logs()  # died after inserting, before committing
    client = _db_client(clickhouse, sink.database)
    inserted_before = client.query("SELECT count() FROM conversions").result_rows[0][0]
    assert inserted_before > 0
    sink.start("--only", "clickhouse", "--batch-rows", "1000")
    wait_until_rows(client, "SELECT count() FROM postback_outcomes FINAL", 3000, harness=sink)
    assert client.query("SELECT count(), uniqExact(conversion_id) FROM conversions FINAL").result_rows == [(3000, 3000)]
    assert client.query("SELECT sum(amount) FROM conversions FINAL").result_rows[0][0] == Decimal("30000")


@pytest.fixture
def own_clickhouse(tmp_path: Path, settings: Settings):
    if settings.clickhouse_url:
        pytest.skip("needs a local ClickHouse it may stop")
    server = LocalClickHouse(tmp_path / "ch", ClickHouseOptions(http_port=free_port(), tcp_port=free_port(),
                                                               die_with_parent=True))
    proc = server.start()
    try:
        yield server, ClickHouseService(proc.url, "local")
    finally:
        server.stop()


def test_clickhouse_down_for_30s_mid_stream_then_back(sink: SinkHarness, own_clickhouse) -> None:
    server, ch = own_clickhouse
    sink.clickhouse_url = ch.url
    _fill(sink, 500)
    sink.start("--only", "clickhouse", "--metrics-port", str(metrics_port := free_port()))
    client = _db_client(ch, sink.database)
    wait_until_rows(client, "SELECT count() FROM conversions FINAL", 500, harness=sink)
    server.stop()
    t = sink.topics
    for i in range(500, 1500):
        sink.produce(t.conversions.name, "Conversion", conversion(i), f"k{i}")
    sink.flush()
    time.sleep(3)
    import urllib.request

    metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    assert "postback_sink_clickhouse_up 0.0" in metrics and "postback_sink_paused 1.0" in metrics
    time.sleep(27)  # 30 s down in all
    assert sink.procs[0].poll() is None, "the sink died while ClickHouse was down"
    server.start()
    client = _db_client(ch, sink.database)
    wait_until_rows(client, "SELECT count() FROM conversions FINAL", 1500, timeout=120, harness=sink)
    assert client.query("SELECT count(), uniqExact(conversion_id) FROM conversions FINAL").result_rows == [(1500, 1500)]
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    assert "postback_sink_clickhouse_up 1.0" in metrics


def _lifecycle_records(kafka: KafkaService, topic: str) -> list[dict]:
    consumer = Consumer({"bootstrap.servers": kafka.bootstrap_servers, "group.id": unique_name("lc"),
                         "auto.offset.reset": "earliest", "isolation.level": "read_committed"})
    consumer.subscribe([topic])
    out, idle_until = [], time.monotonic() + 8
    while time.monotonic() < idle_until:
        msgs = consumer.consume(1000, timeout=0.5)
        for msg in msgs:
            if not msg.error():
                out.append(Codec.for_record("Conversion").decode(msg.value()))
        if msgs:
            idle_until = time.monotonic() + 3
    consumer.close()
    return out


def test_lifecycle_topics_hold_each_conversion_once_across_a_restart(sink: SinkHarness,
                                                                     kafka: KafkaService) -> None:
    t = sink.topics
    events = ["purchase", "lead", "renewal", "refund", "custom:vip"]
    expected: collections.Counter = collections.Counter()
    families = {"purchase": t.lifecycle_purchase.name, "lead": t.lifecycle_acquisition.name,
                "renewal": t.lifecycle_subscription.name, "refund": t.lifecycle_reversal.name}
    for i in range(2000):
        event = events[i % len(events)]
        attributed = i % 7 != 0
        rec = conversion(i, event=event, attributed=attributed, customer=f"cust-{i % 50}",
                         sign=-1 if event == "refund" else 1)
        sink.produce(t.conversions.name, "Conversion", rec, rec["conversion_id"])
        if attributed and event in families:
            expected[(families[event], rec["conversion_id"])] += 1
    sink.flush()
    first = sink.start("--only", "lifecycle")
    time.sleep(6)
    first.kill()  # SIGKILL mid-stream: an open transaction is aborted, never half-visible
    first.wait(timeout=30)
    sink.start("--only", "lifecycle")
    time.sleep(12)
    seen: collections.Counter = collections.Counter()
    for topic in set(families.values()):
        for rec in _lifecycle_records(kafka, topic):
            seen[(topic, rec["conversion_id"])] += 1
    assert seen == expected, sink.logs()


def _with_payout(rec: dict, **fields) -> dict:
    base = {"payout": Decimal("7.50"), "payout_currency": "EUR", "payout_status": "payable", "payout_reason": None,
            "payout_rule": "offer offer-1 purchase: cpa 7.50 EUR", "reporting_currency": "USD",
            "revenue_reporting": Decimal("10.00"), "payout_reporting": Decimal("8.15"),
            "revenue_fx_rate": Decimal("1"), "revenue_fx_date": None, "payout_fx_rate": Decimal("1.087"),
            "payout_fx_date": "2027-01-14", "fx_status": "ok",
            "cap_decision": "counted offer:offer-1 day 2027-01-15 1/100"}
    return {**rec, **base, **fields}


def test_fx_rates_and_payout_fields(sink: SinkHarness, clickhouse: ClickHouseService) -> None:
    import io
    import json

    import fastavro

    from schemas import SCHEMA_DIR

    t = sink.topics
    sink.produce(t.conversions.name, "Conversion", _with_payout(conversion(1)), "k1")
    sink.produce(t.conversions.name, "Conversion",  # held by a cap, payout 0
                 _with_payout(conversion(2), payout=Decimal("0"), payout_status="hold",
                              payout_reason="cap_daily_conversions", payout_reporting=Decimal("0")), "k2")
    # A conversion written by a producer still on the schema before the payout fields.
    old = fastavro.parse_schema(json.loads((SCHEMA_DIR / "history" / "Conversion.1.avsc").read_text()),
                                named_schemas={})
    body = io.BytesIO()
    fastavro.schemaless_writer(body, old, conversion(3))
    header = b"\xc3\x01" + bytes.fromhex(fastavro.schema.fingerprint(
        fastavro.schema.to_parsing_canonical_form(old), "CRC-64-AVRO"))
    sink.producer.produce(t.conversions.name, header + body.getvalue(), b"k3")
    # EUR on the 14th loaded twice (a corrected file): the later load wins.
    for day, currency, rate, loaded in (("2027-01-14", "EUR", "1.087", NOW),
                                        ("2027-01-14", "EUR", "1.0875", NOW + 1000),
                                        ("2027-01-15", "JPY", "0.000123456789", NOW)):
        sink.produce(t.fx_rates.name, "FxRate", {"date": day, "currency": currency, "rate": rate,
                                                 "reporting_currency": "USD", "loaded_at_ms": loaded},
                     f"{currency}|{day}")
    sink.flush()
    sink.start("--only", "clickhouse")
    client = _db_client(clickhouse, sink.database)
    wait_until_rows(client, "SELECT count() FROM postback_outcomes FINAL", 3, harness=sink)
    wait_until_rows(client, "SELECT count() FROM fx_rates FINAL", 2, harness=sink)
    rates = client.query("SELECT date, currency, rate, reporting_currency, loaded_at FROM fx_rates FINAL "
                         "ORDER BY currency, date").result_rows
    assert [(str(d), c, r, rc, int(at.timestamp() * 1000)) for d, c, r, rc, at in rates] == [
        ("2027-01-14", "EUR", Decimal("1.0875"), "USD", NOW + 1000),
        ("2027-01-15", "JPY", Decimal("0.000123456789"), "USD", NOW),
    ]
    got = {r[0]: r[1:] for r in client.query(
        "SELECT order_id, payout, payout_currency, payout_status, payout_reason, payout_rule, reporting_currency, "
        "revenue_reporting, payout_reporting, revenue_fx_rate, revenue_fx_date, payout_fx_rate, payout_fx_date, "
        "fx_status, cap_decision FROM conversions FINAL").result_rows}
    assert got["O1"] == (Decimal("7.5"), "EUR", "payable", None, "offer offer-1 purchase: cpa 7.50 EUR", "USD",
                         Decimal("10"), Decimal("8.15"), Decimal("1"), None, Decimal("1.087"),
                         date(2027, 1, 14), "ok", "counted offer:offer-1 day 2027-01-15 1/100")
    assert got["O2"][:4] == (Decimal("0"), "EUR", "hold", "cap_daily_conversions")
    assert got["O3"] == (None,) * 14  # written before the payout fields existed
    holds = client.query("SELECT payout_reason, conversions FROM v_payout_holds").result_rows
    assert holds == [("cap_daily_conversions", 1)]


def _delivery(cid: str, attempt: int, outcome: str, **fields) -> dict:
    base = {"conversion_id": cid, "version": 1, "affiliate_id": "aff-1", "endpoint": "aff-1/main",
            "url": f"https://aff.example/pb?cid={cid}&sig=REDACTED", "method": "GET", "attempt": attempt,
            "status": 200 if outcome == "delivered" else 503, "latency_ms": 40 + attempt,
            "error_class": None if outcome == "delivered" else "http_5xx", "response_head": "ok",
            "outcome": outcome, "attempted_at_ms": NOW + attempt * 60_000, "idempotency_key": f"{cid}:1"}
    return {**base, **fields}


def test_outbound_deliveries_are_written_without_outcome_rows(sink: SinkHarness, clickhouse: ClickHouseService) -> None:
    t = sink.topics
    records = [_delivery("cv1", 1, "retry"), _delivery("cv1", 2, "delivered"),
               _delivery("cv2", 1, "dead", status=None, latency_ms=None, error_class="timeout", response_head=None)]
    for record in records + records[:1]:  # the first one redelivered: collapses under FINAL
        sink.produce(t.outbound_deliveries.name, "OutboundDelivery", record, record["conversion_id"])
    sink.produce(t.conversions.name, "Conversion", conversion(1), "k1")
    sink.flush()
    sink.start("--only", "clickhouse")
    client = _db_client(clickhouse, sink.database)
    wait_until_rows(client, "SELECT count() FROM outbound_deliveries FINAL", 3, harness=sink)
    wait_until_rows(client, "SELECT count() FROM postback_outcomes FINAL", 1, harness=sink)
    got = client.query("SELECT conversion_id, attempt, outcome, status, latency_ms, error_class, response_head, "
                       "toUnixTimestamp64Milli(attempted_at), idempotency_key FROM outbound_deliveries FINAL "
                       "ORDER BY conversion_id, attempt").result_rows
    assert got == [("cv1", 1, "retry", 503, 41, "http_5xx", "ok", NOW + 60_000, "cv1:1"),
                   ("cv1", 2, "delivered", 200, 42, None, "ok", NOW + 120_000, "cv1:1"),
                   ("cv2", 1, "dead", None, None, "timeout", None, NOW + 60_000, "cv2:1")]
    # Only the conversion has an outcome row: delivery attempts are not received postbacks.
    assert client.query("SELECT receipt_id FROM postback_outcomes FINAL").result_rows == [("R1-1-purchase",)]
