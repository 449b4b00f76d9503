"""The demo's traffic plan: who clicks which offer and which postbacks follow, as plain data.

Computed up front from a seed and the partner file (`build_plan`, pure and
deterministic), so a run can be replayed and the mix is unit-tested without a network.
Nothing here is signed or sent: see `app.demo.send`.

Besides the random mix, every plan starts with a few *scenario* journeys that exercise
the commission engine in ways whose outcome is known in advance from the partner file
alone (`payout_facts`): more first purchases on the capped offer than its daily cap, a
purchase from the paused affiliate, a purchase sent right after its click on the offer
with a minimum click-to-conversion time, and a purchase refunded after it was paid.
The random journeys on an offer with such a minimum wait longer than it before their
first postback, so that only the planned one is too fast.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import date
from decimal import Decimal
from typing import Any, Literal, TypeAlias

from postback.fx import round_money
from postback.partners import Advertiser, Offer, PartnerConfig


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
    event_at_click: bool = False        # send `event_time` = when the click was sent (a too-fast conversion)


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
    scenario: str = ""                  # "" (random traffic), or one of SCENARIOS

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

# --------------------------------------------------------------------------- payout scenarios
#: The scenario journeys, in the order a plan starts with them.
SCENARIOS = ("clawback", "too_fast", "paused", "cap")
#: Capped-offer scenario purchases beyond the cap (so the cap is always exceeded).
CAP_EXCESS = 2
#: Seconds that a random journey on an offer with `min_click_to_conversion_s` waits beyond it.
QUALITY_MARGIN_S = (1.0, 2.0)


@dataclass(frozen=True)
class PayoutExpectation:
    """What the commission engine must decide for one planned conversion: known from the partner file alone."""

    label: str
    advertiser_id: str
    order_id: str
    event: str
    payout_status: str
    payout_reason: str | None
    payout: Decimal | None = None          # in payout_currency; None: not checked
    payout_currency: str | None = None
    refund_of: str | None = None           # a clawback: minus what the purchase of this order was paid


@dataclass(frozen=True)
class CapExpectation:
    """A daily conversions cap that this run's traffic reaches."""

    offer_id: str
    limit: int
    exact: bool                            # the plan alone brings at least `limit` payable conversions
    payout_each: Decimal | None = None     # every payable one pays this (reporting currency), when fixed


@dataclass(frozen=True)
class PayoutFacts:
    """The payout facts a demo run can be checked against, computed from the plan and the partner file."""

    reporting_currency: str
    timezone: str
    conversions: tuple[PayoutExpectation, ...] = ()
    caps: tuple[CapExpectation, ...] = ()
    paused_affiliates: tuple[str, ...] = ()
    capped_offers: tuple[tuple[str, int], ...] = ()   # (offer_id, daily conversions limit) of every capped offer


def planned_payout(config: PartnerConfig, offer_id: str, affiliate_id: str, event: str, amount: str | None,
                   currency: str | None) -> tuple[Decimal, str] | None:
    """What the payout rule pays for one conversion, or None when it depends on history (tiers) or has no rule.

    The affiliate's override wins over the offer's rule; revshare pays `percent` of the
    revenue in the revenue's currency; the result is rounded half-even to the currency's
    minor unit.
    """
    offer = config.offer(offer_id)
    if offer is None:
        return None
    affiliate = config.affiliate(affiliate_id)
    rule = (affiliate.payouts.get(offer_id, {}).get(event) if affiliate else None) or offer.payouts.get(event)
    if rule is None or rule.tiers:
        return None
    share = rule.percent / 100 * Decimal(amount) if rule.percent is not None and amount is not None else None
    if rule.kind == "cpa" and rule.amount is not None and rule.currency:
        return round_money(rule.amount, rule.currency), rule.currency
    if rule.kind == "revshare" and share is not None and currency:
        return round_money(share, currency), currency
    if rule.kind == "cpa_plus_revshare" and share is not None and rule.amount is not None \
            and rule.currency == currency:
        return round_money(rule.amount + share, currency), currency
    return None


def _paused(config: PartnerConfig) -> list[str]:
    return [a for a, _ in AFFILIATES if (aff := config.affiliate(a)) is not None and aff.status == "paused"]


def _active(config: PartnerConfig) -> list[str]:
    paused = set(_paused(config))
    return [a for a, _ in AFFILIATES if a not in paused]


def _min_wait_s(offer: Offer) -> int | None:
    return offer.quality.min_click_to_conversion_s if offer.quality else None


def _scenario_offers(config: PartnerConfig) -> dict[str, Offer]:
    """The offer each scenario runs on (a scenario without a suitable offer is left out)."""
    offers = sorted((o for o in config.offers.values() if config.advertiser(o.advertiser_id) is not None
                     and "purchase" in o.payouts), key=lambda o: o.offer_id)
    plain = [o for o in offers if not o.caps and not o.affiliate_caps and not o.quality
             and not o.payouts["purchase"].tiers]
    chosen: dict[str, Offer] = {}
    clawback = next((o for o in plain if o.payouts["purchase"].kind == "revshare"), plain[0] if plain else None)
    if clawback is not None:
        chosen["clawback"] = chosen["paused"] = clawback
    fast = next((o for o in offers if _min_wait_s(o)), None)
    if fast is not None:
        chosen["too_fast"] = fast
    cap = next((o for o in offers if o.caps and o.caps.daily_conversions and not o.affiliate_caps
                and not _min_wait_s(o)), None)
    if cap is not None:
        chosen["cap"] = cap
    if not _paused(config):
        chosen.pop("paused", None)
    return chosen


def _scenario_journeys(config: PartnerConfig, builder: _Builder) -> list[Journey]:
    """The scenario journeys: each a redirect click and one or two plain postbacks (no partner mistakes)."""
    rng = builder.rng
    offers = _scenario_offers(config)
    active = _active(config)
    journeys: list[Journey] = []

    def journey(kind: str, offer: Offer, affiliate: str, amount: str, currency: str, *, refund: bool = False,
                fast: bool = False) -> None:
        adv = config.advertisers[offer.advertiser_id]
        auth = builder.auth(adv)
        index = len(journeys)
        customer = f"U-{builder.run_tag}-S{index:05d}"
        order = builder.order_id(adv.advertiser_id, {"clawback": "CLAW", "too_fast": "FAST", "paused": "PAUSE",
                                                     "cap": "CAP"}[kind])
        min_s = _min_wait_s(offer)
        wait = 0.0 if fast else rng.uniform(0.0, 0.5) + (min_s + rng.uniform(*QUALITY_MARGIN_S) if min_s else 0.0)
        steps: list[Step] = [ClickStep("redirect")]
        steps.append(replace(builder.postback(adv, auth, "purchase", with_click_id=True, order_id=order,
                                              amount=amount, currency=currency, customer_id=customer,
                                              delay_s=wait), event_at_click=fast))
        if refund:  # well after the purchase was decided, so that its payout is there to claw back
            steps.append(builder.postback(adv, auth, "refund", with_click_id=True, order_id=order, amount=amount,
                                          currency=currency, customer_id=customer, delay_s=rng.uniform(2.0, 3.0)))
        journeys.append(Journey(
            index=index, offer_id=offer.offer_id, advertiser_id=adv.advertiser_id, affiliate_id=affiliate,
            campaign_id=f"{affiliate.removeprefix('aff-')}-{rng.choice(_CAMPAIGNS)}",
            subs=(rng.choice(_PLACEMENTS), rng.choice(_DEVICES)), user_agent=rng.choice(_USER_AGENTS),
            steps=tuple(steps), scenario=kind))

    foreign = next((c for c, _ in _CURRENCIES if c != config.account.reporting_currency), "EUR")
    reporting = config.account.reporting_currency
    if "clawback" in offers and active:
        journey("clawback", offers["clawback"], active[1 % len(active)], _money(rng, 40, 240), foreign, refund=True)
    if "too_fast" in offers and active:
        journey("too_fast", offers["too_fast"], active[2 % len(active)], _money(rng, 15, 250), reporting, fast=True)
    if "paused" in offers:
        journey("paused", offers["paused"], _paused(config)[0], _money(rng, 15, 250), reporting)
    if "cap" in offers and active:
        cap = offers["cap"].caps.daily_conversions or 0  # type: ignore[union-attr]
        for n in range(cap + CAP_EXCESS):
            journey("cap", offers["cap"], active[n % len(active)], _money(rng, 4.99, 99.99), reporting)
    return journeys


def payout_facts(plan: TrafficPlan, config: PartnerConfig) -> PayoutFacts:
    """What the commission engine must make of this plan's scenario journeys, from the partner file alone.

    Independent of the engine: the payouts are computed here from the rules
    (`planned_payout`), the decisions from what each scenario was built to trigger.
    """
    expected: list[PayoutExpectation] = []
    capped = 0
    cap_offer: Offer | None = None
    for journey in plan.journeys:
        if not journey.scenario:
            continue
        for step in journey.postbacks:
            order = step.order_id or ""
            label = f"{journey.scenario} {journey.offer_id} {journey.affiliate_id} {order}"
            paid = planned_payout(config, journey.offer_id, journey.affiliate_id, "purchase", step.amount,
                                  step.currency)
            if journey.scenario == "cap":
                capped += 1
                cap_offer = config.offer(journey.offer_id)
            elif step.event == "refund":
                expected.append(PayoutExpectation(
                    f"{label} refund", step.advertiser_id, order, "refund", "payable", "clawback",
                    -paid[0] if paid else None, paid[1] if paid else None, refund_of=order))
            elif journey.scenario == "clawback":
                expected.append(PayoutExpectation(label, step.advertiser_id, order, "purchase", "payable", None,
                                                  paid[0] if paid else None, paid[1] if paid else None))
            else:
                reason = "too_fast" if journey.scenario == "too_fast" else "affiliate_paused"
                expected.append(PayoutExpectation(label, step.advertiser_id, order, "purchase", "hold", reason,
                                                  Decimal(0) if paid else None, paid[1] if paid else None))
    caps: list[CapExpectation] = []
    if cap_offer is not None and cap_offer.caps and cap_offer.caps.daily_conversions:
        rule = cap_offer.payouts["purchase"]
        each = rule.amount if rule.kind == "cpa" and not rule.tiers and rule.currency == \
            config.account.reporting_currency and not any(cap_offer.offer_id in a.payouts
                                                          for a in config.affiliates.values()) else None
        limit = cap_offer.caps.daily_conversions
        caps.append(CapExpectation(cap_offer.offer_id, limit, capped >= limit, each))
    capped_offers = tuple(sorted((o.offer_id, o.caps.daily_conversions) for o in config.offers.values()
                                 if o.caps and o.caps.daily_conversions))
    return PayoutFacts(config.account.reporting_currency, config.account.timezone, tuple(expected), tuple(caps),
                       tuple(_paused(config)), capped_offers)


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
    journeys: list[Journey] = _scenario_journeys(config, builder)[:clicks]
    for index in range(len(journeys), clicks):
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
                wait = rng.uniform(0.0, 0.5)
                if _min_wait_s(offer):  # a shopper, not a bot: later than the offer's minimum after the click
                    wait += (_min_wait_s(offer) or 0) + rng.uniform(*QUALITY_MARGIN_S)
                steps.append(replace(head[0], delay_s=wait))
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
