"""Read-side queries over the sink's tables: a receipt's outcome, and a click/order/receipt's journey.

Used by the ingester's `GET /postback/receipts/{receipt_id}` (partners debugging their
own postbacks) and by `postback trace`. Every query reads with FINAL, so replays and
retried inserts never show twice.
"""

from __future__ import annotations

import re
import time
from typing import Any

from ulid import ULID

#: A receipt younger than this and not yet in ClickHouse is reported `pending`, older ones `unknown`.
PENDING_WINDOW_MS = 15 * 60_000
_SAFE = re.compile(r"^[A-Za-z0-9_.:\-/]{1,128}$")


def _rows(client: Any, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    result = client.query(sql, parameters=params)
    return [dict(zip(result.column_names, row)) for row in result.result_rows]


def receipt_outcome(client: Any, receipt_id: str, now_ms: int | None = None) -> dict[str, Any]:
    """{"receipt_id", "status": accepted|duplicate|rejected|pending|unknown, ...details}."""
    if not _SAFE.match(receipt_id):
        return {"receipt_id": receipt_id[:64], "status": "unknown"}
    found = _rows(client, "SELECT outcome, reason, advertiser_id, event, conversion_id, received_at, processed_at, "
                          "latency_ms FROM postback_outcomes FINAL WHERE receipt_id = {r:String}",
                  {"r": receipt_id})
    if found:
        row = found[0]
        answer: dict[str, Any] = {"receipt_id": receipt_id, "status": row["outcome"], "reason": row["reason"] or None,
                                  "advertiser_id": row["advertiser_id"], "event": row["event"],
                                  "received_at": row["received_at"].isoformat() + "Z",
                                  "processed_at": row["processed_at"].isoformat() + "Z",
                                  "latency_ms": row["latency_ms"]}
        if row["outcome"] == "accepted":
            answer["conversion_id"] = row["conversion_id"]
        if row["outcome"] == "rejected":
            detail = _rows(client, "SELECT detail FROM rejections FINAL WHERE receipt_id = {r:String}",
                           {"r": receipt_id})
            answer["detail"] = detail[0]["detail"] if detail else None
        if row["outcome"] == "duplicate":
            first = _rows(client, "SELECT first_receipt_id FROM duplicates FINAL WHERE receipt_id = {r:String}",
                          {"r": receipt_id})
            answer["first_receipt_id"] = first[0]["first_receipt_id"] if first else None
        return answer
    now_ms = now_ms if now_ms is not None else time.time_ns() // 1_000_000
    try:
        issued_ms = ULID.from_str(receipt_id).milliseconds
    except ValueError:
        return {"receipt_id": receipt_id, "status": "unknown"}
    recent = 0 <= now_ms - issued_ms <= PENDING_WINDOW_MS
    return {"receipt_id": receipt_id, "status": "pending" if recent else "unknown"}


def trace(client: Any, ident: str) -> dict[str, list[dict[str, Any]]]:
    """Everything ClickHouse knows about a click ID, order ID or receipt ID."""
    if not _SAFE.match(ident):
        raise ValueError("an id is 1-128 characters of A-Z a-z 0-9 _ . : - /")
    p = {"i": ident}
    conversions = _rows(client, "SELECT * FROM conversions FINAL WHERE click_id = {i:String} OR order_id = {i:String} "
                                "OR receipt_id = {i:String} OR conversion_id = {i:String} ORDER BY received_at", p)
    click_ids = {ident} | {c["click_id"] for c in conversions if c["click_id"]}
    receipts = {ident} | {c["receipt_id"] for c in conversions}
    outcomes = _rows(client, "SELECT * FROM postback_outcomes FINAL WHERE receipt_id IN {r:Array(String)} "
                             "OR conversion_id IN (SELECT conversion_id FROM conversions FINAL WHERE "
                             "click_id = {i:String} OR order_id = {i:String}) ORDER BY received_at",
                     {"r": sorted(receipts), "i": ident})
    receipts |= {o["receipt_id"] for o in outcomes}
    return {
        "clicks": _rows(client, "SELECT * FROM clicks FINAL WHERE click_id IN {c:Array(String)}",
                        {"c": sorted(click_ids)}),
        "outcomes": outcomes,
        "conversions": conversions,
        "duplicates": _rows(client, "SELECT * FROM duplicates FINAL WHERE receipt_id IN {r:Array(String)} "
                                    "OR order_id = {i:String} ORDER BY received_at", {"r": sorted(receipts), "i": ident}),
        "rejections": _rows(client, "SELECT receipt_id, received_at, reason, detail, advertiser_id, event FROM "
                                    "rejections FINAL WHERE receipt_id IN {r:Array(String)} ORDER BY received_at",
                            {"r": sorted(receipts)}),
    }
