"""How one postback would be read: the ingester's answer, aliases, auth, event, status, amount, key, partition.

Why: an advertiser moving from another tracker pastes its own URL template. Before
going live, the network's integration engineer wants to see, for one real URL, what
every parameter becomes and why a postback would be refused, without sending it
through Kafka. This runs the very functions the ingester and the verifier run
(`ingest.validation`, `postback.partner_view`, `processors.signing`,
`processors.normalize`, `processors.dedupe`); nothing is sent anywhere.

Guarantee: no secret is printed. Values read as a token or signature are masked, and
the verdict on them is only "matches" or the rejection reason.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from confluent_kafka import murmur2

from ingest import validation as v
from postback.partner_view import DEFAULT_SOURCE, read, routing_key
from postback.partners import PartnerConfig
from processors.dedupe import conversion_id, dedupe_key
from processors.normalize import Invalid, normalize
from processors.signing import SIGNATURE_HEADER, AuthFailed, authenticate

__all__ = ["Explanation", "explain", "render"]

#: Canonical names whose values are never printed.
_MASKED = frozenset({"token", "sig"})


@dataclass
class Explanation:
    """What the pipeline would do with one postback. ``ingest`` is the HTTP answer (202 or 400)."""

    advertiser_id: str
    preset: str | None
    ingest_status: int
    ingest_errors: list[dict[str, str]] = field(default_factory=list)
    parameters: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    auth: dict[str, Any] = field(default_factory=dict)
    outcome: dict[str, Any] = field(default_factory=dict)
    kafka: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"advertiser_id": self.advertiser_id, "preset": self.preset,
                "ingest": {"status": self.ingest_status, "errors": self.ingest_errors},
                "parameters": self.parameters, "notes": self.notes, "auth": self.auth, "outcome": self.outcome,
                "kafka": self.kafka}


def _query(text: str) -> str:
    """The raw query string of a URL, or the text itself when it is a query string."""
    text = text.strip()
    if "://" in text or text.startswith("/"):
        return urlsplit(text).query
    return text[1:] if text.startswith("?") else text


def explain(partners: PartnerConfig, advertiser_id: str, url_or_query: str, partitions: int,
            headers: Mapping[str, str] | None = None, now_ms: int | None = None,
            remote_ip: str = "127.0.0.1") -> Explanation:
    """Read one GET postback (a URL or its query string) as ``advertiser_id``'s configuration reads it.

    A postback without ``advertiser_id`` gets it appended, as the ingester requires it,
    with a note. Raises ``ValueError`` for an advertiser that is not configured.
    """
    adv = partners.advertiser(advertiser_id)
    if adv is None:
        known = ", ".join(partners.advertisers) or "none"
        raise ValueError(f"advertiser {advertiser_id!r} is not configured (known: {known})")
    now = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    out = Explanation(advertiser_id, adv.preset, 202)
    try:
        params = v.parse_urlencoded(_query(url_or_query))
    except v.RejectedInput as exc:
        out.ingest_status, out.ingest_errors = 400, [e.as_dict() for e in exc.errors]
        return out
    sent = v.first(params, "advertiser_id")
    if sent is None:
        params.append(("advertiser_id", advertiser_id))
        out.notes.append(f"the postback carries no advertiser_id: add advertiser_id={advertiser_id} to the URL "
                         "template (explained here as if it did)")
    elif sent != advertiser_id:
        out.notes.append(f"the postback says advertiser_id={sent!r}: it would be read as that advertiser")
    view = read(params, adv)
    for raw, value in params:
        name = adv.canonical_name(raw)
        used = view.sent_as.get(name) == raw
        out.parameters.append({"sent": raw, "value": "(hidden)" if name in _MASKED else value, "as": name,
                               "used": "yes" if used else "no: sent more than once, the first value counts"})
    for name, value in view.fields.items():
        if view.sent_as[name] == DEFAULT_SOURCE:
            out.parameters.append({"sent": DEFAULT_SOURCE, "value": value, "as": name, "used": "yes"})
    try:
        v.check_postback(params, adv)
    except v.RejectedInput as exc:
        out.ingest_status, out.ingest_errors = 400, [e.as_dict() for e in exc.errors]
        return out
    key = routing_key(view, adv)
    out.kafka = {"key": key or "(the receipt id: no order key can be computed at ingest)",
                 "partition": murmur2(key.encode(), partitions) if key else "(spread by receipt id)",
                 "partitions": partitions}
    signature_headers = {k.lower(): val for k, val in (headers or {}).items()}
    auth = authenticate(adv, params, signature_headers, b"", None, remote_ip, now)
    if isinstance(auth, AuthFailed):
        out.auth = {"verdict": "rejected", "reason": auth.reason, "detail": auth.detail}
        out.outcome = {"outcome": "rejection", "reason": auth.reason}
        return out
    out.auth = {"verdict": "accepted", "mode": auth.mode, "key_id": auth.key_id,
                "read_from": _credential_source(view.sent_as, auth.mode, adv.token_header)}
    try:
        n = normalize(params, adv)
    except Invalid as exc:
        out.outcome = {"outcome": "rejection", "reason": exc.reason, "detail": exc.detail}
        return out
    dkey, kind = dedupe_key(n, adv, auth.replay_key)
    out.outcome = {"outcome": "conversion (unless it repeats an earlier one)", "event": n.event,
                   "status": n.status, "raw_status": view.get("status"),
                   "amount": None if n.amount is None else str(n.amount), "currency": n.currency,
                   "click_id": n.click_id, "order_id": n.order_id, "dedupe_key": dkey, "dedupe_kind": kind,
                   "conversion_id": conversion_id(dkey)}
    return out


def _credential_source(sent_as: Mapping[str, str], mode: str, token_header: str | None) -> str:
    """Where the accepted token or signature was read from: a parameter name as sent, or a header."""
    if mode == "token":
        return sent_as.get("token") or f"header {token_header}"
    return sent_as.get("sig") or f"header {SIGNATURE_HEADER}"


def render(e: Explanation) -> str:
    """The explanation as text for a terminal."""
    lines = [f"advertiser     {e.advertiser_id}" + (f" (preset {e.preset})" if e.preset else "")]
    lines += [f"note           {note}" for note in e.notes]
    if e.parameters:
        lines.append("parameters     sent -> read as")
        for p in e.parameters:
            used = "" if p["used"] == "yes" else f"   [{p['used']}]"
            sent = f"{p['sent']} {p['value']}" if p["sent"] == DEFAULT_SOURCE else f"{p['sent']}={p['value']}"
            lines.append(f"  {sent}  ->  {p['as']}{used}")
    if e.ingest_status != 202:
        reasons = ", ".join(f"{x['field']}: {x['reason']}" for x in e.ingest_errors)
        lines.append(f"ingester       400 rejected ({reasons})")
        return "\n".join(lines)
    lines.append("ingester       202 accepted")
    lines.append(f"kafka key      {e.kafka['key']}")
    lines.append(f"partition      {e.kafka['partition']} of {e.kafka['partitions']} (raw-postbacks)")
    if e.auth.get("verdict") == "accepted":
        kid = f", key id {e.auth['key_id']}" if e.auth.get("key_id") else ""
        lines.append(f"auth           {e.auth['mode']} ({e.auth['read_from']}{kid}): matches")
    else:
        lines.append(f"auth           rejected: {e.auth.get('reason')}: {e.auth.get('detail')}")
        return "\n".join(lines)
    o = e.outcome
    if o.get("outcome") == "rejection":
        lines.append(f"outcome        rejection: {o['reason']}: {o.get('detail', '')}")
        return "\n".join(lines)
    raw_status = f" (sent {o['raw_status']!r})" if o.get("raw_status") is not None else " (none sent)"
    lines += [f"event          {o['event']}",
              f"status         {o['status']}{raw_status}",
              f"amount         {o['amount'] or '-'} {o['currency'] or ''}".rstrip(),
              f"click id       {o['click_id'] or '-'}",
              f"order id       {o['order_id'] or '-'}",
              f"dedupe key     {o['dedupe_key']} ({o['dedupe_kind']})",
              f"conversion id  {o['conversion_id']}"]
    return "\n".join(lines)
