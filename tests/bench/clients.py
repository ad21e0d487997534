"""The Kafka client's own cost per record: aiokafka against confluent-kafka (librdkafka).

    .venv/bin/python -m tests.bench.clients [-n N] [--rounds R] [--out PATH]

How much of a worker's CPU a native client could save, measured on the records the
fleet handles (1 KB requests, a key and five headers, 8 partitions) on the local stack's
broker, without the fleet: the process CPU time (every thread's: librdkafka's own
threads count) per record, to

* consume: read N records and touch each one's key, value and headers (aiokafka
  ``getmany`` of 2 000; confluent ``consume`` of 2 000);
* produce: send N records with ``acks=all``, awaited per 2 000 (aiokafka explicit batches
  per partition, as ``app.engine.producing.emit`` sends them; confluent ``produce`` then
  ``flush``).

Rounds alternate the clients, so a busy spell of the machine falls on both. Nothing is
asserted; the figures go into the note of the throughput issue.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer
from confluent_kafka import TopicPartition as CTopicPartition

from tests.bench.throughput import PARTITIONS, create_topics, write_request
from tests.integration.harness import BOOTSTRAP, delete_topics

BATCH = 2_000
HEADERS = [
    ("wal-namespace", b"bench"),
    ("wal-target", b"pg"),
    ("wal-attempt", b"0"),
    ("wal-received-at", b"1764633600000"),
    ("traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
]


def records(prefix: str, n: int) -> list[tuple[bytes, bytes]]:
    return [(f"key-{i % 997}".encode(), write_request(prefix, i)) for i in range(n)]


def _measured(done: int, cpu: float, wall: float) -> dict[str, float]:
    return {"us_cpu_per_record": round(cpu / done * 1e6, 2), "records_per_s": round(done / wall)}


async def produce_aiokafka(topic: str, data: list[tuple[bytes, bytes]]) -> dict[str, float]:
    producer = AIOKafkaProducer(bootstrap_servers=BOOTSTRAP, acks="all", linger_ms=5)
    await producer.start()
    try:
        cpu, wall = time.process_time(), time.perf_counter()
        for start in range(0, len(data), BATCH):
            futures = []
            batches = {p: producer.create_batch() for p in range(PARTITIONS)}
            for i, (key, value) in enumerate(data[start : start + BATCH]):
                p = i % PARTITIONS
                if batches[p].append(key=key, value=value, timestamp=None, headers=HEADERS) is None:
                    futures.append(await producer.send_batch(batches[p], topic, partition=p))
                    batches[p] = producer.create_batch()
                    batches[p].append(key=key, value=value, timestamp=None, headers=HEADERS)
            for p, batch in batches.items():
                if batch.record_count():
                    futures.append(await producer.send_batch(batch, topic, partition=p))
            await asyncio.gather(*futures)
        return _measured(len(data), time.process_time() - cpu, time.perf_counter() - wall)
    finally:
        await producer.stop()


async def produce_confluent(topic: str, data: list[tuple[bytes, bytes]]) -> dict[str, float]:
    producer = Producer({"bootstrap.servers": BOOTSTRAP, "acks": "all", "linger.ms": 5})
    cpu, wall = time.process_time(), time.perf_counter()
    for start in range(0, len(data), BATCH):
        for i, (key, value) in enumerate(data[start : start + BATCH]):
            producer.produce(topic, value, key, partition=i % PARTITIONS, headers=HEADERS)
        producer.flush(30)
    return _measured(len(data), time.process_time() - cpu, time.perf_counter() - wall)


async def consume_aiokafka(topic: str, n: int) -> dict[str, float]:
    consumer = AIOKafkaConsumer(bootstrap_servers=BOOTSTRAP, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        done, touched = 0, 0
        cpu, wall = time.process_time(), time.perf_counter()
        while done < n:
            for batch in (await consumer.getmany(timeout_ms=1000, max_records=BATCH)).values():
                for record in batch:
                    touched += len(record.key or b"") + len(record.value or b"")
                    touched += len(record.headers)
                done += len(batch)
        return _measured(done, time.process_time() - cpu, time.perf_counter() - wall)
    finally:
        await consumer.stop()


async def consume_confluent(topic: str, n: int) -> dict[str, float]:
    consumer = Consumer(
        {"bootstrap.servers": BOOTSTRAP, "group.id": f"bench-{uuid.uuid4().hex[:8]}"}
        | {"enable.auto.commit": False, "log_level": 3}
    )
    consumer.assign([CTopicPartition(topic, p, OFFSET_BEGINNING) for p in range(PARTITIONS)])
    try:
        done, touched = 0, 0
        cpu, wall = time.process_time(), time.perf_counter()
        while done < n:
            for message in consumer.consume(BATCH, 1.0):
                if message.error():
                    continue
                touched += len(message.key() or b"") + len(message.value() or b"")
                touched += len(message.headers() or ())
                done += 1
        return _measured(done, time.process_time() - cpu, time.perf_counter() - wall)
    finally:
        consumer.close()


async def run(n: int, rounds: int) -> dict[str, Any]:
    prefix = f"bc{uuid.uuid4().hex[:8]}"
    data = records(prefix, n)
    parts: dict[str, Callable[[str], Awaitable[dict[str, float]]]] = {
        "produce aiokafka": lambda t: produce_aiokafka(t, data),
        "produce confluent": lambda t: produce_confluent(t, data),
    }
    results: dict[str, list[dict[str, float]]] = {}
    try:
        for r in range(rounds):
            order = list(parts.items()) if r % 2 == 0 else list(reversed(parts.items()))
            for name, produce in order:
                topic = f"{prefix}-{name.split()[1]}-{r}"
                await create_topics(topic)
                results.setdefault(name, []).append(await produce(topic))
                consumers = [("aiokafka", consume_aiokafka), ("confluent", consume_confluent)]
                for client, consume in consumers if r % 2 == 0 else reversed(consumers):
                    got = await consume(topic, n)
                    results.setdefault(f"consume {client}", []).append(got)
    finally:
        await delete_topics(prefix)
    summary = {
        name: {
            "us_cpu_per_record_median": statistics.median(x["us_cpu_per_record"] for x in runs),
            "runs": runs,
        }
        for name, runs in results.items()
    }
    return {"records": n, "rounds": rounds, "parts": summary}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    result = asyncio.run(run(args.n, args.rounds))
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
