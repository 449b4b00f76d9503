"""Record -> row mapping of the sink (pure: no ClickHouse)."""

from __future__ import annotations

from datetime import date
from decimal import Decimal

import pytest

from schemas.codec import Codec
from sinks.rows import (COLUMNS, CONVERSION_COLUMNS, OUTBOUND_DELIVERY_COLUMNS, ROWS_BY_SCHEMA, conversion_rows,
                        fx_rate_rows, outbound_delivery_rows)

from .conftest import NOW, conversion

PAYOUT = {"payout": Decimal("-5.000000"), "payout_currency": "USD", "payout_status": "payable",
          "payout_reason": "clawback", "payout_rule": "offer offer-1 purchase: cpa 5.00 USD",
          "reporting_currency": "USD", "revenue_reporting": Decimal("10.870000"),
          "payout_reporting": Decimal("-5.000000"), "revenue_fx_rate": Decimal("1.087000000000"),
          "revenue_fx_date": "2027-01-14", "payout_fx_rate": Decimal("1.000000000000"), "payout_fx_date": None,
          "fx_status": "ok", "cap_decision": None}


def test_every_table_row_has_its_columns() -> None:
    rec = dict(conversion(1), **PAYOUT)
    for table, row in conversion_rows(rec).items():
        assert len(row) == len(COLUMNS[table]), table
    (row,) = fx_rate_rows({"date": "2027-01-14", "currency": "EUR", "rate": "1.087", "reporting_currency": "USD",
                           "loaded_at_ms": NOW}).values()
    assert len(row) == len(COLUMNS["fx_rates"])


def test_conversion_row_carries_the_payout_fields() -> None:
    row = dict(zip(CONVERSION_COLUMNS, conversion_rows(dict(conversion(1), **PAYOUT))["conversions"]))
    expected = dict(PAYOUT, revenue_fx_date=date(2027, 1, 14))
    assert {k: row[k] for k in PAYOUT} == expected


@pytest.mark.parametrize("decoded", [True, False])
def test_conversion_without_payout_fields_maps_them_to_none(decoded: bool) -> None:
    rec = conversion(1)
    if decoded:  # through the codec (fields default to None) ...
        rec = Codec.for_record("Conversion").decode(Codec.for_record("Conversion").encode(rec))
    # ... or a dict that lacks the keys entirely
    row = dict(zip(CONVERSION_COLUMNS, conversion_rows(rec)["conversions"]))
    assert all(row[k] is None for k in PAYOUT)


def test_fx_rate_row() -> None:
    record = {"date": "2027-01-14", "currency": "JPY", "rate": "0.006512345678", "reporting_currency": "USD",
              "loaded_at_ms": NOW}
    assert ROWS_BY_SCHEMA["FxRate"](Codec.for_record("FxRate").decode(Codec.for_record("FxRate").encode(record))) \
        == {"fx_rates": (date(2027, 1, 14), "JPY", Decimal("0.006512345678"), "USD", NOW)}


DELIVERY = {"conversion_id": "conv-purchase-O1", "version": 2, "affiliate_id": "aff-1", "endpoint": "aff-1/main",
            "url": "https://aff.example/pb?cid=C1&sig=REDACTED", "method": "GET", "attempt": 1, "status": 503,
            "latency_ms": 87, "error_class": "http_5xx", "response_head": "busy", "outcome": "retry",
            "attempted_at_ms": NOW, "idempotency_key": "conv-purchase-O1:2"}


def test_outbound_delivery_row_through_the_codec() -> None:
    codec = Codec.for_record("OutboundDelivery")
    rows = ROWS_BY_SCHEMA["OutboundDelivery"](codec.decode(codec.encode(DELIVERY)))
    assert list(rows) == ["outbound_deliveries"]  # an attempt is no received postback: no postback_outcomes row
    (row,) = rows.values()
    assert dict(zip(COLUMNS["outbound_deliveries"], row)) == {
        "conversion_id": "conv-purchase-O1", "version": 2, "affiliate_id": "aff-1", "endpoint": "aff-1/main",
        "url": "https://aff.example/pb?cid=C1&sig=REDACTED", "method": "GET", "attempt": 1, "status": 503,
        "latency_ms": 87, "error_class": "http_5xx", "response_head": "busy", "outcome": "retry",
        "attempted_at": NOW, "idempotency_key": "conv-purchase-O1:2"}


def test_outbound_delivery_row_without_a_response() -> None:
    sent = dict(DELIVERY, status=None, latency_ms=None, error_class="timeout", response_head=None, outcome="dead")
    (row,) = outbound_delivery_rows(sent).values()
    got = dict(zip(OUTBOUND_DELIVERY_COLUMNS, row))
    assert (got["status"], got["latency_ms"], got["error_class"], got["response_head"], got["outcome"]) \
        == (None, None, "timeout", None, "dead")


def test_every_schema_with_rows_has_a_table_in_the_writer_order() -> None:
    from sinks.clickhouse_writer import INSERT_ORDER

    assert set(INSERT_ORDER) == set(COLUMNS)
    assert INSERT_ORDER[-1] == "postback_outcomes"
