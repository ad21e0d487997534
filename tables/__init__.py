"""Changelog-backed tables, one per module.

Agents that must not ack an event before its state change is durable write a
table through :func:`app.engine.changelog.changelog_record` and emit the record
it returns with the rest of their output.
"""

from __future__ import annotations


def compact(raw: bytes) -> bytes:
    """``raw`` in a bytes object of its own size, for values kept in memory.

    orjson's output keeps the capacity of its write buffer (about 4 KiB for a
    200-byte document, measured): harmless for a record on its way to Kafka,
    twenty times the data for a value a table or book holds.
    """
    return bytes(memoryview(raw))
