"""The replica probe: a describe that hangs is cut at its deadline and its client closed,
the last answer kept with the error; a describe that answers replaces it."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from app.engine import replicas

IN_SYNC = [
    {
        "error_code": 0,
        "topic": "wal-ingest",
        "partitions": [{"partition": 0, "leader": 1, "replicas": [1, 2, 3], "isr": [1, 2]}],
    }
]


class FakeAdmin:
    made: list[FakeAdmin] = []
    hang = False

    def __init__(self, **kwargs: Any) -> None:
        self.closed = False
        FakeAdmin.made.append(self)

    async def start(self) -> None:
        if FakeAdmin.hang:
            await asyncio.sleep(3600)

    async def describe_topics(self, names: list[str]) -> list[dict[str, Any]]:
        return IN_SYNC

    async def close(self) -> None:
        self.closed = True


async def test_a_hung_describe_keeps_the_last_answer_and_closes_its_client(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(replicas, "AIOKafkaAdminClient", FakeAdmin)
    monkeypatch.setattr(replicas, "DEADLINE_S", 0.1)
    health = replicas.ReplicaHealth()
    await health.refresh(["wal-ingest"])
    view = health.view()
    assert view["underReplicated"]["count"] == 1 and "error" not in view
    FakeAdmin.hang = True
    health._admin = None  # as after a failure: the next describe starts a new client
    await asyncio.wait_for(health.refresh(["wal-ingest"]), 2.0)
    view = health.view()
    assert view["error"].startswith("TimeoutError") and view["underReplicated"]["count"] == 1
    assert FakeAdmin.made[-1].closed, "the client whose start was cut short was left open"
    FakeAdmin.hang = False
    await health.refresh(["wal-ingest"])
    assert "error" not in health.view()
