"""Open-loop load generator for bench/e2e.py: signed GET /postback at a fixed rate.

It runs as its own process, so its CPU is not charged to the ingester and the
benchmark can tell when the generator, rather than the pipeline, was the limit.

Schedule (open loop, like wrk2): request i is due at t0 + i / rate, whatever happened
to earlier requests. Every due request is started at once: sent on an idle one of
--connections keep-alive connections, or queued (first come, first served) until one
is free. A slow server therefore makes requests wait for a free connection, and that
wait is in the latency, which is taken from the *scheduled* time (no coordinated
omission). Requests that are not started by t0 + duration are not sent; they are
reported as `unsent`. `send_lag_ms` is how late the generator started requests after
their scheduled time: when that grows, the generator itself could not keep the rate.

Each postback is a unique purchase (`order_id` = `<tag>-<i>`), HMAC query-signed per
docs/signing.md (ts = the time it goes on the wire, kid, sig). A --click-fraction of
them carries a click_id drawn from --click-ids-file (clicks created before the window);
the rest carry none. Nothing is retried: a retry would blur what a 202 meant.

The client is a minimal HTTP/1.1 keep-alive client on asyncio protocols (uvloop when
installed), not aiohttp: on a 2-CPU host the aiohttp client took about a third of a
core at 1,500 requests/s, CPU the pipeline under test needs. Each connection carries
one request at a time and writes the same request aiohttp did (same headers, so the
ingester records the same User-Agent); an answer is read by its status line,
Content-Length and body (what the ingester sends), and `Connection: close` makes the
connection reconnect. A request not answered --request-timeout after it was started
(queue wait included, like aiohttp's total timeout) is an error (TimeoutError) and its
connection is replaced.

Output: progress on stderr; the result (counts, latency percentiles, the receipt id of
every 202, monotonic times of the window) as JSON in --out. time.monotonic() is
CLOCK_MONOTONIC, shared by all processes of the host, so the benchmark can compare
these times with its own.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import resource
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp
from aiohttp.http import SERVER_SOFTWARE

from bench.harness import log as _log
from postback.eventloop import install_uvloop
from postback.signing import sign_query

# One request in flight: (index, scheduled time, start time), monotonic seconds.
Request = tuple[int, float, float]

MAX_HEAD_BYTES = 65536  # an answer's status line and headers, at most
TIMEOUT_CHECK_S = 0.1  # how often requests are checked against --request-timeout
MIN_SLEEP_S = 0.001  # the scheduler's shortest sleep: requests due sooner wait for it (send lag up to ~1 ms)


def log(message: str) -> None:
    """Progress on stderr, marked as the generator's."""
    _log(message, "load")


def percentiles(values: Sequence[float], points: Sequence[float] = (50, 90, 99, 99.9)) -> dict[str, float | None]:
    """Nearest-rank percentiles (and max) in ms, rounded; None for an empty list."""
    if not values:
        return {**{f"p{p:g}".replace(".", ""): None for p in points}, "max": None}
    ordered = sorted(values)
    out: dict[str, float | None] = {}
    for p in points:
        rank = max(1, -(-len(ordered) * p // 100))  # ceil(n * p / 100)
        out[f"p{p:g}".replace(".", "")] = round(ordered[int(rank) - 1], 2)
    out["max"] = round(ordered[-1], 2)
    return out


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def create_clicks(url: str, n: int, offer_id: str, concurrency: int = 32,
                        timeout_s: float = 30.0) -> tuple[list[str], dict[str, int]]:
    """`n` clicks through GET /click (an offer without landing URL answers 200 with the
    click_id). Returns the click ids and the count of answers per status (-1: error)."""
    ids: list[str] = []
    statuses: collections.Counter[int] = collections.Counter()
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)

    async def worker(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            i = queue.get_nowait()
            try:
                async with session.get(f"{url}/click", params={"offer_id": offer_id, "affiliate_id": f"aff-{i % 40}",
                                                                "sub1": f"s{i}"}, allow_redirects=False) as resp:
                    statuses[resp.status] += 1
                    if resp.status == 200:
                        ids.append((await resp.json())["click_id"])
                    else:
                        await resp.read()
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                statuses[-1] += 1

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s),
                                     connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return ids, dict(statuses)


class Connection(asyncio.Protocol):
    """One keep-alive connection to the ingester, one request at a time."""

    def __init__(self, load: Load) -> None:
        self.load = load
        self.transport: asyncio.Transport | None = None
        self.req: Request | None = None  # the request on the wire, if any
        self.buf = b""  # an answer received in part
        self.idle = False  # in load.idle

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.load.connected(self)

    def send(self, req: Request, data: bytes) -> None:
        self.req = req
        self.transport.write(data)  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        if self.buf:
            data = self.buf + data
            self.buf = b""
        end = data.find(b"\r\n\r\n")
        if end < 0:
            if len(data) > MAX_HEAD_BYTES:
                self.broken(f"no end of headers in the first {len(data):,} bytes")
            else:
                self.buf = data
            return
        head = data[:end].lower()
        if not head.startswith(b"http/1.") or len(head) < 12 or not head[9:12].isdigit():
            self.broken(f"not an HTTP/1.x status line: {data[:80]!r}")
            return
        status = int(head[9:12])
        at = head.find(b"\r\ncontent-length:")
        if at >= 0:
            eol = head.find(b"\r\n", at + 2)
            try:
                length = int(head[at + 17:eol if eol >= 0 else len(head)])
            except ValueError:
                self.broken(f"bad Content-Length in {data[:end][:300]!r}")
                return
        elif status in (204, 304):
            length = 0
        else:  # chunked or close-delimited: the ingester sends neither
            self.broken(f"an answer without Content-Length is not supported: {data[:end][:300]!r}")
            return
        body_end = end + 4 + length
        if len(data) < body_end:
            self.buf = data
            return
        req = self.req
        if req is None or len(data) > body_end:
            self.broken(f"{len(data) - body_end if req else len(data):,} bytes nobody asked for")
            return
        self.req = None
        self.load.answered(req, status, data[end + 4:body_end])
        if b"\r\nconnection: close" in head or (head.startswith(b"http/1.0")
                                                and b"\r\nconnection: keep-alive" not in head):
            self.transport.close()  # type: ignore[union-attr]  # connection_lost() reconnects
        else:
            self.load.free(self)

    def broken(self, why: str) -> None:
        """An answer this client cannot read: its request fails, the connection is replaced."""
        req, self.req, self.buf = self.req, None, b""
        if req is not None:
            self.load.failed(req, "ProtocolError", why)
        self.transport.abort()  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        self.load.lost(self, exc)


class Load:
    """One timed window of postbacks and everything seen in it."""

    def __init__(self, args: argparse.Namespace, click_ids: list[str]) -> None:
        self.args = args
        self.click_ids = click_ids
        self.rng = random.Random(args.seed)
        self.statuses: collections.Counter[int] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()
        self.examples: list[dict[str, Any]] = []  # first few non-202 answers and errors
        self.receipts: list[str] = []
        self.with_click = 0
        self.lat_scheduled_ms: list[float] = []  # answer - scheduled time (what a partner would see)
        self.lat_sent_ms: list[float] = []  # answer - start of the request (connection wait included)
        self.send_lag_ms: list[float] = []  # start - scheduled time (generator lateness)
        self.inflight = 0  # started and not yet answered (queued for a connection or on the wire)
        self.inflight_max = 0
        self.t_last_answer = 0.0
        split = urlsplit(args.url)
        if split.scheme != "http" or not split.hostname:
            raise SystemExit(f"--url must be http://host[:port][/path], got {args.url!r}")
        self.host, self.port = split.hostname, split.port or 80
        # The request aiohttp sent, header for header (the ingester records the User-Agent).
        self.path = f"{split.path.rstrip('/')}/postback?"
        self.head = (f" HTTP/1.1\r\nHost: {split.netloc}\r\nAccept: */*\r\nAccept-Encoding: gzip, deflate, zstd\r\n"
                     f"User-Agent: {SERVER_SOFTWARE}\r\n\r\n").encode("ascii")
        self.loop: asyncio.AbstractEventLoop | None = None
        self.conns: set[Connection] = set()
        self.idle: collections.deque[Connection] = collections.deque()  # first in, first out, as aiohttp
        self.queued: collections.deque[Request] = collections.deque()  # started, waiting for a connection
        self.closing = False
        self.connect_failures: collections.Counter[str] = collections.Counter()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._click: list[int] = []  # per request: index into click_ids, or -1 (choose_clicks)
        # Pieces of the query's wire encoding, quoted once.
        self._adv_q = "advertiser_id=" + quote(args.advertiser_id, safe="")
        self._tag_q, self._kid_q = quote(args.tag, safe=""), quote(args.key_id, safe="")
        self._click_q = [quote(c, safe="") for c in click_ids]

    # -- requests ------------------------------------------------------------------
    def choose_clicks(self, n: int) -> None:
        """The click id of each of the `n` requests, drawn ahead in request order (the same draws
        as one per request at send time)."""
        rng, ids, fraction = self.rng, self.click_ids, self.args.click_fraction
        index = {c: k for k, c in enumerate(ids)}
        self._click = [index[rng.choice(ids)] if ids and rng.random() < fraction else -1 for _ in range(n)]

    def request_bytes(self, i: int) -> bytes:
        """Request i, signed now: parameters and wire order as before; the wire encoding of the
        unsigned part is built from pieces quoted once (the signature does not depend on it)."""
        a = self.args
        order_id, amount = f"{a.tag}-{i:07d}", f"{i % 500 + 1}.{i % 100:02d}"
        params = [("advertiser_id", a.advertiser_id), ("event", "purchase"), ("order_id", order_id),
                  ("amount", amount), ("currency", "USD")]
        click = self._click[i]
        if click >= 0:
            params.insert(2, ("click_id", self.click_ids[click]))
            query = f"{self._adv_q}&event=purchase&click_id={self._click_q[click]}"
        else:
            query = f"{self._adv_q}&event=purchase"
        signed = sign_query(params, a.secret, int(time.time()), a.key_id)
        ts, sig = signed[len(params)][1], signed[-1][1]  # sign_query appends ts, kid, sig
        query += f"&order_id={self._tag_q}-{i:07d}&amount={amount}&currency=USD&ts={ts}&kid={self._kid_q}&sig={sig}"
        return ("GET " + self.path + query).encode("ascii") + self.head

    def start(self, i: int, scheduled: float) -> None:
        started = time.monotonic()
        self.send_lag_ms.append((started - scheduled) * 1000)
        if self._click[i] >= 0:
            self.with_click += 1
        self.inflight += 1
        req = (i, scheduled, started)
        if self.idle:
            conn = self.idle.popleft()
            conn.idle = False
            conn.send(req, self.request_bytes(i))
        else:
            self.queued.append(req)

    def answered(self, req: Request, status: int, body: bytes) -> None:
        i, scheduled, started = req
        ended = time.monotonic()
        if status == 202:
            try:
                receipt = json.loads(body)["receipt_id"]
            except (ValueError, KeyError, TypeError) as exc:
                self.failed(req, type(exc).__name__, f"{exc}; body {body[:200]!r}", ended)
                return
            self.receipts.append(receipt)
        elif len(self.examples) < 10:
            self.examples.append({"i": i, "status": status, "body": body[:300].decode(errors="replace")})
        self.inflight -= 1
        if ended > self.t_last_answer:
            self.t_last_answer = ended
        self.statuses[status] += 1
        self.lat_scheduled_ms.append((ended - scheduled) * 1000)
        self.lat_sent_ms.append((ended - started) * 1000)

    def failed(self, req: Request, kind: str, detail: str, ended: float | None = None) -> None:
        """No answer for `req` (counted in `errors`, without latency, as before)."""
        ended = time.monotonic() if ended is None else ended
        self.inflight -= 1
        self.t_last_answer = max(self.t_last_answer, ended)
        self.errors[kind] += 1
        if len(self.examples) < 10:
            self.examples.append({"i": req[0], "error": f"{kind}: {detail}"[:300]})

    def expire(self, now: float) -> None:
        """Fail the requests started --request-timeout ago and still unanswered."""
        limit = now - self.args.request_timeout
        queued = self.queued
        while queued and queued[0][2] <= limit:
            self.failed(queued.popleft(), "TimeoutError", "no connection became free in time", now)
        for conn in list(self.conns):
            req = conn.req
            if req is not None and req[2] <= limit:
                conn.req = None
                self.failed(req, "TimeoutError", f"no answer after {self.args.request_timeout:g}s", now)
                conn.transport.abort()  # type: ignore[union-attr]

    # -- connections ---------------------------------------------------------------
    def connected(self, conn: Connection) -> None:
        self.conns.add(conn)
        self.free(conn)

    def free(self, conn: Connection) -> None:
        if self.queued:
            req = self.queued.popleft()
            conn.send(req, self.request_bytes(req[0]))
        else:
            conn.idle = True
            self.idle.append(conn)

    def lost(self, conn: Connection, exc: Exception | None) -> None:
        self.conns.discard(conn)
        if conn.idle:
            conn.idle = False
            self.idle.remove(conn)
        req, conn.req = conn.req, None
        if req is not None:
            self.failed(req, type(exc).__name__ if exc else "ServerDisconnectedError",
                        str(exc) if exc else "the server closed the connection before answering")
        if not self.closing:
            self.spawn_reconnect()

    def spawn_reconnect(self) -> None:
        task = asyncio.ensure_future(self.reconnect())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def connect(self) -> bool:
        try:
            await self.loop.create_connection(lambda: Connection(self), self.host, self.port)  # type: ignore[union-attr]
        except OSError as exc:
            kind = type(exc).__name__
            if not self.connect_failures[kind]:
                log(f"cannot connect to {self.host}:{self.port}: {kind}: {exc} (retrying)")
            self.connect_failures[kind] += 1
            return False
        return True

    async def reconnect(self) -> None:
        delay = 0.0
        while not self.closing:
            if delay:
                await asyncio.sleep(delay)
            if await self.connect():
                return
            delay = min(1.0, max(0.05, 2 * delay))

    # -- the window ----------------------------------------------------------------
    async def run(self) -> dict[str, Any]:
        a = self.args
        target = round(a.rate * a.duration)
        self.loop = asyncio.get_running_loop()
        self.choose_clicks(target)
        # Open the connections before t0, so the window does not start with connects.
        opened = await asyncio.gather(*(self.connect() for _ in range(a.connections)))
        for _ in range(opened.count(False)):
            self.spawn_reconnect()
        cpu_before = cpu_s()
        t0 = time.monotonic() + 0.05
        t_end = t0 + a.duration
        i = 0
        throttled = 0
        last_log = last_expire = t0
        behind_max = 0
        rate, max_inflight, start = a.rate, a.max_inflight, self.start
        while i < target:
            now = time.monotonic()
            # Every request scheduled before t_end is started, even when this wake-up comes after it.
            due = min(target, int((min(now, t_end) - t0) * rate) + 1) if now >= t0 else 0
            while i < due:
                if self.inflight >= max_inflight:
                    throttled += 1
                    break
                start(i, t0 + i / rate)
                i += 1
            behind_max = max(behind_max, due - i)
            self.inflight_max = max(self.inflight_max, self.inflight)
            if now - last_expire >= TIMEOUT_CHECK_S:
                last_expire = now
                self.expire(now)
            if now - last_log >= 5.0:
                last_log = now
                log(f"{now - t0:5.1f}s: started {i:,} ({i / max(now - t0, 1e-9):,.0f}/s), "
                    f"202 {self.statuses[202]:,}, other {sum(self.statuses.values()) - self.statuses[202]:,}, "
                    f"errors {sum(self.errors.values()):,}, in flight {self.inflight:,}")
            if now >= t_end:
                break
            # Until the next request is due, but at least MIN_SLEEP_S: uvloop (libuv) timers have
            # millisecond resolution, and a shorter sleep returns at once: a busy loop.
            await asyncio.sleep(min(max(t0 + i / rate - time.monotonic(), MIN_SLEEP_S), 0.005))
        t_last_start = time.monotonic()
        sent = i
        log(f"window over: {sent:,} of {target:,} started; waiting for {self.inflight:,} in flight ...")
        deadline = time.monotonic() + a.request_timeout + 5
        while self.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
            self.expire(time.monotonic())
        cancelled = self.inflight  # only if the wait above timed out
        cpu_used = cpu_s() - cpu_before
        self.closing = True
        for conn in list(self.conns):
            conn.transport.close()  # type: ignore[union-attr]
        for task in list(self._tasks):
            task.cancel()
        await asyncio.sleep(0)
        if self.connect_failures:
            log(f"connection attempts that failed: {dict(self.connect_failures)}")
        answered = sum(self.statuses.values())
        lag = percentiles(self.send_lag_ms)
        window_s = min(t_last_start, t_end) - t0
        t_last = self.t_last_answer or time.monotonic()
        return {
            "rate_target": a.rate,
            "duration_s": a.duration,
            "target": target,
            "sent": sent,
            "unsent": target - sent,
            "send_rate": round(sent / a.duration, 1),
            "kept_rate": sent == target and lag["p99"] is not None and lag["p99"] <= a.late_ms,
            # Why not, when not: the server answered too slowly for --max-inflight (requests were
            # held back), or the generator's own event loop started requests late.
            "limited_by": None if sent == target and lag["p99"] is not None and lag["p99"] <= a.late_ms
            else "max_inflight (slow answers)" if throttled else "generator (send lag)",
            "answered": answered,
            "accepted_202": self.statuses[202],
            "non_202": answered - self.statuses[202],
            "errors": sum(self.errors.values()),
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "error_kinds": dict(self.errors),
            "cancelled": cancelled,
            "examples": self.examples,
            "with_click_id": self.with_click,
            "latency_from_scheduled_ms": percentiles(self.lat_scheduled_ms),
            "latency_from_send_ms": percentiles(self.lat_sent_ms),
            "send_lag_ms": lag,
            "behind_max": behind_max,
            "throttled_by_max_inflight": throttled,
            "inflight_max": self.inflight_max,
            "window_s": round(window_s, 3),
            "answers_until_s": round(t_last - t0, 3),
            "cpu_s": round(cpu_used, 2),
            "cpu_pct": round(100 * cpu_used / max(t_last - t0, 1e-9), 1),
            "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "t_start_monotonic": t0,
            "t_window_end_monotonic": t_end,
            "t_last_answer_monotonic": t_last,
            "receipts": self.receipts,
        }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.e2e_load",
        description="Open-loop load generator (used by bench/e2e.py): HMAC query-signed GET /postback with unique "
                    "order ids at a fixed rate for a fixed time over a pool of HTTP/1.1 keep-alive connections. "
                    "Writes counts, latency percentiles and the receipt id of every 202 as JSON to --out.")
    p.add_argument("--url", required=True, help="ingester base URL, e.g. http://127.0.0.1:8080")
    p.add_argument("--rate", type=float, required=True, help="postbacks per second to schedule")
    p.add_argument("--duration", type=float, required=True, help="seconds of the window")
    p.add_argument("--advertiser-id", required=True)
    p.add_argument("--secret", required=True, help="the advertiser's HMAC secret")
    p.add_argument("--key-id", required=True, help="the secret's key id (kid)")
    p.add_argument("--tag", required=True, help="order ids are <tag>-<i>; unique per run")
    p.add_argument("--click-ids-file", type=Path, help="JSON list of click ids to name in postbacks")
    p.add_argument("--click-fraction", type=float, default=0.9, help="share of postbacks with a click_id (0.9)")
    p.add_argument("--connections", type=int, default=256, help="keep-alive connections (default 256)")
    p.add_argument("--max-inflight", type=int, default=20_000,
                   help="requests started and not yet answered, at most (default 20000); above it the "
                        "generator stops starting requests and reports them as unsent")
    p.add_argument("--request-timeout", type=float, default=30.0, help="per-request timeout, s (default 30)")
    p.add_argument("--late-ms", type=float, default=50.0,
                   help="kept_rate is false when the p99 send lag exceeds this (default 50 ms)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, required=True, help="where to write the JSON result")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    click_ids = json.loads(args.click_ids_file.read_text()) if args.click_ids_file else []
    log(f"{args.rate:g}/s for {args.duration:g}s to {args.url}, {len(click_ids):,} click ids, "
        f"{args.connections} connections")
    loop = "uvloop" if install_uvloop() else "asyncio"
    result = asyncio.run(Load(args, click_ids).run())
    result["loop"] = loop
    args.out.write_text(json.dumps(result))
    log(f"done: sent {result['sent']:,} ({result['send_rate']:,.0f}/s), 202 {result['accepted_202']:,}, "
        f"non-202 {result['non_202']:,}, errors {result['errors']:,}, generator CPU {result['cpu_pct']}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
