"""The ingester's input rules: typed rejections, exact values, and no crash on any input."""

from __future__ import annotations

import json
import pickle
import random
from collections.abc import Callable

import pytest

from ingest.validation import (
    CLICK_FIELDS, MAX_ERRORS, REASONS, ClickInput, FieldError, Limits, RejectedInput, check_postback,
    click_from_json, click_from_params, first, parse_bulk_clicks, parse_json_object, parse_urlencoded,
)
from postback.partners import Advertiser, parse_partner_config


def reasons(fn: Callable[[], object]) -> list[tuple[str, str]]:
    with pytest.raises(RejectedInput) as info:
        fn()
    assert all(e.reason in REASONS for e in info.value.errors)
    return [(e.field, e.reason) for e in info.value.errors]


# -- every reason code is reachable --------------------------------------------------------
CASES: list[tuple[str, Callable[[], object], tuple[str, str]]] = [
    ("missing", lambda: check_postback([("event", "sale")]), ("advertiser_id", "missing")),
    ("empty", lambda: check_postback([("advertiser_id", ""), ("event", "sale")]), ("advertiser_id", "empty")),
    ("too_long", lambda: parse_urlencoded("a=" + "x" * 2049), ("a", "too_long")),
    ("invalid_utf8", lambda: parse_urlencoded("a=%ff%fe"), ("a", "invalid_utf8")),
    ("invalid_percent_encoding", lambda: parse_urlencoded("a=%zz"), ("a", "invalid_percent_encoding")),
    ("nul_byte", lambda: parse_urlencoded("a=%00"), ("a", "nul_byte")),
    ("control_character", lambda: parse_urlencoded("a=x%0Dy"), ("a", "control_character")),
    ("invalid_key", lambda: parse_urlencoded("a%20b=1"), ("query", "invalid_key")),
    ("too_many_parameters", lambda: parse_urlencoded("&".join(["a=1"] * 65)), ("query", "too_many_parameters")),
    ("duplicate", lambda: check_postback([("advertiser_id", "1"), ("event", "e"), ("event", "f")]),
     ("event", "duplicate")),
    ("invalid_json", lambda: parse_json_object(b"{"), ("body", "invalid_json")),
    ("not_object", lambda: parse_json_object(b"[1]"), ("body", "not_object")),
    ("not_flat", lambda: parse_json_object(b'{"a": {"b": 1}}'), ("a", "not_flat")),
    ("invalid_type", lambda: click_from_json({"offer_id": "o", "affiliate_id": "a", "ip": 1}), ("ip", "invalid_type")),
    ("invalid_value", lambda: click_from_params([("offer_id", "o/1"), ("affiliate_id", "a")]),
     ("offer_id", "invalid_value")),
    ("invalid_click_id", lambda: check_postback([("advertiser_id", "1"), ("event", "e"), ("click_id", "x y")]),
     ("click_id", "invalid_click_id")),
]


@pytest.mark.parametrize(("reason", "call", "expected"), CASES, ids=[c[0] for c in CASES])
def test_reason_is_reachable(reason: str, call: Callable[[], object], expected: tuple[str, str]) -> None:
    assert expected[1] == reason
    assert reasons(call) == [expected]


def test_cases_cover_every_reason() -> None:
    assert {c[0] for c in CASES} == REASONS


def test_rejected_input_shape() -> None:
    exc = RejectedInput([FieldError("a", "missing"), FieldError("query", "too_long")])
    assert isinstance(exc, ValueError)
    assert str(exc) == "rejected input: a: missing; query: too_long"
    assert exc.errors[0].as_dict() == {"field": "a", "reason": "missing"}
    assert pickle.loads(pickle.dumps(exc)).errors == exc.errors
    assert len(RejectedInput([FieldError("a", "missing")] * 100).errors) == MAX_ERRORS


# -- urlencoded -----------------------------------------------------------------------------
def test_order_and_duplicates_are_kept() -> None:
    assert parse_urlencoded(b"b=2&a=1&b=3&&c") == [("b", "2"), ("a", "1"), ("b", "3"), ("c", "")]


def test_plus_and_percent_20_are_spaces_and_utf8_decodes() -> None:
    assert parse_urlencoded("q=a+b%20c&n=caf%C3%A9&t=a%09b&k%5B0%5D=x") == [
        ("q", "a b c"), ("n", "café"), ("t", "a\tb"), ("k[0]", "x")]
    assert parse_urlencoded("a=1%2B1%3D2&b==") == [("a", "1+1=2"), ("b", "=")]
    assert parse_urlencoded("n=café".encode()) == [("n", "café")]
    assert parse_urlencoded("") == []


@pytest.mark.parametrize("value", ["%zz", "%4", "%", "abc%", "%g1", "%%41"])
def test_strict_percent_encoding(value: str) -> None:
    assert reasons(lambda: parse_urlencoded("amount=" + value)) == [("amount", "invalid_percent_encoding")]


def test_bad_key_is_reported_under_query_and_its_value_too() -> None:
    assert reasons(lambda: parse_urlencoded("%zz=1")) == [("query", "invalid_percent_encoding")]
    assert reasons(lambda: parse_urlencoded("%ff=%00")) == [("query", "invalid_utf8"), ("query", "nul_byte")]
    assert reasons(lambda: parse_urlencoded("a%00=1&b%0A=2")) == [("query", "nul_byte"), ("query", "control_character")]
    assert reasons(lambda: parse_urlencoded("=1&a/b=2")) == [("query", "invalid_key"), ("query", "invalid_key")]


@pytest.mark.parametrize("value", ["%ff%fe", "%c3", "%ed%a0%80", "%c0%af"])  # truncated, surrogate, overlong
def test_invalid_utf8(value: str) -> None:
    assert reasons(lambda: parse_urlencoded("a=" + value)) == [("a", "invalid_utf8")]


def test_raw_non_utf8_bytes_and_surrogates_in_str() -> None:
    assert reasons(lambda: parse_urlencoded(b"a=\xff")) == [("a", "invalid_utf8")]
    assert reasons(lambda: parse_urlencoded("a=\udcff")) == [("a", "invalid_utf8")]
    assert reasons(lambda: parse_urlencoded(b"a=x\x01")) == [("a", "control_character")]


def test_length_limits_are_in_utf8_bytes() -> None:
    assert parse_urlencoded("a=" + "x" * 2048) == [("a", "x" * 2048)]
    assert parse_urlencoded("k" * 64 + "=1") == [("k" * 64, "1")]
    assert reasons(lambda: parse_urlencoded("k" * 65 + "=1")) == [("query", "invalid_key")]
    assert reasons(lambda: parse_urlencoded("a=" + "%C3%A9" * 1025)) == [("a", "too_long")]
    small = Limits(max_key_bytes=3, max_value_bytes=4)
    assert parse_urlencoded("abc=%C3%A9%C3%A9", small) == [("abc", "éé")]
    assert reasons(lambda: parse_urlencoded("abc=%C3%A9%C3%A9x", small)) == [("abc", "too_long")]


def test_too_many_parameters_is_checked_first_and_counts_nonempty_segments() -> None:
    assert len(parse_urlencoded("&".join(["a=1"] * 64) + "&&&&")) == 64
    assert reasons(lambda: parse_urlencoded(b"%zz&" * 1_000_000)) == [("query", "too_many_parameters")]
    assert reasons(lambda: parse_urlencoded("a&b&c", Limits(max_params=2))) == [("query", "too_many_parameters")]


def test_all_errors_are_collected_and_capped() -> None:
    assert reasons(lambda: parse_urlencoded("a=%zz&b=ok&c=%00")) == [("a", "invalid_percent_encoding"),
                                                                    ("c", "nul_byte")]
    assert len(reasons(lambda: parse_urlencoded("&".join(f"k{i}=%00" for i in range(60))))) == MAX_ERRORS


# -- JSON object ----------------------------------------------------------------------------
def test_json_numbers_keep_their_exact_text_and_bools_are_words() -> None:
    body = b'{"amount": 19.990, "big": 1e400, "n": -0, "i": 123456789012345678901234567890, "ok": true, ' \
           b'"no": false, "s": "caf\\u00e9", "t": "a\\tb"}'
    assert parse_json_object(body) == [("amount", "19.990"), ("big", "1e400"), ("n", "-0"),
                                       ("i", "123456789012345678901234567890"), ("ok", "true"), ("no", "false"),
                                       ("s", "café"), ("t", "a\tb")]
    assert parse_json_object(b" {} ") == []


@pytest.mark.parametrize(("body", "expected"), [
    (b'{"a": {"b": 1}}', [("a", "not_flat")]),
    (b'{"a": [1]}', [("a", "not_flat")]),
    (b'{"a": null}', [("a", "not_flat")]),
    (b'[{"a": 1}]', [("body", "not_object")]),
    (b'"x"', [("body", "not_object")]),
    (b"null", [("body", "not_object")]),
    (b'{"a": NaN}', [("body", "invalid_json")]),
    (b'{"a": Infinity}', [("body", "invalid_json")]),
    (b'{"a": -Infinity}', [("body", "invalid_json")]),
    (b'{"a": 1} x', [("body", "invalid_json")]),
    (b'{"a": "x\ny"}', [("body", "invalid_json")]),  # raw control character inside a string
    (b"", [("body", "invalid_json")]),
    (b"\xef\xbb\xbf{}", [("body", "invalid_json")]),  # BOM
    (b'{"a": 1, "b": 2, "a": 3}', [("a", "duplicate")]),
    (b'{"a": "\\u0000"}', [("a", "nul_byte")]),
    (b'{"a": "\\u001b"}', [("a", "control_character")]),
    (b'{"a": "\\ud800"}', [("a", "invalid_utf8")]),
    (b'{"a": "\xff"}', [("body", "invalid_utf8")]),
    (b'{"a b": 1}', [("body", "invalid_key")]),
    (b'{"": 1}', [("body", "invalid_key")]),
    (b'{"a\\u0000": 1}', [("body", "nul_byte")]),
])
def test_json_rejections(body: bytes, expected: list[tuple[str, str]]) -> None:
    assert reasons(lambda: parse_json_object(body)) == expected


@pytest.mark.parametrize("body", [b"[" * 100_000, b"{" * 100_000, b'{"a":' * 100_000, b'{"a":' + b"[" * 100_000,
                                  b"[" * 100_000 + b"]" * 100_000])
def test_deep_nesting_does_not_crash(body: bytes) -> None:
    assert reasons(lambda: parse_json_object(body))[0][1] in {"not_flat", "invalid_json", "not_object"}


def test_json_limits() -> None:
    many = json.dumps({f"k{i}": i for i in range(65)}).encode()
    assert reasons(lambda: parse_json_object(many)) == [("body", "too_many_parameters")]
    assert reasons(lambda: parse_json_object(json.dumps({"a": "é" * 1025}).encode())) == [("a", "too_long")]
    assert parse_json_object(json.dumps({"a": "é" * 1024}).encode()) == [("a", "é" * 1024)]
    assert reasons(lambda: parse_json_object(json.dumps({"k" * 65: 1}).encode())) == [("body", "invalid_key")]


# -- postbacks ------------------------------------------------------------------------------
def test_check_postback_accepts_a_good_postback() -> None:
    params = [("advertiser_id", "adv1"), ("event", "sale"), ("click_id", "01HX-abc_9"), ("x", "1"), ("x", "2")]
    view = check_postback(params)
    assert (view.fields["event"], view.fields["x"], view.repeated) == ("sale", "1", ())
    assert first(params, "x") == "1"
    assert first(params, "nope") is None


def test_check_postback_collects_every_problem() -> None:
    params = [("event", " "), ("amount", "1"), ("amount", "2"), ("amount", "3"), ("click_id", "a" * 65),
              ("order_id", "o"), ("order_id", "o")]
    assert reasons(lambda: check_postback(params)) == [
        ("advertiser_id", "missing"), ("event", "empty"), ("amount", "duplicate"), ("order_id", "duplicate"),
        ("click_id", "invalid_click_id")]
    assert reasons(lambda: check_postback([("advertiser_id", "a"), ("event", "e"), ("click_id", "")])) == [
        ("click_id", "invalid_click_id")]
    assert reasons(lambda: check_postback([("advertiser_id", "a"), ("event", "e"), ("click_id", "abc\n")])) == [
        ("click_id", "invalid_click_id")]


def _advertiser(body: str) -> Advertiser:
    return parse_partner_config(f'[advertisers.a]\nauth_modes = ["token"]\ntoken = "{"t" * 16}"\n{body}\n',
                                "validation-test.toml").advertisers["a"]


def test_aliased_event_is_accepted_at_the_door() -> None:
    """Regression: an event sent under its alias was refused as missing before aliases were read here."""
    aliased = _advertiser('aliases = { et = "event" }')
    params = [("advertiser_id", "a"), ("et", "sale"), ("order_id", "O1")]
    view = check_postback(params, aliased)
    assert (view.get("event"), view.sent_as["event"], view.repeated) == ("sale", "et", ())
    assert reasons(lambda: check_postback(params, _advertiser(""))) == [("event", "missing")]
    assert reasons(lambda: check_postback(params)) == [("event", "missing")]
    assert reasons(lambda: check_postback([("advertiser_id", "a"), ("et", " ")], aliased)) == [("event", "empty")]


def test_default_event_makes_event_optional() -> None:
    adv = _advertiser('defaults = { event = "purchase" }')
    view = check_postback([("advertiser_id", "a"), ("order_id", "O1")], adv)
    assert (view.get("event"), view.sent_as["event"]) == ("purchase", "(default)")
    blank = check_postback([("advertiser_id", "a"), ("event", "")], adv)
    assert (blank.get("event"), blank.sent_as["event"]) == ("purchase", "(default)")
    sent = check_postback([("advertiser_id", "a"), ("event", "lead")], adv)
    assert (sent.get("event"), sent.sent_as["event"]) == ("lead", "event")
    # The default never stands in for advertiser_id, which is required as sent.
    assert reasons(lambda: check_postback([("event", "lead")], adv)) == [("advertiser_id", "missing")]


def test_duplicates_are_counted_after_aliases() -> None:
    adv = _advertiser('aliases = { et = "event", clickid = "click_id", secure = "token" }')
    assert reasons(lambda: check_postback([("advertiser_id", "a"), ("et", "sale"), ("event", "sale")], adv)) == [
        ("event", "duplicate")]
    assert reasons(lambda: check_postback([("advertiser_id", "a"), ("event", "sale"), ("secure", "x"),
                                           ("token", "y")], adv)) == [("token", "duplicate")]
    # Without the alias, `et` is just an extra parameter.
    assert check_postback([("advertiser_id", "a"), ("et", "sale"), ("event", "sale")]).repeated == ()


def test_click_id_format_is_checked_on_the_aliased_click_id() -> None:
    adv = _advertiser('aliases = { clickid = "click_id" }')
    assert reasons(lambda: check_postback([("advertiser_id", "a"), ("event", "e"), ("clickid", "x y")], adv)) == [
        ("click_id", "invalid_click_id")]
    assert check_postback([("advertiser_id", "a"), ("event", "e"), ("clickid", "01HX-abc_9")], adv).get(
        "click_id") == "01HX-abc_9"
    assert check_postback([("advertiser_id", "a"), ("event", "e"), ("clickid", "x y")]).get("clickid") == "x y"


# -- clicks ---------------------------------------------------------------------------------
def test_click_from_params() -> None:
    click = click_from_params([("gclid", "g"), ("offer_id", "o.1"), ("affiliate_id", "a-1"), ("sub2", "s2"),
                               ("campaign_id", "c_1"), ("sub1", ""), ("gclid", "h")])
    assert click == ClickInput("o.1", "a-1", "c_1", (None, "s2", None, None, None), [("gclid", "g"), ("gclid", "h")])
    assert click.click_id is None and click.clicked_at_ms is None and click.ip is None


def test_click_from_params_errors() -> None:
    assert reasons(lambda: click_from_params([])) == [("offer_id", "missing"), ("affiliate_id", "missing")]
    assert reasons(lambda: click_from_params([("offer_id", ""), ("affiliate_id", "a" * 65), ("campaign_id", "c c")])) \
        == [("offer_id", "empty"), ("affiliate_id", "invalid_value"), ("campaign_id", "invalid_value")]
    dup = [(f, "1") for f in CLICK_FIELDS] * 2
    assert reasons(lambda: click_from_params(dup)) == [(f, "duplicate") for f in CLICK_FIELDS]


def test_click_from_json() -> None:
    click = click_from_json({"offer_id": "o", "affiliate_id": 7, "sub5": 1.5, "click_id": "c-1", "clicked_at": 1700000000,
                             "ip": "203.0.113.9", "user_agent": "UA/1", "referer": None, "flag": True, "n": 3})
    assert click == ClickInput("o", "7", None, (None, None, None, None, "1.5"), [("flag", "true"), ("n", "3")],
                               "c-1", 1_700_000_000_000, "203.0.113.9", "UA/1", None)


@pytest.mark.parametrize(("clicked_at", "ms"), [
    (1700000000, 1_700_000_000_000),
    (1700000000.123, 1_700_000_000_123),
    (1_700_000_000_123, 1_700_000_000_123),
    ("2023-11-14T22:13:20Z", 1_700_000_000_000),
    ("2023-11-15T00:13:20.5+02:00", 1_700_000_000_500),
])
def test_clicked_at_forms(clicked_at: object, ms: int) -> None:
    assert click_from_json({"offer_id": "o", "affiliate_id": "a", "clicked_at": clicked_at}).clicked_at_ms == ms


@pytest.mark.parametrize("clicked_at", ["2023-11-14T22:13:20", "yesterday", "1700000000", -1, True, 1e300,
                                        float("nan"), 10**30, [1], "x" * 100, "0001-01-01T00:00:00+14:00"])
def test_clicked_at_rejections(clicked_at: object) -> None:
    expected = "not_flat" if isinstance(clicked_at, list) else "invalid_value"
    assert reasons(lambda: click_from_json({"offer_id": "o", "affiliate_id": "a", "clicked_at": clicked_at})) == [
        ("clicked_at", expected)]


def test_click_from_json_errors() -> None:
    assert reasons(lambda: click_from_json([1])) == [("line", "not_object")]
    assert reasons(lambda: click_from_json({"offer_id": None, "affiliate_id": True, "click_id": "no way",
                                            "user_agent": "x" * 2049, "referer": ["r"], "bad key": 1, 5: 1,
                                            "sub1": {"a": 1}, "note": "\x00"})) == [
        ("affiliate_id", "invalid_type"), ("click_id", "invalid_click_id"), ("user_agent", "too_long"),
        ("referer", "not_flat"), ("line", "invalid_key"), ("line", "invalid_key"), ("sub1", "not_flat"),
        ("note", "nul_byte"), ("offer_id", "missing"), ("affiliate_id", "missing")]
    many = {"offer_id": "o", "affiliate_id": "a", **{f"k{i}": i for i in range(63)}}
    assert reasons(lambda: click_from_json(many)) == [("line", "too_many_parameters")]


# -- bulk clicks ----------------------------------------------------------------------------
GOOD = {"offer_id": "o", "affiliate_id": "a"}


def test_bulk_json_array() -> None:
    body = b'[{"offer_id": "o", "affiliate_id": "a"}, {"offer_id": "o"}, 3, ' \
           b'{"offer_id": "o", "affiliate_id": "a", "amount": 19.990}]'
    accepted, errors = parse_bulk_clicks(body, "application/json; charset=utf-8")
    assert [n for n, _ in accepted] == [1, 4]
    assert accepted[1][1].extras == [("amount", "19.990")]
    assert errors == [{"line": 2, "field": "affiliate_id", "reason": "missing"},
                      {"line": 3, "field": "line", "reason": "not_object"}]


def test_bulk_ndjson_per_line_errors_and_physical_line_numbers() -> None:
    lines = [json.dumps(GOOD), "", "{bad json", json.dumps({**GOOD, "click_id": "c1", "x": "\u2028"}), "  ",
             "[1]", '{"offer_id": "o", "offer_id": "p", "affiliate_id": "a"}', "\r", json.dumps(GOOD) + "\r"]
    accepted, errors = parse_bulk_clicks("\n".join(lines).encode(), "application/x-ndjson")
    assert [n for n, _ in accepted] == [1, 4, 9]
    assert accepted[1][1].click_id == "c1" and accepted[1][1].extras == [("x", "\u2028")]
    assert errors == [{"line": 3, "field": "line", "reason": "invalid_json"},
                      {"line": 6, "field": "line", "reason": "not_object"},
                      {"line": 7, "field": "offer_id", "reason": "duplicate"}]
    accepted, errors = parse_bulk_clicks(b'{"a":' * 100_000 + b"\n" + json.dumps(GOOD).encode(), "application/jsonl")
    assert [n for n, _ in accepted] == [2] and errors[0]["line"] == 1


@pytest.mark.parametrize(("body", "content_type", "expected"), [
    (b"{", "application/json", [("body", "invalid_json")]),
    (b'{"a": 1}', "application/json", [("body", "not_object")]),
    (b"[NaN]", "application/json", [("body", "invalid_json")]),
    (b"[" * 100_000, "application/json", [("body", "not_flat")]),
    (b"[\xff]", "application/x-ndjson", [("body", "invalid_utf8")]),
    (b"[]", "text/csv", [("content_type", "invalid_value")]),
    (json.dumps([GOOD] * 3).encode(), "application/json", [("body", "too_many_parameters")]),
    ("\n".join([json.dumps(GOOD)] * 3).encode(), "application/x-ndjson", [("body", "too_many_parameters")]),
])
def test_bulk_whole_body_rejections(body: bytes, content_type: str, expected: list[tuple[str, str]]) -> None:
    assert reasons(lambda: parse_bulk_clicks(body, content_type, max_lines=2)) == expected


def test_bulk_max_lines_ignores_blank_lines() -> None:
    body = ("\n\n".join([json.dumps(GOOD)] * 2) + "\n\n\n").encode()
    assert len(parse_bulk_clicks(body, "application/x-ndjson", max_lines=2)[0]) == 2


# -- fuzz -----------------------------------------------------------------------------------
def test_random_inputs_only_ever_raise_rejected_input() -> None:
    rng = random.Random(20240611)
    alphabets = [bytes(range(256)), b"%&=+abcAZ09_.-[]\x00\x01\t\xc3\xa9\xff", b'{}[]":,0123456789.eE+-truefalsn\\u "ab']
    calls = 0
    for i in range(2000):
        alphabet = alphabets[i % 3]
        data = bytes(rng.choice(alphabet) for _ in range(rng.randrange(0, 80)))
        for fn in (parse_urlencoded, parse_json_object, lambda b: parse_urlencoded(b.decode("latin-1"))):
            try:
                result = fn(data)
            except RejectedInput as exc:
                assert exc.errors and all(e.reason in REASONS for e in exc.errors)
            else:
                assert all(type(k) is str and type(v) is str for k, v in result)
            calls += 1
        try:
            parse_bulk_clicks(data, "application/x-ndjson")
        except RejectedInput:
            pass
    assert calls == 6000
