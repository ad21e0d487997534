"""Part b2 of the throughput benchmark: the hand-written pipeline on confluent-kafka.

The same pipeline as :func:`tests.bench.throughput.hand_written` (aiokafka), as tightly on
confluent-kafka (librdkafka): ingest → orjson parse + check → produce to a second topic
(acks=all, same partition) → consume it → COPY into a staging table and INSERT … ON
CONFLICT DO NOTHING into a table keyed by message id; explicit offsets are committed
synchronously once the produce is acknowledged (stage 1) and once the database
transaction is committed (stage 2). One process, one event loop.

The consumers are ``confluent_kafka.aio.AIOConsumer``: each call runs the blocking
librdkafka call in a worker thread; :func:`take` hands over up to 2 000 messages at a
time, as soon as any are there (like aiokafka's ``getmany``). The producer is the plain
``confluent_kafka.Producer``: ``produce`` only enqueues (librdkafka batches and sends from
its own threads) and ``flush``, in a worker thread, waits for the acks. ``AIOProducer``
(2.16.1) is not used: it puts a coroutine, a dict copy and a future in front of every
message, resolves those futures from whichever worker thread serves the delivery reports
(not thread-safe for asyncio: under asyncio debug mode its ``flush`` raises), and they
resolve only when something polls or flushes; a batch would end in ``flush`` anyway.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import psycopg
from confluent_kafka import KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.aio import AIOConsumer

from tests.bench.throughput import Progress, TimedOut, checked_id, create_topics, drop_table
from tests.integration.harness import BOOTSTRAP, PG_DSN, pg_query

#: Messages per ``consume`` call (the aiokafka pipeline's ``max_records``).
BATCH = 2_000
#: librdkafka's own log: errors only, and no notice for each idle connection the broker closes.
QUIET: dict[str, Any] = {"log_level": 3, "log.connection.close": False}

# AIOConsumer.consume is typed ``Any``: its lists hold ``confluent_kafka.Message``.
Batch = list[Any]


async def take(consumer: AIOConsumer) -> Batch:
    """What aiokafka's ``getmany(timeout_ms=100, max_records=BATCH)`` does: the messages
    already fetched, else wait up to 0.1 s for one and take it with those then fetched.

    One ``consume(BATCH, 0.1)`` would not do: librdkafka's batch consume waits until BATCH
    messages are there or the timeout is over, so a stage fed in bursts would idle 0.1 s a batch.
    """
    batch: Batch = await consumer.consume(BATCH, 0)
    if not batch and (batch := await consumer.consume(1, 0.1)):
        batch += await consumer.consume(BATCH - 1, 0)
    return batch


async def joined(consumer: AIOConsumer, timeout: float = 60) -> Batch:
    """Consume until the group has assigned partitions (librdkafka serves the rebalance
    inside ``consume``); the messages that came with the assignment are the first batch."""
    deadline = time.monotonic() + timeout
    while True:
        batch = await take(consumer)
        if batch or await consumer.assignment():
            return batch
        if time.monotonic() > deadline:
            raise TimedOut("consumer group join", timeout, 0, 1)


async def commit(consumer: AIOConsumer, topic: str, offsets: dict[int, int]) -> None:
    """Commit ``offsets`` (partition → next offset) synchronously; a partition's error raises."""
    tps = [TopicPartition(topic, partition, offset) for partition, offset in offsets.items()]
    for tp in await consumer.commit(offsets=tps, asynchronous=False):
        if tp.error is not None:
            raise KafkaException(tp.error)


async def forward(
    consumer: AIOConsumer,
    producer: Producer,
    failed: list[KafkaError],
    topics: tuple[str, str],
    batch: Batch,
    n: int,
    p: Progress,
) -> None:
    """Stage 1: ingest → checked → ``out`` (same partition), offsets committed once acked."""
    topic, out = topics
    while True:
        offsets: dict[int, int] = {}
        for m in batch:
            if (err := m.error()) is not None:
                raise KafkaException(err)
            partition, offset, value = m.partition(), m.offset(), m.value()
            key = checked_id(value, f"{partition}-{offset}")
            if key is not None:  # a real pipeline would dead-letter it; the bench has none
                producer.produce(out, value, key, partition)
            offsets[partition] = offset + 1
        p.forwarded += len(batch)
        if offsets:
            while await asyncio.to_thread(producer.flush, 1.0):  # bounded: cancellable
                pass
            if failed:
                raise KafkaException(failed[0])
            await commit(consumer, topic, offsets)
        if p.forwarded >= n:
            return
        batch = await take(consumer)


async def write(
    consumer: AIOConsumer,
    conn: psycopg.AsyncConnection[Any],
    names: tuple[str, str],
    batch: Batch,
    n: int,
    p: Progress,
) -> None:
    """Stage 2: second topic → COPY into staging → INSERT … ON CONFLICT → commit, offsets."""
    topic, table = names
    while True:
        if batch:
            now = str(int(time.time() * 1000)).encode()
            lines, offsets = [], {}
            for m in batch:
                if (err := m.error()) is not None:
                    raise KafkaException(err)
                payload = orjson.dumps(orjson.loads(m.value())["payload"]).replace(b"\\", b"\\\\")
                lines.append(b"%s\t%s\t%s\n" % (m.key(), payload, now))
                offsets[m.partition()] = m.offset() + 1
            async with conn.cursor() as cur:
                async with cur.copy("COPY staging FROM STDIN") as copy:
                    await copy.write(b"".join(lines))
                await cur.execute(
                    f'INSERT INTO "{table}" SELECT * FROM staging ON CONFLICT DO NOTHING'
                )
                inserted = cur.rowcount
            await conn.commit()
            await commit(consumer, topic, offsets)
            p.written += inserted
        if p.written >= n:
            return
        batch = await take(consumer)


def stop(producer: Producer) -> None:
    """Drop what is still queued (nothing, after a completed run), then close: ``close``
    alone would wait for every queued message, up to ``message.timeout.ms``."""
    producer.purge()
    producer.close()


async def hand_written_confluent(topic: str, prefix: str, n: int, timeout: float) -> dict[str, Any]:
    out, table = f"{prefix}-hc-out", f"bench_{prefix}_hc"
    await create_topics(out)
    columns = "id text PRIMARY KEY, payload jsonb NOT NULL, delivered_at_ms bigint NOT NULL"
    await asyncio.to_thread(pg_query, f'CREATE TABLE "{table}" ({columns})')
    common = {"bootstrap.servers": BOOTSTRAP, **QUIET}
    consuming = {**common, "enable.auto.commit": False, "auto.offset.reset": "earliest"}
    failed: list[KafkaError] = []  # delivery reports come for failures only
    progress = Progress()
    consumers: list[AIOConsumer] = []
    producer: Producer | None = None
    conn: psycopg.AsyncConnection[Any] | None = None
    try:
        conn = await psycopg.AsyncConnection.connect(PG_DSN, connect_timeout=10)
        await conn.execute(f'CREATE TEMP TABLE staging (LIKE "{table}") ON COMMIT DELETE ROWS')
        await conn.commit()
        producer = Producer(
            {
                **common,
                "acks": "all",
                "linger.ms": 5,
                "batch.size": 512 * 1024,
                "delivery.report.only.error": True,
                "on_delivery": lambda err, _msg: failed.append(err),
            }
        )
        for group, subscribed in ((f"{prefix}-hc-1", topic), (f"{prefix}-hc-2", out)):
            consumers.append(AIOConsumer({**consuming, "group.id": group}))
            await consumers[-1].subscribe([subscribed])
        source, second = consumers
        first, first_out = await asyncio.gather(joined(source), joined(second))
        started = time.perf_counter()
        async with asyncio.timeout(timeout):
            await asyncio.gather(
                forward(source, producer, failed, (topic, out), first, n, progress),
                write(second, conn, (out, table), first_out, n, progress),
            )
        seconds = time.perf_counter() - started
    except TimeoutError:
        raise TimedOut(
            "hand-written pipeline (confluent-kafka)", timeout, progress.written, n
        ) from None
    finally:
        for consumer in consumers:
            await consumer.close()
        if producer is not None:
            await asyncio.to_thread(stop, producer)
        if conn is not None:
            await conn.close()
        await asyncio.to_thread(drop_table, table)
    rows = progress.written
    return {"rows": rows, "seconds": round(seconds, 2), "msgs_per_s": round(rows / seconds)}
