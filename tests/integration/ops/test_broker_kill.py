"""The broker SIGKILLed mid-stream and restarted: the worker goes on by itself, and every
request lands once (acked only after Kafka had what it caused)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid

import pytest

from app import stack
from app.settings import Settings
from tests.integration.harness import (
    Fleet,
    eventually,
    group_lag,
    insert_only,
    kafka_pid,
    pg_query,
    produce,
    request,
)

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.slow]


def rows(table: str) -> int:
    return int(pg_query(f'SELECT count(*) FROM "{table}"')[0][0])


async def test_a_broker_killed_and_restarted_mid_stream_loses_and_doubles_nothing(
    fleet: Fleet, own_broker: Settings
) -> None:
    table = f"bk_{uuid.uuid4().hex[:8]}"
    fleet.apply(insert_only(table))
    worker = await fleet.worker(WAL_BATCH_SIZE="200").ready()
    total = 20_000
    await produce(
        fleet.topic("ingest"), (request("orders", {"seq": i, "body": "b"}) for i in range(total))
    )

    async def some_rows() -> bool:
        return rows(table) >= 500

    await eventually(some_rows, timeout=60, what="some rows")
    # mid-stream: produces, fetches and commits in flight
    os.kill(kafka_pid(own_broker), signal.SIGKILL)
    at_kill = rows(table)
    await asyncio.sleep(12)  # past the session timeout: the group must rebalance
    assert rows(table) < total, "the stream was done before the kill: nothing was proven"
    await asyncio.to_thread(stack.up, own_broker)
    back = time.monotonic()
    resumed_at = rows(table)

    async def moving() -> bool:
        return rows(table) > resumed_at

    await eventually(moving, timeout=120, what="rows again after the broker is back")
    resumed = time.monotonic() - back

    async def all_rows() -> bool:
        return rows(table) >= total

    await eventually(all_rows, timeout=240, what="every row")

    async def drained() -> bool:
        roles = ("ingest", "deliver")
        lag = await group_lag(fleet.prefix, [fleet.topic(r) for r in roles])
        return not any(lag.values())

    await eventually(drained, timeout=60, what="every record committed")
    count, distinct = pg_query(f'SELECT count(*), count(DISTINCT seq) FROM "{table}"')[0]
    assert (count, distinct) == (total, total)
    worker.assert_alive()  # it recovered by itself
    print(
        f"broker SIGKILLed at {at_kill} of {total} rows, back 12 s later; rows again "
        f"{resumed:.1f} s after it was up; {count} rows, {distinct} distinct"
    )
