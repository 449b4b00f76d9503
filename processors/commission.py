"""The commission engine: what an affiliate earns for one conversion, and why. Pure.

``commission(conversion, partners, state, fx, now_ms)`` returns a NEW dict: the
conversion plus the payout fields of the Conversion record (``payout``,
``payout_currency``, ``payout_status``, ``payout_reason``, ``payout_rule``,
``reporting_currency``, ``revenue_reporting``, ``payout_reporting``, ``revenue_fx_rate``,
``revenue_fx_date``, ``payout_fx_rate``, ``payout_fx_date``, ``fx_status``,
``cap_decision``). It does no I/O and reads no clock: ``now_ms`` is only stored with
state entries (so they can be expired later); every period is taken from the
conversion's own event time (``event_time_ms``, else ``received_at_ms``) in the
account's timezone.

What is guaranteed, and why
===========================

- **Caps are exact.** The stage that calls this is keyed by ``advertiser_id``, so every
  conversion of one advertiser (of each of its offers, and of each of its orders) meets on
  one partition and ``state`` (that partition's table
  shard) sees them one at a time. Counting, checking and incrementing a cap are
  therefore one step, with no race between workers: with a cap of N, exactly N
  conversions are payable and the rest are held or rejected.
- **Replays are idempotent.** Delivery is at-least-once. The last decision per
  conversion is stored (``conv:<conversion_id>``) with its version; the same
  conversion_id and version again (or an older version) returns the stored record
  field for field and changes no counter.
- **A status change recomputes.** A newer version first undoes what the previous one
  counted (its cap usage, its tier count, its payment on the order, its clawback), then
  is decided afresh: a ``rejected`` status pays 0 (``status_rejected``) and so frees
  its cap room; ``pending`` and ``approved`` pay per rule; tiers count ``approved`` only.
- **Held is never released.** A conversion once held (or rejected by a cap) stays so
  in later versions even when room frees up: payouts never appear after the fact,
  without a person deciding it. Only a ``rejected`` status moves it (to ``none``).
  One exception: a hold with reason ``fx_missing`` is not a decision but a missing
  input, so a new version decides afresh, and so does ``recompute_fx`` (below) once
  the rate is there.
- **Money is exact.** ``Decimal`` throughout; the payout is rounded once, half-even, to
  its currency's minor unit (``postback.fx.round_money``), and so are the amounts in the
  reporting currency. A missing FX rate is never replaced by 0 or 1: the reporting
  amounts are None and ``fx_status`` is ``fx_missing``.

Order of decisions
==================

1. a refund or chargeback (``sign == -1``, status not ``rejected``): the clawback (below),
   attributed or not: advertisers often send refunds with the order id only. Without its
   click it takes back from the affiliate of the order's latest payment, and the record
   takes that payment's ``affiliate_id`` (and ``offer_id`` when it has none), so the
   reports by affiliate and offer net to zero;
2. not attributed (``attributed`` false or no ``affiliate_id``): ``none``, ``not_attributed``;
3. status ``rejected``: ``none``, ``status_rejected``;
4. the rule: the affiliate's override for (offer, event), else the offer's rule for the
   event, else ``none``, ``no_payout_rule``;
5. affiliate paused: ``hold``, ``affiliate_paused``;
6. quality: ``too_fast``, ``too_slow``, ``max_conversions_per_click`` (``hold``);
7. the payout (tier, revshare, FX for a mixed-currency ``cpa_plus_revshare``);
8. caps: offer caps then affiliate caps; conversions then payout; day then month; the
   first exceeded one decides (``on_cap``: ``hold`` or ``rejected``, reason e.g.
   ``cap_daily_conversions`` or ``affiliate_cap_monthly_payout``);
9. otherwise ``payable`` (reason None).

Choices made here
=================

- **Revshare** is ``percent / 100 * revenue`` in the revenue's currency (the payout
  currency of a ``revshare`` rule; the reporting currency when there is no revenue).
  For ``cpa_plus_revshare`` whose cpa currency differs from the revenue's, the
  revshare part is converted into the cpa currency through the reporting currency with
  the event day's rates: ``part * rate(revenue) / rate(cpa)`` (28 significant digits),
  and the sum is rounded once. Without both rates the payout cannot be known: ``hold``,
  ``fx_missing``, payout 0.
- **Tiers** count the affiliate's conversions of this offer in the conversion's month
  that are ``approved`` and payable (held or cap-rejected ones do not advance a tier).
  An approved conversion counts itself, so with ``min_approved = 100`` the 100th
  approved conversion of the month is the first paid at the tier's rate; a pending one
  is priced with the approved conversions before it. A new month starts from 0.
- **Payout caps** are in the reporting currency. Without the payout's rate they cannot
  be checked: the conversion is held with ``fx_missing`` when the offer has a payout cap
  (offer or affiliate), and is payable otherwise.
- **max_conversions_per_click** numbers the distinct conversions per click and event
  that reach the quality checks (held ones too), in the order they arrive; the ones
  numbered above the limit are held. A conversion keeps its number in later versions,
  and the count is never lowered.
- **Clawback**: a refund or chargeback (``sign == -1``) takes back what was paid to the
  same affiliate for the same order (same advertiser
  and ``order_id``) within the offer's ``clawback_days`` (between the two event
  times): ``payout`` is minus that sum, ``payout_status`` ``payable`` (it is money to
  settle) with reason ``clawback``. Payments taken back are removed from the order, so
  a chargeback after a refund takes nothing twice. All payments older than the window:
  ``none``, ``clawback_window_passed``, 0. Nothing paid: ``none``, ``clawback``, 0.
  When an order was paid in several currencies, the payments in the currency of the
  latest one are taken back. ``payout_reporting`` is minus what those payments were
  worth in the reporting currency when they were made, so reports net to zero.
- **FX dates**: the rates used are the newest dated on or before the conversion's day
  in the account timezone (``FxRates.lookup``); the reporting currency is rate 1 on
  that day.
- **FX backfill** (``recompute_fx(conversion_id, partners, state, fx, now_ms)``, run by
  the commission stage for a ``{"backfill": conversion_id}`` message, which
  ``postback fx backfill`` sends for every conversion stored with ``fx_missing``): when
  the rates that conversion lacked are now known, its last decision is recomputed and
  returned as a new Conversion record with the **same version** and ``processed_at_ms``
  = the backfill's time (ClickHouse's ``ReplacingMergeTree(version)`` keeps the row
  inserted last among equal versions, so it replaces the ``fx_missing`` row). Two cases:

  - held with reason ``fx_missing`` (its payout, or its payout caps, needed the rate):
    decided again as if it arrived now (rule, tier, quality, caps of its own period):
    it may become payable, and is then counted against the caps as any other;
  - anything else (payable, held for another reason, ``none``, a clawback): the decision
    stands (same payout, status, reason, rule, cap decision, counters); it only gains
    the reporting amounts it lacked (amounts already known are kept). A payable one whose
    payout was not known in the reporting currency adds it to its payout-cap usage and
    to its order's payment (so a later clawback nets in the reporting currency).

  All or nothing: while any needed rate is still missing, nothing changes and the result
  is None (run the backfill again after loading the rest). None too when the last
  decision is not ``fx_missing`` (e.g. a newer version already came with the rate).
  Replays: once a backfill recomputed a conversion, running it again (an at-least-once
  redelivery, or a second ``postback fx backfill``) returns the identical record and
  changes nothing; so does a replay of the conversion's own message (same version).
  A later status update (version + 1) is handled as usual: it undoes what the
  backfilled decision counted and decides afresh.
- Zero payouts (``none``) are in the reporting currency; a held or cap-rejected
  conversion shows 0 in its rule's currency, and ``payout_rule`` still says what the
  rule would have paid.

State key layout (one advertiser's shard; JSON values, Decimals as strings)
===========================================================================

- ``conv:<conversion_id>``: the last decision: ``v`` version, ``rec`` the payout fields,
  ``sticky`` (held or cap-rejected), and what it counted, to undo on a new version:
  ``caps`` (counter keys), ``pr`` (its payout in the reporting currency), ``tier``,
  ``order``, ``claw`` (payments it took back), ``clk``/``clk_n`` (its click counter and
  number there); ``at`` = now_ms. Only while ``rec`` is ``fx_missing``, and after a
  backfill: ``in``, the input conversion (JSON; what ``recompute_fx`` recomputes from;
  kept for these only, so the state stays small). After a backfill: ``bf``, its now_ms
  (the record's ``processed_at_ms``).
- ``cap:<scope>:<period>``: ``{"n": conversions, "p": payout in reporting currency, "at"}``;
  scope ``offer:<offer_id>`` or ``affiliate:<affiliate_id>@<offer_id>``, period
  ``day:YYYY-MM-DD`` or ``month:YYYY-MM`` (account timezone).
- ``aff:<offer_id>|<affiliate_id>|<YYYY-MM>``: approved payable conversions, for tiers.
- ``click:<click_id>|<event>``: conversions seen per click and event.
- ``order:<advertiser_id>|<order_id>``: payments still open to a clawback,
  ``{conversion_id: {"p": payout, "c": currency, "r": reporting or None, "t": event ms, "a": affiliate}}``.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo

from postback.fx import FxRates, round_money
from postback.partner_model import DEFAULT_CLAWBACK_DAYS, Caps, Offer, PartnerConfig, PayoutRule, Tier

__all__ = ["PAYOUT_REASONS", "PAYOUT_STATUSES", "commission", "recompute_fx"]

#: ``payout_status`` values.
PAYOUT_STATUSES: tuple[str, ...] = ("payable", "hold", "rejected", "none")
#: ``payout_reason`` values (None when payable, except ``clawback``).
PAYOUT_REASONS: tuple[str, ...] = (
    "no_payout_rule", "not_attributed", "status_rejected",
    "cap_daily_conversions", "cap_monthly_conversions", "cap_daily_payout", "cap_monthly_payout",
    "affiliate_cap_daily_conversions", "affiliate_cap_monthly_conversions", "affiliate_cap_daily_payout",
    "affiliate_cap_monthly_payout", "affiliate_paused", "too_fast", "too_slow", "max_conversions_per_click",
    "clawback", "clawback_window_passed", "fx_missing",
)

_DAY_MS = 86_400_000
_ZERO = Decimal(0)
_ONE = Decimal(1)
_DECIMAL_FIELDS = ("payout", "revenue_reporting", "payout_reporting", "revenue_fx_rate", "payout_fx_rate")
#: Keys of a ``conv:`` entry that are not what the decision counted (its effects).
_ENTRY_KEYS = frozenset({"v", "rec", "at", "in", "bf"})
#: (Caps field, what it limits, period) in the order they are checked.
_CAP_CHECKS: tuple[tuple[str, str, str], ...] = (
    ("daily_conversions", "conversions", "day"),
    ("monthly_conversions", "conversions", "month"),
    ("daily_payout", "payout", "day"),
    ("monthly_payout", "payout", "month"),
)


@lru_cache(maxsize=64)
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


@dataclass
class _Decision:
    """What was decided, before the FX fields are added."""

    payout: Decimal
    currency: str
    status: str
    reason: str | None
    rule: str | None = None
    cap_decision: str | None = None
    #: the payout in the reporting currency when it is already known (a clawback)
    reporting: Decimal | None = None
    reporting_known: bool = False
    effects: dict[str, Any] = field(default_factory=dict)
    #: attribution fields the record takes from the order it reverses (a refund without its click)
    adopt: dict[str, Any] = field(default_factory=dict)


def commission(conversion: dict[str, Any], partners: PartnerConfig, state: MutableMapping[str, Any],
               fx: FxRates, now_ms: int) -> dict[str, Any]:
    """The conversion with its payout fields (see the module docstring); updates ``state``.

    ``state`` holds every conversion of the conversion's advertiser (the caller's table shard);
    it is only read and assigned (no value is mutated in place), so a changelogged table
    sees every change.
    """
    cid = conversion["conversion_id"]
    version = int(conversion.get("version") or 1)
    conv_key = f"conv:{cid}"
    prev = state.get(conv_key)
    if prev is not None and int(prev["v"]) >= version:
        out = {**conversion, **_decode(prev["rec"])}
        if prev.get("bf") is not None and int(prev["v"]) == version:  # recomputed by a backfill since
            out["processed_at_ms"] = prev["bf"]
        return out

    if prev is not None:
        _undo(state, prev, cid)
    engine = _engine(conversion, partners, state, fx, now_ms, prev)
    if (prev is not None and prev.get("sticky") and conversion.get("status") != "rejected"
            and not _held_for_fx(prev["rec"])):
        rec = prev["rec"]
        decision = _Decision(round_money(_ZERO, rec["payout_currency"]), rec["payout_currency"], rec["payout_status"],
                             rec["payout_reason"], rec["payout_rule"], rec["cap_decision"])
        decision.effects["sticky"] = True
    else:
        decision = engine.decide()
    fields = engine.fields(decision)
    state[conv_key] = _entry(version, fields, now_ms, _effects(engine, decision), conversion)
    return {**conversion, **fields}


def recompute_fx(conversion_id: str, partners: PartnerConfig, state: MutableMapping[str, Any], fx: FxRates,
                 now_ms: int) -> dict[str, Any] | None:
    """The conversion's record recomputed with the rates it lacked, as the same version; or None.

    See "FX backfill" in the module docstring. ``state`` is the shard of the conversion's
    advertiser (the commission topic's key). Returns the
    full Conversion record to publish (``processed_at_ms`` = ``now_ms`` of the backfill
    that recomputed it), or None when there is nothing to recompute: unknown conversion,
    last decision not ``fx_missing``, or a needed rate still missing (then ``state`` is
    left unchanged).
    """
    conv_key = f"conv:{conversion_id}"
    prev = state.get(conv_key)
    if prev is None or prev.get("in") is None:
        return None
    conversion = _decode_input(prev["in"])
    rec = prev["rec"]
    if rec.get("fx_status") != "fx_missing":
        if prev.get("bf") is None:
            return None
        return {**conversion, **_decode(rec), "processed_at_ms": prev["bf"]}  # this backfill again

    scratch = StateOverlay(state)  # written to state only when the result is complete
    if _held_for_fx(rec):
        _undo(scratch, prev, conversion_id)
        engine = _engine(conversion, partners, scratch, fx, now_ms, prev)
        decision = engine.decide()
        fields = engine.fields(decision)
        effects = _effects(engine, decision)
    else:
        engine = _engine(conversion, partners, scratch, fx, now_ms, prev)
        fields, effects = _fill_fx(engine, prev, conversion_id)
    if fields["fx_status"] == "fx_missing":
        return None
    scratch.commit()
    entry = _entry(int(prev["v"]), fields, now_ms, effects, conversion)
    entry.update(bf=now_ms, **{"in": prev["in"]})
    state[conv_key] = entry
    return {**conversion, **fields, "processed_at_ms": now_ms}


def _held_for_fx(rec: dict[str, Any]) -> bool:
    """Held because a rate was missing (the payout or its payout caps could not be known)."""
    return rec.get("payout_status") == "hold" and rec.get("payout_reason") == "fx_missing"


def _engine(conversion: dict[str, Any], partners: PartnerConfig, state: MutableMapping[str, Any], fx: FxRates,
            now_ms: int, prev: dict[str, Any] | None) -> _Engine:
    """The engine for one conversion: its day and month in the account timezone, its click number so far."""
    account = partners.account
    t_ms = int(conversion.get("event_time_ms") or conversion["received_at_ms"])
    local = datetime.fromtimestamp(t_ms // 1000, _zone(account.timezone))
    day, month = local.strftime("%Y-%m-%d"), local.strftime("%Y-%m")
    clk_key, clk_n = (None, None) if prev is None else (prev.get("clk"), prev.get("clk_n"))
    return _Engine(conversion, partners, state, fx, account.reporting_currency, day, month, t_ms, now_ms,
                   clk_key, clk_n)


def _effects(engine: _Engine, decision: _Decision) -> dict[str, Any]:
    effects = decision.effects
    if engine.clk_key is not None:
        effects.update(clk=engine.clk_key, clk_n=engine.clk_n)
    return effects


def _entry(version: int, fields: dict[str, Any], now_ms: int, effects: dict[str, Any],
           conversion: dict[str, Any]) -> dict[str, Any]:
    """The ``conv:`` entry; the input conversion is kept only while it waits for a rate."""
    entry = {"v": version, "rec": _encode(fields), "at": now_ms, **effects}
    if fields["fx_status"] == "fx_missing":
        entry["in"] = _encode(conversion)
    return entry


def _fill_fx(engine: _Engine, prev: dict[str, Any], cid: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The previous decision unchanged, with the reporting amounts it lacked (known ones kept).

    A payable conversion whose payout gains its reporting amount adds it to the payout
    usage of the caps it counted in and to its order's payment, as if known at the time.
    """
    rec = _decode(prev["rec"])
    d = _Decision(rec["payout"], rec["payout_currency"], rec["payout_status"], rec["payout_reason"],
                  rec["payout_rule"], rec["cap_decision"])
    if rec["payout_reporting"] is not None:
        d.reporting, d.reporting_known = rec["payout_reporting"], True
    fields = engine.fields(d)
    if rec["revenue_reporting"] is not None:
        for name in ("revenue_reporting", "revenue_fx_rate", "revenue_fx_date"):
            fields[name] = rec[name]
    if rec["payout_reporting"] is not None:
        for name in ("payout_fx_rate", "payout_fx_date"):
            fields[name] = rec[name]
    effects = {k: v for k, v in prev.items() if k not in _ENTRY_KEYS}
    gained = fields["payout_reporting"] if rec["payout_reporting"] is None else None
    counted = rec["payout_status"] == "payable" and prev.get("caps") is not None and prev.get("pr") is None
    if gained is not None and counted:
        state = engine.state
        for key in prev["caps"]:
            entry = state.get(key)
            if entry is not None:
                state[key] = dict(entry, p=str(Decimal(entry["p"]) + gained))
        effects["pr"] = str(gained)
        order_key = prev.get("order")
        payments = dict(state.get(order_key) or {}) if order_key is not None else {}
        if cid in payments and payments[cid].get("r") is None:
            payments[cid] = dict(payments[cid], r=str(gained))
            state[order_key] = payments
    return fields, effects


class StateOverlay(MutableMapping[str, Any]):
    """Writes kept apart from ``base`` until ``commit()``, which writes each key once.

    Two uses: a recomputation that cannot finish leaves no trace (``recompute_fx``); and
    the commission stage decides a whole envelope of conversions on one overlay, so a
    counter that every conversion of an offer touches (its daily cap, say) costs one table
    write, and one changelog record, per envelope instead of one per conversion.
    """

    def __init__(self, base: MutableMapping[str, Any]) -> None:
        self.base = base
        self.writes: dict[str, Any] = {}

    def get(self, key: str, default: Any = None) -> Any:
        return self.writes[key] if key in self.writes else self.base.get(key, default)

    def __getitem__(self, key: str) -> Any:
        value = self.get(key, _MISSING)
        if value is _MISSING:
            raise KeyError(key)
        return value

    def __setitem__(self, key: str, value: Any) -> None:
        self.writes[key] = value

    def __delitem__(self, key: str) -> None:
        raise TypeError("the commission engine never deletes state keys")

    def __iter__(self) -> Iterator[str]:
        raise TypeError("the commission engine never iterates its state")

    def __len__(self) -> int:
        raise TypeError("the commission engine never iterates its state")

    def commit(self) -> None:
        for key, value in self.writes.items():
            self.base[key] = value


_MISSING = object()


class _Engine:
    """One conversion's decision; reads and writes ``state`` through ``_add``/``_put`` only."""

    def __init__(self, conversion: dict[str, Any], partners: PartnerConfig, state: MutableMapping[str, Any],
                 fx: FxRates, reporting: str, day: str, month: str, t_ms: int, now_ms: int,
                 clk_key: str | None, clk_n: int | None) -> None:
        self.c = conversion
        self.partners = partners
        self.state = state
        self.fx = fx
        self.reporting = reporting
        self.day = day
        self.month = month
        self.t_ms = t_ms
        self.now_ms = now_ms
        self.clk_key = clk_key
        self.clk_n = clk_n
        amount = conversion.get("amount")
        self.revenue: Decimal | None = None if amount is None else Decimal(str(amount))
        self.revenue_currency: str | None = conversion.get("currency") or None

    # ---- FX

    def rate(self, currency: str | None) -> tuple[Decimal, str] | None:
        """(rate into the reporting currency, its date) for the conversion's day, or None."""
        if currency is None:
            return None
        if currency == self.reporting:
            return _ONE, self.day
        found = self.fx.lookup(currency, self.day)
        return None if found is None else (found.rate, found.date)

    def fields(self, d: _Decision) -> dict[str, Any]:
        missing = False
        revenue_reporting = revenue_rate = revenue_date = None
        if self.revenue is not None:
            found = self.rate(self.revenue_currency)
            if found is None:
                missing = True
            else:
                revenue_rate, revenue_date = found
                revenue_reporting = round_money(self.revenue * revenue_rate, self.reporting)
        payout_rate = payout_date = None
        payout_reporting = None
        found = self.rate(d.currency)
        if found is not None:
            payout_rate, payout_date = found
        if d.reporting_known:
            payout_reporting = d.reporting
        elif found is not None:
            payout_reporting = round_money(d.payout * payout_rate, self.reporting)
        if payout_reporting is None:
            missing = True
        return {
            "payout": d.payout, "payout_currency": d.currency, "payout_status": d.status,
            "payout_reason": d.reason, "payout_rule": d.rule, "reporting_currency": self.reporting,
            "revenue_reporting": revenue_reporting, "payout_reporting": payout_reporting,
            "revenue_fx_rate": revenue_rate, "revenue_fx_date": revenue_date,
            "payout_fx_rate": payout_rate, "payout_fx_date": payout_date,
            "fx_status": "fx_missing" if missing else "ok", "cap_decision": d.cap_decision,
            **d.adopt,
        }

    # ---- the decision

    def none(self, reason: str, rule: str | None = None) -> _Decision:
        return _Decision(round_money(_ZERO, self.reporting), self.reporting, "none", reason, rule)

    def decide(self) -> _Decision:
        c = self.c
        affiliate_id = c.get("affiliate_id") if c.get("attributed") else None
        offer_id = c.get("offer_id")
        offer = self.partners.offer(offer_id) if offer_id else None
        if int(c.get("sign") or 1) == -1 and c.get("status") != "rejected":
            # Before attribution: advertisers send refunds with the order id, often without the click.
            return self.clawback(offer, affiliate_id)
        if not affiliate_id:
            return self.none("not_attributed")
        if c.get("status") == "rejected":
            return self.none("status_rejected")
        affiliate = self.partners.affiliate(affiliate_id)
        event = c.get("event")
        rule: PayoutRule | None = None
        origin = ""
        if offer is not None and affiliate is not None:
            rule = affiliate.override(offer.offer_id, event)
            origin = f"affiliate {affiliate_id} override offer {offer.offer_id} {event}"
        if rule is None and offer is not None:
            rule = offer.payouts.get(event)
            origin = f"offer {offer.offer_id} {event}"
        if rule is None or offer is None:
            return self.none("no_payout_rule")

        currency = rule.currency if rule.kind == "cpa" else (
            rule.currency if rule.kind == "cpa_plus_revshare" else (self.revenue_currency or self.reporting))
        assert currency is not None  # the loader requires a currency with a cpa amount

        def held(reason: str, text: str | None = None, status: str = "hold",
                 cap_decision: str | None = None) -> _Decision:
            d = _Decision(round_money(_ZERO, currency), currency, status, reason, text or f"{origin}: "
                          f"{_describe(rule)}", cap_decision)
            d.effects["sticky"] = True
            return d

        if affiliate is not None and affiliate.paused:
            return held("affiliate_paused")
        quality = self.quality(offer)
        if quality is not None:
            return held(quality)

        tier_key = f"aff:{offer.offer_id}|{affiliate_id}|{self.month}"
        approved = c.get("status") == "approved"
        count = int(self.state.get(tier_key) or 0) + (1 if approved else 0)
        tier = rule.tier_for(count)
        payout, text = self.payout(rule, tier)
        text = f"{origin}: {text}"
        if payout is None:
            return held("fx_missing", text)
        rate = self.rate(currency)
        payout_reporting = None if rate is None else round_money(payout * rate[0], self.reporting)

        scopes = [(f"offer:{offer.offer_id}", "cap_", offer.caps),
                  (f"affiliate:{affiliate_id}@{offer.offer_id}", "affiliate_cap_", offer.affiliate_caps)]
        caps = [(scope, prefix, cap) for scope, prefix, cap in scopes if cap is not None]
        if payout_reporting is None and any(cap.has_payout_caps for _, _, cap in caps):
            return held("fx_missing", text)
        over = self.over_cap(caps, payout_reporting)
        if over is not None:
            reason, on_cap, cap_text = over
            return held(reason, text, "rejected" if on_cap == "reject" else "hold", cap_text)

        # payable: count it everywhere it counts
        d = _Decision(payout, currency, "payable", None, text)
        counted = []
        for scope, _, cap in caps:
            for period, label in (("day", self.day), ("month", self.month)):
                key = f"cap:{scope}:{period}:{label}"
                entry = self.state.get(key) or {"n": 0, "p": "0"}
                p = Decimal(entry["p"]) + (payout_reporting or _ZERO)
                self.state[key] = {"n": int(entry["n"]) + 1, "p": str(p), "at": self.now_ms}
                counted.append(key)
        d.cap_decision = self.cap_text("counted", caps) if caps else None
        d.effects.update(caps=counted, pr=None if payout_reporting is None else str(payout_reporting))
        if approved:
            self.state[tier_key] = int(self.state.get(tier_key) or 0) + 1
            d.effects["tier"] = tier_key
        order_id, advertiser_id = c.get("order_id"), c.get("advertiser_id")
        if order_id:
            order_key = f"order:{advertiser_id}|{order_id}"
            payments = dict(self.state.get(order_key) or {})
            payments[c["conversion_id"]] = {"p": str(payout), "c": currency, "t": self.t_ms, "a": affiliate_id,
                                            "o": offer.offer_id,
                                            "r": None if payout_reporting is None else str(payout_reporting)}
            self.state[order_key] = payments
            d.effects["order"] = order_key
        return d

    def quality(self, offer: Offer) -> str | None:
        """The quality rule the conversion breaks, or None. Counts the conversion per click and event."""
        q = offer.quality
        if q is None:
            return None
        seconds = self.c.get("click_to_conversion_s")
        if seconds is not None:
            if q.min_click_to_conversion_s is not None and int(seconds) < q.min_click_to_conversion_s:
                return "too_fast"
            if q.max_click_to_conversion_s is not None and int(seconds) > q.max_click_to_conversion_s:
                return "too_slow"
        click_id = self.c.get("click_id")
        if q.max_conversions_per_click is not None and click_id:
            key = f"click:{click_id}|{self.c.get('event')}"
            if self.clk_key != key or self.clk_n is None:  # not counted by an earlier version of this conversion
                self.clk_n = int(self.state.get(key) or 0) + 1
                self.state[key] = self.clk_n
                self.clk_key = key
            if self.clk_n > q.max_conversions_per_click:
                return "max_conversions_per_click"
        return None

    def payout(self, rule: PayoutRule, tier: Tier | None) -> tuple[Decimal | None, str]:
        """(payout rounded in the rule's payout currency or None without a needed rate, the rule as text)."""
        amount = rule.amount if tier is None or tier.amount is None else tier.amount
        percent = rule.percent if tier is None or tier.percent is None else tier.percent
        prefix = "" if tier is None else f"tier >={tier.min_approved}: "
        revenue = self.revenue if self.revenue is not None else _ZERO
        rev_currency = self.revenue_currency or self.reporting
        if rule.kind == "cpa":
            assert amount is not None and rule.currency is not None
            return round_money(amount, rule.currency), f"{prefix}cpa {amount} {rule.currency}"
        assert percent is not None
        part = percent / 100 * revenue
        share = f"{percent}% of {revenue} {rev_currency}"
        if rule.kind == "revshare":
            return round_money(part, rev_currency), f"{prefix}revshare {share}"
        assert amount is not None and rule.currency is not None
        text = f"{prefix}cpa_plus_revshare {amount} {rule.currency} + {share}"
        if rev_currency != rule.currency and part != 0:
            from_rate, to_rate = self.rate(rev_currency), self.rate(rule.currency)
            if from_rate is None or to_rate is None:
                return None, f"{text} (no FX rate on {self.day} to convert it to {rule.currency})"
            part = part * from_rate[0] / to_rate[0]
            text += (f" = {round_money(part, rule.currency)} {rule.currency} at {rev_currency} {from_rate[0]} "
                     f"({from_rate[1]}) / {rule.currency} {to_rate[0]} ({to_rate[1]}) {self.reporting}")
        return round_money(amount + part, rule.currency), text

    def over_cap(self, caps: list[tuple[str, str, Caps]],
                 payout_reporting: Decimal | None) -> tuple[str, str, str] | None:
        """(reason, on_cap, cap_decision) for the first limit this conversion would exceed, or None."""
        for scope, prefix, cap, name, kind, period, label, limit, entry in self._limits(caps):
            if kind == "conversions":
                used = int(entry["n"])
                if used + 1 > limit:
                    return f"{prefix}{name}", cap.on_cap, f"over {scope} {period} {label} {used}/{limit}"
            else:
                spent = Decimal(entry["p"])
                assert payout_reporting is not None  # checked by the caller
                if spent + payout_reporting > limit:
                    return (f"{prefix}{name}", cap.on_cap, f"over {scope} {period} {label} payout "
                            f"{spent}+{payout_reporting}/{limit} {self.reporting}")
        return None

    def _limits(self, caps: list[tuple[str, str, Caps]]) -> list[tuple[Any, ...]]:
        """Every configured limit with its period label and current usage entry, in check order."""
        out = []
        for scope, prefix, cap in caps:
            for name, kind, period in _CAP_CHECKS:
                limit = getattr(cap, name)
                if limit is None:
                    continue
                label = self.day if period == "day" else self.month
                entry = self.state.get(f"cap:{scope}:{period}:{label}") or {"n": 0, "p": "0"}
                out.append((scope, prefix, cap, name, kind, period, label, limit, entry))
        return out

    def cap_text(self, verb: str, caps: list[tuple[str, str, Caps]]) -> str:
        """Usage of every configured limit (after counting), e.g. ``counted offer:o1 day 2026-12-07 3/100``."""
        parts = []
        for scope, _, _, _, kind, period, label, limit, entry in self._limits(caps):
            if kind == "conversions":
                parts.append(f"{verb} {scope} {period} {label} {entry['n']}/{limit}")
            else:
                parts.append(f"{verb} {scope} {period} {label} payout {entry['p']}/{limit} {self.reporting}")
        return "; ".join(parts)

    def clawback(self, offer: Offer | None, affiliate_id: str | None) -> _Decision:
        """A refund or chargeback: minus what this affiliate was paid for the order within the window.

        A reversal without its click (``affiliate_id`` None) is matched by the order alone: it
        takes back from the affiliate of the order's latest payment, and the record adopts
        that payment's affiliate and offer (``adopt``), so reports by affiliate net to zero.
        """
        c = self.c
        order_id, advertiser_id = c.get("order_id"), c.get("advertiser_id")
        if not order_id:
            return self.none("clawback", "clawback: no order_id, nothing to take back")
        order_key = f"order:{advertiser_id}|{order_id}"
        payments = dict(self.state.get(order_key) or {})
        adopt: dict[str, Any] = {}
        if affiliate_id is None and payments:
            latest_payment = max(payments.values(), key=lambda p: int(p["t"]))
            affiliate_id = latest_payment.get("a")
            adopt = {"affiliate_id": affiliate_id}
            if not c.get("offer_id") and latest_payment.get("o"):
                adopt["offer_id"] = latest_payment["o"]
                offer = self.partners.offer(latest_payment["o"])
        if affiliate_id is None:
            return self.none("not_attributed", f"reversal of order {advertiser_id}|{order_id}: no click and "
                                               "nothing paid for the order")
        own = {cid: p for cid, p in payments.items() if p.get("a") == affiliate_id}
        days = offer.clawback_days if offer is not None else DEFAULT_CLAWBACK_DAYS
        window_ms = days * _DAY_MS
        inside = {cid: p for cid, p in own.items() if self.t_ms - int(p["t"]) <= window_ms}
        if not inside:
            if own:
                d = self.none("clawback_window_passed",
                              f"clawback of order {advertiser_id}|{order_id}: paid more than {days} days before")
            else:
                d = self.none("clawback", f"clawback of order {advertiser_id}|{order_id}: nothing paid")
            d.adopt = adopt
            return d
        latest = max(inside.values(), key=lambda p: int(p["t"]))
        currency = latest["c"]
        taken = {cid: p for cid, p in inside.items() if p["c"] == currency}
        paid = sum((Decimal(p["p"]) for p in taken.values()), _ZERO)
        d = _Decision(round_money(-paid, currency), currency, "payable", "clawback",
                      f"clawback of order {advertiser_id}|{order_id}: -{paid} {currency} paid within "
                      f"{days} days")
        if all(p.get("r") is not None for p in taken.values()):
            d.reporting = round_money(-sum((Decimal(p["r"]) for p in taken.values()), _ZERO), self.reporting)
            d.reporting_known = True
        for cid in taken:
            del payments[cid]
        self.state[order_key] = payments
        d.effects["claw"] = {"order": order_key, "paid": taken}
        d.adopt = adopt
        return d


def _undo(state: MutableMapping[str, Any], prev: dict[str, Any], cid: str) -> None:
    """Take back what the previous version of a conversion counted (a held one counted nothing)."""
    pr = Decimal(prev["pr"]) if prev.get("pr") is not None else _ZERO
    for key in prev.get("caps") or ():
        entry = state.get(key)
        if entry is not None:
            state[key] = dict(entry, n=max(int(entry["n"]) - 1, 0), p=str(Decimal(entry["p"]) - pr))
    tier_key = prev.get("tier")
    if tier_key is not None:
        state[tier_key] = max(int(state.get(tier_key) or 0) - 1, 0)
    order_key = prev.get("order")
    if order_key is not None:
        payments = dict(state.get(order_key) or {})
        if payments.pop(cid, None) is not None:
            state[order_key] = payments
    claw = prev.get("claw")
    if claw is not None:
        payments = dict(state.get(claw["order"]) or {})
        payments.update(claw["paid"])
        state[claw["order"]] = payments


def _describe(rule: PayoutRule) -> str:
    parts = [rule.kind]
    if rule.amount is not None:
        parts.append(f"{rule.amount} {rule.currency}")
    if rule.percent is not None:
        parts.append(f"{rule.percent}% of revenue")
    return " ".join(parts)


def _encode(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Decimal) else v) for k, v in fields.items()}


def _decode_input(stored: dict[str, Any]) -> dict[str, Any]:
    """The input conversion kept in a ``conv:`` entry, its amount an exact Decimal again."""
    out = dict(stored)
    if out.get("amount") is not None:
        out["amount"] = Decimal(out["amount"])
    return out


def _decode(rec: dict[str, Any]) -> dict[str, Any]:
    out = dict(rec)
    for name in _DECIMAL_FIELDS:
        if out.get(name) is not None:
            out[name] = Decimal(out[name])
    return out
