"""The baseline for bench/process.py: a bare confluent-kafka consume -> produce loop.

One process, one thread: a Consumer in a fresh consumer group reads `--topic-in` from the
beginning in `consume(1000, 0.5)` batches, and a Producer (the project's
`postback.kafka.producer_config`: idempotent, acks=all, lz4, murmur2_random) writes each
record's key and value unchanged to `--topic-out`, until `--count` records were
forwarded; then it flushes, so every forwarded record is acknowledged by the broker.

No decoding, no signature check, no state: this is what one Python process with
librdkafka costs to move the same records through the same broker, the floor that the
faust worker's three stages are compared with.

Prints one JSON line to stdout with `time.monotonic()` readings (CLOCK_MONOTONIC is
system-wide on Linux, so the parent can compare them with its own clock):
`{"t_imported": .., "t_first_record": .., "t_last_ack": .., "forwarded": .., "acked": .., "delivery_errors": ..,
"max_rss_kb": ..}` (peak RSS of this process).
Exit status 0 when `--count` records were forwarded and acknowledged, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
import uuid

from confluent_kafka import Consumer, Producer

from postback.kafka import producer_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bare_forwarder", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bootstrap", required=True, help="Kafka bootstrap servers")
    parser.add_argument("--topic-in", required=True, help="topic to read from the beginning")
    parser.add_argument("--topic-out", required=True, help="topic to write every record to, unchanged")
    parser.add_argument("--count", type=int, required=True, help="stop after this many records")
    parser.add_argument("--timeout", type=float, default=300.0, help="give up after this many seconds")
    args = parser.parse_args(argv)
    t_imported = time.monotonic()

    acked = 0
    errors = 0

    def delivered(err: object, _msg: object) -> None:
        nonlocal acked, errors
        if err is None:
            acked += 1
        else:
            errors += 1

    consumer = Consumer({"bootstrap.servers": args.bootstrap, "group.id": f"bench-bare_{uuid.uuid4().hex[:12]}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": True})
    producer = Producer(producer_config(args.bootstrap))
    consumer.subscribe([args.topic_in])
    forwarded = 0
    t_first: float | None = None
    deadline = t_imported + args.timeout
    try:
        while forwarded < args.count and time.monotonic() < deadline:
            for msg in consumer.consume(1000, 0.5):
                if msg.error():
                    print(f"bare_forwarder: consume error: {msg.error()}", file=sys.stderr)
                    continue
                if t_first is None:
                    t_first = time.monotonic()
                while True:
                    try:
                        producer.produce(args.topic_out, msg.value(), msg.key(), on_delivery=delivered)
                        break
                    except BufferError:  # local queue full: let deliveries drain
                        producer.poll(0.01)
                forwarded += 1
                if forwarded >= args.count:
                    break
            producer.poll(0)
        left = producer.flush(max(1.0, deadline - time.monotonic()))
        t_last_ack = time.monotonic()
    finally:
        consumer.close()
    print(json.dumps({"t_imported": t_imported, "t_first_record": t_first, "t_last_ack": t_last_ack,
                      "forwarded": forwarded, "acked": acked, "unflushed": left, "delivery_errors": errors,
                      "max_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}),
          flush=True)
    return 0 if forwarded >= args.count and acked >= args.count and errors == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
