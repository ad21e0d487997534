"""The fleet's topics, its headers, and the one way agents write to Kafka.

Every value on these topics is bytes: the ingest, deliver and delay topics
carry a client's original request bytes unchanged, with everything the fleet
adds (message id, namespace, attempt, due time, reasons) in ``wal-*``
headers. So a dead letter is always the original bytes and can be replayed
as it is (ARCHITECTURE.md §3).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import (
    CorruptRecordException,
    InvalidTopicError,
    MessageSizeTooLargeError,
    PolicyViolationError,
    RecordListTooLargeError,
    RecordTooLargeError,
    TopicAlreadyExistsError,
    TopicAuthorizationFailedError,
)
from aiokafka.structs import RecordMetadata

from app import store
from app.fleet import fleet, settings
from app.models import TOPIC_MAX_MESSAGE_BYTES
from app.settings import Settings

log = logging.getLogger("wal.topics")

# -- headers -------------------------------------------------------------------------
MESSAGE_ID = "wal-message-id"
NAMESPACE = "wal-namespace"
ATTEMPT = "wal-attempt"
DUE_AT = "wal-due-at"
ERROR_CODE = "wal-error-code"
ERROR_MESSAGE = "wal-error-message"
TARGET = "wal-target"
SOURCE = "wal-source"
FIRST_FAILED_AT = "wal-first-failed-at"
LAST_FAILED_AT = "wal-last-failed-at"
REPLAYED_FROM = "wal-replayed-from"
RECEIVED_AT = "wal-received-at"
ORIGINAL_KEY = "wal-original-key"
ORDER_SEQ = "wal-order-seq"
TRANSACTION_ID = "wal-transaction-id"
MUTATION_INDEX = "wal-mutation-index"
MUTATION_KIND = "wal-mutation-kind"
TRACEPARENT = "traceparent"

#: Headers a client may set on an ingest record that the fleet carries along.
PASSTHROUGH = (TRACEPARENT, REPLAYED_FROM)

#: Delay tiers, in seconds (WAL_DELAY_TIERS): a waiting message sits in the largest
#: tier that does not overshoot its due time, and hops down until it is due.
DELAY_TIERS: tuple[int, ...] = settings.tiers

Headers = dict[str, str]


def tier_name(seconds: int) -> str:
    return f"{seconds // 60}m" if seconds >= 60 and seconds % 60 == 0 else f"{seconds}s"


def topic_names(s: Settings) -> dict[str, str]:
    """Role → full topic name, for every topic the fleet uses."""
    names = {
        "ingest": s.topic("ingest"),
        "deliver": s.topic("deliver"),
        "dlq": s.topic("dlq"),
        "namespaces": s.topic("namespaces"),
        "txn-events": s.topic("txn-events"),
        "stats": s.topic("stats"),
        "status": s.topic("status"),
    }
    for seconds in s.tiers:
        names[f"delay-{tier_name(seconds)}"] = s.topic(f"delay-{tier_name(seconds)}")
    return names


NAMES = topic_names(settings)
ingest_topic = fleet.topic(NAMES["ingest"], partitions=settings.partitions)
deliver_topic = fleet.topic(NAMES["deliver"], partitions=settings.partitions)
stats_topic = fleet.topic(NAMES["stats"], partitions=settings.partitions)
status_topic = fleet.topic(NAMES["status"], partitions=settings.partitions)
delay_topics = {
    seconds: fleet.topic(NAMES[f"delay-{tier_name(seconds)}"], partitions=settings.partitions)
    for seconds in DELAY_TIERS
}


def delay_topic_for(remaining_ms: int) -> str:
    """The delay tier to wait in: the largest that does not overshoot ``remaining_ms``."""
    fitting = [t for t in DELAY_TIERS if t * 1000 <= remaining_ms] or [DELAY_TIERS[0]]
    return NAMES[f"delay-{tier_name(max(fitting))}"]


def decode_headers(raw: Iterable[tuple[str, bytes]] | Mapping[str, bytes] | None) -> Headers:
    """Kafka headers as a str → str dict (the last value wins for repeated keys)."""
    if not raw:
        return {}
    items = raw.items() if isinstance(raw, Mapping) else raw
    return {k: v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for k, v in items}


def encode_headers(headers: Mapping[str, str | None]) -> list[tuple[str, bytes]]:
    return [(k, v.encode()) for k, v in headers.items() if v is not None]


@dataclass(slots=True)  # not frozen: one per message, and frozen init costs 5x
class Record:
    """One record to produce."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: Mapping[str, str | None]
    partition: int | None = None


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
    groups: dict[tuple[str, int], list[Record]] = {}
    choosers: dict[str, Callable[[bytes | None], int]] = {}
    for record in records:
        partition = record.partition
        if partition is None:
            choose = choosers.get(record.topic)
            if choose is None:
                choose = choosers[record.topic] = await _chooser(producer, record.topic)
            partition = choose(record.key)
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
    now = str(int(time.time() * 1000))
    headers = {
        **record.headers,
        ERROR_CODE: code,
        ERROR_MESSAGE: message[:1000],
        FIRST_FAILED_AT: record.headers.get(FIRST_FAILED_AT) or now,
        LAST_FAILED_AT: now,
    }
    log.error("dead-lettered a record for %s: %s", record.topic, message)
    return Record(NAMES["dlq"], record.key, record.value if keep_value else None, headers)


async def ensure_topics(s: Settings, *, timeout: float = 30.0) -> list[str]:
    """Create every topic the fleet needs that does not exist yet; return those created."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=s.bootstrap_servers,
        request_timeout_ms=int(timeout * 1000),
        **admin_security(s),
    )
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = []
        for role, name in topic_names(s).items():
            if name in existing:
                continue
            configs = {
                "min.insync.replicas": str(min(2, s.replication_factor)),
                "max.message.bytes": str(TOPIC_MAX_MESSAGE_BYTES),
            }
            if role == "namespaces":
                configs["cleanup.policy"] = "compact"
            if role == "status":  # history for GET /wal/messages/{id}, then gone
                retention_ms = int(s.status_retention_s * 1000)
                configs["retention.ms"] = str(retention_ms)
                configs["segment.ms"] = str(max(60_000, retention_ms // 6))
            wanted.append(
                NewTopic(
                    name,
                    s.partitions if role != "namespaces" else 1,
                    s.replication_factor,
                    topic_configs=configs,
                )
            )
        if wanted:
            with contextlib.suppress(TopicAlreadyExistsError):  # another worker won the race
                await admin.create_topics(wanted, timeout_ms=int(timeout * 1000))
        ours = sorted(set(topic_names(s).values()) & existing)
        for name, limit in (await record_limits(admin, ours)).items():
            if limit < TOPIC_MAX_MESSAGE_BYTES:
                log.warning(
                    "topic %s holds records up to %d bytes (max.message.bytes): larger "
                    "requests are dead-lettered; raise it to %d (kafka-configs.sh --alter "
                    "--entity-type topics --entity-name %s --add-config max.message.bytes=%d)",
                    name,
                    limit,
                    TOPIC_MAX_MESSAGE_BYTES,
                    name,
                    TOPIC_MAX_MESSAGE_BYTES,
                )
        return [t.name for t in wanted]
    finally:
        await admin.close()


async def record_limits(admin: AIOKafkaAdminClient, names: Sequence[str]) -> dict[str, int]:
    """Each topic's ``max.message.bytes`` (what the broker says it is, default or not)."""
    if not names:
        return {}
    wanted = {"max.message.bytes": None}
    resources = [ConfigResource(ConfigResourceType.TOPIC, n, wanted) for n in names]
    limits = {}
    for response in await admin.describe_configs(resources):
        for _error, _message, _type, name, entries, *_ in response.resources:
            for entry in entries:
                if entry[0] == "max.message.bytes" and entry[1] is not None:
                    limits[name] = int(entry[1])
    return limits


def admin_security(s: Settings) -> dict[str, Any]:
    """aiokafka client keyword arguments for the configured Kafka security."""
    if s.security_protocol == "PLAINTEXT":
        return {}
    from app.fleet import broker_credentials

    creds = broker_credentials(s)
    kwargs: dict[str, Any] = {"security_protocol": s.security_protocol}
    if s.security_protocol.startswith("SASL"):
        kwargs.update(
            sasl_mechanism=s.sasl_mechanism,
            sasl_plain_username=s.sasl_username,
            sasl_plain_password=s.sasl_password.get_secret_value(),
        )
    context = getattr(creds, "ssl_context", None) or getattr(creds, "context", None)
    if context is not None:
        kwargs["ssl_context"] = context
    return kwargs
