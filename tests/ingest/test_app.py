"""Every route and every error class of the ingester, against the real Kafka.

A 202 is checked the strong way: the record is read back from the topic and decoded
with the codec.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.parse

import pytest

from deploy.providers import KafkaService
from postback.partner_view import order_key
from schemas.codec import Codec

from .conftest import BULK_TOKEN, IngesterProcess, http

FORM = {"Content-Type": "application/x-www-form-urlencoded"}
JSON_CT = {"Content-Type": "application/json"}


def _find(kafka: KafkaService, topic: str, codec: Codec, field: str, value: str, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for msg in kafka.read(topic):
            record = codec.decode(msg.value())
            if record[field] == value:
                return msg, record
        time.sleep(0.2)
    raise AssertionError(f"no record with {field}={value} in {topic}")


def test_click_redirects_to_landing_and_is_in_kafka(ingester: IngesterProcess, kafka: KafkaService) -> None:
    resp = http(ingester.url + "/click?offer_id=offer-1&affiliate_id=aff-7&sub1=s%201&utm_source=x",
                headers={"User-Agent": "pytest-ua", "Referer": "https://ref.example/"})
    assert resp.status == 302
    location = resp.headers["location"]
    click_id = urllib.parse.parse_qs(urllib.parse.urlsplit(location).query)["cid"][0]
    assert len(click_id) == 26
    msg, record = _find(kafka, ingester.topics.clicks.name, Codec.for_record("Click"), "click_id", click_id)
    assert msg.key() == click_id.encode()
    assert (record["offer_id"], record["affiliate_id"], record["sub1"]) == ("offer-1", "aff-7", "s 1")
    assert record["source"] == "redirect" and record["user_agent"] == "pytest-ua"
    assert record["referer"] == "https://ref.example/" and record["ip"] == "127.0.0.1"
    assert record["extras"] == [{"key": "utm_source", "value": "x"}]


def test_click_without_landing_answers_json(ingester: IngesterProcess, kafka: KafkaService) -> None:
    resp = http(ingester.url + "/click?offer_id=offer-3&affiliate_id=a1&campaign_id=c9")
    assert resp.status == 200
    body = resp.json()
    assert body["status"] == "accepted"
    _, record = _find(kafka, ingester.topics.clicks.name, Codec.for_record("Click"), "click_id", body["click_id"])
    assert record["campaign_id"] == "c9"


def test_click_missing_affiliate_is_rejected(ingester: IngesterProcess) -> None:
    resp = http(ingester.url + "/click?offer_id=offer-1")
    assert resp.status == 400
    assert resp.json() == {"status": "rejected", "errors": [{"field": "affiliate_id", "reason": "missing"}]}


def test_get_postback_is_recorded_as_sent(ingester: IngesterProcess, kafka: KafkaService) -> None:
    query = "advertiser_id=acme&event=purchase&click_id=CLK1&order_id=o%2F1&amount=19.990&currency=USD&x=2&x=1"
    resp = http(ingester.url + "/postback?" + query, headers={"X-Postback-Signature": "v1=00"})
    assert resp.status == 202
    receipt = resp.json()["receipt_id"]
    msg, record = _find(kafka, ingester.topics.raw_postbacks.name, Codec.for_record("RawPostback"),
                        "receipt_id", receipt)
    # Keyed by the order's dedupe key (aliases applied), so every update of o/1 shares a partition.
    assert msg.key() == order_key("acme", "purchase", "o/1", None, "CLK1", ())[0].encode()
    assert [(p["key"], p["value"]) for p in record["params"]] == [
        ("advertiser_id", "acme"), ("event", "purchase"), ("click_id", "CLK1"), ("order_id", "o/1"),
        ("amount", "19.990"), ("currency", "USD"), ("x", "2"), ("x", "1")]
    assert record["method"] == "GET" and record["path"] == "/postback" and record["body"] == b""
    assert {"key": "X-Postback-Signature", "value": "v1=00"} in record["headers"]
    assert abs(record["received_at_ms"] - time.time() * 1000) < 60_000


def test_form_and_json_postbacks_keep_their_raw_body(ingester: IngesterProcess, kafka: KafkaService) -> None:
    form = b"advertiser_id=acme&event=lead&order_id=o2"
    resp = http(ingester.url + "/postback?ts=1", "POST", form, FORM)
    assert resp.status == 202
    _, rec = _find(kafka, ingester.topics.raw_postbacks.name, Codec.for_record("RawPostback"), "receipt_id",
                   resp.json()["receipt_id"])
    assert rec["body"] == form and rec["content_type"] == "application/x-www-form-urlencoded"
    assert [p["key"] for p in rec["params"]] == ["ts", "advertiser_id", "event", "order_id"]

    body = b'{"advertiser_id":"acme","event":"purchase","amount":12.50,"paid":true}'
    resp = http(ingester.url + "/postback", "POST", body, {**JSON_CT, "X-Postback-Timestamp": "1700000000"})
    assert resp.status == 202
    msg, rec = _find(kafka, ingester.topics.raw_postbacks.name, Codec.for_record("RawPostback"), "receipt_id",
                     resp.json()["receipt_id"])
    assert rec["body"] == body and rec["content_type"] == "application/json"
    assert ("amount", "12.50") in [(p["key"], p["value"]) for p in rec["params"]]
    assert msg.key() == resp.json()["receipt_id"].encode()  # no click_id: keyed by receipt


@pytest.mark.parametrize(("query", "field", "reason"), [
    ("event=purchase", "advertiser_id", "missing"),
    ("advertiser_id=acme", "event", "missing"),
    ("advertiser_id=acme&event=" + "x" * 3000, "event", "too_long"),
    ("advertiser_id=acme&event=purchase&note=%ff%fe", "note", "invalid_utf8"),
    ("advertiser_id=acme&event=purchase&event=lead", "event", "duplicate"),
    ("advertiser_id=acme&event=purchase&n=%zz", "n", "invalid_percent_encoding"),
    ("advertiser_id=acme&event=purchase&n=a%00b", "n", "nul_byte"),
    ("&".join(f"p{i}=1" for i in range(200)) + "&advertiser_id=a&event=e", "query", "too_many_parameters"),
])
def test_malformed_postbacks_get_400_with_reason(ingester: IngesterProcess, query: str, field: str,
                                                 reason: str) -> None:
    resp = http(ingester.url + "/postback?" + query)
    assert resp.status == 400, resp.body
    body = resp.json()
    assert body["status"] == "rejected"
    assert {"field": field, "reason": reason} in body["errors"]


@pytest.mark.parametrize("body", [
    b'{"advertiser_id":"acme","event":"purchase","items":[1,2]}',
    b'{"advertiser_id":"acme","event":"purchase","x":{"y":1}}',
    b'[1,2,3]',
    b'{"advertiser_id":"acme",',
    b"[" * 50000,
])
def test_non_flat_or_broken_json_is_400(ingester: IngesterProcess, body: bytes) -> None:
    resp = http(ingester.url + "/postback", "POST", body, JSON_CT)
    assert resp.status == 400
    assert resp.json()["errors"][0]["reason"] in ("not_flat", "not_object", "invalid_json")


def test_body_limits_content_types_methods_and_routes(ingester: IngesterProcess) -> None:
    big = b"advertiser_id=acme&event=purchase&pad=" + b"a" * 70000
    resp = http(ingester.url + "/postback", "POST", big, FORM)
    assert resp.status == 413 and resp.json()["errors"] == [{"field": "body", "reason": "too_large"}]
    resp = http(ingester.url + "/postback", "POST", b"advertiser_id=acme", {"Content-Type": "text/plain"})
    assert resp.status == 415 and resp.json()["status"] == "rejected"
    resp = http(ingester.url + "/postback", "PUT", b"", FORM)
    assert resp.status == 405 and resp.json()["errors"][0]["reason"] == "method_not_allowed"
    resp = http(ingester.url + "/nope")
    assert resp.status == 404 and resp.json()["errors"][0]["reason"] == "not_found"


def test_chunked_body_over_the_limit_is_413(ingester: IngesterProcess) -> None:
    host, port = urllib.parse.urlsplit(ingester.url).hostname, urllib.parse.urlsplit(ingester.url).port
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(b"POST /postback HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b"a" * 16384
        for _ in range(5):
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        sock.sendall(b"0\r\n\r\n")
        reply = sock.recv(65536)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]


def test_bulk_click_import(ingester: IngesterProcess, kafka: KafkaService) -> None:
    url = ingester.url + "/clicks"
    lines = [{"offer_id": "offer-1", "affiliate_id": "a1", "click_id": "legacy-1", "clicked_at": 1700000000},
             {"offer_id": "offer-1"},
             {"offer_id": "offer-2", "affiliate_id": "a2", "sub2": "s"}]
    assert http(url, "POST", json.dumps(lines).encode(), JSON_CT).status == 401
    assert http(url, "POST", b"[]", {**JSON_CT, "Authorization": "Bearer wrong"}).status == 401
    auth = {"Authorization": f"Bearer {BULK_TOKEN}"}
    assert http(url, "POST", b"x", {"Content-Type": "text/csv", **auth}).status == 415

    resp = http(url, "POST", json.dumps(lines).encode(), {**JSON_CT, **auth})
    assert resp.status == 202, resp.body
    body = resp.json()
    assert body["accepted"] == 2 and body["click_ids"][0] == "legacy-1"
    assert body["errors"] == [{"line": 2, "field": "affiliate_id", "reason": "missing"}]
    _, rec = _find(kafka, ingester.topics.clicks.name, Codec.for_record("Click"), "click_id", "legacy-1")
    assert rec["clicked_at_ms"] == 1_700_000_000_000 and rec["source"] == "bulk_import"

    ndjson = b'{"offer_id":"offer-1","affiliate_id":"n1"}\nnot json\n\n{"offer_id":"offer-1","affiliate_id":"n2"}\n'
    resp = http(url, "POST", ndjson, {"Content-Type": "application/x-ndjson", **auth})
    assert resp.status == 202
    assert resp.json()["accepted"] == 2 and resp.json()["errors"][0]["line"] == 2


def test_health_readiness_and_metrics(ingester: IngesterProcess) -> None:
    assert http(ingester.url + "/healthz").json() == {"status": "ok"}
    assert http(ingester.url + "/readyz").json() == {"status": "ready"}
    http(ingester.url + "/postback?event=x")  # one 400 to count
    text = http(ingester.url + "/metrics").body.decode()
    assert 'postback_ingest_requests_total{route="/postback",status="400"}' in text
    assert "postback_ingest_request_seconds_bucket" in text
    assert "postback_ingest_producer_queue_depth" in text
    assert "postback_ingest_kafka_delivery_errors" in text
