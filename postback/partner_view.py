"""One postback's parameters as one advertiser's configuration reads them: the *aliased view*.

Why one module: the ingester (required fields, the raw record's Kafka key), the verifier
(which parameter holds the token, the signature, the timestamp, the key id), the
normaliser and the dedupe key must all read a postback the same way. When each of them
applied aliases on its own, an aliased event was refused at the door and an aliased
token was never seen. Everything here is pure and cheap: it runs on the ingester's hot
path and again in the processor.

Guarantees:

- ``advertiser_id`` is always read literally (it selects the configuration that holds
  the aliases; the loader refuses an alias to or from it).
- Aliases apply once, not transitively, to every parameter. The first value sent for a
  canonical name is the one used; a singleton name sent more than once (under any of
  its spellings) is listed in ``repeated``, never guessed.
- Defaults fill a canonical name only when the postback does not carry it, or carries
  it blank: a value that was sent always wins.
- The signature is computed over the parameters exactly as sent; this view never
  changes what is signed (see ``docs/signing.md``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import quote

if TYPE_CHECKING:  # attribute access only; keeps the hot path import-light
    from postback.partner_model import Advertiser

__all__ = [
    "AUTH_PARAMS",
    "CORE_PARAMS",
    "DEFAULTABLE_PARAMS",
    "SINGLETON_PARAMS",
    "PartnerView",
    "order_key",
    "read",
    "routing_key",
]

#: Parameters that authenticate a request and are not part of the conversion.
AUTH_PARAMS = frozenset({"ts", "sig", "kid", "token"})
#: Canonical conversion parameters; everything else is kept as extras.
CORE_PARAMS = frozenset({"advertiser_id", "event", "click_id", "order_id", "amount", "currency", "status",
                         "event_time", "customer_id", "period", "offer_id"})
#: Canonical names that may be sent at most once (after aliases).
SINGLETON_PARAMS = CORE_PARAMS | AUTH_PARAMS
#: Canonical names an advertiser may give a default value (``defaults = {...}``).
DEFAULTABLE_PARAMS = ("event", "currency", "status", "offer_id")


@dataclass(frozen=True)
class PartnerView:
    """The canonical fields of one postback.

    ``fields``: canonical name -> first value sent (aliases applied), then defaults.
    ``sent_as``: canonical name -> the parameter name it was read from, or
    ``"(default)"`` when the advertiser's default filled it. ``repeated``: singleton
    canonical names that were sent more than once.
    """

    fields: Mapping[str, str]
    sent_as: Mapping[str, str]
    repeated: tuple[str, ...]

    def get(self, name: str) -> str | None:
        """The value of canonical ``name``, or None."""
        return self.fields.get(name)


DEFAULT_SOURCE = "(default)"


def read(params: Sequence[tuple[str, str]], adv: Advertiser | None) -> PartnerView:
    """The aliased view of ``params`` for ``adv`` (None: no aliases, no defaults)."""
    aliases = adv.aliases if adv is not None else {}
    fields: dict[str, str] = {}
    sent_as: dict[str, str] = {}
    repeated: list[str] = []
    for raw, value in params:
        name = "advertiser_id" if raw == "advertiser_id" else aliases.get(raw, raw)
        if name in fields:
            if name in SINGLETON_PARAMS and name not in repeated:
                repeated.append(name)
            continue
        fields[name] = value
        sent_as[name] = raw
    if adv is not None:
        for name, value in adv.defaults.items():
            if not fields.get(name, "").strip():
                fields[name] = value
                sent_as[name] = DEFAULT_SOURCE
    return PartnerView(fields, sent_as, tuple(repeated))


def _quoted(parts: Sequence[str]) -> str:
    return "|".join(quote(p, safe="") for p in parts)


def order_key(advertiser_id: str, event: str, order_id: str | None, period: str | None, click_id: str | None,
              one_time_events: Sequence[str]) -> tuple[str, str] | None:
    """(key, kind) of the conversion a postback updates, or None when only the request identifies it.

    kind ``order``: (advertiser, event, order_id[, period]); kind ``one_time``: a one-time
    event without an order id, (advertiser, event, "click", click_id). Every update of
    one order has the same key, whatever the platform calls its fields.
    """
    if order_id:
        return _quoted([advertiser_id, event, order_id] + ([period] if period else [])), "order"
    if click_id and event in one_time_events:
        return _quoted([advertiser_id, event, "click", click_id]), "one_time"
    return None


def _stripped(view: PartnerView, name: str) -> str | None:
    return (view.get(name) or "").strip() or None


def routing_key(view: PartnerView, adv: Advertiser) -> str | None:
    """The Kafka key of a raw postback, computed at ingest from the aliased view.

    The dedupe key of the conversion it updates (``order_key``), so all updates of one
    order land on one partition and are verified in the order they were received.
    None when it cannot be computed here (unmapped event, no order id and not a
    one-time event): the caller keys by receipt id, and the dedupe stage's ordering
    rule (``processors.dedupe``) still keeps the order's final status right.
    """
    raw_event = _stripped(view, "event")
    event = adv.map_event(raw_event) if raw_event else None
    if event is None:
        return None
    found = order_key(adv.advertiser_id, event, _stripped(view, "order_id"), _stripped(view, "period"),
                      _stripped(view, "click_id"), adv.one_time_events)
    return None if found is None else found[0]
