"""Delayed requests wait in Kafka and are delivered when due: not before, and not much after."""

from __future__ import annotations

import time

import pytest
from aiokafka import AIOKafkaProducer

from tests.integration.harness import BOOTSTRAP, Fleet, eventually, pg_query, request

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]


async def test_delays_arrive_within_the_bound_even_past_the_largest_tier(fleet: Fleet) -> None:
    """Tiers of 1, 2 and 4 s: a 10 s delay hops 4+4+2, a 13 s one 4+4+4+1."""
    table = f"d_{fleet.prefix}"
    fleet.extra_env["WAL_DELAY_TIERS"] = "1,2,4"
    fleet.apply(
        {
            "name": "later",
            "targets": [{"identifier": "pg", "type": "sql", "config": {"table": table}}],
        }
    )
    await fleet.worker().ready()

    delays = {0: 0, 1: 2, 2: 10, 3: 13}
    sent: dict[int, int] = {}
    producer = AIOKafkaProducer(bootstrap_servers=BOOTSTRAP, acks="all")
    await producer.start()
    try:
        for n, delay in delays.items():
            sent[n] = int(time.time() * 1000)
            lifecycle = {"delay": delay, "delayUnit": "seconds"} if delay else {}
            await producer.send_and_wait(
                fleet.topic("ingest"),
                request("later", {"n": n}, lifecycle=lifecycle),
                timestamp_ms=sent[n],
            )
    finally:
        await producer.stop()

    async def rows() -> list[tuple[int, int]] | None:
        try:
            found = pg_query(f"SELECT (payload->>'n')::int, delivered_at_ms FROM \"{table}\"")
        except Exception:
            return None
        return found if len(found) == len(delays) else None

    found = await eventually(rows, timeout=60, what="all rows")
    for n, delivered in found:
        due = sent[n] + delays[n] * 1000
        bound = max(1000, delays[n] * 10)  # max(1 s, 1 %)
        assert due <= delivered <= due + bound, (n, delivered - due)
