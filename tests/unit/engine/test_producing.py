"""What becomes of a record Kafka refuses for good: a dead letter, and the others go on."""

from __future__ import annotations

from typing import Any

import pytest
from aiokafka.errors import KafkaConnectionError, MessageSizeTooLargeError

from app import names, topics
from app.engine import producing
from app.errors import CODES
from app.names import Record


def record(value: bytes = b'{"namespace":"orders"}') -> Record:
    return Record("wal-deliver", b"k", value, {names.MESSAGE_ID: "wal_1", names.SOURCE: "s/0/7"})


def test_a_refused_record_becomes_a_dead_letter_with_its_bytes_and_the_reason() -> None:
    dead = producing.undeliverable(record(), MessageSizeTooLargeError())
    assert dead.topic == topics.NAMES["dlq"] and dead.key == b"k"
    assert dead.value == record().value
    assert dead.headers[names.ERROR_CODE] == "MESSAGE_SIZE_LIMIT_EXCEEDED" in CODES
    assert "wal-deliver" in str(dead.headers[names.ERROR_MESSAGE])
    assert dead.headers[names.SOURCE] == "s/0/7"  # where it came from: replayable
    lean = producing.undeliverable(record(), MessageSizeTooLargeError(), keep_value=False)
    assert lean.value is None and "could not be kept" in str(lean.headers[names.ERROR_MESSAGE])


async def test_only_the_refused_record_is_dead_lettered_and_an_outage_is_retried(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sent: list[list[Record]] = []
    outage = [1]

    async def emit(records: list[Record]) -> int:
        if outage[0]:
            outage[0] -= 1
            raise KafkaConnectionError()
        if any(r.value == b"huge" and r.topic == "wal-deliver" for r in records):
            raise MessageSizeTooLargeError()
        sent.append(list(records))
        return len(records)

    async def no_sleep(_: float) -> None:
        return None

    monkeypatch.setattr(producing, "emit", emit)
    monkeypatch.setattr(producing.asyncio, "sleep", no_sleep)
    batch = [record(b"a"), record(b"huge"), record(b"b")]
    await producing.emit_until_durable(batch, what="test")
    flat: list[Any] = [r for call in sent for r in call]
    assert [r.value for r in flat] == [b"a", b"huge", b"b"]
    assert [r.topic for r in flat] == ["wal-deliver", topics.NAMES["dlq"], "wal-deliver"]


async def test_an_outage_while_going_one_by_one_is_waited_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sent: list[Record] = []
    calls = [0]

    async def emit(records: list[Record]) -> int:
        calls[0] += 1
        if calls[0] == 3:  # the second record alone: the broker is away for a moment
            raise KafkaConnectionError()
        if any(r.value == b"huge" and r.topic == "wal-deliver" for r in records):
            raise MessageSizeTooLargeError()
        sent.extend(records)
        return len(records)

    async def no_sleep(_: float) -> None:
        return None

    monkeypatch.setattr(producing, "emit", emit)
    monkeypatch.setattr(producing.asyncio, "sleep", no_sleep)
    await producing.emit_until_durable([record(b"a"), record(b"huge")], what="test")
    values = [(r.topic, r.value) for r in sent]
    assert values[-1] == (topics.NAMES["dlq"], b"huge")  # dead-lettered after the outage
    assert ("wal-deliver", b"a") in values and ("wal-deliver", b"huge") not in values

