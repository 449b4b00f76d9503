import ipaddress
import pickle
import textwrap
from dataclasses import FrozenInstanceError
from pathlib import Path

import pytest

from postback.partners import (
    CANONICAL_EVENTS,
    Advertiser,
    Offer,
    PartnerConfig,
    PartnerConfigError,
    is_canonical_event,
    load_partner_config,
    parse_partner_config,
)

EXAMPLE = Path(__file__).parents[2] / "deploy" / "partners.example.toml"
SECRET = "s" * 16
DAY_MS = 86_400_000


def parse(text: str) -> PartnerConfig:
    return parse_partner_config(textwrap.dedent(text), "test.toml")


def adv(body: str = "", name: str = "acme") -> str:
    """An advertiser table; `body` replaces the default hmac secrets when it sets auth."""
    if "secrets" not in body and "auth_modes" not in body:
        body = f'secrets = {{ k1 = "{SECRET}" }}\n' + body
    return f"[advertisers.{name}]\n{body}\n"


def error(text: str) -> PartnerConfigError:
    with pytest.raises(PartnerConfigError) as info:
        parse(text)
    return info.value


# ----------------------------------------------------------------- example file


def test_example_file_loads_with_documented_content() -> None:
    cfg = load_partner_config(EXAMPLE)
    assert cfg.ingest_bulk_token and len(cfg.ingest_bulk_token) >= 16 and cfg.bulk_import_enabled
    assert set(cfg.advertisers) == {"acme", "globex"}
    assert set(cfg.offers) == {"offer-1", "offer-2", "offer-3"}

    acme = cfg.advertiser("acme")
    assert acme is not None
    assert acme.auth_modes == ("hmac",) and acme.allows_hmac and not acme.allows_token
    assert set(acme.secrets) == {"k2025", "k2026"} and acme.default_key_id == "k2026"
    assert acme.token is None
    assert acme.allow_ips == (ipaddress.ip_network("203.0.113.0/24"),
                              ipaddress.ip_network("2001:db8::/32"),
                              ipaddress.ip_network("198.51.100.7/32"))
    assert acme.secret_for(None) == acme.secrets["k2026"] != acme.secret_for("k2025")

    globex = cfg.advertiser("globex")
    assert globex is not None
    assert set(globex.auth_modes) == {"hmac", "token"} and globex.token
    assert globex.default_key_id == "g1"  # the only key
    assert globex.allow_ips == () and globex.ip_allowed("192.0.2.1")
    assert globex.canonical_name("transaction_id") == "order_id"
    assert globex.map_event("sale") == "purchase" and globex.map_status("-1") == "rejected"

    o1, o2, o3 = cfg.offer("offer-1"), cfg.offer("offer-2"), cfg.offer("offer-3")
    assert o1 is not None and o2 is not None and o3 is not None
    assert o1.advertiser_id == "acme" and "{click_id}" in (o1.landing_url or "")
    assert o3.landing_url is None and o3.landing_for("c", "a") is None
    assert o2.window_ms("renewal") == 400 * DAY_MS and o2.window_ms("lead") == 7 * DAY_MS
    assert cfg.advertiser("nope") is None and cfg.offer("nope") is None


def test_example_secrets_stay_out_of_repr() -> None:
    cfg = load_partner_config(EXAMPLE)
    text = repr(cfg)
    assert cfg.ingest_bulk_token not in text
    for a in cfg.advertisers.values():
        assert all(s not in text for s in a.secrets.values())
        assert a.token is None or a.token not in text


def test_empty_config_and_empty_document() -> None:
    for cfg in (PartnerConfig.empty(), parse("")):
        assert cfg.ingest_bulk_token is None and not cfg.bulk_import_enabled
        assert dict(cfg.advertisers) == {} and dict(cfg.offers) == {}


def test_config_is_immutable() -> None:
    cfg = load_partner_config(EXAMPLE)
    with pytest.raises(FrozenInstanceError):
        cfg.ingest_bulk_token = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg.advertisers["x"] = cfg.advertisers["acme"]  # type: ignore[index]
    acme = cfg.advertisers["acme"]
    with pytest.raises(TypeError):
        acme.secrets["k3"] = SECRET  # type: ignore[index]
    assert isinstance(acme.allow_ips, tuple) and isinstance(acme.one_time_events, tuple)


def test_defaults() -> None:
    a = parse(adv()).advertisers["acme"]
    assert a.auth_modes == ("hmac",) and a.default_key_id == "k1" and a.token is None
    assert a.timestamp_tolerance_s == 300 and a.dedupe_horizon_days == 90
    assert a.one_time_events == ("lead", "signup", "install", "trial_start")
    assert a.allow_ips == () and dict(a.aliases) == {} and dict(a.event_map) == {}


def test_several_secrets_without_default_key_id_have_no_default() -> None:
    a = parse(adv(f'secrets = {{ a = "{SECRET}", b = "{SECRET}x" }}')).advertisers["acme"]
    assert a.default_key_id is None and a.secret_for(None) is None
    assert a.secret_for("b") == SECRET + "x" and a.secret_for("zzz") is None


def test_token_only_advertiser() -> None:
    a = parse(adv(f'auth_modes = ["token"]\ntoken = "{SECRET}"')).advertisers["acme"]
    assert a.allows_token and not a.allows_hmac and a.token == SECRET
    assert dict(a.secrets) == {} and a.secret_for(None) is None


def test_load_missing_file_and_bad_toml(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(PartnerConfigError, match="nope.toml"):
        load_partner_config(missing)
    bad = tmp_path / "bad.toml"
    bad.write_text("[advertisers.acme\n")
    with pytest.raises(PartnerConfigError, match=r"bad\.toml: invalid TOML"):
        load_partner_config(bad)


# ----------------------------------------------------------------- validation errors


@pytest.mark.parametrize(
    ("text", "path", "fragment"),
    [
        # unknown keys, at every level
        ("ofers = 1", "", "unknown top-level key 'ofers' (did you mean 'offers'?)"),
        ('[ingest]\nbulk = "x"', "ingest", "unknown key 'bulk'"),
        (adv('secert = "x"'), "advertisers.acme", "unknown key 'secert'"),
        (adv() + '[offers.o1]\nadvertiser_id = "acme"\nlanding = "https://x.example/"',
         "offers.o1", "unknown key 'landing' (did you mean 'landing_url'?)"),
        # offers
        (adv() + '[offers.o1]\nadvertiser_id = "globex"', "offers.o1.advertiser_id",
         "unknown advertiser 'globex'"),
        ("[offers.o1]\nlanding_url = 'https://x.example/'", "offers.o1.advertiser_id", "required"),
        (adv() + '[offers.o1]\nadvertiser_id = "acme"\nlanding_url = "https://x.example/?c={clickid}"',
         "offers.o1.landing_url", "unknown placeholder {clickid}"),
        (adv() + '[offers.o1]\nadvertiser_id = "acme"\nlanding_url = "https://x.example/?c={}"',
         "offers.o1.landing_url", "positional"),
        (adv() + '[offers.o1]\nadvertiser_id = "acme"\nlanding_url = "https://x.example/?c={click_id!r}"',
         "offers.o1.landing_url", "format spec or conversion"),
        (adv() + '[offers.o1]\nadvertiser_id = "acme"\nlanding_url = "https://x.example/?c={click_id"',
         "offers.o1.landing_url", ""),
        (adv() + '[offers.o1]\nadvertiser_id = "acme"\nlanding_url = "ftp://x.example/{click_id}"',
         "offers.o1.landing_url", "http(s)"),
        (adv() + '[offers.o1]\nadvertiser_id = "acme"\nlanding_url = "javascript:alert(1)"',
         "offers.o1.landing_url", "http(s)"),
        (adv() + '[offers.o1]\nadvertiser_id = "acme"\nlanding_url = "/relative?c={click_id}"',
         "offers.o1.landing_url", "absolute http(s)"),
        (adv() + '[offers.o1]\nadvertiser_id = "acme"\nlanding_url = "https://{sub1}.example/"',
         "offers.o1.landing_url", "only allowed after the host"),
        (adv() + '[offers.o1]\nadvertiser_id = "acme"\nlanding_url = "https://x.example/a b"',
         "offers.o1.landing_url", "whitespace"),
        (adv() + '[offers.o1]\nadvertiser_id = "acme"\nattribution_window_days = 0',
         "offers.o1.attribution_window_days", "between 1 and 400"),
        (adv() + '[offers.o1]\nadvertiser_id = "acme"\nattribution_window_days = 30.0',
         "offers.o1.attribution_window_days", "must be an integer"),
        (adv() + '[offers.o1]\nadvertiser_id = "acme"\nattribution_windows = { purchse = 30 }',
         "offers.o1.attribution_windows", "'purchse' is not a canonical event"),
        (adv() + '[offers.o1]\nadvertiser_id = "acme"\nattribution_windows = { renewal = 401 }',
         "offers.o1.attribution_windows.renewal", "between 1 and 400"),
        # ids
        (adv(name='"bad id"'), 'advertisers."bad id"', "invalid advertiser id"),
        (adv() + '[offers."o/1"]\nadvertiser_id = "acme"', 'offers."o/1"', "invalid offer id"),
        (adv(f'secrets = {{ "k 1" = "{SECRET}" }}'), "advertisers.acme.secrets", "invalid key id 'k 1'"),
        (adv(name="a" * 65), "advertisers." + "a" * 65, "invalid advertiser id"),
        # auth
        (adv('auth_modes = ["hmac"]'), "advertisers.acme.secrets", "required"),
        (adv('auth_modes = ["hmac"]\nsecrets = {}'), "advertisers.acme.secrets", "required"),
        (adv('secrets = { k1 = "short" }'), "advertisers.acme.secrets",
         "secret for key id 'k1' is 5 characters long; at least 16"),
        (adv(f'auth_modes = ["hmac", "token"]\nsecrets = {{ k1 = "{SECRET}" }}'),
         "advertisers.acme.token", "required when 'token' is in auth_modes"),
        (adv(f'auth_modes = ["token"]\ntoken = "short"'), "advertisers.acme.token", "at least 16"),
        (adv(f'auth_modes = ["token"]\ntoken = "{SECRET}"\nsecrets = {{ k1 = "{SECRET}" }}'),
         "advertisers.acme.secrets", "'hmac' is not in auth_modes"),
        (adv(f'token = "{SECRET}"'), "advertisers.acme.token", "'token' is not in auth_modes"),
        (adv('auth_modes = []'), "advertisers.acme.auth_modes", "at least one"),
        (adv('auth_modes = ["hmac", "basic"]'), "advertisers.acme.auth_modes", "unknown auth mode 'basic'"),
        (adv('auth_modes = "hmac"'), "advertisers.acme.auth_modes", "must be an array"),
        (adv(f'secrets = {{ k1 = "{SECRET}", k2 = "{SECRET}" }}\ndefault_key_id = "k3"'),
         "advertisers.acme.default_key_id", "'k3' is not a key id in secrets"),
        # networks, numbers, maps
        (adv('allow_ips = ["10.0.0.0/33"]'), "advertisers.acme.allow_ips", "'10.0.0.0/33'"),
        (adv('allow_ips = ["not-an-ip"]'), "advertisers.acme.allow_ips", "not an IP address or CIDR"),
        (adv("allow_ips = [1]"), "advertisers.acme.allow_ips", "array of strings"),
        (adv("timestamp_tolerance_s = 0"), "advertisers.acme.timestamp_tolerance_s", "between 1 and 86400"),
        (adv("timestamp_tolerance_s = true"), "advertisers.acme.timestamp_tolerance_s", "must be an integer"),
        (adv("dedupe_horizon_days = 0"), "advertisers.acme.dedupe_horizon_days", "between 1"),
        (adv('event_map = { sale = "sale" }'), "advertisers.acme.event_map",
         "target of 'sale': 'sale' is not a canonical event"),
        (adv('event_map = { x = "custom:Bad Name" }'), "advertisers.acme.event_map", "not a canonical event"),
        (adv('status_map = { "1" = "ok" }'), "advertisers.acme.status_map", "'ok' is not a status"),
        (adv('status_map = { "1" = 1 }'), "advertisers.acme.status_map", "must be a string"),
        (adv('aliases = { txid = "Order-ID" }'), "advertisers.acme.aliases", "not a parameter name"),
        (adv('one_time_events = ["lead", "leed"]'), "advertisers.acme.one_time_events",
         "'leed' is not a canonical event"),
        (adv('one_time_events = ["lead", "lead"]'), "advertisers.acme.one_time_events", "more than once"),
        # shapes
        ("advertisers = 1", "advertisers", "must be a table"),
        ('[ingest]\nbulk_token = "short"', "ingest.bulk_token", "at least 16"),
    ],
)
def test_validation_errors_name_file_and_path(text: str, path: str, fragment: str) -> None:
    e = error(text)
    assert e.source == "test.toml" and e.path == path
    assert str(e).startswith(f"test.toml: {path}: " if path else "test.toml: ")
    assert fragment in str(e)
    assert isinstance(e, ValueError)


def test_errors_never_echo_secrets() -> None:
    e = error(adv('secrets = { k1 = "tooshort-secret" }'))
    assert "tooshort-secret" not in str(e)


def test_error_pickles() -> None:
    e = error(adv('secret = "x"'))
    e2 = pickle.loads(pickle.dumps(e))
    assert (str(e2), e2.path, e2.source) == (str(e), e.path, e.source)


# ----------------------------------------------------------------- Advertiser behaviour


def _allowlisted() -> Advertiser:
    return parse(adv('allow_ips = ["203.0.113.0/24", "2001:db8::/32", "198.51.100.7"]')).advertisers["acme"]


@pytest.mark.parametrize(
    ("ip", "allowed"),
    [
        ("203.0.113.5", True), ("203.0.113.255", True), ("203.0.114.1", False),
        ("198.51.100.7", True), ("198.51.100.8", False),
        ("2001:db8::1", True), ("2001:db8:ffff::9", True), ("2001:db9::1", False),
        ("::ffff:198.51.100.7", True), ("::ffff:10.0.0.1", False),
        (" 198.51.100.7 ", True),
        ("garbage", False), ("", False), ("203.0.113.0/24", False), ("999.1.1.1", False),
    ],
)
def test_ip_allowed(ip: str, allowed: bool) -> None:
    assert _allowlisted().ip_allowed(ip) is allowed


def test_empty_allowlist_allows_anything() -> None:
    a = parse(adv()).advertisers["acme"]
    assert a.ip_allowed("192.0.2.1") and a.ip_allowed("2001:db8::1") and a.ip_allowed("garbage")


def test_map_event() -> None:
    a = parse(adv('event_map = { sale = "purchase", reg = "signup", purchase = "renewal", '
                  'vip = "custom:vip" }')).advertisers["acme"]
    assert a.map_event("sale") == "purchase" and a.map_event("reg") == "signup"
    assert a.map_event("purchase") == "renewal"  # event_map wins over canonical
    assert a.map_event("vip") == "custom:vip"
    assert all(a.map_event(e) == e for e in CANONICAL_EVENTS if e != "purchase")
    assert a.map_event("custom:my_event-1") == "custom:my_event-1"
    assert a.map_event("my_event") is None  # not custom unless written custom:...
    assert a.map_event("custom:") is None and a.map_event("custom:Upper") is None
    assert a.map_event("custom:" + "x" * 41) is None
    assert a.map_event("Purchase") is None and a.map_event("") is None


def test_is_canonical_event() -> None:
    assert is_canonical_event("refund") and is_canonical_event("custom:a")
    assert not is_canonical_event("sale") and not is_canonical_event("custom:a b")


def test_map_status() -> None:
    a = parse(adv('status_map = { "1" = "approved", "0" = "pending", "-1" = "rejected", '
                  'approved = "pending" }')).advertisers["acme"]
    assert a.map_status(None) == "approved"
    assert (a.map_status("1"), a.map_status("0"), a.map_status("-1")) == ("approved", "pending", "rejected")
    assert a.map_status("approved") == "pending"  # status_map wins
    assert a.map_status("pending") == "pending" and a.map_status("rejected") == "rejected"
    assert a.map_status("2") is None and a.map_status("") is None and a.map_status("Approved") is None


def test_canonical_name() -> None:
    a = parse(adv('aliases = { transaction_id = "order_id", clickid = "click_id", '
                  'sum = "amount", order_id = "click_id" }')).advertisers["acme"]
    assert a.canonical_name("transaction_id") == "order_id"
    assert a.canonical_name("clickid") == "click_id" and a.canonical_name("sum") == "amount"
    assert a.canonical_name("currency") == "currency"
    assert a.canonical_name("order_id") == "click_id"  # one step, not transitive


def test_direct_construction_freezes_and_derives_default_key() -> None:
    a = Advertiser("x", secrets={"k": SECRET}, allow_ips=("10.0.0.0/8",))  # type: ignore[arg-type]
    assert a.default_key_id == "k" and a.secret_for(None) == SECRET
    assert a.ip_allowed("10.1.2.3") and not a.ip_allowed("11.0.0.1")
    with pytest.raises(TypeError):
        a.secrets["k2"] = SECRET  # type: ignore[index]


# ----------------------------------------------------------------- Offer behaviour


def _offer(landing: str, extra: str = "") -> Offer:
    cfg = parse(adv() + f'[offers.off-1]\nadvertiser_id = "acme"\nlanding_url = "{landing}"\n{extra}')
    return cfg.offers["off-1"]


def test_landing_for_substitutes_and_encodes() -> None:
    o = _offer("https://shop.example/landing?cid={click_id}&aff={affiliate_id}&o={offer_id}"
               "&c={campaign_id}&s1={sub1}&s3={sub3}&s5={sub5}#{sub2}")
    url = o.landing_for("01HXYZ", "a b&c", "camp/1", ("x?y", "frag#", None, None, "ü"))
    assert url == ("https://shop.example/landing?cid=01HXYZ&aff=a%20b%26c&o=off-1"
                   "&c=camp%2F1&s1=x%3Fy&s3=&s5=%C3%BC#frag%23")


def test_landing_for_missing_values_become_empty() -> None:
    o = _offer("https://shop.example/p/{offer_id}?cid={click_id}&aff={affiliate_id}&c={campaign_id}&s={sub4}")
    assert o.landing_for("c1", None) == "https://shop.example/p/off-1?cid=c1&aff=&c=&s="
    assert o.landing_for("c1", "a", subs=("1",)) == "https://shop.example/p/off-1?cid=c1&aff=a&c=&s="
    with pytest.raises(ValueError):
        o.landing_for("c1", "a", subs=("1",) * 6)


def test_landing_for_literal_braces_and_no_placeholders() -> None:
    assert _offer("https://x.example/{{literal}}?c={click_id}").landing_for("c", None) == \
        "https://x.example/{literal}?c=c"
    assert _offer("https://x.example/static").landing_for("c", "a") == "https://x.example/static"


def test_window_ms_defaults_and_overrides() -> None:
    default = parse(adv() + '[offers.o]\nadvertiser_id = "acme"').offers["o"]
    assert default.attribution_window_days == 30
    assert default.window_ms("purchase") == 30 * DAY_MS == default.window_ms("custom:x")

    o = parse(adv() + '[offers.o]\nadvertiser_id = "acme"\nattribution_window_days = 14\n'
                      'attribution_windows = { purchase = 30, renewal = 400, "custom:vip" = 2 }').offers["o"]
    assert o.window_ms("lead") == 14 * DAY_MS
    assert o.window_ms("purchase") == 30 * DAY_MS and o.window_ms("renewal") == 400 * DAY_MS
    assert o.window_ms("custom:vip") == 2 * DAY_MS and o.window_days("renewal") == 400


# ----------------------------------------------------------------- aliases, defaults, token_header, presets

TOKEN_MODE = f'auth_modes = ["token"]\ntoken = "{SECRET}"\n'


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ('aliases = { adv = "advertiser_id" }',
         "alias 'adv' -> 'advertiser_id' can have no effect: advertiser_id is read literally"),
        ('aliases = { advertiser_id = "customer_id" }',
         "alias 'advertiser_id' -> 'customer_id' can have no effect: advertiser_id is read literally"),
        ('aliases = { event = "event" }', "alias 'event' -> 'event' maps a name to itself; remove it"),
        ('aliases = { secure = "token" }',
         "alias 'secure' -> 'token' can have no effect: token is only read in 'token' mode, "
         "which is not in auth_modes"),
        (TOKEN_MODE + 'aliases = { signature = "sig" }',
         "alias 'signature' -> 'sig' can have no effect: sig is only read in 'hmac' mode"),
        (TOKEN_MODE + 'aliases = { key = "kid" }',
         "alias 'key' -> 'kid' can have no effect: kid is only read in 'hmac' mode"),
        ('aliases = { txid = "order_id", "" = "click_id" }', "keys may not be empty"),
    ],
)
def test_alias_errors(body: str, fragment: str) -> None:
    e = error(adv(body))
    assert (e.source, e.path) == ("test.toml", "advertisers.acme.aliases")
    assert str(e).startswith("test.toml: advertisers.acme.aliases: ")
    assert fragment in e.problem


def test_aliases_to_auth_parameters_of_allowed_modes_load() -> None:
    a = parse(adv(f'auth_modes = ["hmac", "token"]\nsecrets = {{ k1 = "{SECRET}" }}\ntoken = "{SECRET}"\n'
                  'aliases = { signature = "sig", timestamp = "ts", key = "kid", secure = "token" }')
              ).advertisers["acme"]
    assert dict(a.aliases) == {"signature": "sig", "timestamp": "ts", "key": "kid", "secure": "token"}
    assert a.canonical_name("secure") == "token" and a.canonical_name("advertiser_id") == "advertiser_id"


def test_a_timestamp_alias_loads_for_token_only_advertisers() -> None:
    """Token mode checks ts when it is sent (replay window), so an alias to ts takes effect there too."""
    a = parse(adv(TOKEN_MODE + 'aliases = { timestamp = "ts", secure = "token" }')).advertisers["acme"]
    assert a.canonical_name("timestamp") == "ts"


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ('defaults = { amount = "1" }',
         "no default can be given for 'amount'; allowed: event, currency, status, offer_id"),
        ('defaults = { click_id = "C1" }', "no default can be given for 'click_id'"),
        ('defaults = { event = " " }', "default event is blank"),
        ('defaults = { event = "sale" }', "default event 'sale' is neither canonical nor in event_map"),
        ('defaults = { event = "Purchase" }', "default event 'Purchase' is neither canonical nor in event_map"),
        ('defaults = { status = "ok" }', "default status 'ok' is neither a status nor in status_map"),
        ('defaults = { status = "1" }', "default status '1' is neither a status nor in status_map"),
        ('defaults = { currency = "usd" }', "default currency 'usd' is not an upper-case ISO 4217 code"),
        ('defaults = { currency = "EURO" }', "default currency 'EURO' is not an upper-case ISO 4217 code"),
        ('defaults = { currency = 978 }', "value of 'currency' must be a string"),
        ("defaults = 1", "must be a table"),
    ],
)
def test_defaults_errors(body: str, fragment: str) -> None:
    e = error(adv(body))
    assert (e.source, e.path) == ("test.toml", "advertisers.acme.defaults")
    assert fragment in e.problem


def test_defaults_checked_through_the_maps() -> None:
    a = parse(adv('event_map = { sale = "purchase" }\nstatus_map = { "1" = "approved" }\n'
                  'defaults = { event = "sale", status = "1", currency = "EUR" }')).advertisers["acme"]
    assert dict(a.defaults) == {"event": "sale", "status": "1", "currency": "EUR"}
    assert dict(parse(adv()).advertisers["acme"].defaults) == {}


def test_default_offer_id_must_be_an_offer_of_this_advertiser() -> None:
    two = adv() + adv(name="globex") + '[offers.g1]\nadvertiser_id = "globex"\n[offers.a1]\nadvertiser_id = "acme"\n'
    ok = parse(two.replace("[advertisers.acme]\n", '[advertisers.acme]\ndefaults = { offer_id = "a1" }\n'))
    assert ok.advertisers["acme"].defaults["offer_id"] == "a1"
    for offer, where in (("g1", "of another advertiser"), ("nope", "unknown")):
        e = error(two.replace("[advertisers.acme]\n", f'[advertisers.acme]\ndefaults = {{ offer_id = "{offer}" }}\n'))
        assert e.path == "advertisers.acme.defaults", where
        assert e.problem == f"default offer_id {offer!r} is not an offer of this advertiser", where


def test_token_header() -> None:
    a = parse(adv(TOKEN_MODE + 'token_header = "X-Postback-Token"')).advertisers["acme"]
    assert a.token_header == "X-Postback-Token"
    assert parse(adv()).advertisers["acme"].token_header is None


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ('token_header = "X-Postback-Token"', "given but 'token' is not in auth_modes, so no token is read from it"),
        (TOKEN_MODE + 'token_header = "X Token"', "'X Token' is not a header name"),
        (TOKEN_MODE + 'token_header = "-X"', "'-X' is not a header name"),
        (TOKEN_MODE + 'token_header = ""', "'' is not a header name"),
        (TOKEN_MODE + 'token_header = "X-Postback-Signature"', "'X-Postback-Signature' has another meaning"),
        (TOKEN_MODE + 'token_header = "x-postback-timestamp"', "'x-postback-timestamp' has another meaning"),
        (TOKEN_MODE + 'token_header = "X-Postback-Key-Id"', "has another meaning"),
        (TOKEN_MODE + 'token_header = "Authorization"', "'Authorization' has another meaning"),
        (TOKEN_MODE + 'token_header = "HOST"', "'HOST' has another meaning"),
        (TOKEN_MODE + "token_header = 1", "must be a string"),
    ],
)
def test_token_header_errors(body: str, fragment: str) -> None:
    e = error(adv(body))
    assert (e.source, e.path) == ("test.toml", "advertisers.acme.token_header")
    assert fragment in e.problem


def test_unknown_preset_suggests_the_closest() -> None:
    e = error(adv(f'preset = "keitero"\ntoken = "{SECRET}"'))
    assert (e.source, e.path) == ("test.toml", "advertisers.acme.preset")
    assert e.problem.startswith("unknown preset 'keitero' (did you mean 'keitaro'?); known: everflow, tune, affise")
    far = error(adv('preset = "zzzzzz"'))
    assert far.path == "advertisers.acme.preset" and "did you mean" not in far.problem
    assert error(adv("preset = 3")).problem == "must be a string, got an integer"


def test_preset_keys_are_checked_like_written_ones_and_errors_name_the_key() -> None:
    e = error(f'[advertisers.acme]\npreset = "voluum"\ntoken = "{SECRET}"\nalias = {{ x = "event" }}\n')
    assert e.path == "advertisers.acme" and "unknown key 'alias' (did you mean 'aliases'?)" in e.problem
    e = error(f'[advertisers.acme]\npreset = "voluum"\ntoken = "{SECRET}"\naliases = {{ cid = "cid" }}\n')
    assert e.path == "advertisers.acme.aliases" and "alias 'cid' -> 'cid' maps a name to itself" in e.problem
    e = error(f'[advertisers.acme]\npreset = "voluum"\ntoken = "{SECRET}"\naliases = 1\n')
    assert e.path == "advertisers.acme.aliases" and e.problem == "must be a table, got an integer"
