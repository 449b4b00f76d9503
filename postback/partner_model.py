"""The partner configuration model: advertisers and offers, frozen, with their lookups.

Why a single typed, frozen, validated object: the partner file holds the secrets that
decide whether a postback is trusted and the URLs clicks are redirected to. A typo in
it must stop the process at start-up with a message naming the file, the table and the
problem, never surface hours later as silently rejected (or silently accepted)
conversions. So the result is immutable (frozen dataclasses, tuples,
``MappingProxyType``), can be shared freely between threads, tasks and stages and
swapped as a whole on reload; there is no module-level mutable state; and secrets and
tokens never appear in ``repr()`` or in error messages.

The commission side (``Account``, ``Affiliate``, ``PayoutRule``, ``Tier``, ``Caps``,
``Quality`` and the offer's payout fields) is configuration only: the engine that applies
it is ``processors.commission``. Money is ``Decimal`` throughout, never a float.

Outbound postbacks (``OutboundEndpoint``, ``Affiliate.postbacks``,
``PartnerConfig.endpoints_for``) are configuration only as well: the URL macros are
rendered by ``sinks.outbound.template`` and requests are sent by ``sinks.outbound``.

This module is the model and its lookups; the TOML file format and the loader that
validates it are in ``postback.partner_loader``, offer landing URL templates in
``postback.landing_url``. Import all of them from ``postback.partners``.
"""

from __future__ import annotations

import ipaddress
import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from types import MappingProxyType
from typing import Any, TypeAlias
from urllib.parse import urlsplit

from postback.landing_url import render_template

__all__ = [
    "AFFILIATE_STATUSES",
    "AUTH_MODES",
    "CANONICAL_EVENTS",
    "DEFAULT_CLAWBACK_DAYS",
    "DEFAULT_ONE_TIME_EVENTS",
    "ON_CAP_ACTIONS",
    "OUTBOUND_MACROS",
    "OUTBOUND_METHODS",
    "PAYOUT_KINDS",
    "STATUSES",
    "Account",
    "Advertiser",
    "Affiliate",
    "Caps",
    "Offer",
    "OutboundEndpoint",
    "PayoutRule",
    "Quality",
    "Tier",
    "PartnerConfig",
    "PartnerConfigError",
    "check_outbound_url",
    "is_canonical_event",
    "parse_outbound_url",
]

IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Events every stage understands. Anything else must be written "custom:<name>".
CANONICAL_EVENTS: tuple[str, ...] = (
    "lead", "signup", "install", "trial_start", "subscription_start", "purchase",
    "renewal", "upgrade", "cancel", "refund", "chargeback",
)
#: Conversion statuses after mapping.
STATUSES: tuple[str, ...] = ("approved", "pending", "rejected")
#: Ways a postback may authenticate.
AUTH_MODES: tuple[str, ...] = ("hmac", "token")
#: Events de-duplicated per click (when no order id) unless an advertiser overrides it.
DEFAULT_ONE_TIME_EVENTS: tuple[str, ...] = ("lead", "signup", "install", "trial_start")

#: Payout rule kinds: a fixed amount, a share of the revenue, or both.
PAYOUT_KINDS: tuple[str, ...] = ("cpa", "revshare", "cpa_plus_revshare")
#: What happens to a conversion over a cap.
ON_CAP_ACTIONS: tuple[str, ...] = ("hold", "reject")
#: Affiliate states; a paused affiliate's conversions are held.
AFFILIATE_STATUSES: tuple[str, ...] = ("active", "paused")
DEFAULT_CLAWBACK_DAYS = 30

#: Macros an outbound postback URL may use (rendered by ``sinks.outbound.template``).
OUTBOUND_MACROS: frozenset[str] = frozenset({
    "click_id", "sub1", "sub2", "sub3", "sub4", "sub5", "offer_id", "event", "status",
    "payout", "payout_currency", "order_id", "conversion_id", "version", "event_time",
    "idempotency_key",
})
#: HTTP methods of an outbound postback: GET (macros in the URL) or POST (JSON body).
OUTBOUND_METHODS: tuple[str, ...] = ("GET", "POST")
DEFAULT_OUTBOUND_TIMEOUT_S = 10.0
DEFAULT_OUTBOUND_MAX_CONCURRENCY = 4
DEFAULT_OUTBOUND_RATE_PER_S = 20.0
DEFAULT_RETRY_SCHEDULE_S: tuple[float, ...] = (60.0, 300.0, 900.0, 3600.0)
#: Delay between attempts once ``retry_schedule_s`` is used up.
RETRY_TAIL_S = 21_600.0
DEFAULT_GIVE_UP_AFTER_S = 259_200.0

DEFAULT_TIMESTAMP_TOLERANCE_S = 300
DEFAULT_DEDUPE_HORIZON_DAYS = 90
DEFAULT_ATTRIBUTION_WINDOW_DAYS = 30
MIN_SECRET_LEN = 16

_CUSTOM_NAME_RE = re.compile(r"[a-z0-9_\-]{1,40}")
_CUSTOM_PREFIX = "custom:"

_DAY_MS = 24 * 60 * 60 * 1000


def is_canonical_event(name: str) -> bool:
    """True for a name in CANONICAL_EVENTS or ``custom:<name>`` with a valid <name>."""
    if name in CANONICAL_EVENTS:
        return True
    return (isinstance(name, str) and name.startswith(_CUSTOM_PREFIX)
            and _CUSTOM_NAME_RE.fullmatch(name[len(_CUSTOM_PREFIX):]) is not None)


# Stands in for macros while the URL's scheme and host are checked (cannot occur in a
# checked template: non-ASCII is rejected).
_MACRO_MARK = "\ue000"


def parse_outbound_url(url: str) -> list[tuple[str, str | None]]:
    """Split an outbound URL template into (literal, macro-or-None) pieces.

    Raises ValueError with a readable reason for malformed braces, positional or
    unknown macros, and format specs or conversions. Write a literal brace as {{ or }}.
    """
    pieces: list[tuple[str, str | None]] = []
    try:
        parsed = list(string.Formatter().parse(url))
    except ValueError as e:
        raise ValueError(f"malformed braces ({e}); write a literal brace as {{{{ or }}}}") from None
    for literal, name, spec, conversion in parsed:
        if name is None:
            pieces.append((literal, None))
            continue
        if name == "" or name.isdigit():
            raise ValueError("empty or positional macro '{}'; use a named macro")
        if name not in OUTBOUND_MACROS:
            raise ValueError(f"unknown macro {{{name}}}; allowed: "
                             + " ".join(f"{{{m}}}" for m in sorted(OUTBOUND_MACROS)))
        if spec or conversion:
            raise ValueError(f"macro {{{name}}} may not have a format spec or conversion")
        pieces.append((literal, name))
    return pieces


def check_outbound_url(url: str) -> None:
    """Raise ValueError, with a reason fit for a load error, unless ``url`` is a usable outbound template.

    An absolute http(s) URL with a host and no user info; macros only after the host.
    """
    if not url:
        raise ValueError("must not be empty")
    if any(c.isspace() or not c.isprintable() or not c.isascii() for c in url):
        raise ValueError("must not contain whitespace, control or non-ASCII characters "
                         "(percent-encode them)")
    pieces = parse_outbound_url(url)
    sample = "".join(lit + (_MACRO_MARK if name else "") for lit, name in pieces)
    try:
        parts = urlsplit(sample)
        hostname = parts.hostname
        parts.port  # noqa: B018 - validates the port
    except ValueError as e:
        raise ValueError(f"is not a valid URL: {e}") from None
    if _MACRO_MARK in parts.scheme or _MACRO_MARK in parts.netloc:
        raise ValueError("macros are only allowed after the host (in the path, query or fragment)")
    if parts.scheme.lower() not in ("http", "https"):
        raise ValueError(f"must be an absolute http(s) URL, got scheme {parts.scheme!r}"
                         if parts.scheme else "must be an absolute http(s) URL")
    if not hostname:
        raise ValueError("must include a host")
    if "@" in parts.netloc:
        raise ValueError("must not carry user info (user:password@); sign with 'secret' instead")


class PartnerConfigError(ValueError):
    """The partner file cannot be used. ``str()`` is ``<source>: <path>: <problem>``.

    ``source`` is the file (or the name given to ``parse_partner_config``), ``path`` the
    dotted TOML table/key path ("" for the document itself) and ``problem`` what is
    wrong. Secret values are never included.
    """

    def __init__(self, source: str, path: str, problem: str) -> None:
        self.source = source
        self.path = path
        self.problem = problem
        where = f"{source}: {path}" if path else source
        super().__init__(f"{where}: {problem}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.source, self.path, self.problem))


def _freeze_map(value: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return MappingProxyType(dict(value or {}))


# --------------------------------------------------------------------------- commission


@dataclass(frozen=True)
class Account:
    """Account-wide settings: the currency reports are in and the timezone periods use.

    Cap periods (day, month), tier months and FX dates are taken in ``timezone``.
    """

    reporting_currency: str = "USD"
    timezone: str = "UTC"


@dataclass(frozen=True)
class Tier:
    """A better rate once an affiliate has ``min_approved`` approved conversions this month.

    ``amount`` replaces the rule's cpa amount and ``percent`` its revshare percent; a
    None keeps the rule's own value.
    """

    min_approved: int
    amount: Decimal | None = None
    percent: Decimal | None = None


@dataclass(frozen=True)
class PayoutRule:
    """What an affiliate earns for one event.

    ``kind`` is one of PAYOUT_KINDS. ``amount``/``currency`` are the cpa part (cpa and
    cpa_plus_revshare), ``percent`` the revshare part in percent of the conversion's
    revenue (revshare and cpa_plus_revshare). ``tiers`` are sorted by ``min_approved``.
    """

    kind: str
    amount: Decimal | None = None
    currency: str | None = None
    percent: Decimal | None = None
    tiers: tuple[Tier, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "tiers", tuple(sorted(self.tiers, key=lambda t: t.min_approved)))

    def tier_for(self, approved: int) -> Tier | None:
        """The tier reached with ``approved`` approved conversions (highest ``min_approved`` wins), or None."""
        reached = None
        for tier in self.tiers:
            if approved >= tier.min_approved:
                reached = tier
        return reached


@dataclass(frozen=True)
class Caps:
    """Limits per day and per month (account timezone); None means no limit.

    Payout limits are in the account's reporting currency. ``on_cap`` ("hold" or
    "reject") is what happens to a conversion over a limit.
    """

    daily_conversions: int | None = None
    monthly_conversions: int | None = None
    daily_payout: Decimal | None = None
    monthly_payout: Decimal | None = None
    on_cap: str = "hold"

    @property
    def has_payout_caps(self) -> bool:
        """Whether a payout limit is set (it needs the payout in the reporting currency)."""
        return self.daily_payout is not None or self.monthly_payout is not None


@dataclass(frozen=True)
class Quality:
    """Conversions that look wrong are held: too soon or too late after the click, or too many per click."""

    min_click_to_conversion_s: int | None = None
    max_click_to_conversion_s: int | None = None
    max_conversions_per_click: int | None = None


def _text(value: Any) -> str | None:
    """A conversion field as text for matching (enum symbols by value), or None."""
    if value is None:
        return None
    return str(getattr(value, "value", value))


@dataclass(frozen=True)
class OutboundEndpoint:
    """One affiliate postback endpoint: where, how and which conversions are sent to it.

    Empty ``offers``/``events``/``statuses`` mean "all". ``secret`` (never in ``repr``)
    signs requests as docs/signing.md describes: GET gets ``ts`` and ``sig`` appended to
    the query, POST gets the ``X-Postback-*`` headers over its JSON body.
    ``retry_schedule_s[i]`` is the delay before attempt ``i + 2``; after the schedule,
    attempts are ``RETRY_TAIL_S`` apart, until ``give_up_after_s`` after the first one.
    Instances from the loader satisfy the file-format rules; direct construction only
    normalises the containers.
    """

    affiliate_id: str
    name: str
    url: str
    method: str = "GET"
    offers: tuple[str, ...] = ()
    events: tuple[str, ...] = ()
    statuses: tuple[str, ...] = ()
    secret: str | None = field(default=None, repr=False)
    timeout_s: float = DEFAULT_OUTBOUND_TIMEOUT_S
    max_concurrency: int = DEFAULT_OUTBOUND_MAX_CONCURRENCY
    rate_per_s: float = DEFAULT_OUTBOUND_RATE_PER_S
    retry_schedule_s: tuple[float, ...] = DEFAULT_RETRY_SCHEDULE_S
    give_up_after_s: float = DEFAULT_GIVE_UP_AFTER_S
    allow_private: bool = False
    follow_redirects: bool = False

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        for name in ("offers", "events", "statuses"):
            set_(self, name, tuple(getattr(self, name)))
        set_(self, "retry_schedule_s", tuple(float(d) for d in self.retry_schedule_s))

    @property
    def endpoint_id(self) -> str:
        """``<affiliate_id>/<name>``: the key of retry and dead-letter jobs."""
        return f"{self.affiliate_id}/{self.name}"

    @property
    def signed(self) -> bool:
        """Whether requests to this endpoint are signed."""
        return self.secret is not None

    def matches(self, conversion: Mapping[str, Any]) -> bool:
        """Whether ``conversion`` is for this endpoint's affiliate and passes its filters."""
        if _text(conversion.get("affiliate_id")) != self.affiliate_id:
            return False
        for allowed, key in ((self.offers, "offer_id"), (self.events, "event"),
                             (self.statuses, "status")):
            if allowed and _text(conversion.get(key)) not in allowed:
                return False
        return True

    def retry_delay_s(self, attempt: int) -> float:
        """The delay before ``attempt`` (2 is the first retry); ValueError below 2."""
        if attempt < 2:
            raise ValueError(f"attempt {attempt} is not a retry (attempts start at 1)")
        i = attempt - 2
        return self.retry_schedule_s[i] if i < len(self.retry_schedule_s) else RETRY_TAIL_S


@dataclass(frozen=True)
class Affiliate:
    """One affiliate (publisher): display name, status, per-offer, per-event payout overrides, postbacks.

    ``payouts`` maps offer_id -> event -> PayoutRule; an override wins over the offer's rule
    for that event. ``postbacks`` maps an endpoint name -> OutboundEndpoint, in file order.
    """

    affiliate_id: str
    name: str = ""
    status: str = "active"
    payouts: Mapping[str, Mapping[str, PayoutRule]] = field(default_factory=dict)
    postbacks: Mapping[str, OutboundEndpoint] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", self.affiliate_id)
        object.__setattr__(self, "payouts", MappingProxyType(
            {offer_id: _freeze_map(rules) for offer_id, rules in (self.payouts or {}).items()}))
        object.__setattr__(self, "postbacks", _freeze_map(self.postbacks))

    @property
    def paused(self) -> bool:
        """Whether this affiliate's conversions are held."""
        return self.status == "paused"

    def override(self, offer_id: str, event: str) -> PayoutRule | None:
        """This affiliate's own rule for ``event`` of ``offer_id``, or None."""
        return self.payouts.get(offer_id, {}).get(event)


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class Advertiser:
    """One advertiser: how its postbacks authenticate and how its vocabulary maps to ours.

    Instances from ``parse_partner_config``/``load_partner_config`` satisfy every rule
    of the file format (see the module docstring). Direct construction only freezes the
    containers and derives ``default_key_id``; it does not validate.
    """

    advertiser_id: str
    auth_modes: tuple[str, ...] = ("hmac",)
    secrets: Mapping[str, str] = field(default_factory=dict, repr=False)
    default_key_id: str | None = None
    token: str | None = field(default=None, repr=False)
    allow_ips: tuple[IPNetwork, ...] = ()
    timestamp_tolerance_s: int = DEFAULT_TIMESTAMP_TOLERANCE_S
    aliases: Mapping[str, str] = field(default_factory=dict)
    event_map: Mapping[str, str] = field(default_factory=dict)
    status_map: Mapping[str, str] = field(default_factory=dict)
    dedupe_horizon_days: int = DEFAULT_DEDUPE_HORIZON_DAYS
    one_time_events: tuple[str, ...] = DEFAULT_ONE_TIME_EVENTS
    defaults: Mapping[str, str] = field(default_factory=dict)
    token_header: str | None = None
    preset: str | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "auth_modes", tuple(self.auth_modes))
        set_(self, "secrets", _freeze_map(self.secrets))
        set_(self, "allow_ips", tuple(
            n if isinstance(n, (ipaddress.IPv4Network, ipaddress.IPv6Network))
            else ipaddress.ip_network(n, strict=False)
            for n in self.allow_ips))
        set_(self, "aliases", _freeze_map(self.aliases))
        set_(self, "event_map", _freeze_map(self.event_map))
        set_(self, "status_map", _freeze_map(self.status_map))
        set_(self, "one_time_events", tuple(self.one_time_events))
        set_(self, "defaults", _freeze_map(self.defaults))
        if self.default_key_id is None and len(self.secrets) == 1:
            set_(self, "default_key_id", next(iter(self.secrets)))

    @property
    def allows_hmac(self) -> bool:
        """Whether HMAC-signed postbacks are accepted."""
        return "hmac" in self.auth_modes

    @property
    def allows_token(self) -> bool:
        """Whether postbacks carrying the legacy shared token are accepted."""
        return "token" in self.auth_modes

    @property
    def timestamp_tolerance_ms(self) -> int:
        """``timestamp_tolerance_s`` in milliseconds."""
        return self.timestamp_tolerance_s * 1000

    @property
    def dedupe_horizon_ms(self) -> int:
        """``dedupe_horizon_days`` in milliseconds."""
        return self.dedupe_horizon_days * _DAY_MS

    def ip_allowed(self, ip: str) -> bool:
        """Whether a request from ``ip`` may be accepted.

        An empty allowlist allows everything. An address that does not parse is never
        allowed (when there is an allowlist). IPv4-mapped IPv6 addresses
        (``::ffff:198.51.100.7``) also match the IPv4 networks.
        """
        if not self.allow_ips:
            return True
        try:
            addr = ipaddress.ip_address(ip.strip() if isinstance(ip, str) else ip)
        except (ValueError, TypeError):
            return False
        candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [addr]
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            candidates.append(addr.ipv4_mapped)
        return any(a in net for a in candidates for net in self.allow_ips)

    def secret_for(self, key_id: str | None) -> str | None:
        """The HMAC secret for ``key_id`` (``default_key_id`` when None); None if unknown."""
        kid = self.default_key_id if key_id is None else key_id
        if kid is None:
            return None
        return self.secrets.get(kid)

    def map_event(self, name: str) -> str | None:
        """The canonical event for the advertiser's event ``name``, or None if unknown.

        ``event_map`` first, then a canonical name as it is, then ``custom:<name>`` only
        when given literally in that form. Matching is exact (case-sensitive).
        """
        mapped = self.event_map.get(name)
        if mapped is not None:
            return mapped
        return name if is_canonical_event(name) else None

    def map_status(self, value: str | None) -> str | None:
        """The status ("approved"/"pending"/"rejected") for an advertiser status value.

        No status (None) means "approved"; then ``status_map``; then a status name as
        it is; anything else is None (unknown).
        """
        if value is None:
            return "approved"
        mapped = self.status_map.get(value)
        if mapped is not None:
            return mapped
        return value if value in STATUSES else None

    def canonical_name(self, param: str) -> str:
        """The canonical name of an incoming parameter: its alias target, or itself.

        ``advertiser_id`` is always itself (it is read before any alias can apply).
        """
        if param == "advertiser_id":
            return param
        return self.aliases.get(param, param)


@dataclass(frozen=True)
class Offer:
    """One offer: which advertiser it belongs to, where clicks land, attribution windows.

    Instances from the loader satisfy the file-format rules: ``advertiser_id`` names a
    configured advertiser and ``landing_url`` (when set) is an http(s) URL using only
    the allowed placeholders, none in its scheme or host.
    """

    offer_id: str
    advertiser_id: str
    landing_url: str | None = None
    attribution_window_days: int = DEFAULT_ATTRIBUTION_WINDOW_DAYS
    attribution_windows: Mapping[str, int] = field(default_factory=dict)
    payouts: Mapping[str, PayoutRule] = field(default_factory=dict)
    caps: Caps | None = None
    affiliate_caps: Caps | None = None
    quality: Quality | None = None
    clawback_days: int = DEFAULT_CLAWBACK_DAYS

    def __post_init__(self) -> None:
        object.__setattr__(self, "attribution_windows", _freeze_map(self.attribution_windows))
        object.__setattr__(self, "payouts", _freeze_map(self.payouts))

    def landing_for(
        self,
        click_id: str,
        affiliate_id: str | None,
        campaign_id: str | None = None,
        subs: Sequence[str | None] = (None,) * 5,
    ) -> str | None:
        """The landing URL for one click, or None when the offer has no landing URL.

        Each placeholder is replaced by its value percent-encoded with
        ``quote(value, safe="")`` (so a value can never add path segments, query
        parameters or a fragment); a missing value becomes "". ``subs`` holds sub1..sub5
        (fewer than five is fine; more is a ValueError).
        """
        if self.landing_url is None:
            return None
        if len(subs) > 5:
            raise ValueError(f"at most 5 subs (sub1..sub5), got {len(subs)}")
        padded = tuple(subs) + (None,) * (5 - len(subs))
        values: dict[str, str | None] = {
            "click_id": click_id, "offer_id": self.offer_id,
            "affiliate_id": affiliate_id, "campaign_id": campaign_id,
        }
        values.update({f"sub{i}": v for i, v in enumerate(padded, start=1)})
        return render_template(self.landing_url, values)

    def window_days(self, event: str) -> int:
        """Attribution window for a canonical ``event``, days (override or default)."""
        return self.attribution_windows.get(event, self.attribution_window_days)

    def window_ms(self, event: str) -> int:
        """Attribution window for a canonical ``event``, milliseconds."""
        return self.window_days(event) * _DAY_MS


@dataclass(frozen=True)
class PartnerConfig:
    """All advertisers, offers and affiliates, plus ingest and account settings. Immutable; replace as a whole."""

    ingest_bulk_token: str | None = field(default=None, repr=False)
    advertisers: Mapping[str, Advertiser] = field(default_factory=dict)
    offers: Mapping[str, Offer] = field(default_factory=dict)
    account: Account = field(default_factory=Account)
    affiliates: Mapping[str, Affiliate] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "advertisers", _freeze_map(self.advertisers))
        object.__setattr__(self, "offers", _freeze_map(self.offers))
        object.__setattr__(self, "affiliates", _freeze_map(self.affiliates))

    @classmethod
    def empty(cls) -> "PartnerConfig":
        """No partners and bulk import disabled (e.g. when no file is configured)."""
        return cls()

    @property
    def bulk_import_enabled(self) -> bool:
        """Whether ``[ingest] bulk_token`` is set."""
        return self.ingest_bulk_token is not None

    def longest_attribution_window_days(self) -> int:
        """The longest attribution window of any offer and event (the default when there are no offers)."""
        windows = [DEFAULT_ATTRIBUTION_WINDOW_DAYS]
        for offer in self.offers.values():
            windows.append(offer.attribution_window_days)
            windows.extend(offer.attribution_windows.values())
        return max(windows)

    def advertiser(self, advertiser_id: str) -> Advertiser | None:
        """The advertiser with this id, or None."""
        return self.advertisers.get(advertiser_id)

    def offer(self, offer_id: str) -> Offer | None:
        """The offer with this id, or None."""
        return self.offers.get(offer_id)

    def affiliate(self, affiliate_id: str | None) -> Affiliate | None:
        """The configured affiliate with this id, or None (also for None)."""
        if affiliate_id is None:
            return None
        return self.affiliates.get(affiliate_id)

    def endpoints_for(self, conversion: Mapping[str, Any]) -> list[OutboundEndpoint]:
        """The outbound endpoints ``conversion`` is sent to, in file order.

        Those of its affiliate (``affiliate_id``) whose offer, event and status filters it
        passes; none for a conversion without a configured affiliate. A paused affiliate's
        endpoints still match (its conversions arrive held, i.e. with their status).
        """
        aff = self.affiliate(_text(conversion.get("affiliate_id")))
        if aff is None:
            return []
        return [ep for ep in aff.postbacks.values() if ep.matches(conversion)]
