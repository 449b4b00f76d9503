"""The faust floor for bench/process.py: a faust-streaming app that only counts the records.

One process: a `faust.App` with the settings the processor's app uses (at-least-once,
commit every `ProcessOptions.commit_interval_s`, `producer_acks=-1`, `producer_linger_ms=5`,
`stream_wait_empty=False`, earliest offsets, the same session timeout and partition count;
read from an app that `processors.app.create_app` builds, see `PROCESSOR_SETTINGS`), with
uvloop installed first as the processor worker does, a `memory://` store in a temporary
datadir, its web server off, and a fresh app id (so a fresh consumer group) per run.
One agent over `--topic-in` (raw key and value serializers) iterates `stream.events()`
and counts, until `--count` records were read. It is started with
`faust.Worker(...).execute_from_commandline()`, as `processors.worker.run_worker` starts
the processor.

No decoding, no state, no output: this is what faust itself (its consumer, its stream
and agent machinery, acking, commits) costs to read the same records on the same
broker; no faust worker can drain that topic faster on this host. With `--mode send`
the agent also does `await out_topic.send(key=..., value=...)` per event to the scratch
topic `--topic-out` and flushes faust's producer at the end, so the difference from
`--mode consume` is faust's own per-send cost.

Prints one JSON line to the original stdout with `time.monotonic()` readings
(CLOCK_MONOTONIC is system-wide on Linux, so the parent can compare them with its own clock):
`{"t_imported": .., "t_first_record": .., "t_last": .., "consumed": .., "sent": .., "acked": .., "mode": ..,
"loop": .., "max_rss_kb": ..}`; `t_last` is when the last record was counted (with `--mode send`: when
faust's producer was flushed after it), `max_rss_kb` the peak RSS of this process.
Exit status 0 when `--count` records were consumed (and, with `--mode send`, acknowledged), 1 otherwise
(including `--timeout`). It leaves with `os._exit` once it has printed: faust's shutdown is not measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import faust

from deploy.procs import free_port
from postback.config import ProcessOptions, Settings
from postback.eventloop import install_uvloop
from postback.partners import PartnerConfig
from processors.app import broker_url, create_app

#: The processor app's settings the floor takes over: how it consumes, acks, commits and produces.
PROCESSOR_SETTINGS = ("topic_partitions", "topic_replication_factor", "processing_guarantee",
                      "broker_commit_interval", "broker_session_timeout", "broker_heartbeat_interval",
                      "producer_acks", "producer_linger", "stream_wait_empty", "consumer_auto_offset_reset",
                      "web_bind")


def processor_settings(bootstrap: str, data_dir: str) -> dict[str, Any]:
    """`PROCESSOR_SETTINGS` as `processors.app.create_app` sets them, read from an app it builds and
    that is never started (so the floor follows any change there); about 0.05 s."""
    processor = create_app(Settings.from_env({}), bootstrap, PartnerConfig.empty(), ProcessOptions(),
                           Path(data_dir))
    return {name: getattr(processor.conf, name) for name in PROCESSOR_SETTINGS}


def create_floor_app(bootstrap: str, app_id: str, data_dir: str) -> faust.App:
    """A faust app with the processor app's consumer, producer and commit settings, a memory store and no
    tables; its web server is off (its port would be a free one on 127.0.0.1)."""
    return faust.App(app_id, broker=broker_url(bootstrap), store="memory://", datadir=data_dir,
                     web_port=free_port(), web_enabled=False, **processor_settings(bootstrap, data_dir))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.faust_floor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bootstrap", required=True, help="Kafka bootstrap servers")
    parser.add_argument("--topic-in", required=True, help="topic to read from the beginning")
    parser.add_argument("--count", type=int, required=True, help="stop after this many records")
    parser.add_argument("--mode", choices=["consume", "send"], default="consume",
                        help="consume: only count each event (default); send: also send its key and value, "
                             "unchanged, to --topic-out with faust's producer")
    parser.add_argument("--topic-out", help="with --mode send: the scratch topic to send every record to")
    parser.add_argument("--app-id-prefix", default="bench-faust-floor",
                        help="the app id (consumer group) is PREFIX_<12 hex>, new each run; faust's internal "
                             "topics start with it (default bench-faust-floor)")
    parser.add_argument("--timeout", type=float, default=300.0, help="give up after this many seconds")
    args = parser.parse_args(argv)
    if args.mode == "send" and not args.topic_out:
        parser.error("--mode send needs --topic-out")
    t_imported = time.monotonic()
    send = args.mode == "send"

    loop = "uvloop" if install_uvloop() else "asyncio"  # before faust creates its loop, as the processor does
    data_dir = tempfile.mkdtemp(prefix="faust-floor-")
    app = create_floor_app(args.bootstrap, f"{args.app_id_prefix}_{uuid.uuid4().hex[:12]}", data_dir)
    topic_in = app.topic(args.topic_in, key_type=bytes, value_type=bytes, key_serializer="raw",
                         value_serializer="raw")
    topic_out = app.topic(args.topic_out, key_type=bytes, value_type=bytes, key_serializer="raw",
                          value_serializer="raw") if send else None
    state: dict[str, Any] = {"consumed": 0, "sent": 0, "acked": 0, "t_first_record": None}

    def finish(code: int) -> None:
        """Print the result on the original stdout (fd 1; faust may have replaced sys.stdout) and leave now."""
        line = json.dumps({"t_imported": t_imported, "t_first_record": state["t_first_record"],
                           "t_last": time.monotonic(), "consumed": state["consumed"], "sent": state["sent"],
                           "acked": state["acked"], "mode": args.mode, "loop": loop,
                           "max_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss})
        os.write(1, (line + "\n").encode())
        sys.stderr.flush()
        shutil.rmtree(data_dir, ignore_errors=True)
        os._exit(code)

    def delivered(_fut: Any) -> None:
        state["acked"] += 1

    @app.agent(topic_in)
    async def count(stream: Any) -> None:
        async for event in stream.events():
            if state["t_first_record"] is None:
                state["t_first_record"] = time.monotonic()
            if topic_out is not None:
                await topic_out.send(key=event.key, value=event.value, callback=delivered)
                state["sent"] += 1
            state["consumed"] += 1
            if state["consumed"] >= args.count:
                if topic_out is not None:
                    await app.producer.flush()  # every sent record acknowledged, as the bare forwarder flushes
                finish(0 if state["acked"] >= args.count or not send else 1)

    @app.task
    async def watchdog() -> None:
        await asyncio.sleep(max(0.0, t_imported + args.timeout - time.monotonic()))
        print(f"faust_floor: only {state['consumed']} of {args.count} records after {args.timeout:g}s",
              file=sys.stderr)
        finish(1)

    # As processors.worker.run_worker starts it, but with faust's own terminal output (its start-up spinner
    # writes cursor escapes at WARNING) on stderr: stdout carries only the JSON line.
    worker = faust.Worker(app, loglevel="WARNING", quiet=True, console_port=0, redirect_stdouts=False,
                          stdout=sys.stderr)
    worker.execute_from_commandline()  # never returns normally: finish() leaves the process
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
