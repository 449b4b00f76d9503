"""A hostile-input corpus: each request gets its documented status, and the server keeps serving."""

from __future__ import annotations

import socket
import time
import urllib.parse

import pytest

from .conftest import IngesterProcess, http

OK = "advertiser_id=acme&event=purchase"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
JSON_CT = {"Content-Type": "application/json"}

CORPUS = [
    # (id, method, path, body, headers, status, reason)
    ("overlong value", "GET", f"/postback?{OK}&order_id={'9' * 5000}", None, {}, 400, "too_long"),
    ("overlong key", "GET", f"/postback?{OK}&{'k' * 200}=1", None, {}, 400, "invalid_key"),
    ("NUL in query", "GET", f"/postback?{OK}&order_id=a%00", None, {}, 400, "nul_byte"),
    ("control char", "GET", f"/postback?{OK}&order_id=a%07", None, {}, 400, "control_character"),
    ("bad percent", "GET", f"/postback?{OK}&order_id=%G1", None, {}, 400, "invalid_percent_encoding"),
    ("truncated percent", "GET", f"/postback?{OK}&order_id=%4", None, {}, 400, "invalid_percent_encoding"),
    ("overlong UTF-8", "GET", f"/postback?{OK}&order_id=%C0%AF", None, {}, 400, "invalid_utf8"),
    ("lone surrogate", "GET", f"/postback?{OK}&order_id=%ED%A0%80", None, {}, 400, "invalid_utf8"),
    ("duplicate click_id", "GET", f"/postback?{OK}&click_id=a&click_id=b", None, {}, 400, "duplicate"),
    ("bad click_id", "GET", f"/postback?{OK}&click_id=%3Cscript%3E", None, {}, 400, "invalid_click_id"),
    ("NUL in JSON", "POST", "/postback", b'{"advertiser_id":"acme","event":"p\\u0000"}', JSON_CT, 400, "nul_byte"),
    ("duplicate JSON key", "POST", "/postback", b'{"advertiser_id":"a","event":"x","event":"y"}', JSON_CT, 400,
     "duplicate"),
    ("JSON null value", "POST", "/postback", b'{"advertiser_id":"a","event":"x","n":null}', JSON_CT, 400, "not_flat"),
    ("JSON NaN", "POST", "/postback", b'{"advertiser_id":"a","event":"x","n":NaN}', JSON_CT, 400, "invalid_json"),
    ("deep JSON", "POST", "/postback", b'{"a":' * 5000 + b"1" + b"}" * 5000, JSON_CT, 400, "not_flat"),
    ("JSON not UTF-8", "POST", "/postback", b'{"advertiser_id":"\xff"}', JSON_CT, 400, "invalid_utf8"),
    ("multipart", "POST", "/postback", b"--x\r\n", {"Content-Type": "multipart/form-data; boundary=x"}, 415,
     "unsupported"),
    ("xml", "POST", "/postback", b"<a/>", {"Content-Type": "application/xml"}, 415, "unsupported"),
    ("huge body", "POST", "/postback", b"a=" + b"b" * 200_000, FORM, 413, "too_large"),
    ("form bad UTF-8", "POST", "/postback", OK.encode() + b"&x=%FF", FORM, 400, "invalid_utf8"),
    ("too many form params", "POST", "/postback", ("&".join(f"k{i}=v" for i in range(70)) + "&" + OK).encode(),
     FORM, 400, "too_many_parameters"),
    ("click NUL", "GET", "/click?offer_id=o%00&affiliate_id=a", None, {}, 400, "nul_byte"),
    ("click overlong", "GET", f"/click?offer_id=o&affiliate_id=a&sub1={'s' * 3000}", None, {}, 400, "too_long"),
    ("click duplicate offer", "GET", "/click?offer_id=o&offer_id=p&affiliate_id=a", None, {}, 400, "duplicate"),
    ("DELETE", "DELETE", "/postback", None, {}, 405, "method_not_allowed"),
]


@pytest.mark.parametrize(("method", "path", "body", "headers", "status", "reason"),
                         [c[1:] for c in CORPUS], ids=[c[0] for c in CORPUS])
def test_corpus_entry_gets_its_documented_status(ingester: IngesterProcess, method: str, path: str,
                                                 body: bytes | None, headers: dict[str, str], status: int,
                                                 reason: str) -> None:
    resp = http(ingester.url + path, method, body, headers)
    assert resp.status == status, resp.body[:300]
    payload = resp.json()
    assert payload["status"] == "rejected"
    assert reason in {e["reason"] for e in payload["errors"]}, payload


def _addr(ingester: IngesterProcess) -> tuple[str, int]:
    parts = urllib.parse.urlsplit(ingester.url)
    return parts.hostname or "127.0.0.1", parts.port or 80


def test_slow_clients_do_not_block_others(ingester: IngesterProcess) -> None:
    slow_headers = [socket.create_connection(_addr(ingester), timeout=10) for _ in range(50)]
    try:
        for sock in slow_headers:
            sock.sendall(b"GET /postback?advertiser_id=acme&event=x HTTP/1.1\r\nHost: x\r\n")  # never finishes
        started = time.monotonic()
        assert http(ingester.url + "/healthz").status == 200
        assert time.monotonic() - started < 2
    finally:
        for sock in slow_headers:
            sock.close()


def test_slow_body_gets_408(ingester: IngesterProcess) -> None:
    with socket.create_connection(_addr(ingester), timeout=15) as sock:
        sock.sendall(b"POST /postback HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                     b"Content-Length: 100\r\n\r\nadvertiser_id=acme")
        reply = sock.recv(65536)  # the module's ingester runs with --body-read-timeout 2
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert b'"reason":"read_timeout"' in reply


def test_garbage_request_line_is_400_and_server_survives(ingester: IngesterProcess) -> None:
    for garbage in (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64, b"GET / HTTP/9.9\r\n\r\n",
                    b"GET /click?" + b"a" * 100_000 + b" HTTP/1.1\r\n\r\n"):
        with socket.create_connection(_addr(ingester), timeout=10) as sock:
            sock.sendall(garbage)
            try:
                reply = sock.recv(1024)
            except ConnectionResetError:
                reply = b""
        assert reply == b"" or reply.split(b" ")[1][:1] == b"4", reply[:100]
    assert http(ingester.url + "/healthz").status == 200


def test_server_still_accepts_after_the_corpus(ingester: IngesterProcess) -> None:
    resp = http(ingester.url + "/postback?" + OK)
    assert resp.status == 202 and resp.json()["status"] == "accepted"
