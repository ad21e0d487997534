"""Changelog-backed tables, one per module.

Agents that must not ack an event before its state change is durable write a
table through :func:`changelog_record` and emit the record it returns with the
rest of their output.
"""

from __future__ import annotations

from typing import Any

from app.topics import Record


def compact(raw: bytes) -> bytes:
    """``raw`` in a bytes object of its own size, for values kept in memory.

    orjson's output keeps the capacity of its write buffer (about 4 KiB for a
    200-byte document, measured): harmless for a record on its way to Kafka,
    twenty times the data for a value a table or book holds.
    """
    return bytes(memoryview(raw))


def changelog_record(table: Any, key: bytes, value: bytes | None) -> Record:
    """Set ``key`` in ``table``'s store and return the changelog record to emit for it.

    Faust's own ``table[key] = value`` queues the changelog write in its producer
    buffer, and its ``producer.flush()`` may return before that buffer is empty:
    an agent that acks after it could lose the state change in a crash while its
    effects went out. So state is written to the store directly and its changelog
    record is emitted, and awaited, together with the effects.
    """
    if value is None:
        table.data.pop(key, None)
    else:
        table.data[key] = compact(value)
    return Record(table.changelog_topic.get_topic_name(), key, value, {})
