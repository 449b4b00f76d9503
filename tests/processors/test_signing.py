"""The postback signing scheme: docs/signing.md, processors.signing and `postback sign` agree.

The expected values are written out below *and* must appear verbatim in the partner
documentation; an independent implementation (byte-wise percent-encoding, HMAC built
from hashlib.sha256 by hand) checks the reference on random inputs.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import hmac
import io
import random
import re
import shutil
import string
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app.commands import sign as sign_cli
from ingest.validation import RejectedInput, parse_json_object, parse_urlencoded
from postback.partners import parse_partner_config
from postback.signing import canonical_query, sign_json, sign_query
from processors.signing import REASONS, AuthFailed, AuthOk, authenticate

DOC = Path(__file__).resolve().parents[2] / "docs" / "signing.md"

# --------------------------------------------------------------------------- fixtures

S2025 = "acme-test-secret-2025-0000"
S2026 = "acme-test-secret-2026-1111"
TOKEN = "legacy-token-0123456789"
MIXED_TOKEN = "mixed-token-0123456789ab"

CONFIG = parse_partner_config(f"""
[advertisers.acme]
auth_modes = ["hmac"]
secrets = {{ k2025 = "{S2025}", k2026 = "{S2026}" }}
default_key_id = "k2026"
timestamp_tolerance_s = 300

[advertisers.solo]
secrets = {{ s1 = "solo-test-secret-0000000" }}
timestamp_tolerance_s = 60

[advertisers.legacy]
auth_modes = ["token"]
token = "{TOKEN}"

[advertisers.mixed]
auth_modes = ["hmac", "token"]
secrets = {{ m1 = "mixed-test-secret-00000" }}
token = "{MIXED_TOKEN}"

[advertisers.fenced]
secrets = {{ f1 = "fenced-test-secret-00000" }}
allow_ips = ["203.0.113.0/24", "2001:db8::/32"]
""", "test-partners.toml")
ACME = CONFIG.advertisers["acme"]
SOLO = CONFIG.advertisers["solo"]
LEGACY = CONFIG.advertisers["legacy"]
MIXED = CONFIG.advertisers["mixed"]
FENCED = CONFIG.advertisers["fenced"]

# --------------------------------------------------------------------------- doc vectors

TS1 = 1767225600
PARAMS1 = [("advertiser_id", "acme"), ("event", "purchase"), ("click_id", "c7Hq2xK9ZpL"),
           ("order_id", "A/1001"), ("amount", "19.90"), ("currency", "EUR"), ("coupon", "SAVE+10"),
           ("customer", "Jürgen Müller"), ("sub", "a~b"), ("sub1", "x"), ("tag", "vip"), ("tag", "über")]
CANONICAL1 = ("advertiser_id=acme&amount=19.90&click_id=c7Hq2xK9ZpL&coupon=SAVE%2B10&currency=EUR"
              "&customer=J%C3%BCrgen%20M%C3%BCller&event=purchase&kid=k2026&order_id=A%2F1001&sub=a~b"
              "&sub1=x&tag=%C3%BCber&tag=vip&ts=1767225600")
SIG1 = "608df2a3ee816d02d3f95bae51766bf2aba91bf761549ed9db5e222ea629c05d"
GET1 = ("/postback?advertiser_id=acme&event=purchase&click_id=c7Hq2xK9ZpL&order_id=A%2F1001&amount=19.90"
        "&currency=EUR&coupon=SAVE%2B10&customer=J%C3%BCrgen+M%C3%BCller&sub=a~b&sub1=x&tag=vip"
        "&tag=%C3%BCber&ts=1767225600&kid=k2026&sig=" + SIG1)

TS2 = 1767225900
BODY2 = (b'{"advertiser_id":"acme","event":"purchase","click_id":"c7Hq2xK9ZpL",'
         b'"order_id":"A-1002","amount":"42.00","currency":"EUR"}')
SIG2_K2026 = "34c2bffebdcba26793e6cf4429a0743df9a80f895b33278c00fb362d1ab81c28"
SIG2_K2025 = "887810cf9be301fd83be5b8e2603fe4cf669604bbbca1ebb9f41f96430cf7eca"

CANONICAL3 = CANONICAL1.replace("&kid=k2026", "")
SIG3_K2025 = "5a1d2b8bfe071a083dd4df1e1fc63a8a68335ac4bdf9681054a5760eddb1ce66"


@pytest.fixture(scope="module")
def doc() -> str:
    return DOC.read_text(encoding="utf-8")


def _blocks(doc: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", doc, flags=re.S)


# --------------------------------------------------------------------------- independent implementation

_UNRESERVED_BYTES = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.~")


def ind_encode(text: str) -> bytes:
    """RFC 3986 percent-encoding, one UTF-8 byte at a time."""
    out = bytearray()
    for byte in text.encode("utf-8"):
        if byte in _UNRESERVED_BYTES:
            out.append(byte)
        else:
            out += b"%" + b"0123456789ABCDEF"[byte >> 4:(byte >> 4) + 1] + b"0123456789ABCDEF"[byte & 15:(byte & 15) + 1]
    return bytes(out)


def ind_canonical(params: list[tuple[str, str]]) -> bytes:
    encoded = [ind_encode(k) + b"\x00" + ind_encode(v) for k, v in params if k != "sig"]
    encoded.sort()  # NUL sorts below every encoded byte: same as sorting (key, value)
    return b"&".join(e.replace(b"\x00", b"=") for e in encoded)


def ind_hmac_sha256(key: bytes, message: bytes) -> str:
    """HMAC-SHA256 per RFC 2104, without the hmac module."""
    if len(key) > 64:
        key = hashlib.sha256(key).digest()
    key = key.ljust(64, b"\x00")
    inner = hashlib.sha256(bytes(b ^ 0x36 for b in key) + message).digest()
    return hashlib.sha256(bytes(b ^ 0x5C for b in key) + inner).hexdigest()


_CHARS = (string.ascii_letters + string.digits + "-_.~" + " !\"#$%&'()*+,/:;<=>?@[\\]^`{|}\t"
          + "üÜßé€£中文😀\u00a0\u200b\u0301\ufeff\U0010fffd")
_KEY_POOL = ["a", "b", "A", "sub", "sub1", "sub_1", "tag", "x[]", "x[0]", "é", "a b", "a=b", "~k", "-", "%41"]


def _text(rng: random.Random, max_len: int) -> str:
    return "".join(rng.choice(_CHARS) for _ in range(rng.randint(0, max_len)))


def _random_params(rng: random.Random) -> list[tuple[str, str]]:
    params = []
    for _ in range(rng.randint(0, 14)):
        key = rng.choice(_KEY_POOL) if rng.random() < 0.6 else (_text(rng, 8) or "k")
        value = rng.choice(["", "vip", "x"]) if rng.random() < 0.2 else _text(rng, 20)
        params.append((key, value))
    if params and rng.random() < 0.4:  # an exact duplicate pair
        params.insert(rng.randrange(len(params) + 1), rng.choice(params))
    return params


# --------------------------------------------------------------------------- helpers


def auth(adv, params=(), headers=None, body=b"", content_type=None, ip="198.51.100.7", at_ms=TS1 * 1000):
    return authenticate(adv, list(params), headers or {}, body, content_type, ip, at_ms)


def assert_failed(result, reason: str) -> AuthFailed:
    assert isinstance(result, AuthFailed), result
    assert result.reason == reason, result
    assert result.reason in REASONS
    return result


def assert_ok(result, key_id: str | None = None, mode: str = "hmac") -> AuthOk:
    assert isinstance(result, AuthOk), result
    assert result.mode == mode
    assert result.key_id == key_id
    assert re.fullmatch(r"[0-9a-f]{64}", result.replay_key)
    return result


def json_record(body: bytes, headers: dict[str, str], at_ms: int = TS2 * 1000, adv=ACME, **kw):
    """authenticate() on what the ingester records for a JSON POST without a query string."""
    return auth(adv, parse_json_object(body), headers, body, "application/json", at_ms=at_ms, **kw)


# --------------------------------------------------------------------------- documented vectors


def test_vector_1_query_signing_with_key_id(doc: str) -> None:
    for text in (CANONICAL1, SIG1, GET1):
        assert text in doc
    signed = sign_query(PARAMS1, S2026, TS1, kid="k2026")
    assert signed[:len(PARAMS1)] == PARAMS1
    assert signed[len(PARAMS1):] == [("ts", str(TS1)), ("kid", "k2026"), ("sig", SIG1)]
    assert canonical_query(signed) == CANONICAL1
    assert ind_canonical(signed) == CANONICAL1.encode()
    assert ind_hmac_sha256(S2026.encode(), CANONICAL1.encode()) == SIG1
    ok = assert_ok(auth(ACME, signed), "k2026")
    assert ok.replay_key == hashlib.sha256(CANONICAL1.encode()).hexdigest()


def test_vector_1_as_sent_on_the_wire_authenticates() -> None:
    params = parse_urlencoded(GET1.split("?", 1)[1])  # exactly what the ingester records
    assert params == sign_query(PARAMS1, S2026, TS1, kid="k2026")
    assert_ok(auth(ACME, params), "k2026")


def test_vector_2_json_header_signing(doc: str) -> None:
    assert len(BODY2) == 122 and "122 bytes" in doc
    assert BODY2.decode() in doc
    for line in ("X-Postback-Timestamp: 1767225900", "X-Postback-Key-Id: k2026",
                 f"X-Postback-Signature: v1={SIG2_K2026}"):
        assert line in doc
    headers = sign_json(BODY2, S2026, TS2, kid="k2026")
    assert headers == {"X-Postback-Timestamp": "1767225900", "X-Postback-Key-Id": "k2026",
                       "X-Postback-Signature": f"v1={SIG2_K2026}"}
    assert ind_hmac_sha256(S2026.encode(), b"1767225900." + BODY2) == SIG2_K2026
    ok = assert_ok(json_record(BODY2, headers), "k2026")
    assert ok.replay_key == hashlib.sha256(b"1767225900." + BODY2).hexdigest()


def test_vector_3_rotation(doc: str) -> None:
    both = f"v1={SIG2_K2025},v1={SIG2_K2026}"
    assert f"X-Postback-Signature: {both}" in doc
    assert f"k2025: {S2025}" in doc and f"k2026: {S2026}" in doc
    assert sign_json(BODY2, [S2025, S2026], TS2) == {"X-Postback-Timestamp": str(TS2),
                                                      "X-Postback-Signature": both}
    assert ind_hmac_sha256(S2025.encode(), b"1767225900." + BODY2) == SIG2_K2025
    assert_ok(json_record(BODY2, {"X-Postback-Timestamp": str(TS2), "X-Postback-Signature": both}), "k2025")

    assert CANONICAL3 in doc and SIG3_K2025 in doc
    signed = sign_query(PARAMS1, S2025, TS1)
    assert canonical_query(signed) == CANONICAL3 and signed[-1] == ("sig", SIG3_K2025)
    assert ind_hmac_sha256(S2025.encode(), CANONICAL3.encode()) == SIG3_K2025
    assert_ok(auth(ACME, signed), "k2025")


def test_doc_python_snippet_prints_the_vectors(doc: str) -> None:
    (snippet,) = _blocks(doc, "python")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(snippet, "docs/signing.md", "exec"), {"__name__": "doc_snippet"})
    lines = out.getvalue().splitlines()
    assert lines[0] == SIG1
    assert_ok(auth(ACME, parse_urlencoded(lines[1])), "k2026")
    assert f"'X-Postback-Signature': 'v1={SIG2_K2026}'" in lines[2] and "'k2026'" in lines[2]
    assert f"'v1={SIG2_K2025},v1={SIG2_K2026}'" in lines[3]
    assert lines[4] == SIG3_K2025


@pytest.mark.skipif(not (shutil.which("bash") and shutil.which("openssl")), reason="needs bash and openssl")
def test_doc_shell_snippets_produce_the_vectors(doc: str, tmp_path: Path) -> None:
    query_sh, json_sh = _blocks(doc, "sh")
    shim = 'curl() { printf "curl"; printf " [%s]" "$@"; printf "\\n"; }\n'  # print instead of sending
    for script, expected in ((query_sh, [f"canonical: {CANONICAL1}", f"sig: {SIG1}"]),
                             (json_sh, [f"sig: {SIG2_K2026}"])):
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", shim + script], cwd=tmp_path,
                              capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        assert lines[:len(expected)] == expected
        assert lines[-1].startswith("curl [")
    assert (tmp_path / "body.json").read_bytes() == BODY2
    assert f"[X-Postback-Signature: v1={SIG2_K2026}]" in lines[-1]


def test_doc_lists_every_rejection_reason(doc: str) -> None:
    for reason in REASONS:
        assert f"| `{reason}` |" in doc


# --------------------------------------------------------------------------- canonical string


def test_encoding_leaves_exactly_the_unreserved_characters() -> None:
    kept = [chr(c) for c in range(0x110000)
            if not 0xD800 <= c < 0xE000 and canonical_query([("k", chr(c))]) == f"k={chr(c)}"]
    assert "".join(kept) == "-.0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz~"
    assert canonical_query([(" ", "+/?&=%ü")]) == "%20=%2B%2F%3F%26%3D%25%C3%BC"


def test_canonical_sorting_rules() -> None:
    # by encoded key, then encoded value; pairs, not joined strings; sig excluded; dups kept
    assert canonical_query([("sub1", "x"), ("sub", "y")]) == "sub=y&sub1=x"
    assert canonical_query([("t", "vip"), ("t", "über"), ("t", "vip")]) == "t=%C3%BCber&t=vip&t=vip"
    assert canonical_query([("a", "/"), ("a", ".")]) == "a=%2F&a=."
    assert canonical_query([("sig", "x"), ("b", ""), ("a", "1")]) == "a=1&b="
    assert canonical_query([]) == ""
    with pytest.raises(ValueError):
        canonical_query([("k", "\ud800")])


def test_independent_implementation_agrees_on_500_random_parameter_sets() -> None:
    rng = random.Random(20260101)
    secrets = [S2026, "short-but-ok-16ch", "x" * 100, "sécret-ünïcode-key"]
    for i in range(500):
        params = _random_params(rng)
        assert canonical_query(params).encode() == ind_canonical(params), params
        # what sign_query adds is signed too
        unsigned = [(k, v) for k, v in params if k not in ("ts", "kid", "sig")]
        secret, ts = rng.choice(secrets), rng.randrange(10**10)
        kid = rng.choice([None, "k2026", "ü-kid"])
        signed = sign_query(unsigned, secret, ts, kid=kid)
        assert signed[-1] == ("sig", ind_hmac_sha256(secret.encode(), ind_canonical(signed))), params
        body = _text(rng, 60).encode()
        sig = sign_json(body, secret, ts)["X-Postback-Signature"]
        assert sig == "v1=" + ind_hmac_sha256(secret.encode(), str(ts).encode() + b"." + body)
        if i % 5 == 0:  # and the verifier accepts what was signed
            adv_params = [(k, v) for k, v in unsigned if k != "token"]
            result = auth(ACME, sign_query(adv_params, S2025, TS1), at_ms=TS1 * 1000 + rng.randrange(-300_000, 300_001))
            assert_ok(result, "k2025")


# --------------------------------------------------------------------------- rule 1: ip


def test_ip_allowlist() -> None:
    params = sign_query([("event", "lead")], "fenced-test-secret-00000", TS1)
    assert_ok(auth(FENCED, params, ip="203.0.113.9"), "f1")
    assert_ok(auth(FENCED, params, ip="2001:db8::1"), "f1")
    assert_ok(auth(FENCED, params, ip="::ffff:203.0.113.9"), "f1")
    for ip in ("198.51.100.7", "", "not-an-ip", "2001:db9::1"):
        assert_failed(auth(FENCED, params, ip=ip), "ip_not_allowed")
    # checked first: even an unsigned request reports the address
    assert_failed(auth(FENCED, [("event", "lead")], ip="198.51.100.7"), "ip_not_allowed")


# --------------------------------------------------------------------------- rule 2: mode


def test_missing_signature_when_nothing_authenticates() -> None:
    failed = assert_failed(auth(ACME, [("event", "lead"), ("ts", str(TS1))]), "missing_signature")
    assert "X-Postback-Signature" in failed.detail and "sig" in failed.detail
    assert_failed(auth(ACME, []), "missing_signature")


def test_header_presence_selects_header_mode_over_sig_param() -> None:
    headers = sign_json(BODY2, S2026, TS2)
    query_signed = sign_query([("event", "lead")], S2026, TS2)
    # a correct sig parameter does not help when the header is there: the header is checked
    result = auth(ACME, query_signed, {"X-Postback-Signature": "v1=" + "0" * 64,
                                       "X-Postback-Timestamp": str(TS2)}, at_ms=TS2 * 1000)
    assert_failed(result, "missing_signature")  # query params outside the (empty) body
    assert_ok(json_record(BODY2, headers), "k2026")


def test_auth_mode_not_allowed() -> None:
    assert_failed(auth(ACME, [("event", "lead"), ("token", "whatever-token-123")]), "auth_mode_not_allowed")
    legacy_secret = "legacy-test-secret-000"
    assert_failed(auth(LEGACY, sign_query([("event", "lead")], legacy_secret, TS1)), "auth_mode_not_allowed")
    headers = sign_json(BODY2, legacy_secret, TS2)
    assert_failed(json_record(BODY2, headers, adv=LEGACY), "auth_mode_not_allowed")


def test_token_mode_allowed_and_not_allowed() -> None:
    params = [("event", "lead"), ("token", TOKEN)]
    ok = assert_ok(auth(LEGACY, params), None, mode="token")
    assert ok.replay_key == hashlib.sha256(canonical_query(params).encode()).hexdigest()
    assert "token=" in canonical_query(params)
    assert_failed(auth(LEGACY, [("event", "lead"), ("token", TOKEN + "x")]), "bad_signature")
    assert_failed(auth(LEGACY, [("event", "lead"), ("token", "")]), "bad_signature")
    assert_failed(auth(LEGACY, [("event", "lead"), ("token", "tökén-ñon-ascii")]), "bad_signature")
    assert_failed(auth(ACME, params), "auth_mode_not_allowed")
    # an advertiser allowing both may use either
    assert_ok(auth(MIXED, [("event", "lead"), ("token", MIXED_TOKEN)]), None, mode="token")
    assert_ok(auth(MIXED, sign_query([("event", "lead")], "mixed-test-secret-00000", TS1)), "m1")


def test_token_mode_timestamp_only_when_sent() -> None:
    far = TS1 * 1000 + 10 * 86_400_000
    assert_ok(auth(LEGACY, [("token", TOKEN)], at_ms=far), None, mode="token")
    assert_ok(auth(LEGACY, [("token", TOKEN), ("ts", str(TS1))], at_ms=TS1 * 1000 + 300_000), None, mode="token")
    assert_failed(auth(LEGACY, [("token", TOKEN), ("ts", str(TS1))], at_ms=far), "stale_timestamp")
    assert_failed(auth(LEGACY, [("token", TOKEN), ("ts", "soon")]), "invalid_field")


def test_repeated_auth_parameters_are_invalid() -> None:
    signed = sign_query([("event", "lead")], S2026, TS1)
    assert_failed(auth(ACME, signed + [("ts", str(TS1))]), "invalid_field")
    assert_failed(auth(ACME, signed + [signed[-1]]), "invalid_field")
    assert_failed(auth(ACME, sign_query([("event", "lead")], S2026, TS1, kid="k2026") + [("kid", "k2026")]),
                  "invalid_field")
    assert_failed(auth(LEGACY, [("token", TOKEN), ("token", TOKEN)]), "invalid_field")


def test_conflicting_header_spellings_are_invalid() -> None:
    headers = sign_json(BODY2, S2026, TS2)
    same = dict(headers, **{"x-postback-signature": headers["X-Postback-Signature"]})
    assert_ok(json_record(BODY2, same), "k2026")  # the same value twice is harmless
    other = dict(headers, **{"x-postback-signature": "v1=" + "0" * 64})
    assert_failed(json_record(BODY2, other), "invalid_field")


def test_header_names_are_case_insensitive() -> None:
    headers = {k.lower(): v for k, v in sign_json(BODY2, S2026, TS2, kid="k2026").items()}
    assert_ok(json_record(BODY2, headers), "k2026")
    headers = {k.upper(): v for k, v in sign_json(BODY2, S2026, TS2, kid="k2026").items()}
    assert_ok(json_record(BODY2, headers), "k2026")


# --------------------------------------------------------------------------- rule 3: coverage


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8",
                                          "Application/JSON", "application/vnd.partner+json"])
def test_query_signing_is_refused_for_json_bodies(content_type: str) -> None:
    # the ingester appends the JSON pairs to params; a correct sig over all of them still fails
    params = sign_query(parse_json_object(BODY2), S2026, TS1)
    failed = assert_failed(auth(ACME, params, body=BODY2, content_type=content_type), "missing_signature")
    assert failed.detail == "JSON bodies are signed with the X-Postback-Signature header"
    assert_ok(auth(ACME, params), "k2026")  # the same params without a JSON body pass


def test_header_signing_must_cover_every_parameter() -> None:
    headers = sign_json(BODY2, S2026, TS2)
    body_params = parse_json_object(BODY2)
    assert_ok(json_record(BODY2, headers), "k2026")
    # a query-string parameter (recorded before the body's) is not signed
    failed = assert_failed(auth(ACME, [("amount", "9999")] + body_params, headers, BODY2, "application/json",
                                at_ms=TS2 * 1000), "missing_signature")
    assert "1 parameter(s)" in failed.detail
    # an empty body signs nothing but the timestamp: query parameters are refused
    empty = sign_json(b"", S2026, TS2)
    assert_failed(auth(ACME, [("event", "lead")], empty, b"", None, at_ms=TS2 * 1000), "missing_signature")
    assert_ok(auth(ACME, [], empty, b"", None, at_ms=TS2 * 1000), "k2026")
    # params that do not come from the body at all
    assert_failed(auth(ACME, [("event", "lead")], headers, BODY2, "application/json", at_ms=TS2 * 1000),
                  "missing_signature")
    assert_failed(auth(ACME, body_params, headers, BODY2, "text/plain", at_ms=TS2 * 1000), "missing_signature")


def test_header_signing_of_a_form_body() -> None:
    body = b"advertiser_id=acme&event=purchase&note=J%C3%BCrgen+M%C3%BCller&sum=1%2B1&empty=&&flag"
    params = parse_urlencoded(body)
    headers = sign_json(body, S2026, TS2)
    form = "application/x-www-form-urlencoded"
    assert_ok(auth(ACME, params, headers, body, form, at_ms=TS2 * 1000), "k2026")
    assert_failed(auth(ACME, [("x", "1")] + params, headers, body, form, at_ms=TS2 * 1000), "missing_signature")


def test_header_signing_json_value_kinds_match_the_ingester() -> None:
    body = ('{"advertiser_id":"acme","event":"purchase","amount":19.990,"n":-0,"big":1e400,'
            '"ok":true,"no":false,"esc":"\\u00fc\\"\\t","raw":"ü 😀","k[]":"1"}').encode()
    headers = sign_json(body, S2026, TS2)
    assert_ok(json_record(body, headers), "k2026")


# --------------------------------------------------------------------------- rule 4: timestamp


@pytest.mark.parametrize("bad_ts", ["", "abc", "12.5", "+1767225600", "-1767225600", " 1767225600",
                                    "1_767_225_600", "١٧٦٧٢٢٥٦٠٠", "1" * 19, "0x6955B900"])
def test_timestamp_must_be_plain_digits(bad_ts: str) -> None:
    params = [("event", "lead"), ("ts", bad_ts)]
    params.append(("sig", hmac.new(S2026.encode(), canonical_query(params).encode(), hashlib.sha256).hexdigest()))
    assert_failed(auth(ACME, params), "invalid_field")
    body_headers = {"X-Postback-Timestamp": bad_ts + "x", "X-Postback-Signature": "v1=" + "0" * 64}
    assert_failed(auth(ACME, [], body_headers), "invalid_field")


def test_timestamp_missing_is_missing_signature() -> None:
    params = [("event", "lead")]
    params.append(("sig", hmac.new(S2026.encode(), b"event=lead", hashlib.sha256).hexdigest()))
    assert_failed(auth(ACME, params), "missing_signature")
    headers = sign_json(BODY2, S2026, TS2)
    del headers["X-Postback-Timestamp"]
    assert_failed(json_record(BODY2, headers), "missing_signature")


def test_tolerance_boundaries_use_receipt_time_not_the_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    # processing a year late (consumer lag, topic replay) changes nothing
    monkeypatch.setattr(time, "time", lambda: TS1 + 365 * 86_400.0)
    monkeypatch.setattr(time, "time_ns", lambda: (TS1 + 365 * 86_400) * 10**9)
    for adv, secret, tol in ((ACME, S2026, 300), (SOLO, "solo-test-secret-0000000", 60)):
        params = sign_query([("event", "lead")], secret, TS1)
        headers = sign_json(BODY2, secret, TS1)
        for delta_ms, reason in ((0, None), (tol * 1000, None), (-tol * 1000, None), (tol * 1000 - 1, None),
                                 ((tol + 1) * 1000, "stale_timestamp"), (-(tol + 1) * 1000, "stale_timestamp"),
                                 (tol * 1000 + 1, "stale_timestamp"), (-tol * 1000 - 1, "stale_timestamp")):
            at = TS1 * 1000 + delta_ms
            for result in (auth(adv, params, at_ms=at), json_record(BODY2, headers, at_ms=at, adv=adv)):
                if reason is None:
                    assert isinstance(result, AuthOk), (adv.advertiser_id, delta_ms, result)
                else:
                    failed = assert_failed(result, reason)
                    assert f"at most {tol} s" in failed.detail


# --------------------------------------------------------------------------- rules 5-6: keys, compare


def test_rotation_query_mode() -> None:
    unsigned = [("event", "lead"), ("click_id", "c1")]
    for secret, kid in ((S2025, "k2025"), (S2026, "k2026")):
        assert_ok(auth(ACME, sign_query(unsigned, secret, TS1)), kid)  # no kid: both keys tried
        assert_ok(auth(ACME, sign_query(unsigned, secret, TS1, kid=kid)), kid)  # kid selects
    # kid selects one key: a signature made with the other one does not match
    assert_failed(auth(ACME, sign_query(unsigned, S2026, TS1, kid="k2025")), "bad_signature")
    failed = assert_failed(auth(ACME, sign_query(unsigned, S2026, TS1, kid="k2099")), "unknown_key_id")
    assert "k2099" in failed.detail
    assert_failed(auth(ACME, sign_query(unsigned, S2026, TS1, kid="")), "unknown_key_id")


def test_rotation_header_mode() -> None:
    headers = sign_json(BODY2, [S2025, S2026], TS2)
    assert_ok(json_record(BODY2, headers), "k2025")
    assert_ok(json_record(BODY2, dict(headers, **{"X-Postback-Key-Id": "k2026"})), "k2026")
    assert_failed(json_record(BODY2, dict(headers, **{"X-Postback-Key-Id": "k2099"})), "unknown_key_id")
    # only the second value matches (the first is made with a key we do not have)
    stranger = sign_json(BODY2, "some-other-secret-123", TS2)["X-Postback-Signature"]
    two = {"X-Postback-Timestamp": str(TS2), "X-Postback-Signature": f"{stranger},v1={SIG2_K2026}"}
    assert_ok(json_record(BODY2, two), "k2026")
    # unknown schemes, malformed values and whitespace around values are ignored
    messy = {"X-Postback-Timestamp": f" {TS2} ",
             "X-Postback-Signature": f"v0=deadbeef, v1=nothex ,t=1,v1={SIG2_K2026.upper()}"}
    assert_ok(json_record(BODY2, messy), "k2026")
    # kid names one key: two values signed with k2025 only do not match k2026
    assert_failed(json_record(BODY2, {"X-Postback-Timestamp": str(TS2), "X-Postback-Key-Id": "k2026",
                                      "X-Postback-Signature": f"v1={SIG2_K2025}"}), "bad_signature")


def test_signature_header_value_problems() -> None:
    base = {"X-Postback-Timestamp": str(TS2)}
    assert_failed(json_record(BODY2, dict(base, **{"X-Postback-Signature": ""})), "missing_signature")
    assert_failed(json_record(BODY2, dict(base, **{"X-Postback-Signature": "v0=" + SIG2_K2026})),
                  "missing_signature")
    assert_failed(json_record(BODY2, dict(base, **{"X-Postback-Signature": "v1=" + SIG2_K2026[:-1]})),
                  "bad_signature")
    nine = ",".join(["v1=" + "0" * 64] * 8 + ["v1=" + SIG2_K2026])
    assert_failed(json_record(BODY2, dict(base, **{"X-Postback-Signature": nine})), "invalid_field")
    eight = ",".join(["v1=" + "0" * 64] * 7 + ["v1=" + SIG2_K2026])
    assert_ok(json_record(BODY2, dict(base, **{"X-Postback-Signature": eight})), "k2026")


@pytest.mark.parametrize("bad", ["", "0" * 63, "0" * 65, "g" * 64, SIG1[:-1] + " ", "v1=" + SIG1, "ü" * 64])
def test_malformed_sig_is_bad_signature(bad: str) -> None:
    signed = sign_query(PARAMS1, S2026, TS1, kid="k2026")
    assert_failed(auth(ACME, signed[:-1] + [("sig", bad)]), "bad_signature")


def test_sig_case_and_replay_key_do_not_depend_on_presentation() -> None:
    signed = sign_query(PARAMS1, S2026, TS1, kid="k2026")
    lower = assert_ok(auth(ACME, signed), "k2026")
    upper = assert_ok(auth(ACME, signed[:-1] + [("sig", SIG1.upper())]), "k2026")
    shuffled = signed[:]
    random.Random(1).shuffle(shuffled)
    assert lower == upper == auth(ACME, shuffled)

    keys = set()
    for headers in (sign_json(BODY2, S2026, TS2), sign_json(BODY2, S2026, TS2, kid="k2026"),
                    sign_json(BODY2, S2025, TS2), sign_json(BODY2, [S2025, S2026], TS2),
                    sign_json(BODY2, [S2026, S2025], TS2),
                    {"X-Postback-Timestamp": str(TS2), "X-Postback-Signature": f"v1={SIG2_K2026.upper()}"}):
        result = json_record(BODY2, headers)
        assert isinstance(result, AuthOk), (headers, result)
        keys.add(result.replay_key)
    assert keys == {hashlib.sha256(f"{TS2}.".encode() + BODY2).hexdigest()}
    # a different request (new ts) is a different replay key
    other = assert_ok(json_record(BODY2, sign_json(BODY2, S2026, TS2 + 1)), "k2026")
    assert other.replay_key not in keys


def test_every_candidate_is_compared(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = hmac.compare_digest

    def counting(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    # 2 keys x 2 presented values, the very first pair matches: still 4 comparisons
    assert_ok(json_record(BODY2, sign_json(BODY2, [S2025, S2026], TS2)), "k2025")
    assert len(calls) == 4
    calls.clear()
    assert_failed(auth(ACME, sign_query([("event", "lead")], "unknown-secret-0000", TS1)), "bad_signature")
    assert len(calls) == 2
    calls.clear()
    assert_ok(auth(LEGACY, [("token", TOKEN)]), None, mode="token")
    assert len(calls) == 1


def test_bad_signature_detail_helps_without_leaking() -> None:
    failed = assert_failed(auth(ACME, sign_query([("event", "lead")], "unknown-secret-0000", TS1)), "bad_signature")
    assert "k2025, k2026" in failed.detail and f"'event=lead&ts={TS1}'" in failed.detail
    for secret in (S2025, S2026):
        assert secret not in failed.detail
        assert hmac.new(secret.encode(), f"event=lead&ts={TS1}".encode(), hashlib.sha256).hexdigest() \
            not in failed.detail
    token_failed = assert_failed(auth(LEGACY, [("token", "nope-nope-nope-nope")]), "bad_signature")
    assert TOKEN not in token_failed.detail


# --------------------------------------------------------------------------- tampering


def test_tampering_with_any_parameter_is_bad_signature() -> None:
    signed = sign_query(PARAMS1, S2026, TS1, kid="k2026")
    assert_ok(auth(ACME, signed), "k2026")
    for i, (k, v) in enumerate(signed[:-1]):
        if k == "kid":
            changed = [(k, "k2025")]
        elif k == "ts":
            changed = [(k, str(TS1 + 1)), (k, "0" + v)]
        else:
            changed = [(k, v + "x"), (k, v[:-1]), (k + "x", v), (k, v + " "), (k.upper(), v)]
        for new in changed:
            tampered = signed[:i] + [new] + signed[i + 1:]
            assert_failed(auth(ACME, tampered), "bad_signature")
        assert_failed(auth(ACME, signed[:i] + signed[i + 1:]), "missing_signature" if k == "ts" else "bad_signature")
    assert_failed(auth(ACME, signed[:-1] + [("extra", "1"), signed[-1]]), "bad_signature")
    assert_failed(auth(ACME, signed[:-1] + [("tag", "vip"), signed[-1]]), "bad_signature")  # one more duplicate


def test_tampering_with_any_body_byte_is_bad_signature() -> None:
    headers = sign_json(BODY2, S2026, TS2, kid="k2026")
    for i in range(len(BODY2)):
        for flip in (0x01, 0x20):
            body = BODY2[:i] + bytes([BODY2[i] ^ flip]) + BODY2[i + 1:]
            try:  # what the ingester would record for this body
                params = parse_json_object(body)
            except RejectedInput:
                params = []  # not recordable as JSON; the signature check alone still fails
            result = auth(ACME, params, headers, body, "application/json", at_ms=TS2 * 1000)
            assert_failed(result, "bad_signature")
    for body in (BODY2 + b"\n", b" " + BODY2, BODY2[:-1], b""):
        assert_failed(auth(ACME, [], headers, body, "application/json", at_ms=TS2 * 1000), "bad_signature")
    moved = dict(headers, **{"X-Postback-Timestamp": str(TS2 + 1)})
    assert_failed(json_record(BODY2, moved), "bad_signature")


# --------------------------------------------------------------------------- robustness


def test_never_raises_on_hostile_input() -> None:
    rng = random.Random(7)
    header_values = ["", "v1=", "v1=,,,", "v1=" + "0" * 64, "\x00", "ü" * 10, "v1=" + "ü" * 64, "=" * 9]
    for _ in range(400):
        params = _random_params(rng) + rng.sample([("ts", str(TS1)), ("sig", "0" * 64), ("kid", "k2025"),
                                                   ("token", TOKEN), ("ts", "x\ud800"), ("k", "\ud800")],
                                                  rng.randint(0, 3))
        headers = {}
        if rng.random() < 0.5:
            headers["X-Postback-Signature"] = rng.choice(header_values)
            headers["X-Postback-Timestamp"] = rng.choice([str(TS1), "", "x", "9" * 30])
            if rng.random() < 0.5:
                headers["x-postback-key-id"] = rng.choice(["k2025", "", "\x00"])
        body = bytes(rng.randrange(256) for _ in range(rng.randint(0, 40)))
        content_type = rng.choice([None, "application/json", "application/x-www-form-urlencoded", "x/y", ""])
        for adv in (ACME, LEGACY, MIXED, FENCED):
            result = authenticate(adv, params, headers, body, content_type, rng.choice(["1.2.3.4", "?"]),
                                  TS1 * 1000)
            assert isinstance(result, (AuthOk, AuthFailed))
            if isinstance(result, AuthFailed):
                assert result.reason in REASONS and result.detail


def test_signing_api_misuse() -> None:
    with pytest.raises(ValueError):
        sign_query([("ts", "1")], S2026, TS1)
    with pytest.raises(ValueError):
        sign_query([("sig", "1")], S2026, TS1)
    with pytest.raises(ValueError):
        sign_query([], S2026, -1)
    with pytest.raises(ValueError):
        sign_query([], S2026, True)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        sign_json(b"{}", [S2025, S2026], TS2, kid="k2025")
    with pytest.raises(ValueError):
        sign_json(b"{}", [], TS2)
    assert sign_json(b"{}", S2026, TS2) == sign_json(b"{}", [S2026], TS2)


# --------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="postback")
    sign_cli.register(parser.add_subparsers(dest="command", required=True))
    return parser


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    args = _parser().parse_args(argv)
    code = args.handler(args, None)
    out, err = capsys.readouterr()
    return code, out, err


def _vector1_args() -> list[str]:
    args = ["sign", "--secret", S2026, "--kid", "k2026", "--ts", str(TS1)]
    for k, v in PARAMS1:
        args += ["--param", f"{k}={v}"]
    return args


def test_cli_signs_query_like_the_doc(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(_vector1_args(), capsys)
    assert code == 0
    (query,) = out.splitlines()
    assert query.endswith(f"&ts={TS1}&kid=k2026&sig={SIG1}")
    assert parse_urlencoded(query) == sign_query(PARAMS1, S2026, TS1, kid="k2026")


def test_cli_query_with_url_prints_a_curl_command(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    secret_file = tmp_path / "acme.key"
    secret_file.write_text(S2025 + "\n", encoding="utf-8")
    code, out, err = _run(["sign", "--secret-file", str(secret_file), "--ts", str(TS1), "--show-canonical",
                           "--param", "event=lead", "--param", "note=it's a ü & b",
                           "--url", "https://pb.example/postback?advertiser_id=acme"], capsys)
    assert code == 0
    query, curl = out.splitlines()
    assert curl.startswith("curl -sS 'https://pb.example/postback?advertiser_id=acme&event=lead&")
    assert err.startswith("canonical: advertiser_id=acme&event=lead&note=it%27s%20a%20%C3%BC%20%26%20b&ts=")
    params = parse_urlencoded(query)
    assert params[0] == ("advertiser_id", "acme")  # the URL's own parameters are signed too
    assert_ok(auth(ACME, params), "k2025")
    if shutil.which("bash"):  # the printed command survives the shell unchanged
        shim = 'curl() { printf "%s\\n" "$@"; }\n'
        done = subprocess.run(["bash", "-c", shim + curl], capture_output=True, text=True, timeout=30)
        url = done.stdout.splitlines()[-1]
        assert_ok(auth(ACME, parse_urlencoded(url.split("?", 1)[1])), "k2025")


def test_cli_signs_json_like_the_doc(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    body_file = tmp_path / "body.json"
    body_file.write_bytes(BODY2)
    code, out, _ = _run(["sign", "--secret", S2026, "--kid", "k2026", "--ts", str(TS2),
                         "--json-body", str(body_file)], capsys)
    assert code == 0
    assert out.splitlines() == ["X-Postback-Timestamp: 1767225900", "X-Postback-Key-Id: k2026",
                                f"X-Postback-Signature: v1={SIG2_K2026}"]
    code, out, _ = _run(["sign", "--secret", S2026, "--ts", str(TS2), "--json-body", str(body_file),
                         "--url", "https://pb.example/postback"], capsys)
    assert code == 0
    assert "curl -sS https://pb.example/postback" in out
    assert f"--data-binary @{body_file}" in out or f"--data-binary '@{body_file}'" in out
    assert f"-H 'X-Postback-Signature: v1={SIG2_K2026}'" in out


def test_cli_json_from_stdin_inlines_the_exact_body(capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    body = '{"advertiser_id":"acme","event":"lead","note":"it\'s \\"ü\\" $HOME `x`"}\n'.encode()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(body)))
    code, out, _ = _run(["sign", "--secret", S2026, "--ts", str(TS2), "--json-body", "-",
                         "--url", "https://pb.example/postback"], capsys)
    assert code == 0
    assert out.startswith(f"X-Postback-Timestamp: {TS2}\nX-Postback-Signature: v1=")
    if shutil.which("bash"):
        curl = out[out.index("curl "):]
        shim = 'curl() { for a in "$@"; do printf "%s\\0" "$a"; done; }\n'
        done = subprocess.run(["bash", "-c", shim + curl], capture_output=True, timeout=30)
        argv = done.stdout.split(b"\0")
        assert argv[argv.index(b"--data-binary") + 1] == body
        headers = dict(a.decode().split(": ", 1) for a in argv if a.startswith(b"X-Postback"))
        assert_ok(auth(ACME, parse_json_object(body), headers, body, "application/json", at_ms=TS2 * 1000),
                  "k2026")


def test_cli_defaults_ts_to_now(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(time, "time", lambda: 1767225611.75)
    code, out, _ = _run(["sign", "--secret", S2026, "--param", "event=lead"], capsys)
    assert code == 0 and "&ts=1767225611&sig=" in out


def test_cli_refuses_unsigned_or_conflicting_input(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    body_file = tmp_path / "b.json"
    body_file.write_bytes(b"{}")
    code, out, err = _run(["sign", "--secret", S2026, "--json-body", str(body_file), "--param", "a=1"], capsys)
    assert code == 2 and not out and "--param" in err
    code, out, err = _run(["sign", "--secret", S2026, "--json-body", str(body_file),
                           "--url", "https://pb.example/postback?a=1"], capsys)
    assert code == 2 and "query string" in err
    code, out, err = _run(["sign", "--secret", S2026, "--param", "sig=abc"], capsys)
    assert code == 2 and "'sig'" in err
    code, out, err = _run(["sign", "--secret", S2026, "--json-body", str(tmp_path / "missing.json")], capsys)
    assert code == 2 and "cannot read" in err
    code, out, err = _run(["sign", "--secret-file", str(tmp_path / "missing.key")], capsys)
    assert code == 2 and "--secret-file" in err
    for argv in (["sign"], ["sign", "--secret", "s", "--secret-file", "f"], ["sign", "--secret", "s", "--ts", "-5"],
                 ["sign", "--secret", "s", "--param", "novalue"]):
        with pytest.raises(SystemExit) as exc:
            _parser().parse_args(argv)
        assert exc.value.code == 2
    capsys.readouterr()


def test_cli_help_is_helpful() -> None:
    parser = _parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    text = sub.choices["sign"].format_help()
    assert text.startswith("usage: postback sign")
    for word in ("--secret", "--secret-file", "--kid", "--ts", "--json-body", "--param", "--url",
                 "docs/signing.md", "X-Postback-Signature", "curl", "examples:"):
        assert word in text


# --------------------------------------------------------------------------- auth parameters under aliases

ALIAS_TOKEN = "aliased-token-0123456789"
HEADER_TOKEN = "header-token-0123456789ab"
RENAMED_SECRET = "renamed-test-secret-000000"
ALIASED = parse_partner_config(f"""
[advertisers.affiseish]
auth_modes = ["token"]
token = "{ALIAS_TOKEN}"
aliases = {{ secure = "token", clickid = "click_id" }}

[advertisers.headered]
auth_modes = ["token"]
token = "{HEADER_TOKEN}"
token_header = "X-Postback-Token"

[advertisers.tokents]
auth_modes = ["token"]
token = "{ALIAS_TOKEN}"
aliases = {{ secure = "token", timestamp = "ts" }}

[advertisers.renamed]
secrets = {{ r1 = "{RENAMED_SECRET}", r2 = "{RENAMED_SECRET}-2" }}
aliases = {{ signature = "sig", timestamp = "ts", key = "kid" }}
""", "aliased-partners.toml")
AFFISEISH = ALIASED.advertisers["affiseish"]
HEADERED = ALIASED.advertisers["headered"]
RENAMED = ALIASED.advertisers["renamed"]
TOKENTS = ALIASED.advertisers["tokents"]


def test_aliased_token_is_seen() -> None:
    """Regression: a token sent under the advertiser's alias (`secure`) was never looked at."""
    params = [("advertiser_id", "affiseish"), ("clickid", "C1"), ("secure", ALIAS_TOKEN)]
    ok = assert_ok(auth(AFFISEISH, params), None, mode="token")
    # What was verified is the parameters as sent, the aliased token name included.
    assert ok.replay_key == hashlib.sha256(canonical_query(params).encode()).hexdigest()
    assert "secure=" + ALIAS_TOKEN in canonical_query(params)

    forged = assert_failed(auth(AFFISEISH, params[:-1] + [("secure", ALIAS_TOKEN[:-1] + "x")]), "bad_signature")
    assert forged.detail == "the token (secure) does not match this advertiser's token"
    assert ALIAS_TOKEN not in forged.detail

    absent = assert_failed(auth(AFFISEISH, params[:-1]), "missing_signature")
    assert "secure (alias of token)" in absent.detail
    # The canonical name still works, and both at once is one token sent twice.
    assert_ok(auth(AFFISEISH, params[:-1] + [("token", ALIAS_TOKEN)]), None, mode="token")
    twice = assert_failed(auth(AFFISEISH, params + [("token", ALIAS_TOKEN)]), "invalid_field")
    assert "sent 2 times" in twice.detail
    # An advertiser without the alias reads `secure` as an ordinary parameter.
    assert_failed(auth(LEGACY, [("secure", TOKEN)]), "missing_signature")


def test_token_from_the_configured_header() -> None:
    params = [("advertiser_id", "headered"), ("event", "lead")]
    ok = assert_ok(auth(HEADERED, params, {"X-Postback-Token": HEADER_TOKEN}), None, mode="token")
    assert ok.replay_key == hashlib.sha256(canonical_query(params).encode()).hexdigest()
    assert_ok(auth(HEADERED, params, {"x-postback-token": HEADER_TOKEN}), None, mode="token")  # any case
    assert_ok(auth(HEADERED, params + [("token", HEADER_TOKEN)]), None, mode="token")  # the parameter still works

    forged = assert_failed(auth(HEADERED, params, {"X-Postback-Token": HEADER_TOKEN + "x"}), "bad_signature")
    assert forged.detail == "the token (header X-Postback-Token) does not match this advertiser's token"

    both = assert_failed(auth(HEADERED, params + [("token", HEADER_TOKEN)], {"X-Postback-Token": HEADER_TOKEN}),
                         "invalid_field")
    assert "token" in both.detail and "sent 2 times" in both.detail

    absent = assert_failed(auth(HEADERED, params), "missing_signature")
    assert "X-Postback-Token header" in absent.detail
    # Another advertiser's token header means nothing.
    assert_failed(auth(LEGACY, params, {"X-Postback-Token": TOKEN}), "missing_signature")


def _renamed_signed(params: list[tuple[str, str]], secret: str = RENAMED_SECRET) -> list[tuple[str, str]]:
    """What a partner does with renamed fields: sign every parameter it sends but the signature itself."""
    signature = hmac.new(secret.encode(), canonical_query(params).encode(), hashlib.sha256).hexdigest()
    return params + [("signature", signature)]


def test_aliased_sig_ts_and_kid_with_query_signing() -> None:
    params = [("advertiser_id", "renamed"), ("event", "purchase"), ("order_id", "R-1"),
              ("timestamp", str(TS1)), ("key", "r1")]
    signed = _renamed_signed(params)
    canonical = canonical_query(params)
    assert canonical == "advertiser_id=renamed&event=purchase&key=r1&order_id=R-1&timestamp=1767225600"
    # The aliased signature name is left out; the aliased ts and kid are in, under the names sent.
    assert canonical_query(signed, {"signature"}) == canonical
    assert canonical_query(signed) != canonical  # by default only `sig` is unsigned
    ok = assert_ok(auth(RENAMED, signed), "r1")
    assert ok.replay_key == hashlib.sha256(canonical.encode()).hexdigest()
    # No key id: every key is tried.
    assert_ok(auth(RENAMED, _renamed_signed(params[:-1], RENAMED_SECRET + "-2")), "r2")

    # Signed over the canonical names instead of the names sent: not what the partner sent.
    as_canonical = [("advertiser_id", "renamed"), ("event", "purchase"), ("order_id", "R-1"),
                    ("ts", str(TS1)), ("kid", "r1")]
    wrong = hmac.new(RENAMED_SECRET.encode(), canonical_query(as_canonical).encode(), hashlib.sha256).hexdigest()
    failed = assert_failed(auth(RENAMED, params + [("signature", wrong)]), "bad_signature")
    assert repr(canonical) in failed.detail

    tampered = [(k, "R-2" if k == "order_id" else v) for k, v in signed]
    assert_failed(auth(RENAMED, tampered), "bad_signature")


def test_aliased_auth_parameters_are_checked_under_the_names_sent() -> None:
    base = [("advertiser_id", "renamed"), ("event", "purchase")]
    stale = assert_failed(auth(RENAMED, _renamed_signed(base + [("timestamp", str(TS1 - 301))])), "stale_timestamp")
    assert stale.detail.startswith(f"parameter timestamp {TS1 - 301} is 301 s")
    bad_ts = assert_failed(auth(RENAMED, _renamed_signed(base + [("timestamp", "now")])), "invalid_field")
    assert bad_ts.detail.startswith("parameter timestamp must be unix seconds")
    missing_ts = assert_failed(auth(RENAMED, _renamed_signed(base)), "missing_signature")
    assert missing_ts.detail.startswith("parameter ts is missing")
    unknown = assert_failed(auth(RENAMED, _renamed_signed(base + [("timestamp", str(TS1)), ("key", "r9")])),
                            "unknown_key_id")
    assert unknown.detail == "parameter key 'r9' is not a key of this advertiser"
    malformed = assert_failed(auth(RENAMED, base + [("timestamp", str(TS1)), ("signature", "abc")]), "bad_signature")
    assert malformed.detail.startswith("parameter signature must be 64 hexadecimal digits")
    # A timestamp under both names, or two signatures, is never guessed.
    signed = _renamed_signed(base + [("timestamp", str(TS1))])
    assert_failed(auth(RENAMED, signed + [("ts", str(TS1))]), "invalid_field")
    assert_failed(auth(RENAMED, signed + [("sig", signed[-1][1])]), "invalid_field")


def test_token_mode_checks_an_aliased_timestamp_when_sent() -> None:
    """Token mode reads ts when it is sent, so its alias is honoured there too (not refused at load)."""
    base = [("advertiser_id", "tokents"), ("secure", ALIAS_TOKEN)]
    assert_ok(auth(TOKENTS, base), None, mode="token")
    assert_ok(auth(TOKENTS, base + [("timestamp", str(TS1))]), None, mode="token")
    stale = assert_failed(auth(TOKENTS, base + [("timestamp", str(TS1 - 3600))]), "stale_timestamp")
    assert stale.detail.startswith("parameter timestamp ")
