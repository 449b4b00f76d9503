"""GET /postback/receipts/{receipt_id}: a partner looks up what happened to its postback."""

from __future__ import annotations

import time
from pathlib import Path

from ulid import ULID

from deploy.providers import ClickHouseService, KafkaService
from sinks.migrations import apply_migrations
from sinks.rows import OUTCOME_COLUMNS, REJECTION_COLUMNS, DUPLICATE_COLUMNS

from .conftest import http, start_ingester


def test_receipt_lookup_for_each_outcome(kafka: KafkaService, clickhouse: ClickHouseService, ch_database: str,
                                         tmp_path: Path) -> None:
    apply_migrations(clickhouse.client(), ch_database, progress=lambda _m: None)
    client = clickhouse.client(ch_database)
    now = int(time.time() * 1000)
    ok, dup, bad = str(ULID()), str(ULID()), str(ULID())
    client.insert("postback_outcomes", [
        (ok, "accepted", "", "acme", "purchase", "conv-1", now - 900, now - 800),
        (dup, "duplicate", "retry", "acme", "purchase", "", now - 700, now - 650),
        (bad, "rejected", "bad_signature", "acme", "purchase", "", now - 600, now - 590),
    ], column_names=OUTCOME_COLUMNS)
    client.insert("rejections", [(bad, now - 600, now - 590, "acme", "purchase", "bad_signature",
                                  "the signature does not match", "127.0.0.1", {}, "")],
                  column_names=REJECTION_COLUMNS)
    client.insert("duplicates", [(dup, ok, now - 700, now - 650, "acme", "purchase", "O1", "acme|purchase|O1",
                                  "retry")], column_names=DUPLICATE_COLUMNS)
    ing = start_ingester(kafka, tmp_path, "--clickhouse-database", ch_database,
                         env={"CLICKHOUSE_URL": clickhouse.url})
    try:
        base = ing.url + "/postback/receipts/"
        accepted = http(base + ok)
        assert accepted.status == 200
        assert accepted.json()["status"] == "accepted" and accepted.json()["conversion_id"] == "conv-1"
        assert accepted.json()["latency_ms"] == 100
        duplicate = http(base + dup).json()
        assert (duplicate["status"], duplicate["reason"], duplicate["first_receipt_id"]) == ("duplicate", "retry", ok)
        rejected = http(base + bad).json()
        assert (rejected["status"], rejected["reason"]) == ("rejected", "bad_signature")
        assert rejected["detail"] == "the signature does not match"
        pending = http(base + str(ULID()))  # issued just now, not processed yet
        assert pending.status == 200 and pending.json()["status"] == "pending"
        old = str(ULID.from_timestamp(time.time() - 86_400))
        assert http(base + old).status == 404 and http(base + old).json()["status"] == "unknown"
        assert http(base + "not-a-ulid").status == 404
        assert http(base + "%27%3B%20DROP").status == 404  # hostile ids never reach SQL
    finally:
        assert ing.stop() == 0


def test_lookup_without_clickhouse_is_503(kafka: KafkaService, tmp_path: Path) -> None:
    ing = start_ingester(kafka, tmp_path, env={"CLICKHOUSE_URL": "chdb:///nowhere"})
    try:
        resp = http(ing.url + "/postback/receipts/" + str(ULID()))
        assert resp.status == 503 and resp.json()["reason"] == "lookup_not_configured"
    finally:
        assert ing.stop() == 0
