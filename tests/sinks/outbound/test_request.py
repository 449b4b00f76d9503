"""Outbound requests: GET and POST, signatures the documented inbound scheme accepts, redaction."""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import replace
from decimal import Decimal
from urllib.parse import parse_qsl, urlsplit

import pytest

from postback import __version__
from postback.partners import Advertiser, OutboundEndpoint
from postback.signing import canonical_query
from processors.signing import AuthOk, authenticate
from sinks.outbound.request import REDACTED, OutboundRequest, build_request, redact
from sinks.outbound.template import fields

SECRET = "affiliate-secret-0123456789"
NOW = 1_767_225_600
URL = "https://aff.example/pb?cid={click_id}&p={payout}&cur={payout_currency}&s={status}&k={idempotency_key}"


def conv(**kw: object) -> dict[str, object]:
    base: dict[str, object] = {
        "conversion_id": "conv-1", "version": 2, "click_id": "clk 1/ü", "offer_id": "offer-1",
        "affiliate_id": "aff-1", "event": "purchase", "status": "approved",
        "payout": Decimal("5.000000"), "payout_currency": "EUR", "event_time_ms": 1_767_225_600_000,
    }
    base.update(kw)
    return base


def ep(**kw: object) -> OutboundEndpoint:
    return OutboundEndpoint(**{"affiliate_id": "aff-1", "name": "main", "url": URL, **kw})  # type: ignore[arg-type]


def hmac_hex(secret: str, message: bytes) -> str:
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def receiver() -> Advertiser:
    """The affiliate's side, configured like one of our advertisers with the endpoint's secret."""
    return Advertiser(advertiser_id="aff-1", auth_modes=("hmac",), secrets={"k1": SECRET})


def test_unsigned_get() -> None:
    req = build_request(ep(), conv(), NOW)
    assert isinstance(req, OutboundRequest) and req.method == "GET" and req.body is None
    assert req.url == ("https://aff.example/pb?cid=clk%201%2F%C3%BC&p=5.000000&cur=EUR&s=approved"
                       "&k=conv-1%3A2")
    assert req.headers == {"Idempotency-Key": "conv-1:2", "User-Agent": f"postback-pipeline/{__version__}"}
    assert req.redacted_url == req.url


def test_signed_get_verifies_with_the_inbound_verifier() -> None:
    req = build_request(ep(secret=SECRET), conv(), NOW)
    query = urlsplit(req.url).query
    params = parse_qsl(query, keep_blank_values=True)
    assert [k for k, _ in params][-2:] == ["ts", "sig"] and dict(params)["ts"] == str(NOW)
    assert dict(params)["cid"] == "clk 1/ü"
    # docs/signing.md by hand: HMAC-SHA256 over the canonical string of every parameter but sig.
    expected = hmac_hex(SECRET, canonical_query(params).encode())
    assert dict(params)["sig"] == expected
    # and the verifier our ingest pipeline runs.
    result = authenticate(receiver(), params, {}, b"", None, "203.0.113.1", NOW * 1000)
    assert isinstance(result, AuthOk), result
    wrong = replace(receiver(), secrets={"k1": "another-secret-0123456789"})
    assert not isinstance(authenticate(wrong, params, {}, b"", None, "203.0.113.1", NOW * 1000), AuthOk)


def test_signed_get_keeps_template_query_and_drops_fragment() -> None:
    req = build_request(ep(url="https://aff.example/pb/{offer_id}?a=1&b=x+y&e=#frag", secret=SECRET), conv(), NOW)
    parts = urlsplit(req.url)
    assert parts.fragment == "" and parts.path == "/pb/offer-1"
    assert parts.query.startswith("a=1&b=x+y&e=&ts=")
    params = parse_qsl(parts.query, keep_blank_values=True)
    assert isinstance(authenticate(receiver(), params, {}, b"", None, "203.0.113.1", NOW * 1000), AuthOk)


def test_signed_get_without_query() -> None:
    req = build_request(ep(url="https://aff.example/pb", secret=SECRET), conv(), NOW)
    assert urlsplit(req.url).query.startswith(f"ts={NOW}&sig=")


def test_post_body_and_headers() -> None:
    req = build_request(ep(method="POST"), conv(), NOW)
    assert req.method == "POST" and req.body is not None
    assert json.loads(req.body) == fields(conv())
    assert req.body == json.dumps(fields(conv()), sort_keys=True, separators=(",", ":"),
                                  ensure_ascii=False).encode()
    assert b" " not in req.body.replace(b"clk 1", b"")
    assert req.headers["Content-Type"] == "application/json"
    assert req.headers["Idempotency-Key"] == "conv-1:2"
    assert not any(h.startswith("X-Postback") for h in req.headers)
    assert req.url.startswith("https://aff.example/pb?cid=clk%201")


def test_signed_post_verifies() -> None:
    req = build_request(ep(method="POST", secret=SECRET), conv(), NOW)
    assert req.body is not None
    assert req.headers["X-Postback-Timestamp"] == str(NOW)
    assert req.headers["X-Postback-Signature"] == "v1=" + hmac_hex(SECRET, f"{NOW}.".encode() + req.body)
    # The verifier refuses header-signed requests with unsigned query parameters, so a
    # receiver like ours wants a POST endpoint URL without a query.
    req = build_request(ep(url="https://aff.example/pb", method="POST", secret=SECRET), conv(), NOW)
    assert req.body is not None
    sig_headers = {k: v for k, v in req.headers.items() if k.startswith("X-Postback")}
    params = list(json.loads(req.body).items())
    result = authenticate(receiver(), params, sig_headers, req.body, "application/json", "203.0.113.1",
                          NOW * 1000)
    assert isinstance(result, AuthOk), result
    tampered = req.body.replace(b"5.000000", b"9.000000")
    result = authenticate(receiver(), list(json.loads(tampered).items()), sig_headers, tampered,
                          "application/json", "203.0.113.1", NOW * 1000)
    assert not isinstance(result, AuthOk)


def test_idempotency_key_same_for_every_attempt() -> None:
    a = build_request(ep(secret=SECRET), conv(), NOW)
    b = build_request(ep(secret=SECRET), conv(), NOW + 60)
    assert a.headers["Idempotency-Key"] == b.headers["Idempotency-Key"] == "conv-1:2"
    assert a.url != b.url


def test_secret_never_in_redacted_url_repr_or_errors() -> None:
    endpoint = ep(url=URL + "&token=" + SECRET, secret=SECRET)
    req = build_request(endpoint, conv(), NOW)
    assert SECRET in req.url  # the template itself carried it
    assert SECRET not in req.redacted_url and SECRET not in repr(req)
    sig = dict(parse_qsl(urlsplit(req.url).query))["sig"]
    assert sig not in req.redacted_url and sig not in repr(req)
    assert "sig=REDACTED" in req.redacted_url and "token=REDACTED" in req.redacted_url
    with pytest.raises(ValueError) as info:
        build_request(ep(url="https://aff.example/?ts=1", secret=SECRET), conv(), NOW)
    assert SECRET not in str(info.value) and "aff-1/main" in str(info.value)
    with pytest.raises(ValueError) as info:
        build_request(ep(secret=SECRET), conv(conversion_id=None), NOW)
    assert SECRET not in str(info.value)
    assert SECRET not in repr(ep(secret=SECRET))


def test_bad_method() -> None:
    with pytest.raises(ValueError, match="method"):
        build_request(ep(method="PUT"), conv(), NOW)


@pytest.mark.parametrize(("url", "expected"), [
    ("https://a.example/p?sig=abc&x=1", f"https://a.example/p?sig={REDACTED}&x=1"),
    ("https://a.example/p?x=1&Token=abc&SIGNATURE=d", f"https://a.example/p?x=1&Token={REDACTED}&SIGNATURE={REDACTED}"),
    ("https://a.example/p?secret=s&key=k&api_key=a&apikey=b&password=p&pass=q&auth=r",
     "https://a.example/p?" + "&".join(f"{k}={REDACTED}" for k in
                                       ("secret", "key", "api_key", "apikey", "password", "pass", "auth"))),
    ("https://a.example/p?api-key=1&access_token=2&client_secret=3",
     f"https://a.example/p?api-key={REDACTED}&access_token={REDACTED}&client_secret={REDACTED}"),
    ("https://a.example/p?to%6Ben=x", f"https://a.example/p?to%6Ben={REDACTED}"),
    ("https://a.example/p?sig", f"https://a.example/p?sig={REDACTED}"),
    ("https://a.example/p?k=conv-1%3A2&cid=a%20b&keys=1", "https://a.example/p?k=conv-1%3A2&cid=a%20b&keys=1"),
    ("https://user:pw@a.example/p", f"https://{REDACTED}@a.example/p"),
    ("https://a.example/p#sig=x", "https://a.example/p"),
    ("https://a.example/p", "https://a.example/p"),
])
def test_redact(url: str, expected: str) -> None:
    assert redact(url) == expected
