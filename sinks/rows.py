"""Decoded Avro records -> ClickHouse rows: pure functions, one per table.

Times stay epoch milliseconds (clickhouse-connect writes ints as DateTime64(3) ticks,
no datetime objects on the hot path), money stays `Decimal`. Every topic record also
yields its `postback_outcomes` row, so "one row per receipt" holds by construction (FX rates
and outbound delivery attempts are not received postbacks and have none).
"""

from __future__ import annotations

from datetime import date
from decimal import Decimal
from typing import Any

CLICK_COLUMNS = ("click_id", "clicked_at", "offer_id", "affiliate_id", "campaign_id", "sub1", "sub2", "sub3",
                 "sub4", "sub5", "ip", "user_agent", "referer", "source", "extras")
CONVERSION_COLUMNS = ("conversion_id", "version", "receipt_id", "advertiser_id", "offer_id", "affiliate_id",
                      "campaign_id", "click_id", "sub1", "sub2", "sub3", "sub4", "sub5", "event", "status",
                      "order_id", "customer_id", "period", "amount", "currency", "sign", "event_time",
                      "received_at", "processed_at", "clicked_at", "attributed", "attribution",
                      "click_to_conversion_s", "dedupe_key", "auth_mode", "extras",
                      # Commission (migration 3). Conversions written before them decode with these None.
                      "payout", "payout_currency", "payout_status", "payout_reason", "payout_rule",
                      "reporting_currency", "revenue_reporting", "payout_reporting", "revenue_fx_rate",
                      "revenue_fx_date", "payout_fx_rate", "payout_fx_date", "fx_status", "cap_decision")
OUTCOME_COLUMNS = ("receipt_id", "outcome", "reason", "advertiser_id", "event", "conversion_id", "received_at",
                   "processed_at")
REJECTION_COLUMNS = ("receipt_id", "received_at", "processed_at", "advertiser_id", "event", "reason", "detail",
                     "remote_ip", "params", "body")
DUPLICATE_COLUMNS = ("receipt_id", "first_receipt_id", "received_at", "processed_at", "advertiser_id", "event",
                     "order_id", "dedupe_key", "reason")

FX_RATE_COLUMNS = ("date", "currency", "rate", "reporting_currency", "loaded_at")
OUTBOUND_DELIVERY_COLUMNS = ("conversion_id", "version", "affiliate_id", "endpoint", "url", "method", "attempt",
                             "status", "latency_ms", "error_class", "response_head", "outcome", "attempted_at",
                             "idempotency_key")

COLUMNS = {"clicks": CLICK_COLUMNS, "conversions": CONVERSION_COLUMNS, "postback_outcomes": OUTCOME_COLUMNS,
           "rejections": REJECTION_COLUMNS, "duplicates": DUPLICATE_COLUMNS, "fx_rates": FX_RATE_COLUMNS,
           "outbound_deliveries": OUTBOUND_DELIVERY_COLUMNS}


def _map(kvs: list[dict[str, str]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for kv in kvs:
        out.setdefault(kv["key"], kv["value"])
    return out


def _day(text: str | None) -> date | None:
    """A YYYY-MM-DD field as the `date` a ClickHouse Date column takes."""
    return None if text is None else date.fromisoformat(text)


def click_rows(c: dict[str, Any]) -> dict[str, tuple]:
    return {"clicks": (c["click_id"], c["clicked_at_ms"], c["offer_id"], c["affiliate_id"], c["campaign_id"],
                       c["sub1"], c["sub2"], c["sub3"], c["sub4"], c["sub5"], c["ip"], c["user_agent"],
                       c["referer"], c["source"], _map(c["extras"]))}


def conversion_rows(c: dict[str, Any]) -> dict[str, tuple]:
    conversion = (c["conversion_id"], c["version"], c["receipt_id"], c["advertiser_id"], c["offer_id"],
                  c["affiliate_id"], c["campaign_id"], c["click_id"], c["sub1"], c["sub2"], c["sub3"], c["sub4"],
                  c["sub5"], c["event"], c["status"], c["order_id"], c["customer_id"], c["period"], c["amount"],
                  c["currency"], c["sign"], c["event_time_ms"], c["received_at_ms"], c["processed_at_ms"],
                  c["clicked_at_ms"], c["attributed"], c["attribution"], c["click_to_conversion_s"],
                  c["dedupe_key"], c["auth_mode"], _map(c["extras"]),
                  c.get("payout"), c.get("payout_currency"), c.get("payout_status"), c.get("payout_reason"),
                  c.get("payout_rule"), c.get("reporting_currency"), c.get("revenue_reporting"),
                  c.get("payout_reporting"), c.get("revenue_fx_rate"), _day(c.get("revenue_fx_date")),
                  c.get("payout_fx_rate"), _day(c.get("payout_fx_date")), c.get("fx_status"), c.get("cap_decision"))
    outcome = (c["receipt_id"], "accepted", "", c["advertiser_id"], c["event"], c["conversion_id"],
               c["received_at_ms"], c["processed_at_ms"])
    return {"conversions": conversion, "postback_outcomes": outcome}


def rejection_rows(r: dict[str, Any]) -> dict[str, tuple]:
    raw = r["raw"]
    body = raw["body"].decode("utf-8", "replace") if isinstance(raw["body"], bytes) else raw["body"]
    rejection = (r["receipt_id"], r["received_at_ms"], r["processed_at_ms"], r["advertiser_id"] or "",
                 r["event"] or "", r["reason"], r["detail"], raw["remote_ip"], _map(raw["params"]), body)
    outcome = (r["receipt_id"], "rejected", r["reason"], r["advertiser_id"] or "", r["event"] or "", "",
               r["received_at_ms"], r["processed_at_ms"])
    return {"rejections": rejection, "postback_outcomes": outcome}


def duplicate_rows(d: dict[str, Any]) -> dict[str, tuple]:
    duplicate = (d["receipt_id"], d["first_receipt_id"], d["received_at_ms"], d["processed_at_ms"],
                 d["advertiser_id"], d["event"] or "", d["order_id"], d["dedupe_key"], d["reason"])
    outcome = (d["receipt_id"], "duplicate", d["reason"], d["advertiser_id"], d["event"] or "", "",
               d["received_at_ms"], d["processed_at_ms"])
    return {"duplicates": duplicate, "postback_outcomes": outcome}


def fx_rate_rows(f: dict[str, Any]) -> dict[str, tuple]:
    """An FX rate is no postback: it has no `postback_outcomes` row. The rate travels as decimal text."""
    return {"fx_rates": (date.fromisoformat(f["date"]), f["currency"], Decimal(f["rate"]), f["reporting_currency"],
                         f["loaded_at_ms"])}


def outbound_delivery_rows(d: dict[str, Any]) -> dict[str, tuple]:
    """One delivery attempt to an affiliate: no postback was received, so no `postback_outcomes` row."""
    return {"outbound_deliveries": (d["conversion_id"], d["version"], d["affiliate_id"], d["endpoint"], d["url"],
                                    d["method"], d["attempt"], d["status"], d["latency_ms"], d["error_class"],
                                    d["response_head"], d["outcome"], d["attempted_at_ms"], d["idempotency_key"])}


ROWS_BY_SCHEMA = {"Click": click_rows, "Conversion": conversion_rows, "Rejection": rejection_rows,
                  "Duplicate": duplicate_rows, "FxRate": fx_rate_rows, "OutboundDelivery": outbound_delivery_rows}
