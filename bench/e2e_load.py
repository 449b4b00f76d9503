"""Open-loop load generator for bench/e2e.py: signed GET /postback at a fixed rate.

It runs as its own process, so its CPU is not charged to the ingester and the
benchmark can tell when the generator, rather than the pipeline, was the limit.

Schedule (open loop, like wrk2): request i is due at t0 + i / rate, whatever happened
to earlier requests. Every due request is started at once as an asyncio task on an
aiohttp keep-alive pool of --connections connections. A slow server therefore makes
requests wait for a free connection, and that wait is in the latency, which is taken
from the *scheduled* time (no coordinated omission). Requests that are not started by
t0 + duration are not sent; they are reported as `unsent`. `send_lag_ms` is how late
the generator started requests after their scheduled time: when that grows, the
generator itself could not keep the rate.

Each postback is a unique purchase (`order_id` = `<tag>-<i>`), HMAC query-signed per
docs/signing.md (ts = now, kid, sig). A --click-fraction of them carries a click_id
drawn from --click-ids-file (clicks created before the window); the rest carry none.
Nothing is retried: a retry would blur what a 202 meant.

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
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

# Run as `python bench/e2e_load.py`, Python puts bench/ first on sys.path, where bench/ingest.py would
# shadow the `ingest` package: put the repository there instead (see bench/common.py).
_BENCH = Path(__file__).resolve().parent
sys.path[:] = [str(_BENCH.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _BENCH]

import aiohttp  # noqa: E402
from yarl import URL  # noqa: E402

from bench.common import log as _log  # noqa: E402
from processors.signing import sign_query  # noqa: E402


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
        self.lat_sent_ms: list[float] = []  # answer - actual start of the request task
        self.send_lag_ms: list[float] = []  # actual start - scheduled time (generator lateness)
        self.inflight: set[asyncio.Task[None]] = set()
        self.inflight_max = 0
        self.t_last_answer = 0.0
        self._ts_cache = (0, 0)

    def query(self, i: int) -> str:
        a = self.args
        params = [("advertiser_id", a.advertiser_id), ("event", "purchase"), ("order_id", f"{a.tag}-{i:07d}"),
                  ("amount", f"{i % 500 + 1}.{i % 100:02d}"), ("currency", "USD")]
        if self.click_ids and self.rng.random() < a.click_fraction:
            params.insert(2, ("click_id", self.rng.choice(self.click_ids)))
            self.with_click += 1
        return urlencode(sign_query(params, a.secret, int(time.time()), a.key_id), quote_via=quote)

    async def one(self, session: aiohttp.ClientSession, i: int, scheduled: float) -> None:
        started = time.monotonic()
        self.send_lag_ms.append((started - scheduled) * 1000)
        url = URL(f"{self.args.url}/postback?{self.query(i)}", encoded=True)
        status, kind = -1, None
        try:
            async with session.get(url, allow_redirects=False) as resp:
                status = resp.status
                body = await resp.read()
                if status == 202:
                    self.receipts.append(json.loads(body)["receipt_id"])
                elif len(self.examples) < 10:
                    self.examples.append({"i": i, "status": status, "body": body[:300].decode(errors="replace")})
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError, KeyError) as exc:
            kind = type(exc).__name__
            if len(self.examples) < 10:
                self.examples.append({"i": i, "error": f"{kind}: {exc}"[:300]})
        ended = time.monotonic()
        self.t_last_answer = max(self.t_last_answer, ended)
        if kind is not None:
            self.errors[kind] += 1
        else:
            self.statuses[status] += 1
            self.lat_scheduled_ms.append((ended - scheduled) * 1000)
            self.lat_sent_ms.append((ended - started) * 1000)

    async def run(self) -> dict[str, Any]:
        a = self.args
        target = round(a.rate * a.duration)
        connector = aiohttp.TCPConnector(limit=a.connections, limit_per_host=a.connections)
        timeout = aiohttp.ClientTimeout(total=a.request_timeout)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            # Open the pool's connections before t0, so the window does not start with connects.
            await asyncio.gather(*(self._ping(session) for _ in range(a.connections)), return_exceptions=True)
            cpu_before = cpu_s()
            t0 = time.monotonic() + 0.05
            t_end = t0 + a.duration
            i = 0
            throttled = 0
            last_log = t0
            behind_max = 0
            while i < target:
                now = time.monotonic()
                if now >= t_end:
                    break
                due = min(target, int((now - t0) * a.rate) + 1) if now >= t0 else 0
                while i < due:
                    if len(self.inflight) >= a.max_inflight:
                        throttled += 1
                        break
                    task = asyncio.create_task(self.one(session, i, t0 + i / a.rate))
                    self.inflight.add(task)
                    task.add_done_callback(self.inflight.discard)
                    i += 1
                behind_max = max(behind_max, due - i)
                self.inflight_max = max(self.inflight_max, len(self.inflight))
                if now - last_log >= 5.0:
                    last_log = now
                    log(f"{now - t0:5.1f}s: started {i:,} ({i / max(now - t0, 1e-9):,.0f}/s), "
                        f"202 {self.statuses[202]:,}, other {sum(self.statuses.values()) - self.statuses[202]:,}, "
                        f"errors {sum(self.errors.values()):,}, in flight {len(self.inflight):,}")
                next_due = t0 + i / a.rate
                await asyncio.sleep(max(0.0, min(next_due - time.monotonic(), 0.005)))
            t_last_start = time.monotonic()
            sent = i
            log(f"window over: {sent:,} of {target:,} started; waiting for {len(self.inflight):,} in flight ...")
            if self.inflight:
                await asyncio.wait(set(self.inflight), timeout=a.request_timeout + 5)
            for task in list(self.inflight):  # only if the wait above timed out
                task.cancel()
            cancelled = len(self.inflight)
            cpu_used = cpu_s() - cpu_before
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

    async def _ping(self, session: aiohttp.ClientSession) -> None:
        async with session.get(f"{self.args.url}/healthz") as resp:
            await resp.read()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/e2e_load.py",
        description="Open-loop load generator (used by bench/e2e.py): HMAC query-signed GET /postback with unique "
                    "order ids at a fixed rate for a fixed time over an aiohttp keep-alive pool. Writes counts, "
                    "latency percentiles and the receipt id of every 202 as JSON to --out.")
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
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(Load(args, click_ids).run())
        result["loop"] = "asyncio"
    else:
        result = uvloop.run(Load(args, click_ids).run())
        result["loop"] = "uvloop"
    args.out.write_text(json.dumps(result))
    log(f"done: sent {result['sent']:,} ({result['send_rate']:,.0f}/s), 202 {result['accepted_202']:,}, "
        f"non-202 {result['non_202']:,}, errors {result['errors']:,}, generator CPU {result['cpu_pct']}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
