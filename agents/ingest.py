"""Ingest: validate, enrich and route every write request on ``wal-ingest``.

Each record is *admitted* (it becomes a record on ``wal-deliver``, keyed by
its routing key, or on a delay tier when it asks to wait) or *rejected* (it
goes to the dead-letter topic with the reason in headers). Nothing a client
can send stops this stream. The HTTP ingest (``POST /wal/write``) runs the
same :func:`admit` before it produces to ``wal-ingest``.

Offsets: a batch's records are acked only after every record they caused is
acknowledged by Kafka (acks=all), so a crash replays them; the message id is
derived from the source coordinates, so a replay yields the same id and the
targets apply it once.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import BaseModel, ValidationError

from app import metrics, names, topics
from app.engine import producing
from app.engine.lanes import Batch, each_batch
from app.errors import Rejected
from app.fleet import fleet, settings
from app.models import MAX_REQUEST_BYTES, Mutation, Namespace, ShardStrategy, WriteRequest
from app.names import Record
from app.topics import ingest_topic
from tables import stats
from tables.namespaces import lookup
from tables.status import Collector, tracked

log = logging.getLogger("wal.ingest")

#: Nothing larger is even parsed: the largest maxMessageSize a namespace may set.
HARD_SIZE_LIMIT = MAX_REQUEST_BYTES


@dataclass(slots=True)  # not frozen: one per message, and frozen init costs 5x
class Admitted:
    """A request that passed every check, with what the fleet adds to it."""

    request: WriteRequest
    namespace: Namespace
    message_id: str
    routing_key: str
    received_at_ms: int
    produced_at_ms: int
    mutations: list[Mutation] | None = None

    @property
    def transaction_id(self) -> str | None:
        """``txn_…``: derived from the message id, so a replay names the same transaction."""
        if self.mutations is None:
            return None
        return "txn_" + self.message_id.removeprefix("wal_")


def admit(
    raw: bytes | None,
    headers: Mapping[str, str],
    *,
    timestamp_ms: int,
    fallback_id: str,
    sequence: int = 0,
    now_ms: int | None = None,
    namespace_of: Callable[[str], Namespace | None] = lookup,
    authorize: Callable[[Namespace], None] | None = None,
) -> Admitted:
    """Check one raw request; raise :class:`Rejected` with a documented code if it fails.

    ``fallback_id`` becomes the message id when neither the body (``messageId``)
    nor a ``wal-message-id`` header gives one; ``sequence`` spreads
    round-robin routing. ``authorize`` (the HTTP ingest's access control) runs
    once the namespace is known, and raises :class:`Rejected` to refuse.
    """
    if raw is None:
        raise Rejected("empty value (a tombstone is not a write request)", code="INVALID_JSON")
    if len(raw) > HARD_SIZE_LIMIT:
        raise Rejected(
            f"message of {len(raw)} bytes exceeds the hard limit of {HARD_SIZE_LIMIT}",
            code="MESSAGE_SIZE_LIMIT_EXCEEDED",
            http_status=413,
        )
    request = parse_request(raw)
    namespace = namespace_of(request.namespace)
    if namespace is None:
        raise Rejected(
            f"namespace '{request.namespace}' not found",
            code="NAMESPACE_NOT_FOUND",
            details={"namespace": request.namespace},
            http_status=404,
        )
    if not namespace.enabled:
        raise Rejected(
            f"namespace '{namespace.name}' is disabled",
            code="NAMESPACE_DISABLED",
            details={"namespace": namespace.name},
            http_status=403,
        )
    if authorize is not None:
        authorize(namespace)
    if len(raw) > namespace.max_message_size:
        raise Rejected(
            f"message size {len(raw)} bytes exceeds limit of {namespace.max_message_size} bytes",
            code="MESSAGE_SIZE_LIMIT_EXCEEDED",
            details={"actualSize": len(raw), "maxSize": namespace.max_message_size},
            http_status=413,
        )
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    ttl_s = request.lifecycle.ttl or namespace.message_ttl_seconds
    if timestamp_ms and now_ms > timestamp_ms + ttl_s * 1000:
        raise Rejected(
            f"message expired: produced {now_ms - timestamp_ms} ms ago, ttl {ttl_s} s",
            code="MESSAGE_EXPIRED",
            details={"ttlSeconds": ttl_s},
        )
    mutations = _mutations(request)
    named = [ref.identifier for ref in request.targets] + [m.target for m in mutations or []]
    for identifier in named:
        if namespace.target(identifier) is None:
            raise Rejected(
                f"target '{identifier}' is not defined by namespace '{namespace.name}'",
                code="TARGET_NOT_FOUND",
                details={"target": identifier},
                http_status=400,
            )
    message_id = request.message_id or headers.get(names.MESSAGE_ID) or fallback_id
    return Admitted(
        request=request,
        namespace=namespace,
        message_id=message_id,
        routing_key=routing_key(namespace, request, message_id, sequence),
        received_at_ms=now_ms,
        produced_at_ms=timestamp_ms or now_ms,
        mutations=mutations,
    )


def _mutations(request: WriteRequest) -> list[Mutation] | None:
    try:
        return request.mutations
    except ValidationError as exc:
        problems = [
            {
                "field": "payload.transactions." + ".".join(str(p) for p in e["loc"]),
                "problem": e["msg"],
            }
            for e in exc.errors(include_url=False, include_input=False)
        ]
        summary = "; ".join(f"{p['field']}: {p['problem']}" for p in problems[:5])
        raise Rejected(f"invalid transaction: {summary}", details=problems) from None


def parse_request(raw: bytes) -> WriteRequest:
    """Bytes → :class:`WriteRequest`, or :class:`Rejected` saying exactly what is wrong."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise Rejected(f"invalid JSON: {exc}", code="INVALID_JSON") from None
    if not isinstance(data, dict):
        raise Rejected(
            f"a write request is a JSON object, not {type(data).__name__}", code="INVALID_JSON"
        )
    try:
        return WriteRequest.model_validate(data)
    except ValidationError as exc:
        problems = [
            {"field": ".".join(str(p) for p in e["loc"]) or "(root)", "problem": e["msg"]}
            for e in exc.errors(include_url=False, include_input=False)
        ]
        summary = "; ".join(f"{p['field']}: {p['problem']}" for p in problems[:5])
        raise Rejected(f"invalid request: {summary}", details=problems) from None


def routing_key(namespace: Namespace, request: WriteRequest, message_id: str, sequence: int) -> str:
    """The namespace's shard strategy applied to one request; stable for the same input.

    ``hash`` and ``custom`` depend only on the request; ``round_robin`` on the
    source offset and ``random`` on the message id, so a replay routes the same.
    """
    shard = namespace.shard_config
    if shard.strategy is ShardStrategy.CUSTOM:
        return f"{namespace.name}:{_at_path(request, shard.key_path or '')}"
    if shard.strategy is ShardStrategy.ROUND_ROBIN:
        return f"{namespace.name}#{sequence % shard.partition_count}"
    if shard.strategy is ShardStrategy.RANDOM:
        digest = hashlib.blake2b(message_id.encode(), digest_size=8).digest()
        return f"{namespace.name}#{int.from_bytes(digest, 'big') % shard.partition_count}"
    if shard.key_path:
        value = _at_path(request, shard.key_path)
        return f"{namespace.name}:{value}"
    canonical = orjson.dumps(request.payload, option=orjson.OPT_SORT_KEYS)
    return f"{namespace.name}:{hashlib.blake2b(canonical, digest_size=8).hexdigest()}"


def _at_path(request: WriteRequest, path: str) -> str:
    """Value at a dotted path (``payload.user.id``, ``metadata.tenant``) as a string.

    Walks the request's fields and dicts; the same value a walk of its
    ``model_dump()`` gives (routing must not change), without dumping it."""
    value: Any = request
    for part in path.split("."):
        if isinstance(value, BaseModel):
            value = getattr(value, part, None) if part in type(value).model_fields else None
        else:
            value = value.get(part) if isinstance(value, dict) else None
    if isinstance(value, BaseModel):
        value = value.model_dump(by_alias=False)
    elif isinstance(value, list):  # ``target``: a list of models
        value = [v.model_dump(by_alias=False) if isinstance(v, BaseModel) else v for v in value]
    if isinstance(value, (dict, list)):
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
    return "" if value is None else str(value)


def derived_id(timestamp_ms: int, partition: int, offset: int) -> str:
    """A message id from the ingest record's coordinates: time-sortable, replay-stable."""
    return f"wal_{timestamp_ms:013d}_{partition}_{offset}"


def deliver_record(
    admitted: Admitted, raw: bytes, headers: Mapping[str, str], source: str, key: bytes | None
) -> Record:
    """The ``wal-deliver`` (or delay-tier) record for an admitted request.

    A transaction becomes a ``begin`` event on ``wal-txn-events`` instead: the
    transactions agent dispatches its mutations.
    """
    if admitted.mutations is not None:  # a transaction (its id: transaction_id)
        return _begin(admitted, headers)
    out: dict[str, str | None] = {h: headers.get(h) for h in names.PASSTHROUGH}
    out.update(
        {
            names.MESSAGE_ID: admitted.message_id,
            names.NAMESPACE: admitted.namespace.name,
            names.RECEIVED_AT: str(admitted.received_at_ms),
            names.SOURCE: source,
            names.ATTEMPT: "1",
            names.ORIGINAL_KEY: key.decode("utf-8", "replace") if key else None,
        }
    )
    delay_s = admitted.request.lifecycle.delay_seconds
    if delay_s > 0:
        # Due counts from when the client produced the request, so a replay keeps it.
        due_at = admitted.produced_at_ms + delay_s * 1000
        out[names.DUE_AT] = str(due_at)
        if due_at > admitted.received_at_ms:
            topic = topics.delay_topic_for(due_at - admitted.received_at_ms)
            return Record(topic, admitted.routing_key.encode(), raw, out)
    return Record(topics.NAMES["deliver"], admitted.routing_key.encode(), raw, out)


def _begin(admitted: Admitted, headers: Mapping[str, str]) -> Record:
    txn_id = admitted.transaction_id
    assert txn_id is not None and admitted.mutations is not None
    body = {
        "type": "begin",
        "txn": txn_id,
        "namespace": admitted.namespace.name,
        "messageId": admitted.message_id,
        "mutations": [m.model_dump(mode="json") for m in admitted.mutations],
        "timeoutAt": admitted.received_at_ms
        + admitted.namespace.transaction_timeout_seconds * 1000,
    }
    out = {h: headers.get(h) for h in names.PASSTHROUGH}
    out[names.TRANSACTION_ID] = txn_id
    return Record(topics.NAMES["txn-events"], txn_id.encode(), orjson.dumps(body), out)


def dead_letter(
    rejected: Rejected,
    raw: bytes | None,
    headers: Mapping[str, str],
    source: str,
    key: bytes | None,
    namespace: Namespace | None = None,
) -> Record:
    """The dead-letter record for a rejected request: original key and bytes, reason in headers."""
    kept: dict[str, str | None] = {h: headers.get(h) for h in names.PASSTHROUGH}
    kept.update(
        {
            names.SOURCE: source,
            names.ATTEMPT: "0",
            names.NAMESPACE: namespace.name if namespace else None,
        }
    )
    topic = (namespace.dlq_config.topic_name if namespace else None) or topics.NAMES["dlq"]
    return names.dead_letter(topic, key, raw, kept, code=rejected.code, message=rejected.message)


@fleet.agent(ingest_topic, concurrency=1)
async def ingest(stream: Any) -> None:
    """Admit or dead-letter every ingest record; never raises (faust #175)."""
    await each_batch(stream, _ingest_batch, settings)


async def _ingest_batch(batch: Batch) -> None:
    metrics.BATCH_SIZE.labels("ingest").observe(len(batch))
    notes, accepted = Collector(), Counter[str]()  # this batch's, apart from any other's
    plain: dict[str, list[str]] = {}  # namespace -> ids accepted as they are (no fields)
    records = [_route(message, notes, accepted, plain) for message in batch.records]
    for name, n in accepted.items():  # once a batch, not once a record
        metrics.MESSAGES.labels(name, "ingest", "accepted").inc(n)
    for name, ids in plain.items():
        notes.note_many(ids, name, "accepted")
    records += _stats_deltas(batch.records, records)
    records += notes.drain(topics.NAMES["status"], settings.partitions)
    await producing.emit_until_durable(records, what=f"{len(records)} ingest records")
    batch.ack()
    log.info("ingested a batch of %d", len(batch), extra={"agent": "ingest", "count": len(batch)})


def _route(
    message: Any, notes: Collector, accepted: Counter[str], plain: dict[str, list[str]]
) -> Record:
    """One ingest record (aiokafka's ``ConsumerRecord``) → its next record; the status
    ``accepted`` of a request sent on as it is goes into ``plain``, noted once a batch."""
    headers = names.decode_headers(message.headers)
    source = f"{message.topic}/{message.partition}/{message.offset}"
    timestamp_ms = message.timestamp if message.timestamp and message.timestamp > 0 else 0
    timestamp_ms = timestamp_ms or int(time.time() * 1000)
    try:
        admitted = admit(
            message.value,
            headers,
            timestamp_ms=timestamp_ms,
            fallback_id=derived_id(timestamp_ms, message.partition, message.offset),
            sequence=message.offset,
        )
    except Rejected as rejected:
        namespace = _namespace_of(message.value)
        _count_rejected(namespace, rejected.code)
        if tracked(namespace.status_tracking if namespace else "all", "rejected"):
            notes.note(
                headers.get(names.MESSAGE_ID) or _id_of(message.value),
                namespace.name if namespace else metrics.UNKNOWN,
                "rejected",
                code=rejected.code,
                message=rejected.message[:300],
            )
        return dead_letter(rejected, message.value, headers, source, message.key, namespace)
    except Exception as exc:  # a bug of ours must not stop the stream: dead-letter, loudly
        log.exception(
            "unexpected error admitting %s",
            source,
            extra={"namespace": headers.get(names.NAMESPACE)},
        )
        internal = Rejected(f"internal error: {type(exc).__name__}", code="INTERNAL_ERROR")
        _count_rejected(None, internal.code)
        return dead_letter(internal, message.value, headers, source, message.key)
    accepted[admitted.namespace.name] += 1
    record = deliver_record(admitted, message.value, headers, source, message.key)
    due = record.headers.get(names.DUE_AT)
    step = "delayed" if due and record.topic != topics.NAMES["deliver"] else "accepted"
    if not tracked(admitted.namespace.status_tracking, step):
        return record
    if step == "accepted" and not due and admitted.mutations is None:
        plain.setdefault(admitted.namespace.name, []).append(admitted.message_id)
    else:
        notes.note(
            admitted.message_id,
            admitted.namespace.name,
            step,
            dueAt=int(due) if due else None,
            transactionId=admitted.transaction_id,
        )
    return record


def _stats_deltas(messages: list[Any], records: list[Record]) -> list[Record]:
    """The batch's accepted/rejected requests per namespace, as ``wal-stats`` records
    naming the ingest records they count (a batch re-read after a crash counts once)."""
    sources: dict[str, dict[str, list[str]]] = {}
    for message, record in zip(messages, records, strict=True):
        name = record.headers.get(names.NAMESPACE) or metrics.UNKNOWN
        outcome = "rejected" if record.headers.get(names.ERROR_CODE) else "accepted"
        listed = sources.setdefault(name, {}).setdefault(outcome, [])
        listed.append(f"{message.topic}/{message.partition}/{message.offset}")
    return [stats.delta(name, sources=per) for name, per in sources.items()]


def _count_rejected(namespace: Namespace | None, code: str) -> None:
    name = namespace.name if namespace else metrics.UNKNOWN
    metrics.MESSAGES.labels(name, "ingest", "rejected").inc()
    metrics.DEAD_LETTERS.labels(name, code).inc()


def _id_of(raw: bytes | None) -> str | None:
    """Best-effort message id of a rejected request (its ``messageId``), for its status."""
    try:
        data = orjson.loads(raw or b"")
    except orjson.JSONDecodeError:
        return None
    found = data.get("messageId") if isinstance(data, dict) else None
    return found if isinstance(found, str) and 0 < len(found) <= 256 else None


def _namespace_of(raw: bytes | None) -> Namespace | None:
    """Best-effort namespace of a rejected request, for its DLQ topic; None if unknowable."""
    try:
        data = orjson.loads(raw or b"")
        name = data.get("namespace") if isinstance(data, dict) else None
        return lookup(name.strip().lower()) if isinstance(name, str) else None
    except (orjson.JSONDecodeError, ValueError):
        return None
