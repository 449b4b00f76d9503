"""Outbound URL macros: values, RFC 3986 encoding, the idempotency key and the POST fields."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from urllib.parse import parse_qsl, urlsplit

import pytest

from postback.signing import canonical_query
from sinks.outbound.template import MACROS, encode, fields, idempotency_key, render


def conv(**kw: object) -> dict[str, object]:
    base: dict[str, object] = {
        "conversion_id": "conv-1", "version": 3, "click_id": "clk-1", "offer_id": "offer-1",
        "affiliate_id": "aff-1", "event": "purchase", "status": "approved",
        "payout": Decimal("5.250000"), "payout_currency": "EUR", "order_id": "ord-9",
        "event_time_ms": 1_767_225_600_123, "sub1": "s1", "sub2": None,
    }
    base.update(kw)
    return base


def test_macros_are_the_contract() -> None:
    assert MACROS == frozenset({
        "click_id", "sub1", "sub2", "sub3", "sub4", "sub5", "offer_id", "event", "status", "payout",
        "payout_currency", "order_id", "conversion_id", "version", "event_time", "idempotency_key"})


def test_fields_values() -> None:
    f = fields(conv())
    assert set(f) == MACROS
    assert f["click_id"] == "clk-1" and f["offer_id"] == "offer-1" and f["event"] == "purchase"
    assert f["status"] == "approved" and f["payout"] == "5.250000" and f["payout_currency"] == "EUR"
    assert f["order_id"] == "ord-9" and f["conversion_id"] == "conv-1" and f["version"] == "3"
    assert f["event_time"] == "2026-01-01T00:00:00.123Z"
    assert f["idempotency_key"] == "conv-1:3"
    assert f["sub1"] == "s1" and f["sub2"] == "" and f["sub5"] == ""


def test_missing_values_are_empty() -> None:
    f = fields({"conversion_id": "c", "version": 0})
    assert f["payout"] == "" and f["event_time"] == "" and f["status"] == "" and f["version"] == "0"


def test_payout_is_plain_decimal_text() -> None:
    assert fields(conv(payout=Decimal("0E-6")))["payout"] == "0.000000"
    assert fields(conv(payout=Decimal("-1.5")))["payout"] == "-1.5"
    assert fields(conv(payout=Decimal("1E+3")))["payout"] == "1000"
    with pytest.raises(ValueError, match="float"):
        fields(conv(payout=1.5))


def test_event_time_forms() -> None:
    assert fields(conv(event_time_ms=0))["event_time"] == "1970-01-01T00:00:00.000Z"
    berlin = timezone(timedelta(hours=1))
    dt = datetime(2026, 1, 1, 13, 0, 0, 456_000, tzinfo=berlin)
    assert fields(conv(event_time_ms=None, event_time=dt))["event_time"] == "2026-01-01T12:00:00.456Z"
    with pytest.raises(ValueError, match="naive"):
        fields(conv(event_time_ms=None, event_time=datetime(2026, 1, 1)))
    with pytest.raises(ValueError, match="integer"):
        fields(conv(event_time_ms="1767225600000"))
    assert fields(conv(event_time_ms=None, event_time=datetime(2026, 1, 1, tzinfo=UTC)))["event_time"] \
        == "2026-01-01T00:00:00.000Z"


def test_status_enum_by_value() -> None:
    class Status:
        value = "rejected"

    assert fields(conv(status=Status()))["status"] == "rejected"


def test_idempotency_key() -> None:
    assert idempotency_key(conv()) == "conv-1:3"
    assert idempotency_key({"conversion_id": "x", "version": 0}) == "x:0"
    for bad in ({"version": 1}, {"conversion_id": "", "version": 1}, {"conversion_id": "x"},
                {"conversion_id": "x", "version": None}):
        with pytest.raises(ValueError):
            idempotency_key(bad)
    with pytest.raises(ValueError):
        fields({"click_id": "x"})


def test_render_substitutes_and_encodes() -> None:
    url = render("https://aff.example/pb/{offer_id}?cid={click_id}&p={payout}&cur={payout_currency}"
                 "&s={status}&k={idempotency_key}&t={event_time}", conv())
    assert url == ("https://aff.example/pb/offer-1?cid=clk-1&p=5.250000&cur=EUR&s=approved"
                   "&k=conv-1%3A3&t=2026-01-01T00%3A00%3A00.123Z")


@pytest.mark.parametrize(("raw", "encoded"), [
    ("a b", "a%20b"), ("x&y=z", "x%26y%3Dz"), ("/../", "%2F..%2F"), ("#frag", "%23frag"),
    ("ü", "%C3%BC"), ("a+b", "a%2Bb"), ("-_.~", "-_.~"), ("?q", "%3Fq"), ("{sub1}", "%7Bsub1%7D"),
    ("%41", "%2541"),
])
def test_values_cannot_change_the_url_structure(raw: str, encoded: str) -> None:
    assert encode(raw) == encoded
    url = render("https://aff.example/pb?cid={click_id}&s={sub1}", conv(click_id=raw, sub1="x"))
    assert url == f"https://aff.example/pb?cid={encoded}&s=x"
    parts = urlsplit(url)
    assert parts.netloc == "aff.example" and parts.path == "/pb" and parts.fragment == ""
    assert parse_qsl(parts.query) == [("cid", raw), ("s", "x")]


def test_encoding_matches_the_signing_canonical_encoder() -> None:
    value = "a b/ü~*'()!"
    assert canonical_query([("v", value)]) == f"v={encode(value)}"


def test_missing_value_renders_empty_and_literal_braces() -> None:
    assert render("https://a.example/{{x}}?s={sub2}&o={order_id}", conv(order_id=None)) \
        == "https://a.example/{x}?s=&o="


def test_render_refuses_unknown_macros() -> None:
    with pytest.raises(ValueError, match="unknown macro"):
        render("https://a.example/?x={affiliate}", conv())
