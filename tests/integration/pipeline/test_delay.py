"""Delayed requests wait in Kafka and are delivered when due, not before."""

from __future__ import annotations

import time

import pytest

from tests.integration.harness import Fleet, eventually, pg_query, produce, request

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]


async def test_delayed_requests_arrive_when_due(fleet: Fleet) -> None:
    table = f"d_{fleet.prefix}"
    fleet.apply(
        {
            "name": "later",
            "targets": [{"identifier": "pg", "type": "sql", "config": {"table": table}}],
        }
    )
    await fleet.worker().ready()
    sent_ms = int(time.time() * 1000)
    await produce(
        fleet.topic("ingest"),
        [
            request("later", {"n": 0}),
            request("later", {"n": 2}, lifecycle={"delay": 2}),
            request("later", {"n": 7}, lifecycle={"delay": 7, "delayUnit": "seconds"}),
        ],
    )

    async def rows() -> list[tuple[int, int]] | None:
        try:
            found = pg_query(
                f"SELECT (payload->>'n')::int, delivered_at_ms FROM \"{table}\" ORDER BY 1"
            )
        except Exception:
            return None
        return found if len(found) == 3 else None

    found = await eventually(rows, timeout=60, what="three rows")
    late = {n: delivered - sent_ms for n, delivered in found}
    assert late[2] >= 2000 and late[7] >= 7000, late
    # Bound for an idle fleet: due + max(1 s, 1 %), plus the produce round trip.
    assert late[2] <= 2000 + 1000 + 500 and late[7] <= 7000 + 1000 + 500, late
