"""Backfill: deliver again, to one target only, what the log still holds for a namespace.

**Which topic: ``wal-deliver``.** It is the one topic every admitted write passes
through as a record of its own, the first pass (``wal-attempt: 1``, no
``wal-target``): ingest's output from ``wal-ingest``, ``POST /wal/write`` (which
never touches ``wal-ingest``), a delayed write once it is due (:mod:`agents.delay`
forwards it here), a transaction's mutations. ``wal-ingest`` misses the HTTP
writes, holds the rejected requests too, and its records would have to be admitted
again; the delay tiers hold a write only until it is due, and a retry only for the
target that failed. Both topics keep the broker's default retention, and a write
reaches ``wal-deliver`` no earlier than ``wal-ingest``, so no write ``wal-ingest``
still holds is gone from ``wal-deliver``. (There is no journal topic.) A write still
waiting in a delay tier needs no backfill: it is delivered, when due, to the
namespace's targets as they are then, the new one included.

**What is re-emitted**: each first pass of a write of the namespace admitted
(``wal-received-at``) within ``[since, until)``, once per message id, to
``wal-deliver`` again: the same partition, key and bytes, the same message id, with
``wal-target: T`` (deliver applies it to T alone: ``agents.deliver._plan``),
``wal-attempt: 1``, ``wal-replayed-from`` naming the original, and a new
``wal-received-at`` (its TTL and latency count from the backfill, as a dead-letter
replay's count from its replay). So it takes the normal path - routing, per-key
ordering, retries, the breaker, the DLQ - and T's ledger (SQL: the write's
transaction; Redis: its script) makes a second backfill, or a write T already
has, change nothing. The other targets see no record.

**Skipped**, counted by reason: a transaction's mutations (their outcomes belong to
a transaction that has ended), requests that named their targets without T,
records without a message id, and message ids this run re-emitted already (an
ingest replayed after a crash writes a write twice).

Records are read with a plain consumer (no group, nothing committed) from the
offset of ``since`` (Kafka's time index: a record's timestamp is never before its
``wal-received-at``) to the end each partition had when the backfill began.

A write of a key both before and after T was added reaches T in the order of the
log *within* the backfill, but the live writes reach T first: a backfilled older
write of the same key lands after them (for a Redis ``set``, the older value wins).
Use ``--until`` the time T was added and keys that are not rewritten meanwhile,
or conditions, where that matters.
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from pydantic import ValidationError

from app import names
from app.engine.clients import TopicPartition, plain_consumer
from app.engine.reading import partitions_of, read_to_end
from app.models import WriteRequest
from app.names import Record
from app.rates import TokenBucket
from app.settings import Settings

#: Records re-emitted at once (each call waits until Kafka has them).
CHUNK = 500
#: Message ids remembered to re-emit each once (duplicates sit close together).
SEEN_CAPACITY = 200_000
#: How often progress is reported, seconds.
REPORT_EVERY_S = 0.5
#: A partition read that brings no record for this long means the broker is gone.
IDLE_TIMEOUT_S = 30.0

#: Headers of the original that a re-emitted write does not carry.
DROPPED = frozenset(
    {
        names.ATTEMPT,
        names.TARGET,
        names.DUE_AT,
        names.ORDER_SEQ,
        names.ERROR_CODE,
        names.ERROR_MESSAGE,
        names.FIRST_FAILED_AT,
        names.LAST_FAILED_AT,
        names.REPLAYED_FROM,
        names.RECEIVED_AT,
    }
)


@dataclass(frozen=True, slots=True)
class Plan:
    """What to backfill: a namespace's writes admitted in ``[since_ms, until_ms)``, to one
    target, at most ``rate`` a second; ``dry_run`` counts without re-emitting."""

    namespace: str
    target: str
    since_ms: int | None = None
    until_ms: int | None = None
    dry_run: bool = False
    rate: float | None = None


@dataclass(slots=True)
class Tally:
    """How far a backfill is: records to read, read, matched, re-emitted, skipped by reason."""

    total: int = 0
    read: int = 0
    matched: int = 0
    re_emitted: int = 0
    skipped: Counter[str] = field(default_factory=Counter)

    def as_json(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "read": self.read,
            "matched": self.matched,
            "reEmitted": self.re_emitted,
            "skipped": sum(self.skipped.values()),
            "skippedBy": dict(self.skipped),
        }


class Seen:
    """The message ids re-emitted lately (the oldest forgotten past ``capacity``)."""

    def __init__(self, capacity: int = SEEN_CAPACITY) -> None:
        self.capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()

    def first(self, message_id: str) -> bool:
        """True the first time ``message_id`` is offered (within the capacity)."""
        if message_id in self._ids:
            return False
        self._ids[message_id] = None
        if len(self._ids) > self.capacity:
            self._ids.popitem(last=False)
        return True


EMIT = "emit"


def choose(
    headers: dict[str, str], value: bytes | None, timestamp_ms: int, plan: Plan, seen: Seen
) -> str | None:
    """A ``wal-deliver`` record's part in ``plan``: None (not one of its writes: another
    namespace, a later pass, outside the time range), :data:`EMIT`, or why it is skipped."""
    if headers.get(names.NAMESPACE) != plan.namespace or headers.get(names.TARGET):
        return None
    if headers.get(names.CANCEL):  # a cancel record (tables/cancellations), not a write
        return None
    received = _int(headers.get(names.RECEIVED_AT)) or timestamp_ms
    if plan.since_ms is not None and received < plan.since_ms:
        return None
    if plan.until_ms is not None and received >= plan.until_ms:
        return None
    if headers.get(names.TRANSACTION_ID):
        return "transaction"
    message_id = headers.get(names.MESSAGE_ID)
    if not message_id:
        return "no-message-id"
    if not _asks_for(value, plan.target):
        return "other-targets"
    if not seen.first(message_id):
        return "duplicate"
    return EMIT


def _asks_for(value: bytes | None, target: str) -> bool:
    """Whether the request goes to ``target``: it names none (all of them), or names it."""
    if not value or b'"target"' not in value:
        return True
    try:
        refs = WriteRequest.model_validate(orjson.loads(value)).targets
    except (orjson.JSONDecodeError, ValidationError):
        return True  # deliver dead-letters what it cannot read; nothing to decide here
    return not refs or any(ref.identifier == target for ref in refs)


def again(record: Any, headers: dict[str, str], target: str, now_ms: int) -> Record:
    """The ``wal-deliver`` record that delivers ``record``'s write to ``target`` only."""
    out: dict[str, str | None] = {k: v for k, v in headers.items() if k not in DROPPED}
    out.update(
        {
            names.TARGET: target,
            names.ATTEMPT: "1",
            names.RECEIVED_AT: str(now_ms),
            names.REPLAYED_FROM: f"{record.topic}/{record.partition}/{record.offset}",
        }
    )
    return Record(record.topic, record.key, record.value, out, partition=record.partition)


def _int(text: str | None) -> int:
    try:
        return int(text or 0)
    except ValueError:
        return 0


Emit = Callable[[list[Record]], Awaitable[None]]
Report = Callable[[str, Tally], Awaitable[None]]


async def run(s: Settings, plan: Plan, emit: Emit, report: Report, tally: Tally) -> None:
    """Backfill ``plan`` from ``wal-deliver``, counting in ``tally`` (it says how far a run
    that raised came): ``emit`` makes re-emitted records durable, ``report`` hears the tally
    once at the ``start`` (with the total) and then as ``progress`` every
    :data:`REPORT_EVERY_S`."""
    seen = Seen()
    # a tenth of a second's worth banked: a sleep that overshoots is made up, not lost
    bucket = TokenBucket(plan.rate, max(1.0, plan.rate / 10)) if plan.rate else None
    chunk: list[Record] = []
    consumer = plain_consumer(s)
    await consumer.start()
    try:
        starts, ends = await _range(consumer, s.topic("deliver"), plan.since_ms)
        tally.total = sum(ends[tp] - starts[tp] for tp in ends)
        await report("start", tally)
        reported = time.monotonic()
        async for batch in read_to_end(
            consumer, ends, starts=starts, ends=ends, idle_timeout=IDLE_TIMEOUT_S
        ):
            for record in batch:
                tally.read += 1
                headers = names.decode_headers(record.headers)
                verdict = choose(headers, record.value, record.timestamp or 0, plan, seen)
                if verdict is not None:
                    tally.matched += 1
                    await _take(verdict, record, headers, plan, tally, chunk, bucket)
                if len(chunk) >= CHUNK or _due(reported):
                    tally.re_emitted += await _flush(emit, chunk)
                if _due(reported):
                    await report("progress", tally)
                    reported = time.monotonic()
        tally.re_emitted += await _flush(emit, chunk)
    finally:
        await consumer.stop()


async def _take(
    verdict: str,
    record: Any,
    headers: dict[str, str],
    plan: Plan,
    tally: Tally,
    chunk: list[Record],
    bucket: TokenBucket | None,
) -> None:
    """Count a matched record; queue its re-emission when it is one."""
    if verdict != EMIT:
        tally.skipped[verdict] += 1
    elif plan.dry_run:
        tally.re_emitted += 1
    else:
        if bucket is not None:
            await bucket.wait()
        chunk.append(again(record, headers, plan.target, int(time.time() * 1000)))


async def _range(
    consumer: Any, topic: str, since_ms: int | None
) -> tuple[dict[TopicPartition, int], dict[TopicPartition, int]]:
    """Where to start (the offset of ``since_ms``, or the beginning) and end, per partition."""
    tps = await partitions_of(consumer, topic, refresh=True)
    if not tps:
        raise LookupError(f"topic {topic} does not exist")
    starts = await consumer.beginning_offsets(tps)
    ends = await consumer.end_offsets(tps)
    if since_ms is not None:
        found = await consumer.offsets_for_times({tp: since_ms for tp in tps})
        starts = {tp: ends[tp] if found[tp] is None else found[tp].offset for tp in tps}
    return starts, ends


def _due(since: float) -> bool:
    return time.monotonic() - since >= REPORT_EVERY_S


async def _flush(emit: Emit, chunk: list[Record]) -> int:
    if not chunk:
        return 0
    out = list(chunk)
    chunk.clear()
    await emit(out)
    return len(out)
