"""Outbound postback endpoints in the partner file: defaults, every load error, and which conversions match."""

from __future__ import annotations

import textwrap
from dataclasses import FrozenInstanceError
from pathlib import Path

import pytest

from postback.partners import (
    OUTBOUND_MACROS,
    RETRY_TAIL_S,
    OutboundEndpoint,
    PartnerConfig,
    PartnerConfigError,
    check_outbound_url,
    load_partner_config,
    parse_partner_config,
)

EXAMPLE = Path(__file__).parents[2] / "deploy" / "partners.example.toml"
SECRET = "outbound-secret-0123456789"
BASE = f"""
[advertisers.acme]
secrets = {{ k1 = "{"s" * 16}" }}
[offers.o1]
advertiser_id = "acme"
[offers.o2]
advertiser_id = "acme"
[affiliates.aff-1]
"""


def parse(extra: str) -> PartnerConfig:
    return parse_partner_config(BASE + textwrap.dedent(extra), "test.toml")


def endpoint(body: str, name: str = "main") -> OutboundEndpoint:
    cfg = parse(f"[affiliates.aff-1.postbacks.{name}]\n" + textwrap.dedent(body))
    aff = cfg.affiliate("aff-1")
    assert aff is not None
    return aff.postbacks[name]


def error(body: str) -> PartnerConfigError:
    with pytest.raises(PartnerConfigError) as info:
        endpoint(body)
    return info.value


def test_defaults() -> None:
    ep = endpoint('url = "https://aff.example/pb?cid={click_id}"')
    assert ep.endpoint_id == "aff-1/main" and ep.affiliate_id == "aff-1" and ep.name == "main"
    assert ep.method == "GET" and ep.offers == () and ep.events == () and ep.statuses == ()
    assert ep.secret is None and not ep.signed
    assert ep.timeout_s == 10 and ep.max_concurrency == 4 and ep.rate_per_s == 20
    assert ep.retry_schedule_s == (60, 300, 900, 3600) and ep.give_up_after_s == 259_200
    assert ep.allow_private is False and ep.follow_redirects is False


def test_every_key() -> None:
    ep = endpoint(f"""
        url = "http://aff.example:8080/pb/{{offer_id}}?p={{payout}}&k={{idempotency_key}}"
        method = "POST"
        offers = ["o1"]
        events = ["purchase", "custom:vip"]
        statuses = ["approved", "rejected"]
        secret = "{SECRET}"
        timeout_s = 2.5
        max_concurrency = 64
        rate_per_s = 0.5
        retry_schedule_s = [1, 2.5]
        give_up_after_s = 0
        allow_private = true
        follow_redirects = true
    """)
    assert ep.method == "POST" and ep.offers == ("o1",) and ep.events == ("purchase", "custom:vip")
    assert ep.statuses == ("approved", "rejected") and ep.secret == SECRET and ep.signed
    assert (ep.timeout_s, ep.max_concurrency, ep.rate_per_s) == (2.5, 64, 0.5)
    assert ep.retry_schedule_s == (1.0, 2.5) and ep.give_up_after_s == 0
    assert ep.allow_private and ep.follow_redirects


def test_frozen_and_secret_not_in_repr() -> None:
    ep = endpoint(f'url = "https://aff.example/"\nsecret = "{SECRET}"')
    assert SECRET not in repr(ep)
    cfg = parse(f'[affiliates.aff-1.postbacks.main]\nurl = "https://aff.example/"\nsecret = "{SECRET}"')
    assert SECRET not in repr(cfg)
    with pytest.raises(FrozenInstanceError):
        ep.url = "https://evil.example/"  # type: ignore[misc]
    aff = cfg.affiliate("aff-1")
    assert aff is not None
    with pytest.raises(TypeError):
        aff.postbacks["x"] = ep  # type: ignore[index]


def test_several_endpoints_keep_file_order() -> None:
    cfg = parse("""
        [affiliates.aff-1.postbacks.zeta]
        url = "https://a.example/"
        [affiliates.aff-1.postbacks.alpha]
        url = "https://b.example/"
    """)
    aff = cfg.affiliate("aff-1")
    assert aff is not None and list(aff.postbacks) == ["zeta", "alpha"]
    assert cfg.endpoints_for({"affiliate_id": "aff-1"}) == list(aff.postbacks.values())


def test_retry_delays() -> None:
    ep = endpoint('url = "https://a.example/"\nretry_schedule_s = [5, 10]')
    assert [ep.retry_delay_s(n) for n in (2, 3, 4, 9)] == [5, 10, RETRY_TAIL_S, RETRY_TAIL_S]
    with pytest.raises(ValueError):
        ep.retry_delay_s(1)


@pytest.mark.parametrize(("body", "path", "needle"), [
    ('method = "GET"', "affiliates.aff-1.postbacks.main.url", "required"),
    ('url = 5', "affiliates.aff-1.postbacks.main.url", "must be a string"),
    ('url = "https://a.example/?c={clickid}"', "affiliates.aff-1.postbacks.main.url", "unknown macro {clickid}"),
    ('url = "https://a.example/?c={}"', "affiliates.aff-1.postbacks.main.url", "positional"),
    ('url = "https://a.example/?c={click_id:>9}"', "affiliates.aff-1.postbacks.main.url", "format spec"),
    ('url = "https://a.example/?c={click_id"', "affiliates.aff-1.postbacks.main.url", "braces"),
    ('url = "https://{sub1}.example/"', "affiliates.aff-1.postbacks.main.url", "only allowed after the host"),
    ('url = "ftp://a.example/"', "affiliates.aff-1.postbacks.main.url", "http(s)"),
    ('url = "a.example/pb"', "affiliates.aff-1.postbacks.main.url", "http(s)"),
    ('url = "https:///pb"', "affiliates.aff-1.postbacks.main.url", "host"),
    ('url = "https://a.example/ x"', "affiliates.aff-1.postbacks.main.url", "whitespace"),
    ('url = "https://u:p@a.example/"', "affiliates.aff-1.postbacks.main.url", "user info"),
    ('url = "https://a.example:99999/"', "affiliates.aff-1.postbacks.main.url", "not a valid URL"),
    ('url = "https://a.example/"\nmethod = "PUT"', "affiliates.aff-1.postbacks.main.method", "unknown method 'PUT'"),
    ('url = "https://a.example/"\nmethod = "post"', "affiliates.aff-1.postbacks.main.method", "did you mean 'POST'"),
    ('url = "https://a.example/"\noffers = ["nope"]', "affiliates.aff-1.postbacks.main.offers", "unknown offer 'nope'"),
    ('url = "https://a.example/"\noffers = []', "affiliates.aff-1.postbacks.main.offers", "is empty"),
    ('url = "https://a.example/"\noffers = "o1"', "affiliates.aff-1.postbacks.main.offers", "array"),
    ('url = "https://a.example/"\nevents = ["sale"]', "affiliates.aff-1.postbacks.main.events", "not a canonical event"),
    ('url = "https://a.example/"\nevents = ["lead", "lead"]', "affiliates.aff-1.postbacks.main.events", "more than once"),
    ('url = "https://a.example/"\nstatuses = ["paid"]', "affiliates.aff-1.postbacks.main.statuses", "not a status"),
    ('url = "https://a.example/"\nsecret = "short"', "affiliates.aff-1.postbacks.main.secret", "at least 16"),
    ('url = "https://a.example/"\nsecret = 1234567890123456789', "affiliates.aff-1.postbacks.main.secret", "string"),
    ('url = "https://a.example/?sig=1"\nsecret = "0123456789abcdef"', "affiliates.aff-1.postbacks.main.url", "'sig'"),
    ('url = "https://a.example/?a=1&ts=1"\nsecret = "0123456789abcdef"', "affiliates.aff-1.postbacks.main.url", "'ts'"),
    ('url = "https://a.example/"\ntimeout_s = 0.05', "affiliates.aff-1.postbacks.main.timeout_s", "between 0.1 and 120"),
    ('url = "https://a.example/"\ntimeout_s = 121', "affiliates.aff-1.postbacks.main.timeout_s", "between"),
    ('url = "https://a.example/"\ntimeout_s = "10"', "affiliates.aff-1.postbacks.main.timeout_s", "must be a number"),
    ('url = "https://a.example/"\ntimeout_s = true', "affiliates.aff-1.postbacks.main.timeout_s", "must be a number"),
    ('url = "https://a.example/"\nmax_concurrency = 0', "affiliates.aff-1.postbacks.main.max_concurrency", "between 1 and 64"),
    ('url = "https://a.example/"\nmax_concurrency = 65', "affiliates.aff-1.postbacks.main.max_concurrency", "between 1 and 64"),
    ('url = "https://a.example/"\nmax_concurrency = 2.0', "affiliates.aff-1.postbacks.main.max_concurrency", "integer"),
    ('url = "https://a.example/"\nrate_per_s = 0', "affiliates.aff-1.postbacks.main.rate_per_s", "greater than 0"),
    ('url = "https://a.example/"\nrate_per_s = nan', "affiliates.aff-1.postbacks.main.rate_per_s", "greater than 0"),
    ('url = "https://a.example/"\nretry_schedule_s = []', "affiliates.aff-1.postbacks.main.retry_schedule_s", "at least one"),
    ('url = "https://a.example/"\nretry_schedule_s = 60', "affiliates.aff-1.postbacks.main.retry_schedule_s", "array"),
    ('url = "https://a.example/"\nretry_schedule_s = [60, 0]', "affiliates.aff-1.postbacks.main.retry_schedule_s[1]", "greater than 0"),
    ('url = "https://a.example/"\nretry_schedule_s = ["60"]', "affiliates.aff-1.postbacks.main.retry_schedule_s[0]", "number"),
    ('url = "https://a.example/"\ngive_up_after_s = -1', "affiliates.aff-1.postbacks.main.give_up_after_s", "between 0"),
    ('url = "https://a.example/"\ngive_up_after_s = 2592001', "affiliates.aff-1.postbacks.main.give_up_after_s", "between 0"),
    ('url = "https://a.example/"\nallow_private = "yes"', "affiliates.aff-1.postbacks.main.allow_private", "true or false"),
    ('url = "https://a.example/"\nfollow_redirects = 1', "affiliates.aff-1.postbacks.main.follow_redirects", "true or false"),
    ('url = "https://a.example/"\nurll = "x"', "affiliates.aff-1.postbacks.main", "unknown key 'urll'"),
])
def test_errors_name_file_table_and_key(body: str, path: str, needle: str) -> None:
    err = error(body)
    assert err.source == "test.toml" and err.path == path, str(err)
    assert needle in err.problem, str(err)
    assert str(err).startswith(f"test.toml: {path}: ")


def test_secret_never_in_errors() -> None:
    leaked = "tiny-secret"
    err = error(f'url = "https://a.example/"\nsecret = "{leaked}"')
    assert leaked not in str(err)
    err = error(f'url = "https://a.example/?sig=1"\nsecret = "{SECRET}"')
    assert SECRET not in str(err)


def test_table_shapes() -> None:
    with pytest.raises(PartnerConfigError, match=r"affiliates\.aff-1\.postbacks: must be a table"):
        parse_partner_config(BASE + 'postbacks = "x"\n', "test.toml")
    with pytest.raises(PartnerConfigError, match=r"affiliates\.aff-1\.postbacks\.main: must be a table"):
        parse_partner_config(BASE + 'postbacks = { main = "x" }\n', "test.toml")
    with pytest.raises(PartnerConfigError, match=r"invalid postback endpoint name"):
        parse_partner_config(BASE + '[affiliates.aff-1.postbacks."a b"]\nurl = "https://a.example/"\n', "test.toml")


def test_signing_params_allowed_without_secret_and_for_post() -> None:
    assert endpoint('url = "https://a.example/?sig={click_id}"').url.endswith("sig={click_id}")
    ep = endpoint(f'url = "https://a.example/?ts=1"\nmethod = "POST"\nsecret = "{SECRET}"')
    assert ep.method == "POST"


def test_literal_braces_and_every_macro_allowed() -> None:
    url = "https://a.example/{{x}}?" + "&".join(f"{m}={{{m}}}" for m in sorted(OUTBOUND_MACROS))
    check_outbound_url(url)
    assert endpoint(f'url = "{url}"').url == url


# ----------------------------------------------------------------- endpoints_for

def conv(**kw: object) -> dict[str, object]:
    base: dict[str, object] = {"affiliate_id": "aff-1", "offer_id": "o1", "event": "purchase",
                               "status": "approved", "conversion_id": "c1", "version": 1}
    base.update(kw)
    return base


@pytest.fixture
def cfg() -> PartnerConfig:
    return parse("""
        [affiliates.aff-1.postbacks.all]
        url = "https://all.example/"
        [affiliates.aff-1.postbacks.o1-purchases]
        url = "https://p.example/"
        offers = ["o1"]
        events = ["purchase"]
        [affiliates.aff-1.postbacks.final]
        url = "https://f.example/"
        statuses = ["approved", "rejected"]
        [affiliates.aff-2.postbacks.main]
        url = "https://two.example/"
    """)


def names(cfg: PartnerConfig, conversion: dict[str, object]) -> list[str]:
    return [ep.endpoint_id for ep in cfg.endpoints_for(conversion)]


def test_endpoints_for_filters(cfg: PartnerConfig) -> None:
    assert names(cfg, conv()) == ["aff-1/all", "aff-1/o1-purchases", "aff-1/final"]
    assert names(cfg, conv(offer_id="o2")) == ["aff-1/all", "aff-1/final"]
    assert names(cfg, conv(event="refund")) == ["aff-1/all", "aff-1/final"]
    assert names(cfg, conv(status="pending")) == ["aff-1/all", "aff-1/o1-purchases"]
    assert names(cfg, conv(offer_id=None)) == ["aff-1/all", "aff-1/final"]
    assert names(cfg, conv(affiliate_id="aff-2")) == ["aff-2/main"]


def test_endpoints_for_unknown_or_missing_affiliate(cfg: PartnerConfig) -> None:
    assert cfg.endpoints_for(conv(affiliate_id="aff-9")) == []
    assert cfg.endpoints_for(conv(affiliate_id=None)) == []
    assert cfg.endpoints_for({}) == []
    assert PartnerConfig.empty().endpoints_for(conv()) == []


def test_endpoints_for_status_enum_like(cfg: PartnerConfig) -> None:
    class Status:
        value = "pending"

    assert names(cfg, conv(status=Status())) == ["aff-1/all", "aff-1/o1-purchases"]


def test_affiliate_without_postbacks() -> None:
    aff = parse("").affiliate("aff-1")
    assert aff is not None and dict(aff.postbacks) == {}


# ----------------------------------------------------------------- example file

def test_example_file_still_loads_and_documents_postbacks() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    assert "[affiliates.aff-1.postbacks.main]" in text
    load_partner_config(EXAMPLE)


def test_example_postbacks_block_loads_when_uncommented() -> None:
    out, on = [], False
    for line in EXAMPLE.read_text(encoding="utf-8").splitlines():
        if line.startswith("# [affiliates.aff-1.postbacks.main]"):
            on = True
        if on and line.startswith("# "):
            line = line[2:]
        elif on:
            on = False
        out.append(line)
    cfg = parse_partner_config("\n".join(out), "example")
    aff = cfg.affiliate("aff-1")
    assert aff is not None
    ep = aff.postbacks["main"]
    assert ep.events == ("purchase", "refund") and ep.signed and not ep.allow_private
    assert [e.endpoint_id for e in cfg.endpoints_for(
        {"affiliate_id": "aff-1", "offer_id": "offer-1", "event": "purchase", "status": "approved"})] == ["aff-1/main"]
