"""Read-side queries over the sink's tables: a receipt's outcome, and a click/order/receipt's journey.

Used by the ingester's `GET /postback/receipts/{receipt_id}` (partners debugging their
own postbacks) and by `postback trace`. Every query reads with FINAL, so replays and
retried inserts never show twice, except `trace`'s per-version payout history, which
keeps one row per (conversion_id, version) with `LIMIT 1 BY`.
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


#: What the commission engine decided for one conversion version (migration 3's columns).
PAYOUT_COLUMNS = ("payout", "payout_currency", "payout_status", "payout_reason", "payout_rule", "reporting_currency",
                  "revenue_reporting", "payout_reporting", "revenue_fx_rate", "revenue_fx_date", "payout_fx_rate",
                  "payout_fx_date", "fx_status", "cap_decision")


def _number(value: Any) -> str:
    """A Decimal without trailing zeros (1.087000000000 -> 1.087, 5.000000 -> 5)."""
    text = format(value, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def describe_payout(row: dict[str, Any]) -> str:
    """One line for a conversion version of `trace`'s `payouts` section."""
    head = f"{row['conversion_id']} v{row['version']} {row['event']} {row['status']}" + \
        (" (reversal)" if row["sign"] < 0 else "")
    if row["payout_status"] is None:
        return f"{head}: no payout decision (written before the commission engine)"
    payout = "-" if row["payout"] is None else f"{_number(row['payout'])} {row['payout_currency'] or ''}".strip()
    parts = [f"{head}: payout {payout} {row['payout_status']}" +
             (f" ({row['payout_reason']})" if row["payout_reason"] else "")]
    if row["payout_rule"]:
        parts.append(f"rule: {row['payout_rule']}")
    fx = []
    for what, amount in (("revenue", "revenue_reporting"), ("payout", "payout_reporting")):
        rate, day = row[f"{what}_fx_rate"], row[f"{what}_fx_date"]
        shown = "-" if row[amount] is None else _number(row[amount])
        fx.append(f"{what} {shown} {row['reporting_currency'] or ''}".rstrip() +
                  (f" at {_number(rate)}" if rate is not None else "") + (f" of {day}" if day else ""))
    parts.append(f"fx {row['fx_status'] or '-'}: " + ", ".join(fx))
    if row["cap_decision"]:
        parts.append(f"cap: {row['cap_decision']}")
    return "; ".join(parts)


#: The columns of `trace`'s `deliveries` section (outbound postbacks to affiliates, migration 5).
DELIVERY_COLUMNS = ("conversion_id", "version", "endpoint", "attempt", "outcome", "status", "latency_ms",
                    "error_class", "attempted_at", "url")


def describe_delivery(row: dict[str, Any]) -> str:
    """One line for a delivery attempt of `trace`'s `deliveries` section (the URL is stored redacted)."""
    status = "-" if row["status"] is None else str(row["status"])
    latency = "-" if row["latency_ms"] is None else f"{row['latency_ms']} ms"
    at = row["attempted_at"]
    when = at.strftime("%Y-%m-%dT%H:%M:%S.") + f"{at.microsecond // 1000:03d}Z" if hasattr(at, "strftime") else at
    return (f"{row['conversion_id']} v{row['version']} -> {row['endpoint']} attempt {row['attempt']} "
            f"{row['outcome']}: status {status}, {latency}, error {row['error_class'] or '-'}, at {when}; "
            f"{row['url']}")


def trace(client: Any, ident: str) -> dict[str, list[dict[str, Any]]]:
    """Everything ClickHouse knows about a click ID, order ID or receipt ID.

    `payouts` lists every version of the conversions found that ClickHouse still holds (not
    FINAL: a background merge eventually keeps only the latest), each with its commission
    decision; `conversions` shows the latest version of each. `deliveries` lists every outbound
    postback attempt to the affiliates' endpoints for those conversions (or for `ident` as a
    conversion ID), by conversion, endpoint and attempt.
    """
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
    conversion_ids = sorted({c["conversion_id"] for c in conversions})
    payouts = _rows(client, "SELECT conversion_id, version, receipt_id, event, status, sign, "
                            f"{', '.join(PAYOUT_COLUMNS)} FROM conversions WHERE conversion_id IN {{v:Array(String)}} "
                            "ORDER BY conversion_id, version, inserted_at DESC LIMIT 1 BY conversion_id, version",
                    {"v": conversion_ids}) if conversion_ids else []
    deliveries = _rows(client, f"SELECT {', '.join(DELIVERY_COLUMNS)} FROM outbound_deliveries FINAL "
                               "WHERE conversion_id IN {v:Array(String)} "
                               "ORDER BY conversion_id, endpoint, version, attempt",
                       {"v": sorted(set(conversion_ids) | {ident})})
    return {
        "clicks": _rows(client, "SELECT * FROM clicks FINAL WHERE click_id IN {c:Array(String)}",
                        {"c": sorted(click_ids)}),
        "outcomes": outcomes,
        "conversions": conversions,
        "payouts": payouts,
        "deliveries": deliveries,
        "duplicates": _rows(client, "SELECT * FROM duplicates FINAL WHERE receipt_id IN {r:Array(String)} "
                                    "OR order_id = {i:String} ORDER BY received_at", {"r": sorted(receipts), "i": ident}),
        "rejections": _rows(client, "SELECT receipt_id, received_at, reason, detail, advertiser_id, event FROM "
                                    "rejections FINAL WHERE receipt_id IN {r:Array(String)} ORDER BY received_at",
                            {"r": sorted(receipts)}),
    }
