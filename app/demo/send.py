"""Sending the demo's plan: each request as it goes on the wire, paced, with a progress bar.

Postbacks are signed only when they are sent (`render_postback`, with the current time),
because signed timestamps must be within the advertiser's tolerance of the moment the
ingester receives them. `submit_plan` runs each click's journey in order while journeys
run concurrently over one aiohttp connection pool.
"""

from __future__ import annotations

import asyncio
import json
import re
import string
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import IO, Any
from urllib.parse import quote, unquote, urlencode

from app.demo.plan import WRONG_SECRET, ClickStep, Journey, PostbackStep, TrafficPlan
from postback.partners import Advertiser, Offer, PartnerConfig
from postback.signing import sign_json, sign_query


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


def render_postback(step: PostbackStep, config: PartnerConfig, click_id: str | None, ts: int,
                    event_time_ms: int | None = None) -> WireRequest:
    """The signed request for `step`, signed at unix time `ts` with the partner file's secrets.

    `event_time_ms` adds the advertiser's `event_time` (epoch ms): the demo dates a
    too-fast conversion (`step.event_at_click`) at the moment its click was sent.

    Query transport: GET with `ts`, `kid`, `sig` per docs/signing.md. JSON transport: POST
    of a flat JSON object with the X-Postback-* headers. Token transport: GET with the
    legacy `token` (and `ts`). A `bad` step is spoiled the way partners spoil them: signed
    with a secret we never issued, or changed after signing.
    """
    adv = config.advertisers[step.advertiser_id]
    params = list(step.params)
    if step.with_click_id and click_id:
        params.insert(2, ("click_id", click_id))
    if event_time_ms is not None:
        name = next((src for src, dst in adv.aliases.items() if dst == "event_time" and src != "event_time"),
                    "event_time")
        params.append((name, str(event_time_ms)))
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
        click_sent_ms: int | None = None
        sent: dict[int, WireRequest] = {}
        for index, step in enumerate(journey.steps):
            if step.delay_s:
                await asyncio.sleep(step.delay_s)
            if isinstance(step, ClickStep):
                if step.mode == "redirect":
                    click_sent_ms = time.time_ns() // 1_000_000
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
                request = render_postback(step, self.config, click_id, int(time.time()),
                                          click_sent_ms if step.event_at_click else None)
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
