"""End-to-end fixtures: the whole pipeline exactly as users run it (`postback run`), driven over HTTP.

`start_pipeline` starts `python -m app.cli run` against a given Kafka and ClickHouse
(KAFKA_BOOTSTRAP_SERVERS / CLICKHOUSE_URL, so it starts no stack of its own) with a
unique topic prefix, database, state directory and free ports, and a partner file
written here. Stopping it (`Pipeline.shutdown`) sends SIGTERM, waits (bounded), and
checks the exit code and that no process of its tree is left (leftovers are killed).

`PostbackStream` is a partner's server in a background thread: ~N signed postbacks per
second with unique order ids over aiohttp, recording every answer.
`assert_every_202_recorded_once` is the no-loss / no-duplicate check of the fault tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from deploy.procs import alive_since, children, cmdline, die_with_parent, free_port, start_time
from deploy.providers import ClickHouseService, KafkaService, unique_name
from processors.signing import sign_query

ROOT = Path(__file__).resolve().parents[2]

ADVERTISER = "acme-e2e"
KID = "k1"
SECRET = "e2e-secret-k1-0123456789abcdef"
TOKEN = "e2e-legacy-token-0123456789abcdef"
OFFER = "offer-e2e"
#: The landing URL carries the click id back to the advertiser, as a real integration does.
LANDING = "https://shop.example/landing?cid={click_id}&aff={affiliate_id}"

PARTNERS_TOML = f"""
[advertisers.{ADVERTISER}]
auth_modes = ["hmac", "token"]
secrets = {{ {KID} = "{SECRET}" }}
token = "{TOKEN}"

[offers.{OFFER}]
advertiser_id = "{ADVERTISER}"
landing_url = "{LANDING}"
attribution_window_days = 7
"""

FORM_HEADERS = {"Content-Type": "application/x-www-form-urlencoded"}

#: Client chatter while Kafka or ClickHouse is down: cut from the logs shown in failures.
_NOISE = re.compile(r"Connection refused|Connect call failed|NodeNotReadyError|not ready \(node id|"
                    r"Marking the coordinator dead|coordinator \(node \d+\) is either")

#: Lines that report a crash: a faust agent, a sink thread, a child the supervisor restarts.
_CRASH = re.compile(r"Crashed reason=|crashed$|exited with -?\d+; restarting|Traceback \(most recent")

#: Bounds of every wait in this package (seconds).
READY_TIMEOUT_S = 150.0
STOP_TIMEOUT_S = 150.0
LEFTOVER_TIMEOUT_S = 15.0
#: Waiting for outcome rows gives up when none was added for this long (a wedged pipeline).
STALL_TIMEOUT_S = 45.0


# ----------------------------------------------------------------------------- helpers
def eventually(fn: Callable[[], Any], timeout: float, what: str, interval: float = 0.5) -> Any:
    """Call `fn` until it returns something truthy (returned) or `timeout` passes (AssertionError).

    Exceptions from `fn` count as "not yet" (a service may be restarting), the last one is reported.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            value = fn()
            if value:
                return value
            last = value
        except Exception as exc:  # noqa: BLE001
            last = exc
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")
        time.sleep(interval)


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def http_get(url: str, timeout: float = 20.0) -> Response:
    """One GET, no redirect following, any status returned (not raised)."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request("GET", parts.path + (f"?{parts.query}" if parts.query else ""))
        resp = conn.getresponse()
        return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


def signed_query(params: Sequence[tuple[str, str]], secret: str = SECRET, kid: str | None = KID,
                 ts: int | None = None) -> str:
    """The query string of a postback signed as docs/signing.md says (query signing)."""
    signed = sign_query(list(params), secret, int(time.time()) if ts is None else ts, kid)
    return urllib.parse.urlencode(signed, quote_via=urllib.parse.quote)


def postback_params(order_id: str, event: str = "purchase", amount: str | None = "10.00",
                    click_id: str | None = None, currency: str = "USD") -> list[tuple[str, str]]:
    params = [("advertiser_id", ADVERTISER), ("event", event), ("order_id", order_id)]
    if click_id:
        params.append(("click_id", click_id))
    if amount is not None:
        params += [("amount", amount), ("currency", currency)]
    return params


def ingest_workers(ingest_pid: int) -> list[int]:
    """The ingest worker processes (multiprocessing spawn children) of an ingest parent."""
    return [pid for pid in children(ingest_pid) if "spawn_main" in cmdline(pid)]


# ----------------------------------------------------------------------------- the pipeline
@dataclass
class Pipeline:
    """One `postback run` and what a test needs to drive and inspect it."""

    proc: subprocess.Popen[bytes]
    url: str
    database: str
    prefix: str
    state_dir: Path
    run_log: Path
    bootstrap: str
    clickhouse_url: str
    #: Every process of its tree ever seen: pid -> start time (checked at shutdown).
    known: dict[int, str | None] = field(default_factory=dict)
    #: Receipt ids of every 202 this test got through `get` (checked against postback_outcomes).
    receipts_202: list[str] = field(default_factory=list)
    #: The children's pids once ready: run.json's children later tell which were restarted.
    first_children: dict[str, int] = field(default_factory=dict)
    #: Set by `shutdown`: the problems it found (None while running).
    stopped: list[str] | None = None
    #: True once a test asserted on `shutdown`'s result itself (teardown then only cleans up).
    checked: bool = False

    @property
    def run_file(self) -> Path:
        return self.state_dir / "run.json"

    def info(self) -> dict[str, Any]:
        try:
            return json.loads(self.run_file.read_text())
        except (OSError, ValueError):
            return {}

    def track(self) -> dict[int, str | None]:
        """Record every process currently in the tree of `postback run`."""
        todo = [self.proc.pid]
        while todo:
            pid = todo.pop()
            if pid not in self.known or self.known[pid] is None:
                self.known[pid] = start_time(pid)
            todo += children(pid)
        for pid in (self.info().get("children") or {}).values():
            if pid and pid not in self.known:
                self.known[pid] = start_time(pid)
        return self.known

    def children(self) -> dict[str, int]:
        self.track()
        return dict(self.info().get("children") or {})

    def child(self, name: str, not_pid: int | None = None, timeout: float = 60.0) -> int:
        """The live pid of child `name` per run.json (other than `not_pid`: wait for a restart)."""
        def found() -> int | None:
            self.assert_running()
            pid = self.children().get(name)
            return pid if pid and pid != not_pid and alive_since(pid, None) else None

        return eventually(found, timeout, f"a live {name} child (not {not_pid}) in {self.run_file}; "
                                          f"{self.logs()}")

    def assert_running(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"postback run exited with {self.proc.returncode}:\n{self.logs()}")

    def get(self, path_and_query: str, timeout: float = 20.0) -> Response:
        """GET from the ingester; a 202's receipt id is remembered."""
        resp = http_get(self.url + path_and_query, timeout)
        if resp.status == 202:
            self.receipts_202.append(resp.json()["receipt_id"])
        return resp

    def client(self) -> Any:
        import clickhouse_connect

        return clickhouse_connect.get_client(dsn=self.clickhouse_url, database=self.database)

    def query(self, sql: str, parameters: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Rows as dicts, from a fresh client (ClickHouse may have been restarted)."""
        result = self.client().query(sql, parameters=parameters or {})
        return [dict(zip(result.column_names, row)) for row in result.result_rows]

    def outcomes(self) -> dict[str, list[dict[str, Any]]]:
        """receipt_id -> its rows in postback_outcomes FINAL (exactly one each, if all is well)."""
        found: dict[str, list[dict[str, Any]]] = {}
        for row in self.query("SELECT receipt_id, outcome, reason, conversion_id FROM postback_outcomes FINAL"):
            found.setdefault(row["receipt_id"], []).append(row)
        return found

    def _log_files(self) -> list[Path]:
        return [self.run_log, *sorted((self.state_dir / "logs").glob("*.log"))]

    def crashes(self) -> list[str]:
        """Crash reports in the logs: faust agent crashes, crashed sink threads, supervisor restarts."""
        found = []
        for log in self._log_files():
            try:
                text = log.read_text(errors="replace").splitlines()
            except OSError:
                continue
            found += [f"{log.name}: {line.strip()[:400]}" for line in text if _CRASH.search(line)]
        return found

    def restarted(self) -> dict[str, tuple[int, int]]:
        """Children whose pid changed since ready: name -> (first pid, current pid)."""
        now = self.children()
        return {name: (pid, now.get(name)) for name, pid in self.first_children.items() if now.get(name) != pid}

    def logs(self, lines: int = 25) -> str:
        """Crash reports, then the end of every log without the clients' connection-refused chatter."""
        crashes = self.crashes()
        parts = [f"--- crash reports in the logs ({len(crashes)}):", *crashes[:12]]
        for log in self._log_files():
            try:
                text = log.read_text(errors="replace").splitlines()
            except OSError:
                continue
            kept = [line for line in text if not _NOISE.search(line)]
            parts.append(f"--- {log} (last {lines} of {len(kept)} lines, {len(text) - len(kept)} noise lines cut):\n"
                         + "\n".join(kept[-lines:]))
        return "\n".join(parts)

    def stop_and_check(self) -> None:
        """Shut down now and fail this test (not its teardown) on a non-zero exit or leftovers."""
        self.checked = True
        problems = self.shutdown()
        assert not problems, "\n".join(problems)

    def shutdown(self, timeout: float = STOP_TIMEOUT_S) -> list[str]:
        """SIGTERM `postback run`, wait (bounded), kill leftovers; returns the problems found. Idempotent."""
        if self.stopped is not None:
            return self.stopped
        problems: list[str] = []
        self.track()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout)
            if code != 0:
                problems.append(f"postback run exited with {code} (expected 0)")
        except subprocess.TimeoutExpired:
            problems.append(f"postback run did not exit within {timeout:.0f}s of SIGTERM")
            self.proc.kill()
            self.proc.wait(timeout=30)
        deadline = time.monotonic() + LEFTOVER_TIMEOUT_S
        left = [pid for pid, started in self.known.items() if alive_since(pid, started)]
        while left and time.monotonic() < deadline:
            time.sleep(0.2)
            left = [pid for pid, started in self.known.items() if alive_since(pid, started)]
        if left:
            problems.append("processes left behind: " + "; ".join(f"{pid} {cmdline(pid)[:120]}" for pid in left))
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if problems:
            problems.append(self.logs(40))
        self.stopped = problems
        return problems


def start_pipeline(tmp: Path, bootstrap: str, clickhouse_url: str, *extra: str,
                   ready_timeout: float = READY_TIMEOUT_S, partners_toml: str = PARTNERS_TOML) -> Pipeline:
    """Start `postback run` on free ports and wait (bounded) until run.json says ready and lists its children."""
    tmp.mkdir(parents=True, exist_ok=True)
    state = tmp / "state"
    partners = tmp / "partners.toml"
    partners.write_text(partners_toml)
    prefix, database, port = unique_name("e2e"), unique_name("e2e"), free_port()
    env = dict(os.environ, KAFKA_BOOTSTRAP_SERVERS=bootstrap, CLICKHOUSE_URL=clickhouse_url,
               POSTBACK_STATE_DIR=str(state), POSTBACK_TOPIC_PREFIX=prefix, POSTBACK_CONFIG=str(partners))
    env.pop("POSTBACK_SINK_FAULT", None)
    argv = [sys.executable, "-m", "app.cli", "run", "--port", str(port),
            "--process-web-port", str(free_port()), "--sink-metrics-port", str(free_port()),
            "--late-click-wait", "5", "--database", database, *extra]
    run_log = tmp / "run.log"
    with open(run_log, "ab") as out:
        proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)
    pipe = Pipeline(proc, f"http://127.0.0.1:{port}", database, prefix, state, run_log, bootstrap, clickhouse_url)

    def ready() -> bool:
        pipe.assert_running()
        pipe.track()
        info = pipe.info()
        return bool(info.get("ready") and info.get("children") and all(info["children"].values()))

    try:
        eventually(ready, ready_timeout, "postback run to be ready", interval=0.25)
        assert pipe.info()["ingest_url"] == pipe.url
        pipe.first_children = pipe.children()
    except BaseException:
        pipe.shutdown()
        raise
    return pipe


@contextlib.contextmanager
def running_pipeline(tmp: Path, bootstrap: str, clickhouse_url: str, *extra: str,
                     partners_toml: str = PARTNERS_TOML) -> Iterator[Pipeline]:
    """A started pipeline; on leaving, SIGTERM it and fail on a non-zero exit or leftover processes."""
    pipe = start_pipeline(tmp, bootstrap, clickhouse_url, *extra, partners_toml=partners_toml)
    try:
        yield pipe
    finally:
        problems = pipe.shutdown()
    assert pipe.checked or not problems, "\n".join(problems)


@pytest.fixture
def pipeline_factory(tmp_path: Path) -> Iterator[Callable[..., Pipeline]]:
    """start(bootstrap, clickhouse_url, *extra_args) -> Pipeline; every one is stopped and checked at teardown."""
    stack = contextlib.ExitStack()
    count = [0]

    def start(bootstrap: str, clickhouse_url: str, *extra: str) -> Pipeline:
        count[0] += 1
        return stack.enter_context(running_pipeline(tmp_path / f"run{count[0]}", bootstrap, clickhouse_url,
                                                    *extra))

    with stack:
        yield start


@pytest.fixture(scope="module")
def pipeline(kafka: KafkaService, clickhouse: ClickHouseService,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    """One pipeline for a whole module, on the session's Kafka and ClickHouse."""
    with running_pipeline(tmp_path_factory.mktemp("e2e"), kafka.bootstrap_servers, clickhouse.url) as pipe:
        yield pipe


# ----------------------------------------------------------------------------- traffic
def make_clicks(pipe: Pipeline, n: int, affiliate: str = "aff-stream") -> list[str]:
    """`n` clicks through GET /click; returns their click ids (taken from the redirect)."""
    ids = []
    for i in range(n):
        resp = http_get(f"{pipe.url}/click?offer_id={OFFER}&affiliate_id={affiliate}&sub1=s{i}")
        assert resp.status == 302, (resp.status, resp.body)
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(resp.headers["location"]).query)
        ids.append(query["cid"][0])
    return ids


@dataclass(frozen=True)
class Sent:
    """One postback of a stream and its answer: status -1 is a connection error or timeout."""

    order_id: str
    status: int
    receipt_id: str | None
    started: float
    ended: float
    error: str | None = None


class PostbackStream:
    """A partner's server: ~`rate` signed postbacks/s with unique order ids, from a background thread.

    Postbacks are form POSTs signed over their body; every third names one of `click_ids`
    (so attribution runs too). Answers are recorded whatever they are; nothing is retried
    (a retry would blur what a 202 meant).
    """

    def __init__(self, url: str, tag: str, rate: float = 120.0, click_ids: Sequence[str] = (),
                 max_inflight: int = 48, request_timeout: float = 20.0) -> None:
        self.url = url
        self.tag = tag
        self.rate = rate
        self.click_ids = list(click_ids)
        self.max_inflight = max_inflight
        self.request_timeout = request_timeout
        self.results: list[Sent] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self) -> PostbackStream:
        self._thread = threading.Thread(target=self._main, name=f"stream-{self.tag}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 60.0) -> list[Sent]:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the postback stream did not stop"
        if self._error is not None:
            raise self._error
        return list(self.results)

    def count(self, status: int = 202, since: float = 0.0) -> int:
        with self._lock:
            return sum(1 for r in self.results if r.status == status and r.started >= since)

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as exc:  # noqa: BLE001 - reported by stop()
            self._error = exc

    async def _run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self.request_timeout)
        # A connection per request, as partners' servers mostly send them: the kernel spreads them over
        # the ingest workers (SO_REUSEPORT), so every worker serves part of the stream.
        connector = aiohttp.TCPConnector(limit=self.max_inflight, force_close=True)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            inflight: set[asyncio.Task[None]] = set()
            i = 0
            started = time.monotonic()
            while not self._stop.is_set():
                due = int((time.monotonic() - started) * self.rate)
                while i < due and len(inflight) < self.max_inflight:
                    task = asyncio.create_task(self._one(session, i))
                    inflight.add(task)
                    task.add_done_callback(inflight.discard)
                    i += 1
                if i < due:  # saturated (a fault makes answers slow): do not build a backlog
                    started = time.monotonic() - i / self.rate
                await asyncio.sleep(0.01)
            if inflight:
                await asyncio.wait(inflight, timeout=self.request_timeout + 5)

    async def _one(self, session: aiohttp.ClientSession, i: int) -> None:
        order_id = f"{self.tag}-{i:06d}"
        click_id = self.click_ids[i % len(self.click_ids)] if self.click_ids and i % 3 == 0 else None
        body = signed_query(postback_params(order_id, amount=f"{i % 100 + 1}.50", click_id=click_id))
        started = time.monotonic()
        status, receipt, error = -1, None, None
        try:
            # A signed form POST: aiohttp silently resends an idempotent GET once when the server drops
            # the connection, which would turn a lost answer into a partner retry (a duplicate outcome).
            async with session.post(f"{self.url}/postback", data=body.encode(), headers=FORM_HEADERS) as resp:
                status = resp.status
                if status == 202:
                    receipt = (await resp.json())["receipt_id"]
                else:
                    await resp.read()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            status, error = -1, f"{type(exc).__name__}: {exc}"
        with self._lock:
            self.results.append(Sent(order_id, status, receipt, started, time.monotonic(), error))


def summarize(sends: Sequence[Sent]) -> dict[int, int]:
    statuses: dict[int, int] = {}
    for s in sends:
        statuses[s.status] = statuses.get(s.status, 0) + 1
    return dict(sorted(statuses.items()))


def warm_up(pipe: Pipeline, tag: str, timeout: float = 120.0) -> Sent:
    """One signed postback, waited for until its outcome row is in ClickHouse (the whole path is up)."""
    order_id = f"{tag}-warmup"
    started = time.monotonic()
    resp = pipe.get("/postback?" + signed_query(postback_params(order_id)))
    assert resp.status == 202, (resp.status, resp.body)
    receipt = resp.json()["receipt_id"]
    eventually(lambda: pipe.query("SELECT 1 FROM postback_outcomes FINAL WHERE receipt_id = {r:String}",
                                  {"r": receipt}),
               timeout, f"the warm-up postback's outcome row\n{pipe.logs()}", interval=1.0)
    return Sent(order_id, 202, receipt, started, time.monotonic())


def wait_for_outcomes(pipe: Pipeline, receipts: set[str], timeout: float = 150.0,
                      stall: float = STALL_TIMEOUT_S) -> str | None:
    """Wait until every receipt has an outcome row; None, or why not.

    Gives up after `timeout`, or after `stall` seconds without a single new outcome row,
    or at once when a processor agent crashed (faust keeps the worker running without it).
    """
    started = last_progress = time.monotonic()
    have = -1
    while True:
        pipe.assert_running()
        try:
            outcomes = set(pipe.outcomes())
        except Exception:  # noqa: BLE001 - ClickHouse may be restarting
            outcomes = set()
        if receipts <= outcomes:
            return None
        now = time.monotonic()
        if len(outcomes) > have:
            have, last_progress = len(outcomes), now
        agent_crashes = [c for c in pipe.crashes() if "Crashed reason=" in c]
        if agent_crashes:
            return f"a processor agent crashed: {agent_crashes[0]}"
        if now - last_progress > stall:
            return f"no new outcome row for {stall:.0f}s ({now - started:.0f}s after the stream ended)"
        if now - started > timeout:
            return f"still incomplete after {timeout:.0f}s"
        time.sleep(1.0)


def assert_every_202_recorded_once(pipe: Pipeline, sends: Sequence[Sent], timeout: float = 150.0) -> dict[str, Any]:
    """No loss, no duplicate, for a stream of unique orders.

    - every 202 receipt gets (within `timeout`) exactly one row in postback_outcomes FINAL,
      and that outcome is `accepted` (each order was sent once, correctly signed);
    - no conversion_id twice in conversions FINAL, no order twice;
    - every order that got a 202 has its conversion; a conversion of an order that got no
      202 is allowed only for a request whose answer was lost (connection error, 503 after
      a delivery timeout): a 202 promises "recorded", a non-202 does not promise "not";
    - count(conversions FINAL) == distinct orders accepted, where those are the 202'd
      orders plus such recorded-without-a-202 ones, and equals the accepted outcomes.
    """
    ok = [s for s in sends if s.status == 202]
    receipts = {s.receipt_id for s in ok}
    assert len(receipts) == len(ok), "the ingester gave one receipt id to two requests"
    orders_202 = {s.order_id for s in ok}
    assert len(orders_202) == len(ok), "the stream sent an order twice"
    unanswered = {s.order_id for s in sends if s.status != 202 and not 400 <= s.status < 500}

    why = wait_for_outcomes(pipe, receipts, timeout)
    if why:
        missing = receipts - set(pipe.outcomes())
        lost = sorted((s.order_id, s.receipt_id) for s in ok if s.receipt_id in missing)
        raise AssertionError(
            f"{len(missing)} of {len(receipts)} receipts that got a 202 have no outcome row: {why} "
            f"(first: {lost[:5]}); statuses {summarize(sends)}\n{pipe.logs()}")

    outcomes = pipe.outcomes()
    multi = {r: rows for r, rows in outcomes.items() if len(rows) != 1}
    assert not multi, f"receipts with several outcome rows in FINAL: {list(multi.items())[:5]}"
    not_accepted = {r: outcomes[r][0] for r in receipts if outcomes[r][0]["outcome"] != "accepted"}
    assert not not_accepted, (f"{len(not_accepted)} unique, correctly signed postbacks that got a 202 were not "
                              f"accepted: {list(not_accepted.items())[:5]}")

    tags = sorted({s.order_id.rsplit("-", 1)[0] for s in sends})
    conversions = pipe.query(
        "SELECT conversion_id, order_id, receipt_id, version FROM conversions FINAL "
        "WHERE arrayExists(t -> startsWith(assumeNotNull(order_id), t), {tags:Array(String)})", {"tags": tags})
    by_id: dict[str, int] = {}
    by_order: dict[str, int] = {}
    for c in conversions:
        by_id[c["conversion_id"]] = by_id.get(c["conversion_id"], 0) + 1
        by_order[c["order_id"]] = by_order.get(c["order_id"], 0) + 1
    assert not [k for k, n in by_id.items() if n > 1], "a conversion_id appears twice in conversions FINAL"
    assert not [k for k, n in by_order.items() if n > 1], \
        f"orders with several conversions: {[k for k, n in by_order.items() if n > 1][:5]}"
    conv_orders = set(by_order)
    missing_orders = orders_202 - conv_orders
    assert not missing_orders, f"{len(missing_orders)} orders got a 202 but have no conversion: " \
                               f"{sorted(missing_orders)[:5]}"
    unexplained = conv_orders - orders_202 - unanswered
    assert not unexplained, f"conversions of orders nobody sent or that got a 4xx: {sorted(unexplained)[:5]}"
    accepted_outcome_conversions = {rows[0]["conversion_id"] for rows in outcomes.values()
                                    if rows[0]["outcome"] == "accepted"}
    assert len(conversions) == len(orders_202 | (conv_orders & unanswered)) == len(accepted_outcome_conversions), \
        (len(conversions), len(orders_202), len(conv_orders & unanswered), len(accepted_outcome_conversions))
    return {"sent": len(sends), "202": len(ok), "statuses": summarize(sends), "conversions": len(conversions),
            "recorded_without_202": len(conv_orders & unanswered)}
