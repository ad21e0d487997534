"""The one way agents write to Kafka: produce, and wait until Kafka has it.

Callers ack their source records only after :func:`emit` (or
:func:`emit_until_durable`) returns: that is what makes "commit a source offset
only after what it caused is durable" true. A record Kafka refuses for good is
dead-lettered (:func:`undeliverable`), never retried forever.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

from aiokafka.errors import (
    CorruptRecordException,
    InvalidTopicError,
    MessageSizeTooLargeError,
    PolicyViolationError,
    RecordListTooLargeError,
    RecordTooLargeError,
    TopicAuthorizationFailedError,
)
from aiokafka.structs import RecordMetadata

from app.engine import rdkafka, store
from app.fleet import fleet, settings
from app.names import Record, dead_letter, encode_headers
from app.topics import NAMES

log = logging.getLogger("wal.topics")


async def emit(records: Sequence[Record]) -> int:
    """Produce ``records`` with acks=all and wait until Kafka has them all; return how many.

    Callers ack their source events only after this returns: that is what
    makes "commit a source offset only after what it caused is durable" true.
    A Kafka error propagates; callers keep their events unacked and retry.

    Records go out as one batch per (topic, partition) per call, in order, with
    partitions chosen as Kafka's default partitioner does (a keyed record by
    its key's murmur2 hash, the same partition ``producer.send`` would pick):
    one future per batch rather than per record, the largest per-record cost
    of a busy agent after Faust's own (py-spy).
    """
    producer = fleet.producer._ensure_producer()  # type: ignore[attr-defined]
    if settings.producer_client == "librdkafka":
        return await _emit_rd(producer, records)
    groups: dict[tuple[str, int], list[Record]] = {}
    for record, partition in await _partitioned(producer, records):
        groups.setdefault((record.topic, partition), []).append(record)
    futures = []
    sizes: list[int] = []  # records behind each future: a batch's future has its first offset
    for (topic, partition), members in groups.items():
        batch = producer.create_batch()
        for r in members:
            headers = encode_headers(r.headers)
            if batch.append(key=r.key, value=r.value, timestamp=None, headers=headers) is None:
                sizes.append(batch.record_count())
                futures.append(await producer.send_batch(batch, topic, partition=partition))
                batch = producer.create_batch()
                if batch.append(key=r.key, value=r.value, timestamp=None, headers=headers) is None:
                    # larger than a batch on its own: the producer's own path splits nothing
                    # either, but reports the size error the way callers expect
                    sizes.append(1)
                    futures.append(
                        await producer.send(
                            topic, r.value, key=r.key, partition=partition, headers=headers
                        )
                    )
        if batch.record_count():
            sizes.append(batch.record_count())
            futures.append(await producer.send_batch(batch, topic, partition=partition))
    store.note_durable(fleet.tables, zip(await asyncio.gather(*futures), sizes, strict=True))
    return len(records)


async def _emit_rd(producer: Any, records: Sequence[Record]) -> int:
    """:func:`emit` through librdkafka (``WAL_PRODUCER_CLIENT=librdkafka``): partitions
    chosen here as for aiokafka, the records' batching and requests in C."""
    items = [
        (r.topic, partition, r.key, r.value, encode_headers(r.headers))
        for r, partition in await _partitioned(producer, records)
    ]
    last = await rdkafka.producer(settings).send(items)
    store.note_durable(fleet.tables, ((meta, 1) for meta in last))
    return len(records)


async def emit_one(record: Record) -> RecordMetadata:
    """Produce one record with acks=all; its partition and offset once Kafka has it."""
    future = await fleet.producer.send(
        record.topic,
        record.key,
        record.value,
        record.partition,
        None,
        encode_headers(record.headers),
    )
    meta: RecordMetadata = await future
    return meta


async def _partitioned(producer: Any, records: Sequence[Record]) -> list[tuple[Record, int]]:
    """Each record with its partition: its own, or the one the fleet's partitioner picks."""
    placed = []
    choosers: dict[str, Callable[[bytes | None], int]] = {}
    for record in records:
        partition = record.partition
        if partition is None:
            choose = choosers.get(record.topic)
            if choose is None:
                choose = choosers[record.topic] = await _chooser(producer, record.topic)
            partition = choose(record.key)
        placed.append((record, partition))
    return placed


async def _chooser(producer: Any, topic: str) -> Callable[[bytes | None], int]:
    """What ``producer.send(topic, key=key)`` does to choose a partition, with the topic's
    partitions looked up once (aiokafka's does that per record: a set and two lists)."""
    await producer.client._wait_on_metadata(topic)
    metadata = producer._metadata
    every = list(metadata.partitions_for_topic(topic))
    available = list(metadata.available_partitions_for_topic(topic))
    choose = producer._partitioner
    return lambda key: choose(key, every, available)


#: Produce errors about the record itself, not the transport: it can never be produced as
#: it is, and retrying it would stop its stream for good (issue 16).
SIZE_ERRORS: tuple[type[Exception], ...] = (
    MessageSizeTooLargeError,
    RecordTooLargeError,
    RecordListTooLargeError,
)


RECORD_ERRORS: tuple[type[Exception], ...] = (
    *SIZE_ERRORS,
    CorruptRecordException,
    InvalidTopicError,
    PolicyViolationError,
    TopicAuthorizationFailedError,
)


async def emit_until_durable(records: Sequence[Record], *, what: str) -> None:
    """:func:`emit`, retried with backoff until Kafka takes the records.

    A stream must not move past a message whose consequence is not durable,
    and must not die either (faust #175): so it waits here, logging, while the
    broker is away, and its source offsets stay uncommitted. A record Kafka
    refuses for good (:data:`RECORD_ERRORS`: too large, invalid, not allowed)
    is not retried: it goes to the dead-letter topic with the reason
    (:func:`undeliverable`), and the others go on.
    """
    delay = 0.2
    one_by_one = False
    while True:
        try:
            await (_one_by_one(records) if one_by_one else emit(records))
            return
        except asyncio.CancelledError:
            raise
        except RECORD_ERRORS as exc:  # which record? one by one, the refused ones dead-lettered
            log.warning("producing %s: Kafka refused a record (%r); one by one", what, exc)
            one_by_one = True
        except Exception as exc:  # a broker outage: wait and try again
            fleet.log.warning("producing %s failed (%s); retrying in %.1fs", what, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


async def _one_by_one(records: Sequence[Record]) -> None:
    """Emit each record alone; one Kafka refuses goes to the DLQ instead. A transport error
    propagates (:func:`emit_until_durable` waits and goes one by one again: records emitted
    already are emitted again, which at-least-once allows)."""
    for record in records:
        try:
            await emit([record])
            continue
        except RECORD_ERRORS as exc:
            refused = exc
        try:
            await emit([undeliverable(record, refused)])
        except RECORD_ERRORS as exc:  # even the dead letter does not fit: its coordinates do
            await emit([undeliverable(record, exc, keep_value=False)])


def undeliverable(record: Record, exc: Exception, *, keep_value: bool = True) -> Record:
    """The dead letter for a record Kafka refused: its key and bytes (or, when they cannot
    be kept, none, with their size in the message), the reason and where it was going."""
    size = len(record.value or b"")
    code = "MESSAGE_SIZE_LIMIT_EXCEEDED" if isinstance(exc, SIZE_ERRORS) else "RECORD_REJECTED"
    message = f"Kafka refused the record for {record.topic} ({size} bytes): {type(exc).__name__}"
    if not keep_value:
        message += "; its bytes could not be kept either"
    log.error("dead-lettered a record for %s: %s", record.topic, message)
    value = record.value if keep_value else None
    return dead_letter(NAMES["dlq"], record.key, value, record.headers, code=code, message=message)
