"""Reading a topic to its end, outside any consumer group: one way, used everywhere.

``wal`` commands (namespaces, dead letters), the status book's rebuild and the
fleet probe all read topics this way: a plain aiokafka consumer (nothing
committed, so reading never changes what the next reader sees), the partitions
of a topic (asking the brokers when the client has not seen it yet - aiokafka's
only way to do that is a private call, made here and nowhere else), and records
from where the caller says up to the end the partition had when reading began.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from app.engine.clients import plain_consumer
from app.settings import Settings

#: Records per fetch when reading to the end.
MAX_RECORDS = 2000


async def partitions_of(
    consumer: AIOKafkaConsumer, topic: str, *, refresh: bool = False
) -> list[TopicPartition]:
    """The partitions of ``topic``; the brokers are asked when the client does not know it
    (or ``refresh``): empty when it does not exist."""
    parts = None if refresh else consumer.partitions_for_topic(topic)
    if not parts:
        await consumer._client.force_metadata_update()  # aiokafka has no public call for it
        parts = consumer.partitions_for_topic(topic)
    return [TopicPartition(topic, p) for p in sorted(parts or ())]


async def read_to_end(
    consumer: AIOKafkaConsumer,
    tps: Iterable[TopicPartition],
    *,
    starts: Mapping[TopicPartition, int] | None = None,
    ends: Mapping[TopicPartition, int] | None = None,
    idle_timeout: float | None = None,
) -> AsyncIterator[list[Any]]:
    """Batches of records of ``tps`` from ``starts`` (default: each partition's beginning)
    up to ``ends`` (default: the end each had when reading began). TimeoutError when no
    record arrives for ``idle_timeout`` seconds while some are still expected."""
    tps = list(tps)
    if not tps:
        return
    consumer.assign(tps)
    if starts is None:
        await consumer.seek_to_beginning(*tps)
    else:
        for tp in tps:
            consumer.seek(tp, starts[tp])
    ends = dict(ends) if ends is not None else await consumer.end_offsets(tps)
    todo = {tp for tp in tps if ends[tp] > await consumer.position(tp)}
    idle_since = time.monotonic()
    while todo:
        fetched = await consumer.getmany(*todo, timeout_ms=500, max_records=MAX_RECORDS)
        if fetched:
            idle_since = time.monotonic()
        elif idle_timeout is not None and time.monotonic() - idle_since > idle_timeout:
            missing = ", ".join(f"{tp.topic}/{tp.partition}" for tp in sorted(todo))
            raise TimeoutError(f"no record from {missing} in {idle_timeout:g} s")
        for tp, records in fetched.items():
            wanted = [r for r in records if r.offset < ends[tp]]
            if wanted:
                yield wanted
            if records and records[-1].offset + 1 >= ends[tp]:
                todo.discard(tp)
        for tp in list(todo):
            if await consumer.position(tp) >= ends[tp]:
                todo.discard(tp)


async def read_topic(s: Settings, topic: str, *, timeout: float = 10.0) -> list[Any]:
    """Every record of ``topic`` from the beginning to its current end."""
    consumer = plain_consumer(s)
    await consumer.start()
    try:
        records: list[Any] = []
        async with asyncio.timeout(timeout):
            tps = await partitions_of(consumer, topic)
            async for batch in read_to_end(consumer, tps):
                records.extend(batch)
        return records
    finally:
        await consumer.stop()
