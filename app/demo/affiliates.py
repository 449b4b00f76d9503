"""The demo's affiliate endpoints: local servers that receive the outbound postbacks, and their report.

`postback run` delivers every conversion of an affiliate with a
`[affiliates.<id>.postbacks.<name>]` table to that endpoint (sinks/outbound/delivery.py).
deploy/demo-partners.toml points four affiliates at fixed loopback ports that this module
serves while the demo runs, each with its own behaviour (`BEHAVIOURS`):

- aff-search, ``healthy``: answers 200 at once; its requests are signed (HMAC, as
  docs/signing.md describes) and the signature is checked here;
- aff-coupons, ``recovering``: answers 503 to the first `RECOVER_AFTER` requests of each
  idempotency key, then 200, so every key is delivered after retries;
- aff-influencer, ``slow``: answers 200 after `SLOW_S` seconds (within its timeout);
- aff-cashback, ``bad_request``: always answers 400, a permanent failure: each key is
  dead-lettered after one attempt.

The servers (`AffiliateServers`) record every request. At the end `collect_deliveries`
reads this run's rows of `outbound_deliveries` per affiliate, `delivery_checks` compares
them and what the servers received with the behaviours (pure), and `format_deliveries`
prints them (pure).
"""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from postback.partner_model import PartnerConfig
from postback.signing import canonical_query

#: Requests of one idempotency key that the recovering endpoint answers 503.
RECOVER_AFTER = 2
#: How long the slow endpoint takes to answer, seconds.
SLOW_S = 1.5
#: behaviour name -> what it is, in the summary.
BEHAVIOURS = {
    "healthy": "200 at once, signed",
    "recovering": f"503 for the first {RECOVER_AFTER} requests of a key, then 200",
    "slow": f"200 after {SLOW_S:g} s",
    "bad_request": "always 400",
}
#: The demo's endpoints: (affiliate id, behaviour, loopback port). deploy/demo-partners.toml
#: names the same ports.
DEMO_ENDPOINTS: tuple[tuple[str, str, int], ...] = (
    ("aff-search", "healthy", 18181),
    ("aff-coupons", "recovering", 18182),
    ("aff-influencer", "slow", 18183),
    ("aff-cashback", "bad_request", 18184),
)


def answer(behaviour: str, nth: int) -> tuple[int, float]:
    """(HTTP status, delay in seconds) of the `nth` (1-based) request of one key to a `behaviour` endpoint."""
    if behaviour == "healthy":
        return 200, 0.0
    if behaviour == "recovering":
        return (503 if nth <= RECOVER_AFTER else 200), 0.0
    if behaviour == "slow":
        return 200, SLOW_S
    if behaviour == "bad_request":
        return 400, 0.0
    raise ValueError(f"unknown behaviour {behaviour!r}")


def signature_ok(query: str, secret: str | None) -> bool:
    """Whether a GET query carries a valid `sig` (HMAC-SHA256 of the canonical query without `sig`)."""
    if not secret:
        return False
    pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
    sigs = [v for k, v in pairs if k == "sig"]
    if len(sigs) != 1 or not any(k == "ts" for k, _ in pairs):
        return False
    unsigned = [(k, v) for k, v in pairs if k != "sig"]
    expected = hmac.new(secret.encode(), canonical_query(unsigned).encode(), hashlib.sha256).hexdigest()
    return hmac.compare_digest(sigs[0].lower(), expected)


@dataclass(frozen=True)
class Received:
    """One request a demo endpoint received."""

    key: str                   # Idempotency-Key header
    status: int                # what the endpoint answered
    signed: bool               # the signature checked out (endpoints with a secret only)


class AffiliateServer:
    """One loopback endpoint with a behaviour; records what it received."""

    def __init__(self, affiliate_id: str, behaviour: str, port: int, secret: str | None = None,
                 host: str = "127.0.0.1") -> None:
        answer(behaviour, 1)  # validates the behaviour
        self.affiliate_id = affiliate_id
        self.behaviour = behaviour
        self.secret = secret
        self.received: list[Received] = []
        self._seen: Counter[str] = Counter()
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                key = self.headers.get("Idempotency-Key", "")
                query = urllib.parse.urlsplit(self.path).query
                with outer._lock:
                    outer._seen[key] += 1
                    status, delay = answer(outer.behaviour, outer._seen[key])
                    signed = signature_ok(query, outer.secret) if outer.secret else False
                    outer.received.append(Received(key, status, signed))
                if delay:
                    time.sleep(delay)
                body = b"ok" if status == 200 else b"demo endpoint says no"
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = _handle  # noqa: N815 - http.server's names
            do_POST = _handle  # noqa: N815

        try:
            self.server = ThreadingHTTPServer((host, port), Handler)
        except OSError as err:
            raise RuntimeError(f"the demo's endpoint for {affiliate_id} cannot listen on {host}:{port} ({err}): "
                               "is another `postback demo` running?") from err
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, name=f"demo-{affiliate_id}",
                                        daemon=True)
        self._thread.start()

    def snapshot(self) -> list[Received]:
        with self._lock:
            return list(self.received)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=5)


class AffiliateServers:
    """The demo's endpoints (`DEMO_ENDPOINTS`) of the affiliates that `config` sends postbacks to."""

    def __init__(self, config: PartnerConfig, endpoints: Sequence[tuple[str, str, int]] = DEMO_ENDPOINTS) -> None:
        self.servers: dict[str, AffiliateServer] = {}
        try:
            for affiliate_id, behaviour, port in endpoints:
                affiliate = config.affiliate(affiliate_id)
                if affiliate is None or not affiliate.postbacks:
                    continue
                ports = [urllib.parse.urlsplit(ep.url).port for ep in affiliate.postbacks.values()]
                if port not in ports:
                    continue
                secret = next((ep.secret for ep in affiliate.postbacks.values() if ep.secret), None)
                self.servers[affiliate_id] = AffiliateServer(affiliate_id, behaviour, port, secret)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for server in self.servers.values():
            server.close()
        self.servers.clear()

    def __enter__(self) -> AffiliateServers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- report


@dataclass(frozen=True)
class DeliveryRow:
    """Outbound postbacks of this run to one affiliate: the delivery log and what its endpoint received."""

    affiliate_id: str
    behaviour: str
    conversions: int           # this run's conversions of the affiliate (the latest versions)
    keys: int                  # idempotency keys expected (conversion_id:version of those versions)
    notified: int              # of those conversions, with at least one attempt
    delivered: int             # keys ending delivered
    dead: int                  # keys ending dead
    retries: int               # attempts with outcome retry
    attempts: int
    p50_ms: float | None       # latency_ms of delivered attempts
    p99_ms: float | None
    received: int              # requests the local endpoint received about this run's conversions
    received_keys: int         # distinct idempotency keys among them (every version)
    ok_once: int = 0           # keys the endpoint answered 200 exactly once
    ok_more: int = 0           # keys answered 200 more than once
    bad_signatures: int = 0    # 200 answers whose signature did not check out (signed endpoints)
    single_attempt_dead: int = 0   # dead keys with exactly one attempt
    missing: tuple[str, ...] = field(default=())  # expected keys without a final row (a few, for the message)


def delivery_stats(expected_keys: Sequence[str], log: Sequence[tuple[str, int, str, int | None]],
                   received: Sequence[Received]) -> dict[str, Any]:
    """The counts of a `DeliveryRow` from the expected keys, the log rows (key, attempt, outcome,
    latency_ms) and what the endpoint received."""
    final: dict[str, str] = {}
    attempts: Counter[str] = Counter()
    latencies: list[int] = []
    for key, _attempt, outcome, latency in log:
        attempts[key] += 1
        if outcome in ("delivered", "dead"):
            final[key] = outcome
        if outcome == "delivered" and latency is not None:
            latencies.append(int(latency))
    latencies.sort()

    def pct(q: float) -> float | None:
        if not latencies:
            return None
        return float(latencies[min(len(latencies) - 1, int(round(q * (len(latencies) - 1))))])

    expected = list(dict.fromkeys(expected_keys))
    # Only this run's conversions (every version of them): the service may also deliver older runs'.
    ours = {k.rsplit(":", 1)[0] for k in expected}
    received = [r for r in received if r.key.rsplit(":", 1)[0] in ours]
    ok = Counter(r.key for r in received if r.status == 200)
    return {
        "keys": len(expected),
        "notified": len({k.rsplit(":", 1)[0] for k in expected if attempts[k]}),
        "delivered": sum(1 for k in expected if final.get(k) == "delivered"),
        "dead": sum(1 for k in expected if final.get(k) == "dead"),
        "retries": sum(1 for _k, _a, o, _l in log if o == "retry"),
        "attempts": len(log),
        "p50_ms": pct(0.5), "p99_ms": pct(0.99),
        "received": len(received), "received_keys": len({r.key for r in received}),
        "ok_once": sum(1 for k in expected if ok[k] == 1),
        "ok_more": sum(1 for k in expected if ok[k] > 1),
        "bad_signatures": sum(1 for r in received if r.status == 200 and not r.signed),
        "single_attempt_dead": sum(1 for k in expected if final.get(k) == "dead" and attempts[k] == 1),
        "missing": tuple(k for k in expected if k not in final)[:3],
    }


def _q(name: str) -> str:
    from sinks.migrations import quote_identifier

    return quote_identifier(name)


def _literal(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _expected_keys(client: Any, db: str, run_conversions: str, affiliate_id: str) -> list[str]:
    rows = client.query(f"SELECT conversion_id, version FROM {db}.conversions FINAL "
                        f"WHERE {run_conversions} AND affiliate_id = {_literal(affiliate_id)} "
                        "ORDER BY conversion_id").result_rows
    return [f"{c}:{v}" for c, v in rows]


def _log(client: Any, db: str, run_conversions: str, affiliate_id: str) -> list[tuple[str, int, str, int | None]]:
    rows = client.query(f"SELECT idempotency_key, attempt, outcome, latency_ms FROM {db}.outbound_deliveries FINAL "
                        f"WHERE {run_conversions} AND affiliate_id = {_literal(affiliate_id)}").result_rows
    return [(str(k), int(a), str(o), None if lat is None else int(lat)) for k, a, o, lat in rows]


def wait_for_deliveries(client: Any, database: str, run_conversions: str, affiliates: Sequence[str],
                        timeout_s: float, poll_s: float = 1.0) -> tuple[int, int]:
    """Poll until every expected key of `affiliates` has a final row (delivered or dead), or `timeout_s`
    passes; (keys with a final row, keys expected)."""
    db = _q(database)
    if int(client.command(f"EXISTS TABLE {db}.outbound_deliveries")) != 1:
        return 0, 0
    deadline = time.monotonic() + timeout_s
    while True:
        done = want = 0
        for affiliate_id in affiliates:
            expected = set(_expected_keys(client, db, run_conversions, affiliate_id))
            final = {k for k, _a, o, _l in _log(client, db, run_conversions, affiliate_id)
                     if o in ("delivered", "dead")}
            want += len(expected)
            done += len(expected & final)
        if done >= want or time.monotonic() >= deadline:
            return done, want
        time.sleep(poll_s)


def collect_deliveries(client: Any, database: str, run_conversions: str,
                       servers: AffiliateServers) -> tuple[DeliveryRow, ...]:
    """One `DeliveryRow` per demo endpoint: this run's delivery log and what the endpoint received."""
    db = _q(database)
    if int(client.command(f"EXISTS TABLE {db}.outbound_deliveries")) != 1:
        return ()
    out: list[DeliveryRow] = []
    for affiliate_id, server in servers.servers.items():
        expected = _expected_keys(client, db, run_conversions, affiliate_id)
        stats = delivery_stats(expected, _log(client, db, run_conversions, affiliate_id), server.snapshot())
        out.append(DeliveryRow(affiliate_id, server.behaviour,
                               len({k.rsplit(':', 1)[0] for k in expected}), **stats))
    return tuple(out)


@dataclass(frozen=True)
class DeliveryCheck:
    label: str
    ok: bool
    detail: str


def delivery_checks(rows: Sequence[DeliveryRow]) -> tuple[DeliveryCheck, ...]:
    """What each behaviour must have led to (every check needs at least one key):

    - healthy: every key delivered, answered 200 exactly once, with a valid signature;
    - recovering: every key delivered, after retries;
    - slow: every key delivered;
    - bad_request: every key dead after a single attempt (no retry).
    """
    out: list[DeliveryCheck] = []
    for r in rows:
        label = f"outbound {r.affiliate_id} ({r.behaviour})"
        problems: list[str] = []
        if not r.keys:
            problems.append("no conversions to deliver")
        missing = r.keys - r.delivered - r.dead
        if missing:
            problems.append(f"{missing} of {r.keys} keys without a final delivery row"
                            + (f" (e.g. {', '.join(r.missing)})" if r.missing else ""))
        if r.behaviour in ("healthy", "recovering", "slow") and r.dead:
            problems.append(f"{r.dead} keys dead-lettered")
        if r.behaviour == "healthy":
            if r.ok_once != r.keys or r.ok_more:
                problems.append(f"{r.ok_once} of {r.keys} keys answered 200 exactly once, {r.ok_more} more than once")
            if r.bad_signatures:
                problems.append(f"{r.bad_signatures} requests with a bad signature")
        if r.behaviour == "recovering" and r.keys and not r.retries:
            problems.append("no retries")
        if r.behaviour == "bad_request":
            if r.delivered:
                problems.append(f"{r.delivered} keys delivered")
            if r.retries or r.single_attempt_dead != r.keys:
                problems.append(f"{r.retries} retries; {r.single_attempt_dead} of {r.keys} keys dead after one "
                                "attempt")
        extra = {"healthy": f", each answered 200 exactly once, {r.received} signatures valid",
                 "bad_request": ", each after a single attempt"}.get(r.behaviour, "")
        detail = "; ".join(problems) or (
            f"{r.keys} keys: {r.delivered} delivered, {r.dead} dead, {r.retries} retries{extra}")
        out.append(DeliveryCheck(label, not problems, detail))
    return tuple(out)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def format_deliveries(rows: Sequence[DeliveryRow]) -> list[str]:
    """The summary's outbound section (empty when there were no demo endpoints)."""
    if not rows:
        return []
    header = ("affiliate", "endpoint", "conversions", "notified", "keys", "delivered", "retries", "dead",
              "p50 ms", "p99 ms", "received", "distinct keys")
    table = [(r.affiliate_id, BEHAVIOURS.get(r.behaviour, r.behaviour), str(r.conversions), str(r.notified),
              str(r.keys), str(r.delivered), str(r.retries), str(r.dead), _ms(r.p50_ms), _ms(r.p99_ms),
              str(r.received), str(r.received_keys)) for r in rows]
    widths = [max(len(c) for c in col) for col in zip(header, *table)]
    right = set(range(2, len(header)))

    def fmt(cells: Sequence[str]) -> str:
        return "  " + "  ".join(c.rjust(w) if i in right else c.ljust(w)
                                for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return ["", "== Outbound postbacks to the demo's affiliate endpoints (one key per conversion version)",
            fmt(header), *[fmt(t) for t in table],
            "  (p50/p99: latency_ms of delivered attempts; received: requests the local endpoint got about this run's conversions, any version)"]
