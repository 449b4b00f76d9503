"""The outbound delivery service: conversions -> signed HTTP postbacks to affiliate endpoints.

What it guarantees: every conversion version that matches an affiliate endpoint
(`PartnerConfig.endpoints_for`) is delivered to it with a 2xx answer at least once, or
ends on the dead-letter topic with a reason. Requests carry `Idempotency-Key:
<conversion_id>:<version>` (and usually `{idempotency_key}` in the URL), so "exactly one
successful delivery per conversion version" holds *counted by idempotency key*: after a
crash an affiliate may see a repeat of a request it already answered, always with the same
key, never a different one for the same version.

How it flows. One process consumes two topics in the consumer group
`Topics.outbound_group`: `conversions` (each record becomes one job per matching endpoint,
attempt 1) and `outbound-retry` (jobs waiting for a later attempt). Each job is *settled*
by exactly one of:

- delivered (2xx): an `OutboundDelivery` record with outcome `delivered`;
- a retryable failure (timeout, connection error, 429, 5xx): the job with `attempt + 1`
  and `not_before_ms` = now + the endpoint's `retry_schedule_s[attempt - 1]` (after the
  schedule, every 21,600 s) is produced to `outbound-retry`, keyed by endpoint, plus a
  delivery record with outcome `retry`;
- a permanent failure (any other 4xx, a refused private target or redirect), an attempt
  that would fall after `first_attempt_ms + give_up_after_s`, or an endpoint that is no
  longer configured (`endpoint_removed`), or a conversion the endpoint's template cannot
  render (`invalid_request`): the job with a `reason` goes to `outbound-dead`, plus a
  delivery record with outcome `dead` (none for the last two: no request was made).

Every attempt produces one delivery record (topic `outbound-deliveries`, Avro
`OutboundDelivery`, keyed by conversion_id), which ClickHouse stores and
`postback outbound status` summarises.

Isolation between endpoints. Each endpoint has its own lane (`Lane`): an in-memory ready
queue, a delay heap, its own aiohttp session and connection pool, its own token bucket
(`rate_per_s`) and `max_concurrency` worker tasks. The consume loop only appends to lanes
and never awaits a delivery, so an endpoint that hangs until its `timeout_s` occupies its
own workers and nothing else: the other endpoints' requests go out at their own pace.

When an offset is committed (`DeliveryService.commit`, the only place that commits):
a consumed message's offset is committed once every job it produced is settled *and* the
records that settle it are acknowledged by Kafka (idempotent producer, acks=all). Kafka
offsets are "everything before this is done", so per partition the committable offset is
the lowest offset still unsettled (`sinks.outbound.ledger`). After a SIGKILL the next
owner re-reads from there and redoes every unsettled job; some of those may already have
been delivered, or already have a successor on the retry topic, which is why repeats are
expected and carry the same idempotency key. Nothing is lost: a job is only ever dropped
from memory after its settling records are in Kafka.

Retry jobs that are not due yet are held in memory, in their endpoint's delay heap, until
`not_before_ms`; their offsets stay uncommitted until they are settled, and no job is
re-produced just to wait. A held job delays the commit of later retry records of its
partition, so a restart re-reads them; those already settled are attempted again
(repeats, same key), and their successors may then exist twice (each settles on its own).

Memory is bounded, in three ways:

- while more than `max_delayed` (10,000) not-yet-due jobs are held, the retry topic's
  partitions are paused (resumed below half of it); the held jobs themselves still run
  when due;
- an endpoint with `max_lane_jobs` (2,000) jobs waiting gets its new conversion jobs
  parked on the retry topic, due `overflow_delay_s` later (not an attempt: no delivery
  record), so one backed-up endpoint does not hold the conversions of the others;
- as a last resort, while `max_ready` jobs wait in all ready queues, the conversions
  partitions are paused.

Known limit: the retry topic is shared by all endpoints (keyed by endpoint, 6
partitions), so when a dead endpoint's retries fill `max_delayed`, other endpoints'
later retries on the paused partitions are read late (their first attempts are not
affected).

Observability: `postback_outbound_attempts{endpoint,outcome}`,
`postback_outbound_queue_depth{endpoint}`, `postback_outbound_consecutive_failures{endpoint}`
and `postback_outbound_endpoint_failing{endpoint}` (1 once the last `failing_after` attempts
all failed). The service logs a warning when an endpoint starts failing and an info line
when it recovers. URLs are only ever logged or recorded redacted (`redacted_url`).

Shutdown (SIGTERM or the stop event): stop consuming and handing out jobs, let in-flight
attempts finish and settle for up to `shutdown_grace_s`, commit what is settled, close.
"""

from __future__ import annotations

import asyncio
import heapq
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import aiohttp
from confluent_kafka import OFFSET_END, Consumer, KafkaError, TopicPartition
from prometheus_client import CollectorRegistry, Counter, Gauge
from yarl import URL

from postback.config import Settings
from postback.kafka import AsyncProducer, KafkaUnavailable, producer_config
from postback.config import OutboundOptions
from postback.partner_model import RETRY_TAIL_S
from postback.topics import Topics
from schemas.codec import Codec, CodecError
from sinks.outbound.ledger import Ledger, PartitionLedger
from sinks.outbound.template import idempotency_key

log = logging.getLogger("sinks.outbound")

#: After the endpoint's retry schedule is used up, retry this often until give_up_after_s.
LATE_RETRY_S = RETRY_TAIL_S
RESPONSE_HEAD_BYTES = 512
MAX_REDIRECTS = 5


class OutboundMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.attempts = Counter("postback_outbound_attempts", "Delivery attempts, by endpoint and outcome",
                                ["endpoint", "outcome"], registry=registry)
        self.queue_depth = Gauge("postback_outbound_queue_depth", "Jobs waiting (ready or delayed), by endpoint",
                                 ["endpoint"], registry=registry)
        self.consecutive_failures = Gauge("postback_outbound_consecutive_failures",
                                          "Failed attempts since the last delivery, by endpoint", ["endpoint"],
                                          registry=registry)
        self.failing = Gauge("postback_outbound_endpoint_failing",
                             "1 while the endpoint's last attempts all failed", ["endpoint"], registry=registry)
        self.dead = Counter("postback_outbound_dead", "Jobs sent to the dead-letter topic, by reason",
                            ["endpoint", "reason"], registry=registry)
        self.overflow = Counter("postback_outbound_overflow",
                                "Conversion jobs parked on the retry topic because their endpoint was backed up",
                                ["endpoint"], registry=registry)
        self.paused = Gauge("postback_outbound_paused", "1 while consumption of the topic is paused (memory bound)",
                            ["topic"], registry=registry)


def json_safe(conversion: Mapping[str, Any]) -> dict[str, Any]:
    """The conversion as JSON values (Decimals as their text), for the retry and dead topics."""
    def value(v: Any) -> Any:
        if isinstance(v, Decimal):
            return str(v)
        if isinstance(v, Mapping):
            return {k: value(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [value(x) for x in v]
        return v
    return {k: value(v) for k, v in conversion.items()}


def next_delay_s(schedule: tuple[float, ...], attempt: int) -> float:
    """Delay before attempt `attempt + 1`, after `attempt` attempts were made."""
    return float(schedule[attempt - 1]) if attempt - 1 < len(schedule) else float(LATE_RETRY_S)


@dataclass
class Job:
    endpoint_id: str
    conversion: dict[str, Any]
    attempt: int
    not_before_ms: int
    first_attempt_ms: int | None
    last_error: str
    part: PartitionLedger | None = None
    offset: int = -1
    held: bool = False  # counted in DeliveryService.delayed (came from the retry topic, not yet due)

    def to_json(self, **extra: Any) -> bytes:
        body = {"endpoint": self.endpoint_id, "conversion": self.conversion, "attempt": self.attempt,
                "not_before_ms": self.not_before_ms, "first_attempt_ms": self.first_attempt_ms,
                "last_error": self.last_error, **extra}
        return json.dumps(body, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Job:
        body = json.loads(data)
        return cls(str(body["endpoint"]), dict(body["conversion"]), int(body["attempt"]),
                   int(body.get("not_before_ms") or 0), body.get("first_attempt_ms"), str(body.get("last_error") or ""))

    @property
    def idempotency_key(self) -> str:
        return idempotency_key(self.conversion)


class TokenBucket:
    """`rate` tokens per second, bursts up to max(1, rate)."""

    def __init__(self, rate: float) -> None:
        self.rate = float(rate)
        self.capacity = max(1.0, self.rate)
        self.tokens = self.capacity
        self.stamp = time.monotonic()

    async def take(self) -> None:
        while True:
            now = time.monotonic()
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            if self.tokens >= 1.0:
                self.tokens -= 1.0
                return
            await asyncio.sleep((1.0 - self.tokens) / self.rate)


class Lane:
    """One endpoint: its ready queue, delay heap, rate limit, HTTP session and workers."""

    def __init__(self, endpoint: Any, now_ms: Callable[[], int]) -> None:
        self.endpoint = endpoint
        self.now_ms = now_ms
        self.ready: deque[Job] = deque()
        self.delayed: list[tuple[int, int, Job]] = []
        self._seq = 0
        self.bucket = TokenBucket(endpoint.rate_per_s)
        self.wake = asyncio.Event()
        self.stopping = False
        self.session: aiohttp.ClientSession | None = None
        self.workers: list[asyncio.Task[None]] = []
        self.consecutive_failures = 0
        self.failing = False
        self.in_flight = 0

    def depth(self) -> int:
        return len(self.ready) + len(self.delayed)

    def push(self, job: Job) -> None:
        if job.not_before_ms > self.now_ms():
            self._seq += 1
            heapq.heappush(self.delayed, (job.not_before_ms, self._seq, job))
        else:
            self.ready.append(job)
        self.wake.set()

    def drop_revoked(self) -> list[Job]:
        """Remove the jobs of revoked partitions; returns them."""
        gone = [j for j in self.ready if j.part is not None and j.part.revoked]
        gone += [j for _t, _s, j in self.delayed if j.part is not None and j.part.revoked]
        if gone:
            self.ready = deque(j for j in self.ready if not (j.part is not None and j.part.revoked))
            self.delayed = [e for e in self.delayed if not (e[2].part is not None and e[2].part.revoked)]
            heapq.heapify(self.delayed)
        return gone

    async def next_job(self) -> Job | None:
        """The next job to attempt (ready first, then due delayed ones); None once stopping."""
        while not self.stopping:
            if self.ready:
                return self.ready.popleft()
            now = self.now_ms()
            if self.delayed and self.delayed[0][0] <= now:
                return heapq.heappop(self.delayed)[2]
            wait = 0.5 if not self.delayed else min(0.5, max(0.001, (self.delayed[0][0] - now) / 1000))
            self.wake.clear()
            try:
                await asyncio.wait_for(self.wake.wait(), wait)
            except TimeoutError:
                pass
        return None


class Refused(Exception):
    """A request the guard refused: `error_class` is refused_private or redirect_refused."""

    def __init__(self, error_class: str, detail: str) -> None:
        super().__init__(detail)
        self.error_class = error_class


@dataclass
class Attempt:
    status: int | None = None
    latency_ms: int | None = None
    error_class: str | None = None
    response_head: str | None = None
    detail: str = ""


def _guard() -> Any:
    from sinks.outbound import guard

    return guard


def _refusal(exc: BaseException) -> BaseException | None:
    """The guard's TargetRefused inside an aiohttp connection error, if that is what it is."""
    refused = _guard().TargetRefused
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, refused):
            return e
        todo += [e.__cause__, e.__context__, getattr(e, "os_error", None)]  # type: ignore[list-item]
    return None


def _describe(exc: BaseException) -> str:
    """A connection error without its URL (some aiohttp errors quote the full URL, signature included)."""
    os_error = getattr(exc, "os_error", None)
    if os_error is None and isinstance(exc, OSError) and not isinstance(exc, aiohttp.ClientError):
        os_error = exc
    if os_error is not None:
        return f"{type(exc).__name__}: {os_error.strerror or type(os_error).__name__}"
    return type(exc).__name__


class DeliveryService:
    """Consumes conversions and retry jobs, runs the lanes, commits settled offsets. One event loop."""

    def __init__(self, bootstrap: str, topics: Topics, partners: Any, opts: OutboundOptions,
                 metrics: OutboundMetrics, now_ms: Callable[[], int] | None = None) -> None:
        self.bootstrap = bootstrap
        self.topics = topics
        self.partners = partners
        self.opts = opts
        self.metrics = metrics
        self.now_ms = now_ms or (lambda: int(time.time() * 1000))
        self.conversion_codec = Codec.for_record("Conversion")
        self.delivery_codec = Codec.for_record("OutboundDelivery")
        self.endpoints = self._index(partners)
        self.lanes: dict[str, Lane] = {}
        self.ledger = Ledger()
        self.delayed = 0  # retry-topic jobs held in delay heaps
        self.paused: set[str] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.stopping = False
        self.consumer: Consumer | None = None
        self.producer: AsyncProducer | None = None
        self.settled = 0

    @staticmethod
    def _index(partners: Any) -> dict[str, Any]:
        index = {}
        for affiliate in getattr(partners, "affiliates", {}).values():
            for endpoint in getattr(affiliate, "postbacks", {}).values():
                index[endpoint.endpoint_id] = endpoint
        return index

    # -- run ------------------------------------------------------------------------
    async def run(self, stop: threading.Event) -> None:
        loop = asyncio.get_running_loop()
        self.producer = AsyncProducer(producer_config(self.bootstrap, self.opts.delivery_timeout_s), loop)
        self.consumer = Consumer({
            "bootstrap.servers": self.bootstrap, "group.id": self.topics.outbound_group,
            "enable.auto.commit": False, "auto.offset.reset": "earliest",
            "session.timeout.ms": int(self.opts.session_timeout_s * 1000),
            "isolation.level": "read_committed",
        })
        names = [self.topics.conversions.name, self.topics.outbound_retry.name]
        self.consumer.subscribe(names, on_assign=self._on_assign, on_revoke=self._on_revoke,
                                on_lost=self._on_revoke)
        log.info("outbound delivery consuming %s (%d endpoints configured)", ", ".join(names), len(self.endpoints))
        last_commit = time.monotonic()
        try:
            while not stop.is_set():
                messages = self.consumer.consume(500, timeout=0)
                for msg in messages:
                    self._take(msg)
                self._flow_control()
                if time.monotonic() - last_commit >= self.opts.commit_interval_s:
                    self.commit()
                    last_commit = time.monotonic()
                await asyncio.sleep(0 if messages else 0.02)
        finally:
            await self._shutdown()

    async def _shutdown(self) -> None:
        """Stop handing out jobs, let in-flight attempts settle (bounded), commit, close."""
        self.stopping = True
        for lane in self.lanes.values():
            lane.stopping = True
            lane.wake.set()
        pending = [t for lane in self.lanes.values() for t in lane.workers] + list(self.tasks)
        if pending:
            _done, left = await asyncio.wait(pending, timeout=self.opts.shutdown_grace_s)
            for task in left:
                task.cancel()
            if left:
                log.warning("%d delivery tasks still busy after %.0f s; their jobs are redone after restart",
                            len(left), self.opts.shutdown_grace_s)
                await asyncio.gather(*left, return_exceptions=True)
        if self.consumer is not None:
            self.commit()
            self.consumer.close()
        for lane in self.lanes.values():
            if lane.session is not None:
                await lane.session.close()
        if self.producer is not None:
            await self.producer.close()
        log.info("outbound delivery stopped (%d jobs unsettled, redone by the next owner)", self.ledger.unsettled())

    # -- the commit -----------------------------------------------------------------
    def commit(self, only: list[tuple[str, int]] | None = None) -> None:
        """Commit the offsets whose messages are completely settled. The only place that commits.

        What must be true before offset N of a partition is committed, in order:

        1. Every job made from every message before N was settled: delivered, or its
           successor produced to the retry topic, or produced to the dead topic.
        2. The records that settled it (delivery record, retry or dead job) were
           acknowledged by Kafka (`AsyncProducer.send_batch` returned; acks=all, idempotent).
           Only then does a worker call `Ledger.settle` (see `_settle`).
        3. `Ledger.to_commit` gives, per partition, the lowest offset still unsettled (or
           one past the last message taken when none is); it is committed synchronously.
        4. On success the ledger remembers it (no re-commit); on failure nothing changes and
           the next call (every `commit_interval_s`, on revoke, at shutdown) tries again.

        A crash anywhere leaves the unsettled messages uncommitted: they are consumed again
        and their jobs redone (same idempotency key).
        """
        assert self.consumer is not None
        offsets = self.ledger.to_commit()  # 1, 2 (by construction) and 3
        if only is not None:
            offsets = {tp: o for tp, o in offsets.items() if tp in only}
        if not offsets:
            return
        try:
            self.consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()],
                                 asynchronous=False)
        except Exception as exc:  # noqa: BLE001 - 4: retried on the next call
            log.warning("offset commit failed (retried): %s", exc)
            return
        self.ledger.committed(offsets)  # 4

    # -- rebalance --------------------------------------------------------------------
    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if self.opts.conversions_start == "latest":
            conversions = [tp for tp in partitions if tp.topic == self.topics.conversions.name]
            if conversions:
                committed = {(tp.topic, tp.partition): tp.offset for tp in consumer.committed(conversions, 30)}
                for tp in conversions:
                    if committed.get((tp.topic, tp.partition), -1) < 0:
                        tp.offset = OFFSET_END
        consumer.assign(partitions)
        paused = [tp for tp in partitions if tp.topic in self.paused]
        if paused:
            consumer.pause(paused)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        tps = [(tp.topic, tp.partition) for tp in partitions]
        try:
            self.commit(only=tps)
        except Exception as exc:  # noqa: BLE001 - the next owner redoes unsettled work either way
            log.warning("commit on revoke failed: %s", exc)
        for tp in tps:
            self.ledger.revoke(tp)
        for lane in self.lanes.values():
            for job in lane.drop_revoked():
                if job.held:
                    self.delayed -= 1
            self._depth(lane)
        consumer.unassign()

    # -- taking messages ----------------------------------------------------------------
    def _take(self, msg: Any) -> None:
        if msg.error():
            if msg.error().code() != KafkaError._PARTITION_EOF:
                log.warning("consume error: %s", msg.error())
            return
        tp = (msg.topic(), msg.partition())
        if msg.topic() == self.topics.outbound_retry.name:
            self._take_retry(tp, msg)
            return
        try:
            conversion = self.conversion_codec.decode(msg.value())
        except CodecError as exc:
            log.error("skipping undecodable conversion at %s[%d]@%d: %s", *tp, msg.offset(), exc)
            self.ledger.take(tp, msg.offset(), 0)
            return
        endpoints = list(self.partners.endpoints_for(conversion))
        part = self.ledger.take(tp, msg.offset(), len(endpoints))
        if not endpoints:
            return
        safe = json_safe(conversion)
        now = self.now_ms()
        for endpoint in endpoints:
            job = Job(endpoint.endpoint_id, safe, 1, now, None, "", part, msg.offset())
            lane = self._lane(endpoint)
            if lane.depth() >= self.opts.max_lane_jobs:
                # This endpoint is far behind: park the job on the retry topic instead of in memory (not an
                # attempt, so no delivery record), so one backed-up endpoint never pauses the conversions.
                job.not_before_ms = now + int(self.opts.overflow_delay_s * 1000)
                job.last_error = "queue_full"
                self.metrics.overflow.labels(endpoint.endpoint_id).inc()
                self._spawn(self._settle(job, [(self.topics.outbound_retry.name, job.endpoint_id.encode(),
                                                job.to_json(), None)]))
                continue
            lane.push(job)
            self._depth(lane)

    def _take_retry(self, tp: tuple[str, int], msg: Any) -> None:
        try:
            job = Job.from_json(msg.value())
            job.idempotency_key  # noqa: B018 - validates the conversion's keys
        except (ValueError, KeyError, TypeError) as exc:
            log.error("skipping malformed retry job at %s[%d]@%d: %s", *tp, msg.offset(), exc)
            self.ledger.take(tp, msg.offset(), 0)
            return
        job.part = self.ledger.take(tp, msg.offset(), 1)
        job.offset = msg.offset()
        endpoint = self.endpoints.get(job.endpoint_id)
        if endpoint is None:
            self._spawn(self._dead_letter(job, "endpoint_removed"))
            return
        lane = self._lane(endpoint)
        if job.not_before_ms > self.now_ms():
            job.held = True
            self.delayed += 1
        lane.push(job)
        self._depth(lane)

    def _flow_control(self) -> None:
        """Bounded memory: pause a topic's partitions while too many of its jobs are held."""
        ready = sum(len(lane.ready) for lane in self.lanes.values())
        self._pause(self.topics.outbound_retry.name, self.delayed, self.opts.max_delayed)
        self._pause(self.topics.conversions.name, ready, self.opts.max_ready)

    def _pause(self, topic: str, held: int, limit: int) -> None:
        assert self.consumer is not None
        if topic not in self.paused and held >= limit:
            self.paused.add(topic)
            self.consumer.pause([tp for tp in self.consumer.assignment() if tp.topic == topic])
            self.metrics.paused.labels(topic).set(1)
            log.warning("pausing %s: %d jobs held in memory (limit %d)", topic, held, limit)
        elif topic in self.paused and held < limit // 2:
            self.paused.discard(topic)
            self.consumer.resume([tp for tp in self.consumer.assignment() if tp.topic == topic])
            self.metrics.paused.labels(topic).set(0)
            log.info("resuming %s: %d jobs held in memory", topic, held)

    def _lane(self, endpoint: Any) -> Lane:
        lane = self.lanes.get(endpoint.endpoint_id)
        if lane is None:
            lane = self.lanes[endpoint.endpoint_id] = Lane(endpoint, self.now_ms)
            lane.workers = [asyncio.get_running_loop().create_task(self._worker(lane),
                                                                  name=f"outbound-{endpoint.endpoint_id}-{i}")
                            for i in range(int(endpoint.max_concurrency))]
        return lane

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _depth(self, lane: Lane) -> None:
        self.metrics.queue_depth.labels(lane.endpoint.endpoint_id).set(lane.depth())

    # -- attempts -----------------------------------------------------------------------
    async def _worker(self, lane: Lane) -> None:
        while True:
            job = await lane.next_job()
            if job is None:
                return
            if job.held:
                job.held = False
                self.delayed -= 1
            self._depth(lane)
            if job.part is not None and job.part.revoked:
                continue  # its partition's new owner redoes it
            await lane.bucket.take()
            lane.in_flight += 1
            try:
                await self._attempt(lane, job)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a bug must not kill the lane; the job is redone after restart
                log.exception("delivery attempt for %s crashed", lane.endpoint.endpoint_id)
            finally:
                lane.in_flight -= 1

    def _session(self, lane: Lane) -> aiohttp.ClientSession:
        if lane.session is None:
            endpoint = lane.endpoint
            kwargs: dict[str, Any] = {"limit": int(endpoint.max_concurrency)}
            if not endpoint.allow_private:
                kwargs["resolver"] = _guard().GuardedResolver(allow_private=False)
            # trust_env=False: through a proxy the resolver would only ever see the proxy's address.
            lane.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(**kwargs), trust_env=False)
        return lane.session

    async def _http(self, lane: Lane, method: str, url: str, headers: Mapping[str, str],
                    body: bytes | None) -> Attempt:
        """Send the request (and, if the endpoint follows redirects, each checked hop); status and head.

        The URL is sent as it is (already percent-encoded and signed). Raises `Refused`,
        `TimeoutError` or aiohttp/OS connection errors.
        """
        guard = _guard()
        endpoint = lane.endpoint
        session = self._session(lane)
        timeout = aiohttp.ClientTimeout(total=float(endpoint.timeout_s))
        loop = asyncio.get_running_loop()
        try:
            await guard.check_target_async(url, endpoint.allow_private)
        except guard.TargetRefused as exc:
            raise Refused("refused_private", exc.reason) from None
        hops = 0
        while True:
            async with session.request(method, URL(url, encoded=True), headers=dict(headers), data=body,
                                       allow_redirects=False, timeout=timeout) as resp:
                head = await resp.content.read(RESPONSE_HEAD_BYTES)
                status = resp.status
                location = resp.headers.get("Location")
            if not 300 <= status < 400 or status == 304:
                return Attempt(status=status, response_head=head.decode("utf-8", "replace"))
            hops += 1
            if hops > getattr(guard, "MAX_REDIRECTS", MAX_REDIRECTS):
                raise Refused("redirect_refused", f"more than {MAX_REDIRECTS} redirects")
            try:
                url = await loop.run_in_executor(None, guard.check_redirect, location or "", url, endpoint)
            except guard.TargetRefused as exc:  # RedirectRefused included
                raise Refused("redirect_refused", f"HTTP {status}: {exc.reason}") from None
            if status == 303:
                method, body = "GET", None

    async def _attempt(self, lane: Lane, job: Job) -> None:
        from sinks.outbound.request import build_request

        endpoint = lane.endpoint
        now = self.now_ms()
        if job.first_attempt_ms is None:
            job.first_attempt_ms = now
        try:
            request = build_request(endpoint, job.conversion, now // 1000)
        except ValueError as exc:  # the conversion cannot fill the endpoint's template: no request to send
            log.error("cannot build the request for %s: %s", endpoint.endpoint_id, exc)
            await self._dead_letter(job, "invalid_request")
            return
        started = time.monotonic()
        try:
            result = await self._http(lane, request.method, request.url, request.headers, request.body)
        except Refused as exc:
            result = Attempt(error_class=exc.error_class, detail=str(exc))
        except TimeoutError:
            result = Attempt(error_class="timeout", detail=f"no answer within {endpoint.timeout_s} s")
        except (aiohttp.ClientError, OSError) as exc:
            refused = _refusal(exc) if not endpoint.allow_private else None
            result = Attempt(error_class="refused_private" if refused else "connect",
                             detail=str(refused) if refused else _describe(exc))
        except Exception as exc:
            if endpoint.allow_private or _refusal(exc) is None:
                raise
            result = Attempt(error_class="refused_private", detail=str(exc))
        result.latency_ms = int((time.monotonic() - started) * 1000)
        status = result.status
        if status is not None:
            if 200 <= status < 300:
                pass
            elif status == 429:
                result.error_class = "http_429"
            elif status >= 500:
                result.error_class = "http_5xx"
            else:
                result.error_class = "http_4xx"
            if result.error_class:
                result.detail = f"HTTP {status}"
        retryable = result.error_class in ("timeout", "connect", "http_429", "http_5xx")
        attempted_at = self.now_ms()
        if result.error_class is None:
            outcome, follow = "delivered", None
        elif retryable:
            delay_ms = int(next_delay_s(tuple(endpoint.retry_schedule_s), job.attempt) * 1000)
            due = attempted_at + delay_ms
            if due - job.first_attempt_ms > float(endpoint.give_up_after_s) * 1000:
                outcome, follow = "dead", "gave_up"
            else:
                outcome, follow = "retry", due
        else:
            outcome, follow = "dead", result.error_class
        record = {
            "conversion_id": str(job.conversion["conversion_id"]), "version": int(job.conversion["version"]),
            "affiliate_id": str(endpoint.affiliate_id), "endpoint": endpoint.endpoint_id,
            "url": request.redacted_url, "method": request.method, "attempt": job.attempt,
            "status": result.status, "latency_ms": result.latency_ms, "error_class": result.error_class,
            "response_head": result.response_head, "outcome": outcome, "attempted_at_ms": attempted_at,
            "idempotency_key": job.idempotency_key,
        }
        records: list[tuple[str, bytes | None, bytes | None, int | None]] = [
            (self.topics.outbound_deliveries.name, record["conversion_id"].encode(),
             self.delivery_codec.encode(record), None)]
        error = f"{result.error_class}: {result.detail}" if result.error_class else ""
        if outcome == "retry":
            successor = Job(job.endpoint_id, job.conversion, job.attempt + 1, int(follow), job.first_attempt_ms,
                            error)
            records.append((self.topics.outbound_retry.name, job.endpoint_id.encode(), successor.to_json(), None))
        elif outcome == "dead":
            dead = Job(job.endpoint_id, job.conversion, job.attempt, job.not_before_ms, job.first_attempt_ms, error)
            records.append((self.topics.outbound_dead.name, job.endpoint_id.encode(),
                            dead.to_json(reason=str(follow)), None))
            self.metrics.dead.labels(endpoint.endpoint_id, str(follow)).inc()
            log.info("dead letter for %s key %s: %s (%s)", endpoint.endpoint_id, job.idempotency_key, follow,
                     error or "-")
        self.metrics.attempts.labels(endpoint.endpoint_id, outcome).inc()
        self._health(lane, result, request.redacted_url)
        await self._settle(job, records)

    def _health(self, lane: Lane, result: Attempt, redacted_url: str) -> None:
        endpoint_id = lane.endpoint.endpoint_id
        if result.error_class is None:
            lane.consecutive_failures = 0
            if lane.failing:
                lane.failing = False
                log.info("endpoint %s recovered: delivered to %s", endpoint_id, redacted_url)
        else:
            lane.consecutive_failures += 1
            if not lane.failing and lane.consecutive_failures >= self.opts.failing_after:
                lane.failing = True
                log.warning("endpoint %s is failing: the last %d attempts failed, last %s (%s) for %s", endpoint_id,
                            lane.consecutive_failures, result.error_class, result.detail, redacted_url)
        self.metrics.consecutive_failures.labels(endpoint_id).set(lane.consecutive_failures)
        self.metrics.failing.labels(endpoint_id).set(1 if lane.failing else 0)

    async def _dead_letter(self, job: Job, reason: str) -> None:
        self.metrics.dead.labels(job.endpoint_id, reason).inc()
        log.warning("dead letter for %s key %s: %s", job.endpoint_id, job.idempotency_key, reason)
        await self._settle(job, [(self.topics.outbound_dead.name, job.endpoint_id.encode(),
                                  job.to_json(reason=reason), None)])

    async def _settle(self, job: Job, records: list[tuple[str, bytes | None, bytes | None, int | None]]) -> None:
        """Produce the settling records and wait for their acknowledgement; only then mark the job settled.

        Retried until acknowledged. When stopping, a job whose records are not acknowledged
        stays unsettled (redone by the next owner; the records that did arrive are repeats).
        """
        assert self.producer is not None
        delay = 0.2
        while True:
            try:
                await self.producer.send_batch(records)
                break
            except KafkaUnavailable as exc:
                if self.stopping:
                    log.warning("stopping with the records of %s unacknowledged: %s", job.idempotency_key, exc)
                    return
                log.warning("settling records not acknowledged (%s), retrying", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        if job.part is not None:
            self.ledger.settle(job.part, job.offset)
        self.settled += 1


def serve(settings: Settings, bootstrap: str, partners: Any, opts: OutboundOptions,
          stop: threading.Event | None = None, registry: CollectorRegistry | None = None,
          now_ms: Callable[[], int] | None = None) -> int:
    """Run the delivery service against Kafka `bootstrap` until `stop` is set.

    Without `stop`, SIGTERM/SIGINT stop it (call from the main thread). Topics are named
    by `settings.topic_prefix` and created when missing.
    """
    import signal

    from confluent_kafka.admin import AdminClient
    from prometheus_client import start_http_server

    from postback.topics import ensure_topics

    topics = Topics(settings.topic_prefix)
    ensure_topics(AdminClient({"bootstrap.servers": bootstrap}),
                  [topics.conversions, topics.outbound_retry, topics.outbound_dead, topics.outbound_deliveries])
    registry = registry or CollectorRegistry()
    if opts.metrics_port:
        start_http_server(opts.metrics_port, addr="127.0.0.1", registry=registry)
    if stop is None:
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    service = DeliveryService(bootstrap, topics, partners, opts, OutboundMetrics(registry), now_ms)
    print(f"outbound delivery running: {len(service.endpoints)} endpoints, group {topics.outbound_group}",
          flush=True)
    asyncio.run(service.run(stop))
    return 0
