"""`postback demo`: drive a running pipeline with realistic partner traffic and report what it made of it.

Against a running ingester (`--url`), processors and sink, this plays both sides of an
affiliate deal: affiliates' users click tracking links (`GET /click`), and advertisers'
servers send signed postbacks (`GET|POST /postback`) back for some of those clicks:
purchases in several currencies, leads, trials and their monthly renewals, refunds,
pending orders that are approved later. Like real partners it also misbehaves a little:
it retries requests, re-sends orders, signs with the wrong key, loses click IDs, and
delivers some clicks only after their conversion (bulk import). It then waits until
every postback the ingester accepted (202) has an outcome in ClickHouse and prints a
summary for marketers: revenue by affiliate and offer, match rate, dedupe rate,
rejection reasons and latency.

Why it is built this way:

- The traffic is a *plan* computed up front from a seed and the partner file
  (`build_plan`, pure and deterministic), so a run can be replayed and the mix is
  unit-tested without a network. Signing happens only when a request is sent
  (`render_postback`), with the current time, because signed timestamps must be within
  the advertiser's tolerance of the moment the ingester receives them.
- Submission (`submit_plan`) runs each click's journey in order (a status update must
  follow its pending order, a late click must follow its postback) while journeys run
  concurrently over one aiohttp connection pool, paced to `--rate` requests/s.
- The summary is read back from ClickHouse (`collect_report`, the real results), kept
  as plain data, and formatted by a pure function (`format_report`) that is tested on
  fixed rows.

The secrets come from the partner file, which must be the file the running ingester
and processors loaded (POSTBACK_CONFIG); otherwise every postback is rejected.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import string
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import IO, Any, Literal, TypeAlias
from urllib.parse import quote, unquote, urlencode

from postback.config import Settings
from postback.partners import Advertiser, Offer, PartnerConfig, load_partner_config
from processors.signing import sign_json, sign_query

#: The partner file used when POSTBACK_CONFIG is not set (the one `postback run` uses too).
DEMO_PARTNERS = Path(__file__).resolve().parent.parent / "deploy" / "demo-partners.toml"

Transport: TypeAlias = Literal["query", "json", "token"]
Outcome: TypeAlias = Literal["accepted", "duplicate", "rejected"]

# --------------------------------------------------------------------------- the mix
#: Per base postback: an exact re-send of the same signed request (-> duplicate `retry`).
P_RETRY = 0.055
#: Per base postback with an order id: the same order signed again later (-> `order_repeat`).
P_RESIGN = 0.05
#: Per base postback: an earlier attempt with a broken signature (-> rejected `bad_signature`).
P_BAD_SIGNATURE = 0.036
#: Per journey: the advertiser lost the click id, so none of its postbacks carry one.
P_NO_CLICK_ID = 0.05
#: Per converting journey: the click record arrives after the first postback (bulk import).
P_LATE_CLICK = 0.055
#: Per journey using HMAC: one of the advertiser's older servers still on the legacy token.
P_TOKEN = 0.2

AFFILIATES: tuple[tuple[str, float], ...] = (
    ("aff-coupons", 0.28), ("aff-cashback", 0.24), ("aff-search", 0.2), ("aff-influencer", 0.16),
    ("aff-social", 0.12),
)
_CAMPAIGNS = ("spring", "brand", "retarget", "always-on")
_PLACEMENTS = ("homepage", "newsletter", "sidebar", "story", "serp")
_DEVICES = ("ios", "android", "desktop")
_CURRENCIES = (("USD", 0.6), ("EUR", 0.3), ("GBP", 0.1))
_USER_AGENTS = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148",
    "Mozilla/5.0 (Linux; Android 15; Pixel 9) AppleWebKit/537.36 Chrome/131.0 Mobile Safari/537.36",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/131.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_6) AppleWebKit/605.1.15 Version/18.1 Safari/605.1.15",
)
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
#: Never an advertiser's secret or token: what a misconfigured partner server signs with.
WRONG_SECRET = "demo-not-the-configured-secret-0000"


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class ClickStep:
    """The user's click: `redirect` is GET /click; `bulk` imports our own click id late (POST /clicks)."""

    mode: Literal["redirect", "bulk"]
    delay_s: float = 0.0
    ago_s: float = 0.0          # bulk: the click happened this long before the first postback was sent


@dataclass(frozen=True)
class PostbackStep:
    """One postback request as the advertiser's server sends it, plus what the pipeline should make of it.

    `params` are the wire parameters in the advertiser's own dialect (its aliases,
    event and status names), without the click id (known only once the click was
    answered) and without authentication (added when it is sent, with the current time).
    """

    advertiser_id: str
    event: str                          # the canonical event meant
    status: str                         # the canonical status meant
    params: tuple[tuple[str, str], ...]
    transport: Transport
    key_id: str | None = None           # the secret that signs (HMAC transports)
    send_key_id: bool = False           # name it (kid / X-Postback-Key-Id)
    all_keys: bool = False              # JSON: one v1= value per active key (key rotation)
    with_click_id: bool = True
    order_id: str | None = None
    amount: str | None = None
    currency: str | None = None
    role: Literal["original", "status_update", "retry", "resign", "bad_signature"] = "original"
    bad: Literal["tampered", "wrong_secret"] | None = None
    resend_of: int | None = None        # index of the step whose exact request is sent again
    delay_s: float = 0.0
    expect: Outcome = "accepted"
    expect_reason: str = ""


Step: TypeAlias = ClickStep | PostbackStep


@dataclass(frozen=True)
class Journey:
    """One user's click on an affiliate link and everything the advertiser reports about it, in order."""

    index: int
    offer_id: str
    advertiser_id: str
    affiliate_id: str
    campaign_id: str
    subs: tuple[str, ...]
    user_agent: str
    steps: tuple[Step, ...]
    late_click_id: str | None = None    # set when the click is bulk-imported after a postback

    @property
    def postbacks(self) -> tuple[PostbackStep, ...]:
        return tuple(s for s in self.steps if isinstance(s, PostbackStep))


@dataclass(frozen=True)
class TrafficPlan:
    """The whole simulated traffic, deterministic for (partner file, clicks, seed, run id)."""

    seed: int
    run_id: str
    journeys: tuple[Journey, ...]

    @property
    def requests(self) -> int:
        """HTTP requests the plan makes (clicks, bulk imports and postbacks)."""
        return sum(len(j.steps) for j in self.journeys)

    def postbacks(self) -> Iterator[tuple[Journey, PostbackStep]]:
        for journey in self.journeys:
            for step in journey.postbacks:
                yield journey, step

    def mix(self) -> dict[str, float]:
        """Shares of the anomalies: over postbacks, except `late_click` (over clicks)."""
        steps = [s for _, s in self.postbacks()]
        n = len(steps) or 1
        return {
            "retry": sum(s.role == "retry" for s in steps) / n,
            "resign": sum(s.role == "resign" for s in steps) / n,
            "bad_signature": sum(s.role == "bad_signature" for s in steps) / n,
            "no_click_id": sum(not s.with_click_id for s in steps) / n,
            "token": sum(s.transport == "token" for s in steps) / n,
            "json": sum(s.transport == "json" for s in steps) / n,
            "late_click": sum(j.late_click_id is not None for j in self.journeys) / (len(self.journeys) or 1),
        }

    def expected_outcomes(self) -> Counter[tuple[str, str]]:
        """(outcome, reason) -> postbacks, if every request is answered 202."""
        return Counter((s.expect, s.expect_reason) for _, s in self.postbacks())


class _Dialect:
    """Speaks one advertiser's vocabulary: its parameter aliases, event names and status codes."""

    _FIXED = ("advertiser_id", "event", "click_id")

    def __init__(self, adv: Advertiser) -> None:
        self.adv = adv

    def name(self, canonical: str) -> str:
        if canonical in self._FIXED:
            return canonical
        return next((src for src, dst in self.adv.aliases.items() if dst == canonical and src != canonical),
                    canonical)

    def event(self, canonical: str) -> str:
        return next((src for src, dst in self.adv.event_map.items() if dst == canonical), canonical)

    def status(self, canonical: str) -> str:
        return next((src for src, dst in self.adv.status_map.items() if dst == canonical), canonical)


def _vertical(adv: Advertiser) -> str:
    """What kind of business an advertiser is, judged by the events it maps (so any partner file works)."""
    targets = set(adv.event_map.values())
    if targets & {"renewal", "trial_start", "subscription_start"}:
        return "subscription"
    if targets & {"signup", "install"}:
        return "app"
    return "ecommerce"


def _weighted(rng: random.Random, options: Sequence[tuple[str, float]]) -> str:
    return rng.choices([o for o, _ in options], weights=[w for _, w in options])[0]


def _money(rng: random.Random, low: float, high: float) -> str:
    return f"{rng.uniform(low, high):.2f}"


def _add_months(day: date, months: int) -> str:
    index = day.year * 12 + day.month - 1 + months
    return f"{index // 12:04d}-{index % 12 + 1:02d}"


@dataclass
class _Builder:
    """Mutable state while one plan is drawn: the random stream and the order-id counter."""

    rng: random.Random
    run_tag: str
    today: date
    orders: int = 0

    def order_id(self, adv_id: str, kind: str = "") -> str:
        self.orders += 1
        prefix = (kind or re.sub(r"[^A-Za-z0-9]", "", adv_id)[:2] or "OR").upper()
        return f"{prefix}-{self.run_tag}-{self.orders:05d}"

    # -- one postback --------------------------------------------------------------
    def postback(self, adv: Advertiser, auth: dict[str, Any], event: str, *, with_click_id: bool,
                 order_id: str | None = None, amount: str | None = None, currency: str | None = None,
                 status: str | None = None, period: str | None = None, offer_id: str | None = None,
                 customer_id: str | None = None,
                 role: str = "original", delay_s: float = 0.0) -> PostbackStep:
        d = _Dialect(adv)
        params: list[tuple[str, str]] = [("advertiser_id", adv.advertiser_id), ("event", d.event(event))]
        for name, value in (("order_id", order_id), ("amount", amount), ("currency", currency),
                            ("period", period), ("offer_id", offer_id), ("customer_id", customer_id)):
            if value is not None:
                params.append((d.name(name), value))
        if status is not None:
            params.append((d.name("status"), d.status(status)))
        return PostbackStep(advertiser_id=adv.advertiser_id, event=event, status=status or "approved",
                            params=tuple(params), with_click_id=with_click_id, order_id=order_id,
                            amount=amount, currency=currency, role=role, delay_s=delay_s,  # type: ignore[arg-type]
                            **auth)

    def auth(self, adv: Advertiser) -> dict[str, Any]:
        """How this journey's advertiser server authenticates (fixed per server, so per journey)."""
        rng = self.rng
        if not adv.allows_hmac or (adv.allows_token and rng.random() < P_TOKEN):
            return {"transport": "token"}
        keys = list(adv.secrets)
        main = adv.default_key_id or keys[0]
        key = main if len(keys) == 1 or rng.random() < 0.85 else rng.choice([k for k in keys if k != main])
        transport = "json" if rng.random() < 0.45 else "query"
        all_keys = transport == "json" and len(keys) > 1 and rng.random() < 0.25
        return {"transport": transport, "key_id": key, "send_key_id": not all_keys and rng.random() < 0.5,
                "all_keys": all_keys}

    # -- what each kind of advertiser reports --------------------------------------
    def conversions(self, vertical: str, adv: Advertiser, with_click: bool, customer: str) -> list[PostbackStep]:
        """The base postbacks one user's advertiser sends, in order (no mistakes yet).

        Every postback carries the advertiser's `customer_id`: without an order id and a
        click id, two users' leads signed in the same second would otherwise be the same
        request, and the second would rightly be dropped as a retry.
        """
        rng = self.rng
        auth = self.auth(adv)
        pb = lambda event, **kw: self.postback(adv, auth, event, with_click_id=with_click,  # noqa: E731
                                               customer_id=customer, **kw)
        steps: list[PostbackStep] = []

        def purchase(low: float, high: float, event: str = "purchase", pending_ok: bool = True,
                     currency: str | None = None) -> PostbackStep:
            order = self.order_id(adv.advertiser_id)
            cur = currency or _weighted(rng, _CURRENCIES)
            amount = _money(rng, low, high)
            if pending_ok and with_click and rng.random() < 0.25:  # reviewed first, approved a moment later
                steps.append(pb(event, order_id=order, amount=amount, currency=cur, status="pending"))
                final = "rejected" if rng.random() < 0.1 else "approved"
                steps.append(pb(event, order_id=order, amount=amount, currency=cur, status=final,
                                role="status_update", delay_s=rng.uniform(0.8, 2.0)))
            else:
                steps.append(pb(event, order_id=order, amount=amount, currency=cur))
            return steps[-1]

        def refund(of: PostbackStep, full: bool = True) -> None:
            amount = of.amount if full else f"{Decimal(of.amount or '0') * Decimal('0.5'):.2f}"
            steps.append(pb("refund", order_id=of.order_id, amount=amount, currency=of.currency,
                            delay_s=rng.uniform(0.3, 1.5)))

        if vertical == "ecommerce":
            if rng.random() < 0.25:
                steps.append(pb("lead"))
            if not steps or rng.random() < 0.8:
                first = purchase(15, 250)
                if rng.random() < 0.2:
                    purchase(10, 120)
                if first.status == "approved" and rng.random() < 0.12:
                    refund(first, full=rng.random() < 0.6)
        elif vertical == "subscription":
            if rng.random() < 0.7:
                steps.append(pb("trial_start"))
                if rng.random() < 0.75:
                    subscription = self.order_id(adv.advertiser_id, "SUB")
                    cur = _weighted(rng, _CURRENCIES[:2])
                    price = rng.choice(("9.99", "14.99"))
                    for month in range(1, rng.randint(1, 3) + 1):
                        steps.append(pb("renewal", order_id=subscription, amount=price, currency=cur,
                                        period=_add_months(self.today, month), delay_s=rng.uniform(0.1, 0.6)))
                    if rng.random() < 0.08:
                        refund(steps[-1])
            else:  # annual plan: the payment is reviewed (pending) before it is approved
                purchase(99, 119, currency="USD")
        else:  # app
            steps.append(pb("signup"))
            if rng.random() < 0.55:
                purchase(4.99, 99.99, pending_ok=False, currency="USD")
                if rng.random() < 0.2:
                    purchase(4.99, 49.99, pending_ok=False, currency="USD")
        return steps

    def anomalies(self, steps: list[PostbackStep]) -> list[list[PostbackStep]]:
        """The partner mistakes around each base postback: one group per base postback, in sending order.

        A group is [bad-signature attempt?, original, exact retry?, re-signed repeat?];
        `resend_of` counts postbacks across all groups.
        """
        rng = self.rng
        groups: list[list[PostbackStep]] = []
        count = 0
        for step in steps:
            group: list[PostbackStep] = []
            if rng.random() < P_BAD_SIGNATURE:
                # A token does not cover the content, so a token request can only carry a wrong token.
                bad = "wrong_secret" if step.transport == "token" or rng.random() < 0.5 else "tampered"
                group.append(replace(step, role="bad_signature", bad=bad, expect="rejected",
                                     expect_reason="bad_signature"))
                step = replace(step, delay_s=rng.uniform(0.1, 0.5))  # fixed and sent again
            group.append(step)
            original = count + len(group) - 1
            if rng.random() < P_RETRY:
                group.append(replace(step, role="retry", resend_of=original, delay_s=rng.uniform(0.2, 0.8),
                                     expect="duplicate", expect_reason="retry"))
            if step.order_id and rng.random() < P_RESIGN:
                # > 1 s later: a new `ts`, so a new signed request about the same order.
                group.append(replace(step, role="resign", delay_s=rng.uniform(1.2, 2.2),
                                     expect="duplicate", expect_reason="order_repeat"))
            count += len(group)
            groups.append(group)
        return groups


def build_plan(config: PartnerConfig, clicks: int, seed: int, run_id: str) -> TrafficPlan:
    """The traffic of one demo run: `clicks` journeys over the partner file's offers.

    Deterministic for its arguments. `run_id` (a ULID) makes order ids and late click ids
    unique per run, so running the demo again is not deduplicated against the last run,
    and its time picks the renewal periods.
    """
    if clicks < 1:
        raise ValueError("clicks must be at least 1")
    offers = [o for o in config.offers.values() if config.advertiser(o.advertiser_id) is not None]
    if not offers:
        raise ValueError("the partner file configures no offers: nothing to click")
    from ulid import ULID

    rng = random.Random(seed)
    builder = _Builder(rng, run_id[-6:].upper(), ULID.from_str(run_id).datetime.date())
    journeys: list[Journey] = []
    for index in range(clicks):
        offer = rng.choice(offers)
        adv = config.advertisers[offer.advertiser_id]
        affiliate = _weighted(rng, AFFILIATES)
        with_click = rng.random() >= P_NO_CLICK_ID
        converts = rng.random() < {"ecommerce": 0.55, "subscription": 0.6, "app": 0.6}[_vertical(adv)]
        customer = f"U-{builder.run_tag}-{index:06d}"
        groups = builder.anomalies(builder.conversions(_vertical(adv), adv, with_click, customer)) \
            if converts else []
        late = bool(groups) and with_click and config.bulk_import_enabled and rng.random() < P_LATE_CLICK
        rest = [p for group in groups[1:] for p in group]
        steps: list[Step] = []
        if late:  # the first postback (and its repeats) goes out before we know the click
            steps.extend(groups[0])
            steps.append(ClickStep("bulk", delay_s=rng.uniform(1.0, 2.0), ago_s=rng.uniform(60, 900)))
            steps.extend(rest)
        else:
            steps.append(ClickStep("redirect"))
            if groups:
                head = groups[0]
                steps.append(replace(head[0], delay_s=rng.uniform(0.0, 0.5)))
                steps.extend(head[1:] + rest)
        journeys.append(Journey(
            index=index, offer_id=offer.offer_id, advertiser_id=adv.advertiser_id, affiliate_id=affiliate,
            campaign_id=f"{affiliate.removeprefix('aff-')}-{rng.choice(_CAMPAIGNS)}",
            subs=(rng.choice(_PLACEMENTS), rng.choice(_DEVICES)), user_agent=rng.choice(_USER_AGENTS),
            steps=tuple(_reindex(steps)),
            late_click_id=run_id[:10] + "".join(rng.choice(_CROCKFORD) for _ in range(16)) if late else None,
        ))
    return TrafficPlan(seed=seed, run_id=run_id, journeys=tuple(journeys))


def _reindex(steps: list[Step]) -> list[Step]:
    """`resend_of` was an index among postbacks; make it the index among the journey's steps."""
    positions = [i for i, s in enumerate(steps) if isinstance(s, PostbackStep)]
    out: list[Step] = []
    for step in steps:
        if isinstance(step, PostbackStep) and step.resend_of is not None:
            step = replace(step, resend_of=positions[step.resend_of])
        out.append(step)
    return out


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class WireRequest:
    """One HTTP request exactly as sent (re-sending it byte for byte is an exact retry)."""

    method: str
    target: str                          # path and raw (already encoded) query
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    @property
    def raw_query(self) -> str:
        return self.target.partition("?")[2]


def _tamper(adv: Advertiser, params: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """What a meddling proxy does after signing: inflate the amount, or slip in a coupon."""
    for i, (name, value) in enumerate(params):
        if adv.canonical_name(name) == "amount":
            return params[:i] + [(name, f"{Decimal(value) * 10:.2f}")] + params[i + 1:]
    return params + [("coupon", "FREE100")]


def _query(params: Sequence[tuple[str, str]]) -> str:
    return urlencode(list(params), quote_via=quote, safe="")


def render_postback(step: PostbackStep, config: PartnerConfig, click_id: str | None, ts: int) -> WireRequest:
    """The signed request for `step`, signed at unix time `ts` with the partner file's secrets.

    Query transport: GET with `ts`, `kid`, `sig` per docs/signing.md. JSON transport: POST
    of a flat JSON object with the X-Postback-* headers. Token transport: GET with the
    legacy `token` (and `ts`). A `bad` step is spoiled the way partners spoil them: signed
    with a secret we never issued, or changed after signing.
    """
    adv = config.advertisers[step.advertiser_id]
    params = list(step.params)
    if step.with_click_id and click_id:
        params.insert(2, ("click_id", click_id))
    if step.transport == "token":
        token = WRONG_SECRET if step.bad == "wrong_secret" else (adv.token or "")
        signed = params + [("ts", str(ts)), ("token", token)]
        if step.bad == "tampered":
            signed = _tamper(adv, signed)
        return WireRequest("GET", "/postback?" + _query(signed))
    secret = WRONG_SECRET if step.bad == "wrong_secret" else adv.secrets[step.key_id or ""]
    if step.transport == "query":
        signed = sign_query(params, secret, ts, kid=step.key_id if step.send_key_id else None)
        if step.bad == "tampered":
            signed = _tamper(adv, signed)
        return WireRequest("GET", "/postback?" + _query(signed))
    body = json.dumps(dict(params), separators=(",", ":")).encode()
    if step.all_keys and step.bad is None:
        secrets = [adv.secrets[k] for k in adv.secrets]
        headers = sign_json(body, secrets, ts)
    else:
        headers = sign_json(body, secret, ts, kid=step.key_id if step.send_key_id else None)
    if step.bad == "tampered":
        body = json.dumps(dict(_tamper(adv, params)), separators=(",", ":")).encode()
    return WireRequest("POST", "/postback", body,
                       tuple(headers.items()) + (("Content-Type", "application/json"),))


def click_request(journey: Journey) -> WireRequest:
    """GET /click for the journey's affiliate link."""
    params = [("offer_id", journey.offer_id), ("affiliate_id", journey.affiliate_id),
              ("campaign_id", journey.campaign_id)]
    params += [(f"sub{i}", sub) for i, sub in enumerate(journey.subs, start=1)]
    return WireRequest("GET", "/click?" + _query(params),
                       headers=(("User-Agent", journey.user_agent), ("Referer", "https://affiliate.example/")))


def bulk_click_request(journey: Journey, token: str, clicked_at_ms: int) -> WireRequest:
    """POST /clicks importing the journey's click (our own click id) after its postback."""
    line = {"click_id": journey.late_click_id, "clicked_at": clicked_at_ms, "offer_id": journey.offer_id,
            "affiliate_id": journey.affiliate_id, "campaign_id": journey.campaign_id,
            "user_agent": journey.user_agent}
    line.update({f"sub{i}": sub for i, sub in enumerate(journey.subs, start=1)})
    return WireRequest("POST", "/clicks", json.dumps([line], separators=(",", ":")).encode(),
                       (("Authorization", f"Bearer {token}"), ("Content-Type", "application/json")))


_ULID_RE = re.compile(r"[0-9A-HJKMNP-TV-Z]{26}")


def click_id_from_location(location: str, offer: Offer | None) -> str | None:
    """The click id inside a 302's Location, found by matching the offer's landing template."""
    if offer is not None and offer.landing_url:
        pattern, names = [], []
        for literal, name, _spec, _conv in string.Formatter().parse(offer.landing_url):
            pattern.append(re.escape(literal))
            if name is not None:
                pattern.append(r"([^/?#&]*)")
                names.append(name)
        match = re.fullmatch("".join(pattern), location)
        if match and "click_id" in names:
            return unquote(match.group(names.index("click_id") + 1)) or None
    found = _ULID_RE.search(location)
    return found.group() if found else None


# --------------------------------------------------------------------------- progress


class ProgressBar:
    """A plain-text progress bar on stderr: redrawn in place on a TTY, else one line per 10%."""

    def __init__(self, label: str, total: int, stream: IO[str] | None = None, tty: bool | None = None) -> None:
        self.label = label
        self.total = max(total, 0)
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.started = time.monotonic()
        self._last_draw = 0.0
        self._last_decile = -1
        self.done = 0

    def line(self, done: int, note: str = "") -> str:
        share = 1.0 if self.total == 0 else min(done / self.total, 1.0)
        bar = "#" * int(share * 30)
        elapsed = time.monotonic() - self.started
        return (f"{self.label} [{bar:<30}] {share:>4.0%} {done}/{self.total} {elapsed:5.1f}s"
                + (f"  {note}" if note else ""))

    def update(self, done: int, note: str = "", force: bool = False) -> None:
        self.done = done
        if self.tty:
            now = time.monotonic()
            if force or now - self._last_draw >= 0.1 or done >= self.total:
                self._last_draw = now
                self.stream.write("\r" + self.line(done, note) + "\x1b[K")
                self.stream.flush()
            return
        decile = 10 if self.total == 0 else min(done * 10 // self.total, 10)
        if (decile > self._last_decile and decile < 10) or force:  # 100% is drawn by finish()
            self._last_decile = decile
            self.stream.write(self.line(done, note) + "\n")
            self.stream.flush()

    def finish(self, note: str = "") -> None:
        """Draw the final state (in plain mode only when it adds something) and end the line."""
        if self.tty:
            self.update(self.done, note, force=True)
            self.stream.write("\n")
            self.stream.flush()
        else:
            self.update(self.done, note, force=True)


# --------------------------------------------------------------------------- submission


@dataclass
class Submission:
    """What the ingester answered: the receipts it accepted, with what the plan expects of each."""

    receipts: dict[str, PostbackStep] = field(default_factory=dict)
    click_ids: list[str] = field(default_factory=list)
    answers: Counter[str] = field(default_factory=Counter)       # "GET /click 302" -> n
    failures: Counter[str] = field(default_factory=Counter)      # why a request got no success
    skipped: int = 0                                             # postbacks not sent (their click failed)
    requests: int = 0
    elapsed_s: float = 0.0


class _Pacer:
    """Spaces request starts 1/rate apart, however many journeys are waiting (single event loop, no lock)."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate
        self._next = 0.0

    async def wait(self) -> None:
        now = time.monotonic()
        slot = max(now, self._next)
        self._next = slot + self.interval
        if slot > now:
            await asyncio.sleep(slot - now)


@dataclass(frozen=True)
class _Answer:
    status: int
    payload: dict[str, Any]
    location: str | None


MAX_ATTEMPTS = 5


class _Submitter:
    """Sends the plan's journeys over one connection pool, each journey's steps in order."""

    def __init__(self, session: Any, base_url: str, config: PartnerConfig, rate: float,
                 progress: ProgressBar | None) -> None:
        self.session = session
        self.base = base_url.rstrip("/")
        self.config = config
        self.pacer = _Pacer(rate)
        self.progress = progress
        self.result = Submission()
        self.done = 0

    def _tick(self, n: int = 1) -> None:
        self.done += n
        if self.progress:
            r = self.result
            accepted = len(r.receipts)
            failed = sum(r.failures.values())
            self.progress.update(self.done, f"202: {accepted}" + (f"  failed: {failed}" if failed else ""))

    async def send(self, request: WireRequest) -> _Answer | None:
        """Send once, re-sending after a 503 (nothing was accepted then) or a connection error."""
        import aiohttp
        from yarl import URL

        url = URL(self.base + request.target, encoded=True)
        why = "no answer"
        for attempt in range(MAX_ATTEMPTS):
            await self.pacer.wait()
            try:
                async with self.session.request(request.method, url, data=request.body or None,
                                                headers=dict(request.headers), allow_redirects=False) as resp:
                    raw = await resp.read()
                    status, location = resp.status, resp.headers.get("Location")
                    retry_after = resp.headers.get("Retry-After")
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                why = f"{type(exc).__name__}"
                await asyncio.sleep(min(0.2 * 2 ** attempt, 3.0))
                continue
            self.result.requests += 1
            self.result.answers[f"{request.method} {request.path} {status}"] += 1
            if status == 503 and attempt < MAX_ATTEMPTS - 1:
                await asyncio.sleep(min(float(retry_after) if (retry_after or "").isdigit() else 1.0, 5.0))
                continue
            try:
                payload = json.loads(raw) if raw else {}
            except ValueError:
                payload = {}
            return _Answer(status, payload if isinstance(payload, dict) else {}, location)
        self.result.failures[f"{request.method} {request.path}: {why}"] += 1
        return None

    async def click(self, journey: Journey) -> str | None:
        answer = await self.send(click_request(journey))
        self._tick()
        if answer is None:
            return None
        click_id: str | None = None
        if answer.status == 302 and answer.location:
            click_id = click_id_from_location(answer.location, self.config.offer(journey.offer_id))
        elif answer.status == 200:
            click_id = answer.payload.get("click_id")
        if not click_id:
            self.result.failures[f"GET /click answered {answer.status} without a click id"] += 1
            return None
        self.result.click_ids.append(click_id)
        return click_id

    async def bulk_click(self, journey: Journey, clicked_at_ms: int) -> str | None:
        token = self.config.ingest_bulk_token or ""
        answer = await self.send(bulk_click_request(journey, token, clicked_at_ms))
        self._tick()
        if answer is None or answer.status != 202 or not answer.payload.get("accepted"):
            if answer is not None:
                self.result.failures[f"POST /clicks answered {answer.status}"] += 1
            return None
        self.result.click_ids.append(journey.late_click_id or "")
        return journey.late_click_id

    async def postback(self, step: PostbackStep, request: WireRequest) -> None:
        answer = await self.send(request)
        self._tick()
        if answer is None:
            return
        receipt = answer.payload.get("receipt_id")
        if answer.status == 202 and receipt:
            self.result.receipts[receipt] = step
        else:
            reasons = ",".join(f"{e.get('field')}:{e.get('reason')}" for e in answer.payload.get("errors", []))
            self.result.failures[f"{request.method} /postback answered {answer.status} {reasons}".strip()] += 1

    async def journey(self, journey: Journey) -> None:
        click_id = journey.late_click_id
        clicked = journey.late_click_id is not None   # a late click's id is ours: usable before it is sent
        first_sent_ms: int | None = None
        sent: dict[int, WireRequest] = {}
        for index, step in enumerate(journey.steps):
            if step.delay_s:
                await asyncio.sleep(step.delay_s)
            if isinstance(step, ClickStep):
                if step.mode == "redirect":
                    click_id = await self.click(journey)
                    clicked = click_id is not None
                else:  # the user clicked minutes before the conversion; its record only arrives now
                    before = first_sent_ms or time.time_ns() // 1_000_000
                    await self.bulk_click(journey, before - int(step.ago_s * 1000))
                continue
            if step.with_click_id and not clicked:
                self.result.skipped += 1
                self._tick()
                continue
            if step.resend_of is not None:
                request = sent.get(step.resend_of)
                if request is None:
                    self.result.skipped += 1
                    self._tick()
                    continue
            else:
                request = render_postback(step, self.config, click_id, int(time.time()))
            sent[index] = request
            first_sent_ms = first_sent_ms or time.time_ns() // 1_000_000
            await self.postback(step, request)


#: Journeys in flight at most (bounds memory for big runs; the pacer bounds the request rate).
MAX_JOURNEYS_IN_FLIGHT = 1024
#: Connections to the ingester at most (the client pool).
POOL_SIZE = 64


async def submit_plan(plan: TrafficPlan, config: PartnerConfig, base_url: str, rate: float,
                      progress: ProgressBar | None = None) -> Submission:
    """Play the plan against the ingester at `base_url`, at most `rate` requests/s; collect the receipts.

    Users arrive one after another, spaced so that the whole plan's requests average
    `rate`/s: clicks and postbacks interleave as in real traffic instead of all clicks
    first. Each journey then runs its steps in order, with the plan's delays.
    """
    import aiohttp

    loop = asyncio.get_running_loop()
    started = loop.time()
    spacing = plan.requests / max(len(plan.journeys), 1) / rate
    connector = aiohttp.TCPConnector(limit=POOL_SIZE)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        submitter = _Submitter(session, base_url, config, rate, progress)
        in_flight = asyncio.Semaphore(MAX_JOURNEYS_IN_FLIGHT)
        tasks: set[asyncio.Task[None]] = set()

        async def run(journey: Journey) -> None:
            try:
                await submitter.journey(journey)
            finally:
                in_flight.release()

        for i, journey in enumerate(plan.journeys):
            wait = started + i * spacing - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            await in_flight.acquire()
            task = asyncio.create_task(run(journey))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        while tasks:
            await asyncio.gather(*list(tasks))
    result = submitter.result
    if progress:
        failed = sum(result.failures.values())
        progress.finish(f"202: {len(result.receipts)}" + (f"  failed: {failed}" if failed else ""))
    result.elapsed_s = loop.time() - started
    return result


# --------------------------------------------------------------------------- ClickHouse


def _ch_rows(client: Any, sql: str) -> list[tuple[Any, ...]]:
    return [tuple(row) for row in client.query(sql).result_rows]


def _upload_ids(client: Any, table: str, column: str, ids: Sequence[str]) -> None:
    """A session-scoped temporary table of ids: queries filter with `IN table` (no huge query text)."""
    client.command(f"CREATE TEMPORARY TABLE IF NOT EXISTS {table} ({column} String)")
    client.command(f"TRUNCATE TABLE {table}")
    for start in range(0, len(ids), 50_000):
        client.insert(table, [[i] for i in ids[start:start + 50_000]], column_names=[column])


def wait_for_outcomes(client: Any, database: str, receipts: Sequence[str], timeout_s: float,
                      progress: ProgressBar | None = None, poll_s: float = 1.0) -> int:
    """Poll `postback_outcomes FINAL` until every receipt has its row or `timeout_s` passes; how many do."""
    _upload_ids(client, "_demo_receipts", "receipt_id", receipts)
    deadline = time.monotonic() + timeout_s
    db = _q(database)
    found = 0
    while True:
        found = int(_ch_rows(client, f"SELECT count() FROM {db}.postback_outcomes FINAL "
                                     "WHERE receipt_id IN _demo_receipts")[0][0])
        if progress:
            progress.update(found)
        if found >= len(receipts) or time.monotonic() >= deadline:
            break
        time.sleep(poll_s)
    if progress:
        progress.finish(f"{len(receipts) - found} still missing" if found < len(receipts) else "all in ClickHouse")
    return found


def _q(name: str) -> str:
    from sinks.migrations import quote_identifier

    return quote_identifier(name)


@dataclass(frozen=True)
class RevenueRow:
    """Approved conversions of this run for one (affiliate, offer, currency, attributed)."""

    affiliate_id: str          # '' when the conversion has no click
    offer_id: str
    currency: str              # '' for conversions without money (leads, trials)
    attributed: bool
    conversions: int           # sign > 0
    reversals: int             # refunds, chargebacks
    gross: Decimal
    net: Decimal


@dataclass(frozen=True)
class Quantiles:
    count: int
    p50: float
    p99: float
    max: float | None = None


@dataclass(frozen=True)
class DemoReport:
    """Everything the summary shows: plain data, so formatting is a pure, tested function."""

    receipts_accepted: int                              # postbacks answered 202
    receipts_with_outcome: int
    outcomes: tuple[tuple[str, str, int], ...]          # (outcome, reason, receipts) from ClickHouse
    expected: tuple[tuple[str, str, int], ...]          # the same, as the plan intended, for the 202s
    conversions: tuple[tuple[str, str, int], ...]       # (status, attribution, conversions) of this run
    revenue: tuple[RevenueRow, ...]
    decision_latency_ms: Quantiles | None               # received_at -> processed_at (latency_ms)
    sink_latency_ms: Quantiles | None                   # processed_at -> inserted_at (conversions)
    row_latency_ms: Quantiles | None                    # received_at -> inserted_at (conversions)
    clicks_sent: int = 0
    clicks_recorded: int | None = None
    requests: int = 0
    elapsed_s: float = 0.0
    failures: tuple[tuple[str, int], ...] = ()
    answers: tuple[tuple[str, int], ...] = ()            # ("GET /click 302", n): every HTTP answer seen
    skipped: int = 0
    timeout_s: float = 0.0


def _quantiles(row: tuple[Any, ...]) -> Quantiles | None:
    count = int(row[0])
    if not count:
        return None
    qs = list(row[1])
    return Quantiles(count, float(qs[0]), float(qs[1]), float(row[2]) if len(row) > 2 and row[2] is not None
                     else None)


def collect_report(client: Any, database: str, submission: Submission, found: int,
                   timeout_s: float) -> DemoReport:
    """Read this run's results back from ClickHouse (the receipts are in `_demo_receipts`)."""
    db = _q(database)
    receipts = "receipt_id IN _demo_receipts"
    run_conversions = (f"conversion_id IN (SELECT conversion_id FROM {db}.postback_outcomes FINAL "
                       f"WHERE outcome = 'accepted' AND {receipts})")
    outcomes = _ch_rows(client, f"SELECT outcome, reason, count() FROM {db}.postback_outcomes FINAL "
                                f"WHERE {receipts} GROUP BY outcome, reason ORDER BY outcome, reason")
    conversions = _ch_rows(client, f"SELECT status, attribution, count() FROM {db}.conversions FINAL "
                                   f"WHERE {run_conversions} GROUP BY status, attribution "
                                   "ORDER BY status, attribution")
    zero = "toDecimal64(0, 6)"
    revenue = _ch_rows(client, f"""
        SELECT ifNull(affiliate_id, '') AS aff, ifNull(offer_id, '') AS off, ifNull(currency, '') AS cur,
               attributed AS attr, countIf(sign > 0) AS conv_n, countIf(sign < 0) AS rev_n,
               sumIf(ifNull(amount, {zero}), sign > 0) AS gross_total,
               sum(ifNull(signed_amount, {zero})) AS net_total
        FROM {db}.v_conversions_net WHERE {run_conversions}
        GROUP BY aff, off, cur, attr ORDER BY aff, off, cur, attr""")
    decision = _ch_rows(client, f"SELECT count(), quantiles(0.5, 0.99)(latency_ms), max(latency_ms) "
                                f"FROM {db}.postback_outcomes FINAL WHERE {receipts}")[0]
    ms = "toUnixTimestamp64Milli"
    rows = _ch_rows(client, f"""
        SELECT count(), quantiles(0.5, 0.99)({ms}(inserted_at) - {ms}(processed_at)),
               max({ms}(inserted_at) - {ms}(processed_at)),
               quantiles(0.5, 0.99)({ms}(inserted_at) - {ms}(received_at)), max({ms}(inserted_at) - {ms}(received_at))
        FROM {db}.conversions FINAL WHERE {receipts}""")[0]
    clicks_recorded: int | None = None
    if submission.click_ids:
        _upload_ids(client, "_demo_clicks", "click_id", submission.click_ids)
        clicks_recorded = int(_ch_rows(client, f"SELECT count() FROM {db}.clicks FINAL "
                                               "WHERE click_id IN _demo_clicks")[0][0])
    expected = Counter((s.expect, s.expect_reason) for s in submission.receipts.values())
    return DemoReport(
        receipts_accepted=len(submission.receipts), receipts_with_outcome=found,
        outcomes=tuple((str(o), str(r), int(n)) for o, r, n in outcomes),
        expected=tuple(sorted((o, r, n) for (o, r), n in expected.items())),
        conversions=tuple((str(s), str(a), int(n)) for s, a, n in conversions),
        revenue=tuple(RevenueRow(str(a), str(o), str(c), bool(t), int(cn), int(rn), Decimal(g), Decimal(n))
                      for a, o, c, t, cn, rn, g, n in revenue),
        decision_latency_ms=_quantiles(decision),
        sink_latency_ms=_quantiles((rows[0], rows[1], rows[2])),
        row_latency_ms=_quantiles((rows[0], rows[3], rows[4])),
        clicks_sent=len(submission.click_ids), clicks_recorded=clicks_recorded,
        requests=submission.requests, elapsed_s=submission.elapsed_s,
        failures=tuple(sorted(submission.failures.items())), answers=tuple(sorted(submission.answers.items())),
        skipped=submission.skipped, timeout_s=timeout_s,
    )


# --------------------------------------------------------------------------- summary


def _pct(part: float, whole: float) -> str:
    return "n/a" if not whole else f"{part / whole:.1%}"


def _amount(value: Decimal) -> str:
    return f"{value:,.2f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> list[str]:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    fmt = lambda cells: "  ".join(c.rjust(w) if i in right else c.ljust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return ["  " + fmt(header)] + ["  " + fmt([str(c) for c in row]) for row in rows]


def _money_table(rows: Sequence[RevenueRow], key: Callable[[RevenueRow], str], first: str,
                 total: str | None = None) -> list[str]:
    """One line per key: conversions, refunds, and net revenue in one column per currency (never mixed).

    `conversions` counts every approved conversion, with or without money (leads and
    trials too); `total` adds a line summing all keys.
    """
    currencies = sorted({r.currency for r in rows if r.currency})
    groups: dict[str, list[Any]] = {}
    for row in rows:
        for name in (key(row),) + ((total,) if total else ()):
            entry = groups.setdefault(name, [0, 0, {}])
            entry[0] += row.conversions
            entry[1] += row.reversals
            if row.currency:
                entry[2][row.currency] = entry[2].get(row.currency, Decimal(0)) + row.net
    order = lambda name: (name == total, name.startswith("("), name)  # noqa: E731
    body = [[name, str(conv), str(refunds)] + [_amount(nets[c]) if c in nets else "-" for c in currencies]
            for name, (conv, refunds, nets) in sorted(groups.items(), key=lambda kv: order(kv[0]))]
    header = [first, "conversions", "refunds"] + [f"net {c}" for c in currencies]
    return _table(header, body, set(range(1, len(header))))


def attributed_net(report: DemoReport) -> dict[str, Decimal]:
    """Net revenue credited to affiliates (attributed conversions), per currency."""
    out: dict[str, Decimal] = {}
    for row in report.revenue:
        if row.attributed and row.currency:
            out[row.currency] = out.get(row.currency, Decimal(0)) + row.net
    return out


def format_report(report: DemoReport) -> str:
    """The marketer-facing summary of one run."""
    lines: list[str] = []
    total = report.receipts_with_outcome
    by_outcome = Counter()
    for outcome, _reason, n in report.outcomes:
        by_outcome[outcome] += n
    rate = report.requests / report.elapsed_s if report.elapsed_s else 0.0
    lines.append("== Traffic")
    lines.append(f"  {report.requests} requests in {report.elapsed_s:.1f}s ({rate:.0f}/s); "
                 f"clicks issued: {report.clicks_sent}"
                 + (f", in ClickHouse: {report.clicks_recorded}" if report.clicks_recorded is not None else ""))
    lines.append(f"  postbacks accepted by the ingester (202): {report.receipts_accepted}; "
                 f"with an outcome in ClickHouse: {report.receipts_with_outcome}"
                 + ("" if total >= report.receipts_accepted
                    else f"  ({report.receipts_accepted - total} MISSING)"))
    if report.answers:
        lines.append("  HTTP answers: " + ", ".join(f"{what} x{n}" for what, n in report.answers))
    if report.skipped or report.failures:
        lines.append(f"  not sent: {report.skipped} postbacks (their click failed)" if report.skipped else
                     "  requests that failed:")
        if report.skipped and report.failures:
            lines.append("  requests that failed:")
        lines.extend(f"    {n:>5}  {what}" for what, n in report.failures)

    lines.append("")
    lines.append("== Net revenue by affiliate (approved conversions; refunds subtracted)")
    if report.revenue:
        lines.extend(_money_table(report.revenue, lambda r: r.affiliate_id or "(no click)", "affiliate",
                                  total="= all affiliates"))
    else:
        lines.append("  (no approved conversions)")
    lines.append("")
    lines.append("== Net revenue by offer")
    if report.revenue:
        lines.extend(_money_table(report.revenue, lambda r: r.offer_id or "(no offer)", "offer"))
    else:
        lines.append("  (no approved conversions)")
    credited = attributed_net(report)
    lines.append("  attributed to affiliates: " + (", ".join(f"{_amount(v)} {c}" for c, v in sorted(credited.items()))
                                                   or "nothing"))

    lines.append("")
    lines.append("== Quality")
    conv_total = sum(n for _, _, n in report.conversions)
    by_attr = Counter()
    by_status = Counter()
    for status, attribution, n in report.conversions:
        by_attr[attribution] += n
        by_status[status] += n
    named = conv_total - by_attr["no_click_id"]
    lines.append(f"  match rate: {_pct(by_attr['attributed'], conv_total)} of {conv_total} conversions attributed "
                 f"to a click ({_pct(by_attr['attributed'], named)} of those that named a click)"
                 + "".join(f"; {k}: {by_attr[k]}" for k in ("no_click_id", "no_click", "expired") if by_attr[k]))
    if by_status["pending"] or by_status["rejected"]:
        lines.append(f"  not counted as revenue: {by_status['pending']} pending, {by_status['rejected']} rejected "
                     "by the advertiser")
    dup_reasons = ", ".join(f"{r} {n}" for o, r, n in report.outcomes if o == "duplicate")
    lines.append(f"  dedupe rate: {_pct(by_outcome['duplicate'], total)} ({by_outcome['duplicate']} duplicates"
                 + (f": {dup_reasons}" if dup_reasons else "") + ")")
    lines.append(f"  rejection rate: {_pct(by_outcome['rejected'], total)} ({by_outcome['rejected']} rejected)")
    rejected = sorted(((n, r) for o, r, n in report.outcomes if o == "rejected"), reverse=True)
    if rejected:
        lines.append("  rejection reasons:")
        lines.extend(f"    {n:>5}  {reason}" for n, reason in rejected)
    lines.append("  outcomes (seen / expected by the traffic plan):")
    seen = {(o, r): n for o, r, n in report.outcomes}
    expected = {(o, r): n for o, r, n in report.expected}
    for key in sorted(set(seen) | set(expected)):
        outcome, reason = key
        mark = "" if seen.get(key, 0) == expected.get(key, 0) else "   <- differs"
        lines.append(f"    {outcome + (' ' + reason if reason else ''):<26} {seen.get(key, 0):>5} / "
                     f"{expected.get(key, 0):<5}{mark}".rstrip())

    lines.append("")
    lines.append("== Latency")

    def q(label_: str, value: Quantiles | None, note: str = "") -> None:
        if value is None:
            lines.append(f"  {label_}: n/a")
            return
        worst = f", max {value.max:,.0f} ms" if value.max is not None else ""
        lines.append(f"  {label_}: p50 {value.p50:,.0f} ms, p99 {value.p99:,.0f} ms{worst} "
                     f"(n={value.count}){note}")

    q("receipt -> outcome decided (postback_outcomes.latency_ms)", report.decision_latency_ms,
      " - includes late clicks' wait")
    q("decided -> row in ClickHouse (conversions processed_at -> inserted_at)", report.sink_latency_ms)
    q("receipt -> row in ClickHouse (conversions received_at -> inserted_at)", report.row_latency_ms)
    return "\n".join(lines)


_MISMATCH = ("the processors probably loaded a different partner file than this demo (POSTBACK_CONFIG must "
             "name the same file for the demo, the ingester and the processors)")


def _unplanned_rejections(report: DemoReport) -> tuple[int, str]:
    """Rejections beyond what the plan asked for, and the most common reason among them."""
    seen = Counter({r: n for o, r, n in report.outcomes if o == "rejected"})
    seen.subtract(Counter({r: n for o, r, n in report.expected if o == "rejected"}))
    extra = +seen
    return sum(extra.values()), (extra.most_common(1)[0][0] if extra else "")


def verdict(report: DemoReport) -> tuple[bool, str]:
    """Exit status and its reason: every 202 has an outcome, and affiliates earned something.

    Rejections the plan did not ask for do not fail the run (token-mode postbacks still
    earn), but they are called out: they nearly always mean mismatched partner files.
    """
    if report.receipts_accepted == 0:
        return False, ("FAILED: the ingester accepted no postback (no 202 answers); see the failed requests "
                       "above")
    missing = report.receipts_accepted - report.receipts_with_outcome
    if missing > 0:
        return False, (f"FAILED: {missing} of {report.receipts_accepted} accepted postbacks have no outcome in "
                       f"ClickHouse after {report.timeout_s:g}s: are `postback process` and `postback sink` "
                       "running against this stack (same Kafka, same ClickHouse database)?")
    extra, reason = _unplanned_rejections(report)
    warning = ""
    if extra > max(2, report.receipts_with_outcome // 20):
        warning = f"\nWARNING: {extra} postbacks were rejected that the plan signed correctly (mostly {reason}): " \
                  + _MISMATCH
    earned = {c: v for c, v in sorted(attributed_net(report).items()) if v > 0}
    if not earned:
        return False, "FAILED: no attributed revenue was recorded." + (warning.replace("\nWARNING:", "") or "")
    return True, (f"OK: all {report.receipts_accepted} accepted postbacks have an outcome, and affiliates earned "
                  + ", ".join(f"{_amount(v)} {c}" for c, v in earned.items()) + warning)


# --------------------------------------------------------------------------- command


def partner_file(settings: Settings) -> Path:
    """POSTBACK_CONFIG when set (what the processors load too), else deploy/demo-partners.toml."""
    return settings.config_file or DEMO_PARTNERS


def _preflight(base_url: str) -> None:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(base_url.rstrip("/") + "/readyz", timeout=5) as resp:
            resp.read()
    except urllib.error.HTTPError as err:
        raise RuntimeError(f"the ingester at {base_url} is not ready ({err.code}): is Kafka up?") from err
    except (urllib.error.URLError, OSError) as err:
        raise RuntimeError(f"no ingester answers at {base_url} ({getattr(err, 'reason', err)}): start "
                           "`postback ingest` (or `postback run`), or pass --url") from err


def run_demo(settings: Settings, base_url: str, clicks: int, rate: float, database: str, timeout_s: float,
             seed: int | None, out: IO[str] | None = None, err: IO[str] | None = None) -> tuple[bool, DemoReport]:
    """The whole demo: plan, submit, wait for the outcomes, report. Returns (ok, report)."""
    from ulid import ULID

    from sinks.service import clickhouse_url, client_factory

    out = out or sys.stdout
    err = err or sys.stderr
    say = lambda m: print(m, file=err, flush=True)  # noqa: E731
    path = partner_file(settings)
    config = load_partner_config(path)
    url = clickhouse_url(settings)
    if url.startswith("chdb:"):
        raise RuntimeError("the demo reads results from a ClickHouse server, but none runs: start `postback "
                           "stack up` (or set CLICKHOUSE_URL to a server)")
    client = client_factory(url)()  # every query names the database, so a missing one is reported below
    if int(client.command(f"EXISTS DATABASE {_q(database)}")) != 1 or \
            int(client.command(f"EXISTS TABLE {_q(database)}.postback_outcomes")) != 1:
        raise RuntimeError(f"ClickHouse database {database!r} has no postback_outcomes table: start `postback "
                           "sink` (it creates the schema), or pass --database")
    _preflight(base_url)

    seed = seed if seed is not None else random.SystemRandom().randrange(1, 10**6)
    plan = build_plan(config, clicks, seed, str(ULID()))
    postbacks = sum(len(j.postbacks) for j in plan.journeys)
    say(f"postback demo: {clicks} clicks and {postbacks} postbacks ({plan.requests} requests) at up to "
        f"{rate:g} requests/s -> {base_url}")
    say(f"  partner file: {path} (the running ingester and processors must use this same file)")
    say(f"  seed {seed} (--seed {seed} replays this traffic mix); run {plan.run_id}")
    submission = asyncio.run(submit_plan(plan, config, base_url, rate,
                                         ProgressBar("sending  ", plan.requests, err)))
    receipts = list(submission.receipts)
    say(f"  {len(receipts)} postbacks accepted (202); waiting up to {timeout_s:g}s for their outcomes in "
        f"ClickHouse ({url.split('@')[-1]}, database {database})")
    found = wait_for_outcomes(client, database, receipts, timeout_s, ProgressBar("outcomes ", len(receipts), err)) \
        if receipts else 0
    report = collect_report(client, database, submission, found, timeout_s)
    ok, message = verdict(report)
    print(format_report(report), file=out)
    print("", file=out)
    print(message, file=out, flush=True)
    return ok, report


def _demo(args: argparse.Namespace, settings: Settings) -> int:
    if args.clicks < 1 or args.rate <= 0 or args.timeout < 0:
        raise ValueError("--clicks must be >= 1, --rate > 0 and --timeout >= 0")
    ok, _report = run_demo(settings, args.url, args.clicks, args.rate, args.database, args.timeout, args.seed)
    return 0 if ok else 1


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="simulate affiliate clicks and advertiser postbacks against the running pipeline",
        description=(
            "Send realistic traffic to a running pipeline (ingester at --url, `postback process` and "
            "`postback sink` running): affiliate clicks, then signed postbacks (purchases, leads, trials and "
            "renewals, refunds, pending->approved orders) with the usual partner mistakes (retries, repeated "
            "orders, bad signatures, lost click ids, late clicks). Then wait until every accepted postback has "
            "an outcome in ClickHouse and print revenue by affiliate and offer, match rate, dedupe rate, "
            "rejection reasons and latency. Postbacks are signed with the secrets of the partner file "
            "$POSTBACK_CONFIG, else deploy/demo-partners.toml: it MUST be the same file the running ingester "
            "and processors loaded (`postback run` uses deploy/demo-partners.toml by default), or every "
            "postback is rejected. Exit 0 when every accepted postback has an outcome and attributed revenue "
            "is positive, else 1."),
    )
    p.add_argument("--url", default="http://127.0.0.1:8080", help="ingester base URL (default %(default)s)")
    p.add_argument("--clicks", type=int, default=300, help="affiliate clicks to simulate (default %(default)s)")
    p.add_argument("--rate", type=float, default=200.0, help="at most this many requests/s (default %(default)s)")
    p.add_argument("--database", default="postback", help="ClickHouse database of the sink (default %(default)s)")
    p.add_argument("--timeout", type=float, default=120.0,
                   help="seconds to wait for every accepted postback's outcome in ClickHouse (default %(default)s)")
    p.add_argument("--seed", type=int, help="random seed of the traffic mix (default: a fresh one, printed)")
    p.set_defaults(handler=_demo)
