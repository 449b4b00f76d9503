"""`postback demo`: show the running stack doing real work, end to end, in a few seconds.

It uses whatever `postback stack up` (or the external-cluster variables) provides: it
creates the project's topics, writes sample click records through Kafka with the
idempotent producer, reads them back through a consumer group, loads them into
ClickHouse and prints a summary query. Later stages extend it with the ingester and
processors; what it prints always comes from the real services.
"""

from __future__ import annotations

import argparse
import time
import uuid

from postback.config import Settings


def run_demo(settings: Settings, records: int, say=print) -> dict[str, object]:
    from confluent_kafka import Consumer, Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    import clickhouse_connect
    from deploy.stack import Stack

    endpoints = Stack(settings).endpoints()
    if not endpoints["kafka"] or not endpoints["clickhouse"]:
        raise RuntimeError("the stack is not running: run `postback stack up` first (or set "
                           "KAFKA_BOOTSTRAP_SERVERS and CLICKHOUSE_URL)")
    bootstrap, ch_url = endpoints["kafka"], endpoints["clickhouse"]
    topic = f"{settings.topic_prefix}.demo-{uuid.uuid4().hex[:8]}"
    say(f"kafka {bootstrap}: creating topic {topic}")
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for fut in admin.create_topics([NewTopic(topic, 3, 1)]).values():
        fut.result(timeout=30)

    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all",
                         "linger.ms": 5, "partitioner": "murmur2_random"})
    started = time.perf_counter()
    for i in range(records):
        producer.produce(topic, key=f"click-{i}", value=f"offer-{i % 5},aff-{i % 3},{(i % 7) * 1.5}")
        producer.poll(0)
    if producer.flush(30) != 0:
        raise RuntimeError("producer did not deliver every record within 30s")
    say(f"  produced {records} records (idempotent, acks=all) in {time.perf_counter() - started:.2f}s")

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"demo-{uuid.uuid4().hex[:6]}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.subscribe([topic])
    rows: list[list[object]] = []
    deadline = time.monotonic() + 60
    while len(rows) < records and time.monotonic() < deadline:
        for msg in consumer.consume(1000, timeout=1.0):
            if msg.error():
                raise RuntimeError(str(msg.error()))
            offer, aff, amount = msg.value().decode().split(",")
            rows.append([msg.key().decode(), offer, aff, amount])
    consumer.commit(asynchronous=False)
    consumer.close()
    say(f"  consumed {len(rows)} records through a consumer group")

    client = clickhouse_connect.get_client(dsn=ch_url)
    table = f"demo_{uuid.uuid4().hex[:8]}"
    client.command(f"CREATE TABLE {table} (click_id String, offer_id String, affiliate_id String, "
                   f"amount Decimal(18, 6)) ENGINE = ReplacingMergeTree ORDER BY click_id")
    client.insert(table, rows, column_names=["click_id", "offer_id", "affiliate_id", "amount"])
    summary = client.query(f"SELECT offer_id, count(), sum(amount) FROM {table} FINAL GROUP BY offer_id "
                           f"ORDER BY offer_id").result_rows
    say(f"clickhouse {ch_url}: table {table}")
    for offer, count, total in summary:
        say(f"  {offer:<10} {count:>6} rows  amount {total}")
    client.command(f"DROP TABLE {table}")
    for fut in admin.delete_topics([topic]).values():
        fut.result(timeout=30)
    return {"produced": records, "consumed": len(rows), "offers": len(summary)}


def _demo(args: argparse.Namespace, settings: Settings) -> int:
    result = run_demo(settings, args.records)
    return 0 if result["consumed"] == result["produced"] else 1


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run a short demo against the running stack",
                       description=__doc__.split("\n\n")[1] if __doc__ else None)
    p.add_argument("--records", type=int, default=1000, help="records to send (default 1000)")
    p.set_defaults(handler=_demo)
