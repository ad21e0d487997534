"""The status agent's fold of a batch: both bundle formats; garbage skipped, never raised."""

from __future__ import annotations

import orjson
import pytest

from agents import status as agent
from tables.status import Collector, StatusBook


@pytest.fixture
def book(monkeypatch: pytest.MonkeyPatch) -> StatusBook:
    fresh = StatusBook(capacity=100)
    monkeypatch.setattr(agent, "book", fresh)
    return fresh


def test_grouped_and_first_format_bundles_fold_and_garbage_is_skipped(book: StatusBook) -> None:
    collector = Collector()
    collector.note("m1", "orders", "accepted")
    (grouped,) = collector.drain("wal-status", 1)
    first = orjson.dumps([{"id": "m2", "ns": "orders", "st": "accepted", "at": 5}])
    bad = [
        b"not json",
        b'{"g": [["orders", "accepted", "soon", null, ["m3"]]]}',
        b'{"g": [["orders", "accepted", 5, null, [7]]]}',
        b'[{"id": "m4"}]',
        b"{}",
        None,
    ]
    records = [(0, 0, grouped.value), (0, 1, first)] + [(0, 2 + n, v) for n, v in enumerate(bad)]
    skipped = agent._fold(records)
    assert len(skipped) == len(bad) and "-status/0/2: " in skipped[0]
    assert (book.get("m1") or {})["status"] == "pending"
    assert (book.get("m2") or {})["acceptedAt"] == 5
    assert book.get("m3") is None and book.get("m4") is None and len(book) == 2
