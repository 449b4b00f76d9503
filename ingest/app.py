"""The aiohttp application: routes, typed answers, and the Kafka hand-off.

Answer contract (what partners can rely on):

- `202 {"status":"accepted","receipt_id":...}`: the record was acknowledged by Kafka
  (idempotent producer, acks=all) before this answer was written. Never sent otherwise.
- `400 {"status":"rejected","errors":[{"field":...,"reason":...}]}`: malformed on its face;
  retrying the same request will not help.
- `401`/`403` bulk-import auth, `404`/`405` unknown route or method, `408` body not sent
  in time, `413` body too large, `415` unsupported content type; all JSON with the same shape.
- `503 {"status":"unavailable","reason":...}` with `Retry-After`: Kafka did not
  acknowledge in time or the producer queue is full. Nothing was accepted: retry.

The ingester stays thin: signatures, dedupe and attribution happen in `processors`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from ulid import ULID

from ingest import validation as v
from ingest.metrics import CONTENT_TYPE, IngestMetrics
from postback.config import IngestOptions
from postback.kafka import AsyncProducer, KafkaUnavailable
from postback.partner_view import routing_key
from postback.partners import PartnerConfig
from postback.topics import Topics
from schemas.codec import Codec

log = logging.getLogger("ingest")

SIGNATURE_HEADERS = ("X-Postback-Timestamp", "X-Postback-Key-Id", "X-Postback-Signature", "User-Agent")
FORM = "application/x-www-form-urlencoded"
JSON = "application/json"

#: Answers a receipt lookup: (ClickHouse client, receipt id) -> the JSON answer, whose
#: "status" is "unknown" for a receipt not seen (404). Given by the application layer.
ReceiptLookup = Callable[[Any, str], dict[str, Any]]

PRODUCER: web.AppKey[AsyncProducer] = web.AppKey("producer", AsyncProducer)
METRICS: web.AppKey[IngestMetrics] = web.AppKey("metrics", IngestMetrics)


def _json(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=json.dumps(body, separators=(",", ":")).encode(),
                        content_type="application/json", headers=headers)


def rejected(status: int, errors: list[v.FieldError]) -> web.Response:
    return _json(status, {"status": "rejected", "errors": [e.as_dict() for e in errors]})


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _kv(pairs: list[tuple[str, str]]) -> list[dict[str, str]]:
    return [{"key": k, "value": val} for k, val in pairs]


class Ingester:
    """Request handlers bound to one producer, topic set and partner configuration."""

    def __init__(self, opts: IngestOptions, topics: Topics, partners: PartnerConfig,
                 producer_factory: Callable[[asyncio.AbstractEventLoop], AsyncProducer],
                 receipt_lookup: ReceiptLookup | None = None) -> None:
        self.opts = opts
        self.receipt_lookup = receipt_lookup
        self.topics = topics
        self.partners = partners
        self.limits = v.Limits(max_body_bytes=opts.max_body_bytes)
        self.producer_factory = producer_factory
        self.ingester_id = f"{socket.gethostname()}:{os.getpid()}"
        self.click_codec = Codec.for_record("Click")
        self.postback_codec = Codec.for_record("RawPostback")
        self.producer: AsyncProducer | None = None
        self._clients = threading.local()
        self.metrics = IngestMetrics(lambda: self.producer.queue_depth() if self.producer else 0)

    # -- lifecycle -------------------------------------------------------------------
    async def on_startup(self, app: web.Application) -> None:
        self.producer = self.producer_factory(asyncio.get_running_loop())

    async def on_cleanup(self, app: web.Application) -> None:
        if self.producer is not None:
            left = await self.producer.close(timeout=self.opts.shutdown_timeout_s)
            if left:
                log.error("%d records were still unacknowledged at shutdown (their requests got no 202)", left)

    # -- Kafka hand-off -------------------------------------------------------------
    async def _deliver(self, topic: str, key: str, value: bytes) -> web.Response | None:
        """None when Kafka acknowledged; else the 503 to answer."""
        assert self.producer is not None
        try:
            await self.producer.send(topic, key.encode(), value)
        except KafkaUnavailable as exc:
            self.metrics.kafka_errors.labels(exc.reason).inc()
            return _json(503, {"status": "unavailable", "reason": exc.reason, "detail": str(exc)},
                         headers={"Retry-After": str(self.opts.retry_after_s)})
        self.metrics.records.labels(topic).inc()
        return None

    async def _read_body(self, request: web.Request, limit: int) -> bytes | web.Response:
        """The whole body, or the 413/408 answer. Bounded in size and (for slow senders) in time."""
        if request.content_length is not None and request.content_length > limit:
            return rejected(413, [v.FieldError("body", "too_large")])
        content = request.content
        if content.is_eof():  # already buffered in full (the common case): no timer needed
            body = content.read_nowait(limit + 1)
            return rejected(413, [v.FieldError("body", "too_large")]) if len(body) > limit else body
        try:
            async with asyncio.timeout(self.opts.body_read_timeout_s):
                chunks: list[bytes] = []
                size = 0
                while True:
                    chunk = await content.read(limit + 1 - size)
                    if not chunk:
                        return b"".join(chunks)
                    size += len(chunk)
                    if size > limit:
                        return rejected(413, [v.FieldError("body", "too_large")])
                    chunks.append(chunk)
        except TimeoutError:
            return rejected(408, [v.FieldError("body", "read_timeout")])

    # -- routes ----------------------------------------------------------------------
    async def click(self, request: web.Request) -> web.Response:
        try:
            params = v.parse_urlencoded(request.rel_url.raw_query_string, self.limits)
            click = v.click_from_params(params)
        except v.RejectedInput as exc:
            return rejected(400, exc.errors)
        click_id = str(ULID())
        headers = request.headers
        record = self._click_record(click, click_id, _now_ms(), "redirect", request.remote,
                                    headers.get("User-Agent"), headers.get("Referer"))
        # Built here from validated strings: skip the codec's (costly) validation on the hot path.
        value = self.click_codec.encode(record, validated=False)
        failure = await self._deliver(self.topics.clicks.name, click_id, value)
        if failure is not None:
            return failure
        offer = self.partners.offer(click.offer_id)
        landing = offer.landing_for(click_id, click.affiliate_id, click.campaign_id, click.subs) if offer else None
        if landing:
            return web.Response(status=302, headers={"Location": landing})
        return _json(200, {"status": "accepted", "click_id": click_id})

    def _click_record(self, click: v.ClickInput, click_id: str, clicked_at_ms: int, source: str,
                      ip: str | None, user_agent: str | None, referer: str | None) -> dict[str, Any]:
        subs = click.subs
        return {
            "click_id": click_id, "clicked_at_ms": clicked_at_ms, "offer_id": click.offer_id,
            "affiliate_id": click.affiliate_id, "campaign_id": click.campaign_id,
            "sub1": subs[0], "sub2": subs[1], "sub3": subs[2], "sub4": subs[3], "sub5": subs[4],
            "ip": ip, "user_agent": user_agent, "referer": referer, "source": source,
            "extras": _kv(click.extras),
        }

    async def bulk_clicks(self, request: web.Request) -> web.Response:
        token = self.partners.ingest_bulk_token
        if not token:
            return rejected(403, [v.FieldError("authorization", "bulk_import_disabled")])
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or not hmac.compare_digest(auth[7:].encode(), token.encode()):
            return rejected(401, [v.FieldError("authorization", "invalid_token")])
        content_type = request.content_type
        if content_type not in (JSON, "application/x-ndjson", "application/jsonl"):
            return rejected(415, [v.FieldError("content-type", "unsupported")])
        body = await self._read_body(request, self.opts.bulk_max_body_bytes)
        if isinstance(body, web.Response):
            return body
        try:
            accepted, errors = v.parse_bulk_clicks(body, content_type, self.limits)
        except v.RejectedInput as exc:
            return rejected(400, exc.errors)
        if not accepted:
            return _json(400, {"status": "rejected", "accepted": 0, "errors": errors})
        now = _now_ms()
        sends = []
        ids = []
        for _line, click in accepted:
            click_id = click.click_id or str(ULID())
            ids.append(click_id)
            record = self._click_record(click, click_id, click.clicked_at_ms or now, "bulk_import", click.ip,
                                        click.user_agent, click.referer)
            sends.append(self._deliver(self.topics.clicks.name, click_id, self.click_codec.encode(record)))
        results = await asyncio.gather(*sends)
        failed = [r for r in results if r is not None]
        if failed:
            # Lines are keyed by click_id: resending the batch is safe when click_ids were given.
            return _json(503, {"status": "unavailable", "reason": "kafka", "accepted": len(results) - len(failed),
                               "failed": len(failed), "errors": errors},
                         headers={"Retry-After": str(self.opts.retry_after_s)})
        return _json(202, {"status": "accepted", "accepted": len(accepted), "click_ids": ids, "errors": errors})

    async def postback(self, request: web.Request) -> web.Response:
        received_at = _now_ms()
        try:
            params = v.parse_urlencoded(request.rel_url.raw_query_string, self.limits)
        except v.RejectedInput as exc:
            return rejected(400, exc.errors)
        body = b""
        content_type: str | None = None
        if request.method == "POST":
            content_type = request.content_type
            if request.body_exists and content_type not in (FORM, JSON):
                return rejected(415, [v.FieldError("content-type", "unsupported")])
            read = await self._read_body(request, self.opts.max_body_bytes)
            if isinstance(read, web.Response):
                return read
            body = read
            try:
                if body and content_type == FORM:
                    params += v.parse_urlencoded(body, self.limits)
                elif content_type == JSON:
                    params += v.parse_json_object(body, self.limits)
                if len(params) > self.limits.max_params:
                    raise v.RejectedInput([v.FieldError("query", "too_many_parameters")])
            except v.RejectedInput as exc:
                return rejected(400, exc.errors)
            if not body:
                content_type = None
        advertiser_id = v.first(params, "advertiser_id")
        adv = self.partners.advertiser(advertiser_id) if advertiser_id else None
        try:
            view = v.check_postback(params, adv)
        except v.RejectedInput as exc:
            return rejected(400, exc.errors)
        receipt_id = str(ULID())
        headers = request.headers
        recorded = SIGNATURE_HEADERS if adv is None or adv.token_header is None else \
            (*SIGNATURE_HEADERS, adv.token_header)
        record = {
            "receipt_id": receipt_id, "received_at_ms": received_at, "remote_ip": request.remote or "",
            "method": request.method, "path": request.path, "content_type": content_type,
            "params": _kv(params), "body": body,
            "headers": [{"key": h, "value": headers[h]} for h in recorded if h in headers],
            "ingester_id": self.ingester_id,
        }
        # All updates of one order on one partition, so they are verified in the order received.
        key = (routing_key(view, adv) if adv is not None else None) or receipt_id
        value = self.postback_codec.encode(record, validated=False)
        failure = await self._deliver(self.topics.raw_postbacks.name, key, value)
        if failure is not None:
            return failure
        return _json(202, {"status": "accepted", "receipt_id": receipt_id})

    async def receipt(self, request: web.Request) -> web.Response:
        """A receipt's outcome from ClickHouse, for partners debugging their postbacks."""
        if not self.opts.clickhouse_url or self.receipt_lookup is None:
            return _json(503, {"status": "unavailable", "reason": "lookup_not_configured"})
        receipt_id = request.match_info["receipt_id"]
        try:
            answer = await asyncio.get_running_loop().run_in_executor(None, self._lookup, receipt_id)
        except Exception as exc:  # noqa: BLE001 - ClickHouse down or failing: say so, keep serving
            log.warning("receipt lookup failed: %s", exc)
            return _json(503, {"status": "unavailable", "reason": "lookup_failed"},
                         headers={"Retry-After": str(self.opts.retry_after_s)})
        return _json(404 if answer["status"] == "unknown" else 200, answer)

    def _lookup(self, receipt_id: str) -> dict[str, Any]:
        assert self.receipt_lookup is not None
        client = getattr(self._clients, "client", None)
        if client is None:  # clickhouse-connect clients are session-bound: one per executor thread
            import clickhouse_connect

            client = clickhouse_connect.get_client(dsn=self.opts.clickhouse_url,
                                                   database=self.opts.clickhouse_database)
            self._clients.client = client
        return self.receipt_lookup(client, receipt_id)

    async def healthz(self, request: web.Request) -> web.Response:
        return _json(200, {"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        assert self.producer is not None
        if await self.producer.ready():
            return _json(200, {"status": "ready"})
        return _json(503, {"status": "unavailable", "reason": "kafka_unreachable"},
                     headers={"Retry-After": str(self.opts.retry_after_s)})

    async def metrics_text(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _route_label(request: web.Request) -> str:
    info = request.match_info.route.resource
    return info.canonical if info is not None else "unmatched"


def build_app(ingester: Ingester) -> web.Application:
    """The web application; the producer starts and stops with it."""

    @web.middleware
    async def answer_typed(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            reason = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(exc.status, "http_error")
            field = {405: "method", 413: "body"}.get(exc.status, "path")
            response = rejected(exc.status, [v.FieldError(field, reason)])
        except Exception:  # noqa: BLE001 - a bug must cost one request, never the process
            log.exception("unhandled error on %s %s", request.method, request.path)
            response = _json(500, {"status": "error", "reason": "internal_error"})
        ingester.metrics.observe(_route_label(request), response.status, time.perf_counter() - started)
        return response

    app = web.Application(middlewares=[answer_typed], client_max_size=ingester.opts.bulk_max_body_bytes)
    app.on_startup.append(ingester.on_startup)
    app.on_cleanup.append(ingester.on_cleanup)
    app.router.add_get("/click", ingester.click, allow_head=False)
    app.router.add_post("/clicks", ingester.bulk_clicks)
    app.router.add_get("/postback", ingester.postback, allow_head=False)
    app.router.add_post("/postback", ingester.postback)
    app.router.add_get("/postback/receipts/{receipt_id}", ingester.receipt)
    app.router.add_get("/healthz", ingester.healthz)
    app.router.add_get("/readyz", ingester.readyz)
    app.router.add_get("/metrics", ingester.metrics_text)
    return app
