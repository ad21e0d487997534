"""The stats agent's fold of a batch: malformed records are skipped, never raised."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from agents import stats as agent
from tables.stats import NamespaceStats, delta

NOW = 1_700_000_040_000


def event(partition: int, offset: int, key: bytes | None, value: bytes | None) -> Any:
    message = SimpleNamespace(
        topic="wal-stats", partition=partition, offset=offset, key=key, value=value
    )
    return SimpleNamespace(message=message)


@pytest.fixture
def table(monkeypatch: pytest.MonkeyPatch) -> dict[bytes, bytes]:
    fake: dict[bytes, bytes] = {}
    monkeypatch.setattr(agent, "stats", fake)
    return fake


def test_a_batch_is_folded_per_namespace_and_garbage_is_skipped(table: dict[bytes, bytes]) -> None:
    ok = delta("orders", delivered=4, at_ms=NOW)
    other = delta("audit", accepted=2, at_ms=NOW)
    events = [
        event(0, 0, ok.key, ok.value),
        event(0, 1, b"orders", b"\xff not json"),
        event(0, 2, b"audit", ok.value),  # keyed by another namespace than its value says
        event(0, 3, ok.key, ok.value),
        event(1, 0, other.key, other.value),
        event(0, 4, None, None),
    ]
    table.update(agent._fold_batch(events, NOW))
    assert NamespaceStats.loads(table[b"orders"]).totals == {"delivered": 8}
    assert NamespaceStats.loads(table[b"audit"]).totals == {"accepted": 2}

    assert agent._fold_batch(events, NOW) == {}  # the same batch again (a replay): no change
