"""Cancellation marks: keyed into the partition they are about, and only what a partition
reads after its mark is cancelled."""

from __future__ import annotations

import time

import orjson
import pytest

from app.engine.partitioner import partition_of
from app.fleet import settings
from tables import cancellations


@pytest.fixture(autouse=True)
def empty() -> None:
    for key in list(cancellations.cancellations.data):
        del cancellations.cancellations.data[key]


def test_a_marks_key_lands_in_the_partition_it_is_about() -> None:
    for partition in range(settings.partitions):
        key = cancellations.key_for("m-1", partition)
        assert partition_of(key, settings.partitions) == partition
        assert key.startswith(b"m-1#")


def test_only_records_after_the_mark_in_its_partition_are_cancelled() -> None:
    record = cancellations.mark("m-1", 3, 100, "admin:abcd1234")
    assert record.value is not None and orjson.loads(record.value)["o"] == 100
    assert cancellations.cancelled("m-1", 3, 101)
    assert not cancellations.cancelled("m-1", 3, 99)  # read before the cancellation
    assert not cancellations.cancelled("m-1", 2, 101)  # no mark in that partition yet
    assert not cancellations.cancelled("m-2", 3, 101)
    again = cancellations.mark("m-1", 3, 500, "admin:abcd1234")  # cancelling twice
    assert again.value == record.value and cancellations.cancelled("m-1", 3, 101)


def test_marks_past_seven_days_are_forgotten() -> None:
    cancellations.mark("old", 0, 1, "admin:x")
    cancellations.mark("new", 0, 1, "admin:x")
    week_later = int(time.time() * 1000) + cancellations.RETENTION_S * 1000 + 1
    key = cancellations.key_for("new", 0)
    fresh = orjson.loads(cancellations.cancellations.data[key])
    cancellations.cancellations.data[key] = orjson.dumps({**fresh, "at": week_later})
    tombstones = cancellations.expired(week_later)
    assert [t.key for t in tombstones] == [cancellations.key_for("old", 0)]
    assert tombstones[0].value is None and not cancellations.cancelled("old", 0, 2)
