"""The partner file: ONE TOML file of advertisers and offers, read into ``postback.partner_model``.

Every rule below is checked at load time:

- every table accepts only the keys documented below; an unknown key is a load error
  (with a "did you mean" hint), as is a wrong type, an out-of-range number, a bad id,
  a bad CIDR, a bad URL or an unknown URL placeholder;
- secrets and tokens never appear in error messages.

Errors are raised as :class:`~postback.partner_model.PartnerConfigError` (a ``ValueError``)
whose message reads ``<file>: <table path>: <problem>``, e.g.
``deploy/partners.toml: advertisers.acme.secrets: secret for key id 'k1' is 5
characters long; at least 16 are required``. Keys that are not TOML bare keys are
quoted in the path (``advertisers."acme.eu".token``).

File format
===========

All tables are optional; an empty file is a valid configuration with no partners.

.. code-block:: toml

    [ingest]
    # Bearer token for the bulk click import (POST /clicks). Optional: absent means
    # bulk import is disabled. At least 16 characters.
    bulk_token = "..."

    [advertisers.acme]                # advertiser id: ^[A-Za-z0-9_.-]{1,64}$
    # How postbacks authenticate: a subset of {"hmac", "token"}, not empty.
    # Default ["hmac"]. "token" is the legacy shared token sent with the request.
    auth_modes = ["hmac"]
    # key id -> HMAC secret. Several may be active at once so keys can be rotated
    # without downtime. Required (non-empty) when "hmac" is allowed, forbidden when it
    # is not. Key ids: ^[A-Za-z0-9_.-]{1,64}$; each secret at least 16 characters.
    secrets = { k2025 = "...", k2026 = "..." }
    # Key used when a request carries no key id. Optional; must name a key in
    # `secrets`. Default: the only key when there is exactly one, otherwise none (a
    # request without a key id is then not verifiable).
    default_key_id = "k2026"
    # Legacy shared token; required iff "token" is in auth_modes. At least 16 chars.
    token = "..."
    # Source addresses allowed to post. Each entry is parsed with
    # ipaddress.ip_network(strict=False): single addresses and CIDRs, v4 and v6.
    # Optional; empty or absent means any address.
    allow_ips = ["203.0.113.0/24", "2001:db8::/32", "198.51.100.7"]
    # Accepted clock skew of signed timestamps, seconds. Default 300, range 1..86400.
    timestamp_tolerance_s = 300
    # Incoming parameter name -> canonical parameter name. Applied once (not
    # transitively) to every parameter, everywhere: required fields, the Kafka key,
    # authentication (aliases to token, sig, ts and kid name those parameters),
    # normalisation and the dedupe key. Names not listed are used as they are. Targets
    # must look like a canonical parameter name: ^[a-z][a-z0-9_]{0,63}$. An alias that
    # can have no effect is a load error: to or from advertiser_id (read literally, it
    # selects this table), to itself, or to an auth parameter of a mode not allowed.
    aliases = { transaction_id = "order_id", clickid = "click_id", sum = "amount" }
    # Advertiser event name -> canonical event (see CANONICAL_EVENTS, or
    # "custom:<name>" with <name> matching ^[a-z0-9_-]{1,40}$).
    event_map = { sale = "purchase", reg = "signup" }
    # Advertiser status value -> "approved" | "pending" | "rejected".
    status_map = { "1" = "approved", "0" = "pending", "-1" = "rejected" }
    # Canonical name -> value used when a postback does not carry that parameter (or
    # carries it blank); a value that was sent always wins. Keys: event, currency,
    # status, offer_id. Values are checked like sent ones (event and status through
    # the maps above, currency ISO 4217, offer_id a configured offer of this advertiser).
    defaults = { event = "purchase", currency = "EUR" }
    # Header that may carry the legacy token instead of a parameter (only with "token"
    # in auth_modes). The token parameter's own name is set with an alias to "token".
    token_header = "X-Postback-Token"
    # A platform's parameter names, event and status codes and auth parameter (see
    # docs/partners.md and PRESETS in postback/presets.py). Entries written here
    # (aliases, event_map, status_map, defaults, and every other key) override the
    # preset's, entry by entry for the four maps.
    preset = "keitaro"
    # How long order ids are remembered for de-duplication, days. Default 90,
    # range 1..3650.
    dedupe_horizon_days = 90
    # Canonical events counted at most once per click when the postback has no order
    # id. Default ["lead", "signup", "install", "trial_start"]; may be empty.
    one_time_events = ["lead", "signup", "install", "trial_start"]

    [offers.offer-1]                  # offer id: ^[A-Za-z0-9_.-]{1,64}$
    # Required; must name an advertiser configured in this file.
    advertiser_id = "acme"
    # Where a click is redirected. Optional; absolute http(s) URL with a host.
    # Placeholders: {click_id} {offer_id} {affiliate_id} {campaign_id} {sub1}..{sub5},
    # substituted percent-encoded (missing values become ""). Any other placeholder,
    # a format spec or conversion ({click_id:>9}, {click_id!r}), or a placeholder in
    # the scheme or host is a load error. Write a literal brace as {{ or }}.
    landing_url = "https://shop.example/landing?cid={click_id}&aff={affiliate_id}"
    # Attribution window in days for events without an override. Default 30, 1..400.
    attribution_window_days = 30
    # Optional per-event override (canonical event -> days, each 1..400).
    attribution_windows = { purchase = 30, renewal = 400 }
    # How long after a payout a refund or chargeback of the same order (same advertiser
    # and order_id) still takes it back, days. Default 30, range 0..3650.
    clawback_days = 30

    # What affiliates earn. Key: a canonical event (or "custom:<name>"). Money is always
    # a decimal STRING ("5.00"), never a TOML number (a float would not be exact): a
    # number is a load error. At most 6 decimal places; amounts >= 0.
    [offers.offer-1.payouts.purchase]
    # "cpa" (a fixed amount), "revshare" (a percent of the conversion's revenue) or
    # "cpa_plus_revshare" (both). Required.
    type = "cpa_plus_revshare"
    # The cpa part and its currency (ISO 4217, ^[A-Z]{3}$): required for "cpa" and
    # "cpa_plus_revshare", not allowed for "revshare".
    amount = "5.00"
    currency = "USD"
    # The revshare part, percent of the revenue, "0".."100": required for "revshare" and
    # "cpa_plus_revshare", not allowed for "cpa".
    percent = "10"
    # Optional. A tier applies once the affiliate has >= min_approved (1..10000000)
    # approved conversions of this offer in the current month (account timezone); the
    # highest one reached wins. It replaces amount and/or percent (at least one; only
    # the parts the type has); each min_approved at most once.
    tiers = [ { min_approved = 100, amount = "6.00", percent = "12" } ]

    # Limits for the whole offer; every key optional, but at least one limit is set.
    [offers.offer-1.caps]
    daily_conversions = 100           # integers 1..1000000000
    monthly_conversions = 1000
    daily_payout = "500.00"           # in the reporting currency, decimal strings > 0
    monthly_payout = "10000.00"
    on_cap = "hold"                   # "hold" (default) or "reject" a conversion over a limit

    # The same keys, applied to each (offer, affiliate) separately.
    [offers.offer-1.affiliate_caps]
    daily_conversions = 10
    on_cap = "reject"

    # Conversions that look wrong are held. All optional (but at least one is set).
    [offers.offer-1.quality]
    min_click_to_conversion_s = 10    # 0..31622400; not above the max
    max_click_to_conversion_s = 2592000   # 1..31622400
    max_conversions_per_click = 1     # per click and event, 1..1000000

    [account]
    # Currency of reports and of payout caps (ISO 4217). Default "USD".
    reporting_currency = "USD"
    # IANA timezone (zoneinfo) of cap periods, tier months and daily reports. Default "UTC".
    timezone = "Europe/Berlin"

    [affiliates.aff-1]                # affiliate id: ^[A-Za-z0-9_.-]{1,64}$
    name = "Affiliate One"            # display name; default: the id
    status = "active"                 # "active" (default) or "paused": conversions are held
    # Per-offer, per-event overrides: same shape as an offer's payouts; the offer must
    # be configured in this file. An override wins over the offer's rule for that event.
    [affiliates.aff-1.payouts.offer-1.purchase]
    type = "cpa"
    amount = "7.50"
    currency = "EUR"

    # Outbound postbacks: conversions of this affiliate are sent on to its server.
    # One table per endpoint; the name (^[A-Za-z0-9_.-]{1,64}$) is part of the
    # endpoint id "aff-1/main". A conversion goes to every endpoint whose filters it
    # passes; retries are per endpoint.
    [affiliates.aff-1.postbacks.main]
    # Required. Absolute http(s) URL with a host, no user info. Macros (after the host
    # only): {click_id} {sub1}..{sub5} {offer_id} {event} {status} {payout}
    # {payout_currency} {order_id} {conversion_id} {version} {event_time}
    # {idempotency_key}; values are percent-encoded per RFC 3986, missing ones become
    # "". {event_time} is ISO-8601 UTC, {payout} decimal text, {idempotency_key}
    # "<conversion_id>:<version>". Any other macro, a format spec or conversion, or a
    # macro in the scheme or host is a load error. Write a literal brace as {{ or }}.
    url = "https://aff.example/pb?cid={click_id}&p={payout}&cur={payout_currency}&s={status}"
    # "GET" (default): the rendered URL. "POST": the rendered URL with a JSON body of
    # every macro's value (sorted keys). Upper case.
    method = "GET"
    # Optional filters; absent means all, an empty array is a load error.
    offers = ["offer-1"]              # configured offer ids
    events = ["purchase", "refund"]   # canonical events (or "custom:<name>")
    statuses = ["approved", "rejected"]   # approved | pending | rejected
    # Optional HMAC secret (at least 16 characters): requests are signed as
    # docs/signing.md describes (GET: ts and sig appended to the query, so the URL may
    # not carry ts, kid or sig itself; POST: X-Postback-Timestamp and
    # X-Postback-Signature over the body). Never logged: URLs are recorded redacted.
    secret = "..."
    timeout_s = 10                    # per attempt, seconds; default 10, 0.1..120
    max_concurrency = 4               # requests in flight to this endpoint; default 4, 1..64
    rate_per_s = 20                   # requests per second (token bucket); default 20, > 0 (at most 10000)
    # Delays before attempt 2, 3, ... (seconds, each > 0 and at most 604800, not
    # empty); after the schedule, attempts are 21600 s apart. Default below.
    retry_schedule_s = [60, 300, 900, 3600]
    # No attempt later than this after the first one; then the job is dead-lettered.
    # Default 259200 (3 days), 0..2592000.
    give_up_after_s = 259200
    # Allow loopback, private, link-local and cloud metadata targets (for tests and
    # in-house receivers only). Default false: such targets are refused, also when a
    # name resolves to one, at connect time as well.
    allow_private = false
    # Follow 3xx redirects (each hop checked like the URL). Default false: a redirect
    # is a failed attempt.
    follow_redirects = false

A commented, loadable example lives in ``deploy/partners.example.toml``.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import replace
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus, urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from postback.landing_url import check_template
from postback.partner_model import (
    DEFAULT_GIVE_UP_AFTER_S,
    DEFAULT_OUTBOUND_MAX_CONCURRENCY,
    DEFAULT_OUTBOUND_RATE_PER_S,
    DEFAULT_OUTBOUND_TIMEOUT_S,
    DEFAULT_RETRY_SCHEDULE_S,
    OUTBOUND_METHODS,
    AFFILIATE_STATUSES,
    AUTH_MODES,
    CANONICAL_EVENTS,
    DEFAULT_ATTRIBUTION_WINDOW_DAYS,
    DEFAULT_CLAWBACK_DAYS,
    DEFAULT_DEDUPE_HORIZON_DAYS,
    DEFAULT_ONE_TIME_EVENTS,
    DEFAULT_TIMESTAMP_TOLERANCE_S,
    MIN_SECRET_LEN,
    ON_CAP_ACTIONS,
    PAYOUT_KINDS,
    STATUSES,
    Account,
    Advertiser,
    Affiliate,
    Caps,
    IPNetwork,
    Offer,
    OutboundEndpoint,
    PartnerConfig,
    PartnerConfigError,
    PayoutRule,
    Quality,
    Tier,
    check_outbound_url,
    is_canonical_event,
)

__all__ = ["load_partner_config", "parse_partner_config"]

_ID_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_PARAM_RE = re.compile(r"[a-z][a-z0-9_]{0,63}")
_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_\-]+")

_TOP_KEYS = ("ingest", "account", "advertisers", "offers", "affiliates")
_INGEST_KEYS = ("bulk_token",)
_ADVERTISER_KEYS = (
    "preset", "auth_modes", "secrets", "default_key_id", "token", "token_header", "allow_ips",
    "timestamp_tolerance_s", "aliases", "event_map", "status_map", "defaults", "dedupe_horizon_days",
    "one_time_events",
)
#: Canonical names only one auth mode reads; an alias to one of a mode not allowed has no effect.
#: ``ts`` is absent on purpose: token mode checks it too when it is sent (replay window).
_AUTH_TARGETS = {"kid": "hmac", "sig": "hmac", "token": "token"}
_HEADER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,63}")
_RESERVED_HEADERS = frozenset({"x-postback-timestamp", "x-postback-key-id", "x-postback-signature",
                               "user-agent", "content-type", "content-length", "host", "authorization"})
_CURRENCY_RE = re.compile(r"[A-Z]{3}")
#: Advertiser keys that are tables; a preset's entries and the file's are merged entry by entry.
_MAP_KEYS = ("aliases", "event_map", "status_map", "defaults")
_OFFER_KEYS = ("advertiser_id", "landing_url", "attribution_window_days", "attribution_windows",
               "payouts", "caps", "affiliate_caps", "quality", "clawback_days")
_ACCOUNT_KEYS = ("reporting_currency", "timezone")
_AFFILIATE_KEYS = ("name", "status", "payouts", "postbacks")
_POSTBACK_KEYS = ("url", "method", "offers", "events", "statuses", "secret", "timeout_s",
                  "max_concurrency", "rate_per_s", "retry_schedule_s", "give_up_after_s",
                  "allow_private", "follow_redirects")
#: Query parameters the signing of a GET postback appends.
_SIGNING_PARAMS = ("ts", "kid", "sig")
_RULE_KEYS = ("type", "amount", "currency", "percent", "tiers")
_TIER_KEYS = ("min_approved", "amount", "percent")
_CAPS_KEYS = ("daily_conversions", "monthly_conversions", "daily_payout", "monthly_payout", "on_cap")
_QUALITY_KEYS = ("min_click_to_conversion_s", "max_click_to_conversion_s", "max_conversions_per_click")
#: Money and percents: plain decimal text, at most 6 decimal places (the Conversion record's scale).
_MONEY_RE = re.compile(r"[0-9]{1,12}(\.[0-9]{1,6})?")
_MAX_QUALITY_S = 366 * 86_400


def load_partner_config(path: Path) -> PartnerConfig:
    """Read and validate the partner TOML file at ``path``.

    Raises PartnerConfigError (naming the file) when it cannot be read, is not UTF-8
    TOML, or breaks any rule of the format.
    """
    source = str(path)
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as e:
        raise PartnerConfigError(source, "", f"cannot read file: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise PartnerConfigError(source, "", f"not valid UTF-8: {e}") from e
    return parse_partner_config(text, source)


def parse_partner_config(text: str, source: str = "<string>") -> PartnerConfig:
    """Parse and validate partner TOML ``text``; ``source`` names it in error messages."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise PartnerConfigError(source, "", f"invalid TOML: {e}") from e
    return _Reader(source).config(doc)


def _join(path: str, key: str) -> str:
    part = key if _BARE_KEY_RE.fullmatch(key) else json.dumps(key, ensure_ascii=False)
    return f"{path}.{part}" if path else part


class _Reader:
    """Validates one parsed TOML document; holds only the source name for messages."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, path: str, problem: str) -> PartnerConfigError:
        return PartnerConfigError(self.source, path, problem)

    # ---- generic helpers

    def table(self, value: Any, path: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(path, f"must be a table, got {_type_name(value)}")
        return value

    def check_keys(self, table: Mapping[str, Any], path: str, allowed: Sequence[str]) -> None:
        unknown = [k for k in table if k not in allowed]
        if not unknown:
            return
        key = unknown[0]
        hint = difflib.get_close_matches(key, allowed, n=1)
        did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
        what = "top-level key" if not path else "key"
        raise self.fail(path, f"unknown {what} {key!r}{did_you_mean}; allowed: {', '.join(allowed)}")

    def string(self, value: Any, path: str) -> str:
        if not isinstance(value, str):
            raise self.fail(path, f"must be a string, got {_type_name(value)}")
        return value

    def ident(self, value: Any, path: str, what: str) -> str:
        value = self.string(value, path)
        if not _ID_RE.fullmatch(value):
            raise self.fail(path, f"invalid {what} {value!r}: must match ^[A-Za-z0-9_.-]{{1,64}}$")
        return value

    def secret(self, value: Any, path: str, what: str) -> str:
        if not isinstance(value, str):
            raise self.fail(path, f"{what} must be a string, got {_type_name(value)}")
        if len(value) < MIN_SECRET_LEN:
            raise self.fail(path, f"{what} is {len(value)} characters long; "
                                  f"at least {MIN_SECRET_LEN} are required")
        return value

    def integer(self, value: Any, path: str, lo: int, hi: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(path, f"must be an integer, got {_type_name(value)}")
        if not lo <= value <= hi:
            raise self.fail(path, f"must be between {lo} and {hi}, got {value}")
        return value

    def string_list(self, value: Any, path: str) -> list[str]:
        if not isinstance(value, list):
            raise self.fail(path, f"must be an array of strings, got {_type_name(value)}")
        for item in value:
            if not isinstance(item, str):
                raise self.fail(path, f"must be an array of strings; found {_type_name(item)}")
        return value

    def string_map(self, value: Any, path: str) -> dict[str, str]:
        table = self.table(value, path)
        for k, v in table.items():
            if not isinstance(v, str):
                raise self.fail(path, f"value of {k!r} must be a string, got {_type_name(v)}")
            if k == "":
                raise self.fail(path, "keys may not be empty")
        return table

    def event(self, value: str, path: str, context: str) -> str:
        if not is_canonical_event(value):
            raise self.fail(path, f"{context}{value!r} is not a canonical event; use one of "
                                  f"{', '.join(CANONICAL_EVENTS)} or 'custom:<name>' "
                                  "with <name> matching ^[a-z0-9_-]{1,40}$")
        return value

    # ---- document

    def config(self, doc: dict[str, Any]) -> PartnerConfig:
        self.check_keys(doc, "", _TOP_KEYS)
        bulk_token = self.ingest(doc.get("ingest", {}))
        advertisers_t = self.table(doc.get("advertisers", {}), "advertisers")
        advertisers = {}
        for adv_id, body in advertisers_t.items():
            path = _join("advertisers", adv_id)
            self.ident(adv_id, path, "advertiser id")
            advertisers[adv_id] = self.advertiser(adv_id, body, path)
        offers_t = self.table(doc.get("offers", {}), "offers")
        offers = {}
        for offer_id, body in offers_t.items():
            path = _join("offers", offer_id)
            self.ident(offer_id, path, "offer id")
            offers[offer_id] = self.offer(offer_id, body, path, advertisers)
        account = self.account(doc.get("account", {}))
        affiliates_t = self.table(doc.get("affiliates", {}), "affiliates")
        affiliates = {}
        for aff_id, body in affiliates_t.items():
            path = _join("affiliates", aff_id)
            self.ident(aff_id, path, "affiliate id")
            affiliates[aff_id] = self.affiliate(aff_id, body, path, offers)
        for adv_id, adv in advertisers.items():
            offer_id = adv.defaults.get("offer_id")
            if offer_id is not None:
                offer = offers.get(offer_id)
                if offer is None or offer.advertiser_id != adv_id:
                    raise self.fail(_join(_join("advertisers", adv_id), "defaults"),
                                    f"default offer_id {offer_id!r} is not an offer of this advertiser")
        return PartnerConfig(ingest_bulk_token=bulk_token, advertisers=advertisers, offers=offers,
                             account=account, affiliates=affiliates)

    def ingest(self, value: Any) -> str | None:
        table = self.table(value, "ingest")
        self.check_keys(table, "ingest", _INGEST_KEYS)
        if "bulk_token" not in table:
            return None
        return self.secret(table["bulk_token"], "ingest.bulk_token", "bulk_token")

    def with_preset(self, t: dict[str, Any], path: str) -> tuple[dict[str, Any], frozenset[str]]:
        """The advertiser table with its preset's keys filled in, and the alias sources the preset gave.

        Keys written in the table win: whole keys, and single entries of the four maps.
        """
        if "preset" not in t:
            return t, frozenset()
        from postback.presets import PRESETS

        p = _join(path, "preset")
        name = self.string(t["preset"], p)
        preset = PRESETS.get(name)
        if preset is None:
            hint = difflib.get_close_matches(name, list(PRESETS), n=1)
            did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise self.fail(p, f"unknown preset {name!r}{did_you_mean}; known: {', '.join(PRESETS)}")
        merged: dict[str, Any] = {k: list(v) if isinstance(v, tuple) else v
                                  for k, v in preset.items() if k not in _MAP_KEYS}
        merged.update(t)
        for key in _MAP_KEYS:
            if key in preset or key in t:
                merged[key] = {**preset.get(key, {}), **self.table(t.get(key, {}), _join(path, key))}
        own_aliases = self.table(t.get("aliases", {}), _join(path, "aliases"))
        return merged, frozenset(k for k in preset.get("aliases", {}) if k not in own_aliases)

    def advertiser(self, adv_id: str, value: Any, path: str) -> Advertiser:
        t = self.table(value, path)
        self.check_keys(t, path, _ADVERTISER_KEYS)
        t, preset_aliases = self.with_preset(t, path)

        p = _join(path, "auth_modes")
        modes = self.string_list(t.get("auth_modes", ["hmac"]), p)
        if not modes:
            raise self.fail(p, f"must list at least one of {', '.join(AUTH_MODES)}")
        for m in modes:
            if m not in AUTH_MODES:
                raise self.fail(p, f"unknown auth mode {m!r}; allowed: {', '.join(AUTH_MODES)}")
        if len(set(modes)) != len(modes):
            raise self.fail(p, "lists a mode more than once")
        hmac, token_mode = "hmac" in modes, "token" in modes

        p = _join(path, "secrets")
        secrets = self.table(t.get("secrets", {}), p)
        for kid, secret in secrets.items():
            self.ident(kid, p, "key id")
            self.secret(secret, p, f"secret for key id {kid!r}")
        if hmac and not secrets:
            raise self.fail(p, "required (at least one key id = secret) when 'hmac' is in auth_modes")
        if not hmac and secrets:
            raise self.fail(p, "given but 'hmac' is not in auth_modes; add it or remove the secrets")

        p = _join(path, "default_key_id")
        default_kid: str | None = None
        if "default_key_id" in t:
            default_kid = self.ident(t["default_key_id"], p, "key id")
            if default_kid not in secrets:
                known = ", ".join(secrets) or "none"
                raise self.fail(p, f"{default_kid!r} is not a key id in secrets (known: {known})")

        p = _join(path, "token")
        token: str | None = None
        if "token" in t:
            if not token_mode:
                raise self.fail(p, "given but 'token' is not in auth_modes; add it or remove the token")
            token = self.secret(t["token"], p, "token")
        elif token_mode:
            raise self.fail(p, "required when 'token' is in auth_modes")

        p = _join(path, "token_header")
        token_header: str | None = None
        if "token_header" in t:
            token_header = self.string(t["token_header"], p)
            if not token_mode:
                raise self.fail(p, "given but 'token' is not in auth_modes, so no token is read from it")
            if not _HEADER_RE.fullmatch(token_header):
                raise self.fail(p, f"{token_header!r} is not a header name: must match ^[A-Za-z0-9][A-Za-z0-9-]{{0,63}}$")
            if token_header.lower() in _RESERVED_HEADERS:
                raise self.fail(p, f"{token_header!r} has another meaning; choose another header name")

        p = _join(path, "allow_ips")
        networks: list[IPNetwork] = []
        for entry in self.string_list(t.get("allow_ips", []), p):
            try:
                networks.append(ipaddress.ip_network(entry.strip(), strict=False))
            except ValueError as e:
                raise self.fail(p, f"{entry!r} is not an IP address or CIDR network: {e}") from e

        tolerance = self.integer(t.get("timestamp_tolerance_s", DEFAULT_TIMESTAMP_TOLERANCE_S),
                                 _join(path, "timestamp_tolerance_s"), 1, 86_400)

        aliases = self.aliases(t.get("aliases", {}), _join(path, "aliases"), modes, preset_aliases)

        p = _join(path, "event_map")
        event_map = self.string_map(t.get("event_map", {}), p)
        for src, dst in event_map.items():
            self.event(dst, p, f"target of {src!r}: ")

        p = _join(path, "status_map")
        status_map = self.string_map(t.get("status_map", {}), p)
        for src, dst in status_map.items():
            if dst not in STATUSES:
                raise self.fail(p, f"target of {src!r}: {dst!r} is not a status; "
                                   f"use one of {', '.join(STATUSES)}")

        horizon = self.integer(t.get("dedupe_horizon_days", DEFAULT_DEDUPE_HORIZON_DAYS),
                               _join(path, "dedupe_horizon_days"), 1, 3650)

        p = _join(path, "one_time_events")
        one_time = self.string_list(t.get("one_time_events", list(DEFAULT_ONE_TIME_EVENTS)), p)
        for ev in one_time:
            self.event(ev, p, "")
        if len(set(one_time)) != len(one_time):
            raise self.fail(p, "lists an event more than once")

        adv = Advertiser(
            advertiser_id=adv_id, auth_modes=tuple(modes), secrets=secrets,
            default_key_id=default_kid, token=token, allow_ips=tuple(networks),
            timestamp_tolerance_s=tolerance, aliases=aliases, event_map=event_map,
            status_map=status_map, dedupe_horizon_days=horizon, one_time_events=tuple(one_time),
            token_header=token_header, preset=t.get("preset"),
        )
        defaults = self.defaults(t.get("defaults", {}), _join(path, "defaults"), adv)
        return replace(adv, defaults=defaults)

    def aliases(self, value: Any, p: str, modes: Sequence[str], from_preset: frozenset[str]) -> dict[str, str]:
        """Checked aliases; every one must be able to take effect (see the module docstring)."""
        aliases = self.string_map(value, p)
        out: dict[str, str] = {}
        for src, dst in aliases.items():
            if not _PARAM_RE.fullmatch(dst):
                raise self.fail(p, f"alias target {dst!r} (for {src!r}) is not a parameter name: "
                                   "must match ^[a-z][a-z0-9_]{0,63}$")
            mode = _AUTH_TARGETS.get(dst)
            if mode is not None and mode not in modes:
                if src in from_preset:  # the preset's auth parameter, for a mode this advertiser does not use
                    continue
                raise self.fail(p, f"alias {src!r} -> {dst!r} can have no effect: {dst} is only read in "
                                   f"{mode!r} mode, which is not in auth_modes")
            if src == dst:
                raise self.fail(p, f"alias {src!r} -> {dst!r} maps a name to itself; remove it")
            if "advertiser_id" in (src, dst):
                raise self.fail(p, f"alias {src!r} -> {dst!r} can have no effect: advertiser_id is read "
                                   "literally, before aliases apply (it selects the advertiser whose aliases "
                                   "apply); send advertiser_id as it is")
            out[src] = dst
        return out

    def defaults(self, value: Any, p: str, adv: Advertiser) -> dict[str, str]:
        """Checked defaults: only canonical names that take a default, each value as a sent one would be."""
        from postback.partner_view import DEFAULTABLE_PARAMS

        defaults = self.string_map(value, p)
        for name, val in defaults.items():
            if name not in DEFAULTABLE_PARAMS:
                raise self.fail(p, f"no default can be given for {name!r}; allowed: {', '.join(DEFAULTABLE_PARAMS)}")
            if not val.strip():
                raise self.fail(p, f"default {name} is blank")
            if name == "event" and adv.map_event(val) is None:
                raise self.fail(p, f"default event {val!r} is neither canonical nor in event_map")
            if name == "status" and adv.map_status(val) is None:
                raise self.fail(p, f"default status {val!r} is neither a status nor in status_map")
            if name == "currency" and not _CURRENCY_RE.fullmatch(val):
                raise self.fail(p, f"default currency {val!r} is not an upper-case ISO 4217 code")
        return defaults

    def offer(self, offer_id: str, value: Any, path: str,
              advertisers: Mapping[str, Advertiser]) -> Offer:
        t = self.table(value, path)
        self.check_keys(t, path, _OFFER_KEYS)

        p = _join(path, "advertiser_id")
        if "advertiser_id" not in t:
            raise self.fail(p, "required: the id of the advertiser this offer belongs to")
        adv_id = self.string(t["advertiser_id"], p)
        if adv_id not in advertisers:
            known = ", ".join(advertisers) or "none configured"
            raise self.fail(p, f"unknown advertiser {adv_id!r} (known: {known})")

        landing: str | None = None
        if "landing_url" in t:
            landing = self.landing_url(t["landing_url"], _join(path, "landing_url"))

        default_days = self.integer(t.get("attribution_window_days", DEFAULT_ATTRIBUTION_WINDOW_DAYS),
                                    _join(path, "attribution_window_days"), 1, 400)
        p = _join(path, "attribution_windows")
        windows = self.table(t.get("attribution_windows", {}), p)
        for ev, days in windows.items():
            self.event(ev, p, "")
            self.integer(days, _join(p, ev), 1, 400)

        p = _join(path, "payouts")
        payouts = {}
        for ev, body in self.table(t.get("payouts", {}), p).items():
            self.event(ev, p, "payout event ")
            payouts[ev] = self.payout_rule(body, _join(p, ev))
        caps = self.caps(t["caps"], _join(path, "caps")) if "caps" in t else None
        affiliate_caps = (self.caps(t["affiliate_caps"], _join(path, "affiliate_caps"))
                          if "affiliate_caps" in t else None)
        quality = self.quality(t["quality"], _join(path, "quality")) if "quality" in t else None
        clawback_days = self.integer(t.get("clawback_days", DEFAULT_CLAWBACK_DAYS),
                                     _join(path, "clawback_days"), 0, 3650)

        return Offer(offer_id=offer_id, advertiser_id=adv_id, landing_url=landing,
                     attribution_window_days=default_days, attribution_windows=windows,
                     payouts=payouts, caps=caps, affiliate_caps=affiliate_caps, quality=quality,
                     clawback_days=clawback_days)

    # ---- commission

    def money(self, value: Any, path: str, what: str = "amount") -> Decimal:
        """A non-negative decimal STRING; a TOML number is refused because a float is not exact."""
        if isinstance(value, float) or (isinstance(value, int) and not isinstance(value, bool)):
            kind = "float" if isinstance(value, float) else "integer"
            raise self.fail(path, f"{what} is a TOML {kind}; write it as a quoted decimal string, "
                                  f"e.g. \"{value}\" (money is never a float)")
        text = self.string(value, path)
        if not _MONEY_RE.fullmatch(text):
            raise self.fail(path, f"{what} {text!r} is not a decimal number >= 0 with at most 6 decimal "
                                  "places, e.g. \"5.00\"")
        try:
            return Decimal(text)
        except InvalidOperation as e:  # pragma: no cover - the pattern admits only valid decimals
            raise self.fail(path, f"{what} {text!r} is not a decimal number") from e

    def percent(self, value: Any, path: str) -> Decimal:
        pct = self.money(value, path, "percent")
        if pct > 100:
            raise self.fail(path, f"percent must be between 0 and 100, got {value!r}")
        return pct

    def currency(self, value: Any, path: str) -> str:
        code = self.string(value, path)
        if not _CURRENCY_RE.fullmatch(code):
            raise self.fail(path, f"{code!r} is not a currency: an upper-case ISO 4217 code such as \"USD\"")
        return code

    def account(self, value: Any) -> Account:
        t = self.table(value, "account")
        self.check_keys(t, "account", _ACCOUNT_KEYS)
        currency = self.currency(t.get("reporting_currency", "USD"), "account.reporting_currency")
        p = "account.timezone"
        tz = self.string(t.get("timezone", "UTC"), p)
        try:
            if not tz or tz != tz.strip():
                raise ValueError(tz)
            ZoneInfo(tz)
        except (ZoneInfoNotFoundError, ValueError, OSError) as e:
            raise self.fail(p, f"unknown timezone {tz!r}: use an IANA name such as \"Europe/Berlin\" "
                               "or \"UTC\"") from e
        return Account(reporting_currency=currency, timezone=tz)

    def payout_rule(self, value: Any, path: str) -> PayoutRule:
        t = self.table(value, path)
        self.check_keys(t, path, _RULE_KEYS)
        p = _join(path, "type")
        if "type" not in t:
            raise self.fail(p, f"required: one of {', '.join(PAYOUT_KINDS)}")
        kind = self.string(t["type"], p)
        if kind not in PAYOUT_KINDS:
            hint = difflib.get_close_matches(kind, PAYOUT_KINDS, n=1)
            did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise self.fail(p, f"unknown payout type {kind!r}{did_you_mean}; allowed: {', '.join(PAYOUT_KINDS)}")
        has_cpa, has_rev = kind in ("cpa", "cpa_plus_revshare"), kind in ("revshare", "cpa_plus_revshare")
        amount = currency = percent = None
        for key, needed in (("amount", has_cpa), ("currency", has_cpa), ("percent", has_rev)):
            if needed and key not in t:
                raise self.fail(_join(path, key), f"required for type {kind!r}")
            if not needed and key in t:
                raise self.fail(_join(path, key), f"not allowed for type {kind!r}")
        if has_cpa:
            amount = self.money(t["amount"], _join(path, "amount"))
            currency = self.currency(t["currency"], _join(path, "currency"))
        if has_rev:
            percent = self.percent(t["percent"], _join(path, "percent"))
        p = _join(path, "tiers")
        tiers_v = t.get("tiers", [])
        if not isinstance(tiers_v, list):
            raise self.fail(p, f"must be an array of tables, got {_type_name(tiers_v)}")
        tiers: list[Tier] = []
        for i, item in enumerate(tiers_v):
            tp = f"{p}[{i}]"
            tt = self.table(item, tp)
            self.check_keys(tt, tp, _TIER_KEYS)
            if "min_approved" not in tt:
                raise self.fail(_join(tp, "min_approved"), "required: approved conversions this month from "
                                                           "which the tier applies")
            min_approved = self.integer(tt["min_approved"], _join(tp, "min_approved"), 1, 10_000_000)
            if "amount" not in tt and "percent" not in tt:
                raise self.fail(tp, "a tier needs amount or percent (or both)")
            if "amount" in tt and not has_cpa:
                raise self.fail(_join(tp, "amount"), f"not allowed: type {kind!r} has no cpa amount")
            if "percent" in tt and not has_rev:
                raise self.fail(_join(tp, "percent"), f"not allowed: type {kind!r} has no revshare percent")
            t_amount = self.money(tt["amount"], _join(tp, "amount")) if "amount" in tt else None
            t_percent = self.percent(tt["percent"], _join(tp, "percent")) if "percent" in tt else None
            if any(x.min_approved == min_approved for x in tiers):
                raise self.fail(_join(tp, "min_approved"), f"another tier already starts at {min_approved}")
            tiers.append(Tier(min_approved=min_approved, amount=t_amount, percent=t_percent))
        return PayoutRule(kind=kind, amount=amount, currency=currency, percent=percent, tiers=tuple(tiers))

    def caps(self, value: Any, path: str) -> Caps:
        t = self.table(value, path)
        self.check_keys(t, path, _CAPS_KEYS)
        ints = {k: self.integer(t[k], _join(path, k), 1, 1_000_000_000)
                for k in ("daily_conversions", "monthly_conversions") if k in t}
        money = {}
        for k in ("daily_payout", "monthly_payout"):
            if k in t:
                money[k] = self.money(t[k], _join(path, k))
                if money[k] <= 0:
                    raise self.fail(_join(path, k), "must be greater than 0")
        if not ints and not money:
            raise self.fail(path, "sets no limit: give at least one of daily_conversions, monthly_conversions, "
                                  "daily_payout, monthly_payout (or remove the table)")
        p = _join(path, "on_cap")
        on_cap = self.string(t.get("on_cap", "hold"), p)
        if on_cap not in ON_CAP_ACTIONS:
            raise self.fail(p, f"unknown action {on_cap!r}; allowed: {', '.join(ON_CAP_ACTIONS)}")
        return Caps(on_cap=on_cap, **ints, **money)

    def quality(self, value: Any, path: str) -> Quality:
        t = self.table(value, path)
        self.check_keys(t, path, _QUALITY_KEYS)
        if not t:
            raise self.fail(path, f"sets no rule: give at least one of {', '.join(_QUALITY_KEYS)} "
                                  "(or remove the table)")
        lo = (self.integer(t["min_click_to_conversion_s"], _join(path, "min_click_to_conversion_s"),
                           0, _MAX_QUALITY_S) if "min_click_to_conversion_s" in t else None)
        hi = (self.integer(t["max_click_to_conversion_s"], _join(path, "max_click_to_conversion_s"),
                           1, _MAX_QUALITY_S) if "max_click_to_conversion_s" in t else None)
        if lo is not None and hi is not None and lo > hi:
            raise self.fail(_join(path, "min_click_to_conversion_s"),
                            f"{lo} is above max_click_to_conversion_s ({hi}): every conversion would be held")
        per_click = (self.integer(t["max_conversions_per_click"], _join(path, "max_conversions_per_click"),
                                  1, 1_000_000) if "max_conversions_per_click" in t else None)
        return Quality(min_click_to_conversion_s=lo, max_click_to_conversion_s=hi,
                       max_conversions_per_click=per_click)

    def affiliate(self, aff_id: str, value: Any, path: str, offers: Mapping[str, Offer]) -> Affiliate:
        t = self.table(value, path)
        self.check_keys(t, path, _AFFILIATE_KEYS)
        name = self.string(t.get("name", aff_id), _join(path, "name"))
        if not name.strip():
            raise self.fail(_join(path, "name"), "may not be blank (omit it to use the id)")
        p = _join(path, "status")
        status = self.string(t.get("status", "active"), p)
        if status not in AFFILIATE_STATUSES:
            raise self.fail(p, f"unknown status {status!r}; allowed: {', '.join(AFFILIATE_STATUSES)}")
        p = _join(path, "payouts")
        payouts: dict[str, dict[str, PayoutRule]] = {}
        for offer_id, rules in self.table(t.get("payouts", {}), p).items():
            op = _join(p, offer_id)
            if offer_id not in offers:
                known = ", ".join(offers) or "none configured"
                raise self.fail(op, f"unknown offer {offer_id!r} (known: {known}); an override must name "
                                    "a configured offer")
            payouts[offer_id] = {}
            for ev, body in self.table(rules, op).items():
                self.event(ev, op, "payout event ")
                payouts[offer_id][ev] = self.payout_rule(body, _join(op, ev))
        p = _join(path, "postbacks")
        postbacks: dict[str, OutboundEndpoint] = {}
        for ep_name, body in self.table(t.get("postbacks", {}), p).items():
            ep_path = _join(p, ep_name)
            self.ident(ep_name, ep_path, "postback endpoint name")
            postbacks[ep_name] = self.postback(aff_id, ep_name, body, ep_path, offers)
        return Affiliate(affiliate_id=aff_id, name=name, status=status, payouts=payouts,
                         postbacks=postbacks)

    # ---- outbound postbacks

    def number(self, value: Any, path: str, lo: float, hi: float, lo_open: bool = False) -> float:
        """An int or float within [lo, hi] (or (lo, hi] with ``lo_open``)."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(path, f"must be a number, got {_type_name(value)}")
        if value != value or not (lo < value if lo_open else lo <= value) or value > hi:
            bound = f"greater than {lo} and at most {hi}" if lo_open else f"between {lo} and {hi}"
            raise self.fail(path, f"must be {bound}, got {value}")
        return float(value)

    def boolean(self, value: Any, path: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(path, f"must be true or false, got {_type_name(value)}")
        return value

    def filter_list(self, t: Mapping[str, Any], key: str, path: str) -> list[str]:
        if key not in t:
            return []
        p = _join(path, key)
        items = self.string_list(t[key], p)
        if not items:
            raise self.fail(p, "is empty, so nothing would be sent; omit it to send every "
                               f"{key[:-1] if key != 'statuses' else 'status'}")
        if len(set(items)) != len(items):
            raise self.fail(p, "lists a value more than once")
        return items

    def postback(self, aff_id: str, name: str, value: Any, path: str,
                 offers: Mapping[str, Offer]) -> OutboundEndpoint:
        t = self.table(value, path)
        self.check_keys(t, path, _POSTBACK_KEYS)

        p = _join(path, "url")
        if "url" not in t:
            raise self.fail(p, "required: the affiliate's postback URL template")
        url = self.string(t["url"], p)
        try:
            check_outbound_url(url)
        except ValueError as e:
            raise self.fail(p, str(e)) from e

        p = _join(path, "method")
        method = self.string(t.get("method", "GET"), p)
        if method not in OUTBOUND_METHODS:
            hint = [m for m in OUTBOUND_METHODS if m == method.upper()]
            did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise self.fail(p, f"unknown method {method!r}{did_you_mean}; allowed: {', '.join(OUTBOUND_METHODS)}")

        offer_ids = self.filter_list(t, "offers", path)
        for offer_id in offer_ids:
            if offer_id not in offers:
                known = ", ".join(offers) or "none configured"
                raise self.fail(_join(path, "offers"), f"unknown offer {offer_id!r} (known: {known})")
        events = self.filter_list(t, "events", path)
        for ev in events:
            self.event(ev, _join(path, "events"), "")
        statuses = self.filter_list(t, "statuses", path)
        for st in statuses:
            if st not in STATUSES:
                raise self.fail(_join(path, "statuses"), f"{st!r} is not a status; use one of {', '.join(STATUSES)}")

        secret: str | None = None
        if "secret" in t:
            secret = self.secret(t["secret"], _join(path, "secret"), "secret")
            if method == "GET":
                query = urlsplit(url).query
                sent = {unquote_plus(part.split("=", 1)[0]) for part in query.split("&") if part}
                clash = [k for k in _SIGNING_PARAMS if k in sent]
                if clash:
                    raise self.fail(_join(path, "url"), f"carries {clash[0]!r}, which signing appends "
                                                        "(ts and sig); remove it from the URL")

        timeout_s = self.number(t.get("timeout_s", DEFAULT_OUTBOUND_TIMEOUT_S), _join(path, "timeout_s"), 0.1, 120)
        concurrency = self.integer(t.get("max_concurrency", DEFAULT_OUTBOUND_MAX_CONCURRENCY),
                                   _join(path, "max_concurrency"), 1, 64)
        rate = self.number(t.get("rate_per_s", DEFAULT_OUTBOUND_RATE_PER_S), _join(path, "rate_per_s"),
                           0, 10_000, lo_open=True)
        p = _join(path, "retry_schedule_s")
        schedule_v = t.get("retry_schedule_s", list(DEFAULT_RETRY_SCHEDULE_S))
        if not isinstance(schedule_v, list):
            raise self.fail(p, f"must be an array of numbers (seconds), got {_type_name(schedule_v)}")
        if not schedule_v:
            raise self.fail(p, "must list at least one delay (seconds before attempt 2)")
        schedule = tuple(self.number(d, f"{p}[{i}]", 0, 604_800, lo_open=True)
                         for i, d in enumerate(schedule_v))
        give_up = self.number(t.get("give_up_after_s", DEFAULT_GIVE_UP_AFTER_S),
                              _join(path, "give_up_after_s"), 0, 2_592_000)
        allow_private = self.boolean(t.get("allow_private", False), _join(path, "allow_private"))
        follow = self.boolean(t.get("follow_redirects", False), _join(path, "follow_redirects"))
        return OutboundEndpoint(
            affiliate_id=aff_id, name=name, url=url, method=method, offers=tuple(offer_ids),
            events=tuple(events), statuses=tuple(statuses), secret=secret, timeout_s=timeout_s,
            max_concurrency=concurrency, rate_per_s=rate, retry_schedule_s=schedule,
            give_up_after_s=give_up, allow_private=allow_private, follow_redirects=follow,
        )

    def landing_url(self, value: Any, path: str) -> str:
        url = self.string(value, path)
        try:
            check_template(url)
        except ValueError as e:
            raise self.fail(path, str(e)) from e
        return url


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    return type(value).__name__
