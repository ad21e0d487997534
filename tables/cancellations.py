"""Cancellations: messages an operator took back before they were delivered.

``DELETE /wal/messages/{id}`` sends a *cancel record* (header ``wal-cancel``: the
message id) to every ``wal-deliver`` partition; the deliver agent that reads it marks
the id cancelled *in that partition, from that offset on*, here. A record of the id
read later in the partition - a delayed write coming due, a retry, a parked write - is
then never delivered: its status becomes ``cancelled``. A record before the mark was
read before the cancellation and goes its way; if it is delivered, the cancellation
lost the race and the message's status says ``delivered`` - never both, because the
partition's order decides, the same on every replay after a crash. The mark goes to
every partition because the message's partition is its routing key's, which its id
does not tell.

Marks are kept ``RETENTION_S`` (7 days: the longest delay), at most ``CAPACITY`` per
worker (``wal_cancellations`` shows how many; a cancellation past it is refused), and
swept by a timer. The table is keyed so that a mark lands in the partition it is
about (``key_for``), so its changelog lines up with ``wal-deliver`` like the ordering
table's: the worker reading a partition holds its marks.
"""

from __future__ import annotations

import time

import orjson

from app import metrics
from app.engine.changelog import changelog_record
from app.engine.partitioner import partition_of
from app.fleet import fleet, settings
from app.names import Record

cancellations = fleet.Table(
    "cancellations",
    key_type=bytes,
    value_type=bytes,
    partitions=settings.partitions,
    use_partitioner=True,
    help="Messages cancelled before delivery: from which wal-deliver offset, per partition.",
)

#: How long a mark is kept: the longest a write may be delayed.
RETENTION_S = 7 * 86_400
#: Marks a worker holds at most (each is a few dozen bytes).
CAPACITY = 100_000

_SEP = b"#"


def key_for(message_id: str, partition: int) -> bytes:
    """The table key of ``message_id``'s mark in ``partition``: the id and the first
    suffix that the partitioner sends to that partition."""
    base = message_id.encode() + _SEP
    n = 0
    while partition_of(base + str(n).encode(), settings.partitions) != partition:
        n += 1
    return base + str(n).encode()


def mark(message_id: str, partition: int, offset: int, by: str) -> Record:
    """Mark ``message_id`` cancelled in ``partition`` from ``offset`` on (its cancel
    record's); the changelog record to emit with the batch. A mark already there stays
    (cancelling twice changes nothing)."""
    key = key_for(message_id, partition)
    old = cancellations.data.get(key)
    value = old or orjson.dumps({"o": offset, "at": int(time.time() * 1000), "by": by})
    return changelog_record(cancellations, key, value)


class Index:
    """The ids with a mark on this worker, rebuilt when the store changes size or the
    worker's generation changes (a rebalance): a write's check costs a set lookup."""

    def __init__(self) -> None:
        self._seen: tuple[int, int] = (-1, -1)
        self._ids: frozenset[str] = frozenset()

    def ids(self) -> frozenset[str]:
        store = cancellations.data
        seen = (len(store), fleet.consumer_generation_id)
        if seen != self._seen:
            self._ids = frozenset(k.rpartition(_SEP)[0].decode() for k in store)
            self._seen = seen
            metrics.CANCELLATIONS.set(seen[0])
        return self._ids


index = Index()


def cancelled(message_id: str, partition: int, offset: int) -> bool:
    """Whether the record at ``offset`` of ``partition`` is of a message cancelled there
    before it (a mark at or before that offset, younger than ``RETENTION_S``)."""
    if message_id not in index.ids():
        return False
    raw = cancellations.data.get(key_for(message_id, partition))
    if raw is None:
        return False
    found = orjson.loads(raw)
    return bool(found["o"] < offset and found["at"] > (time.time() - RETENTION_S) * 1000)


def full() -> bool:
    return len(cancellations.data) >= CAPACITY


def expired(now_ms: int | None = None) -> list[Record]:
    """Tombstones for the marks older than ``RETENTION_S`` (store updated now)."""
    now_ms = now_ms or int(time.time() * 1000)
    old = [
        key
        for key, raw in list(cancellations.data.items())
        if orjson.loads(raw)["at"] < now_ms - RETENTION_S * 1000
    ]
    return [changelog_record(cancellations, key, None) for key in old]


@fleet.timer(3600.0)
async def sweep_cancellations() -> None:
    """Forget the marks past ``RETENTION_S`` (a timer that raises stops for good)."""
    from app.engine import producing

    try:
        tombstones = expired()
        if tombstones:
            await producing.emit_until_durable(tombstones, what="expired cancellations")
    except Exception:
        fleet.log.exception("sweeping cancellations failed")
