"""SIGTERM finishes within WAL_SHUTDOWN_TIMEOUT_S, even with the broker frozen mid-stream.

What a worker abandons at its deadline was not acked: the next worker on the same
(thawed) broker reads it again, and every request still lands exactly once.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import pytest

from app.settings import Settings
from tests.integration.harness import (
    Fleet,
    Worker,
    eventually,
    insert_only,
    kafka_pid,
    pg_count,
    pg_query,
    produce,
    request,
)

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.slow]

DEADLINE_S = 5.0


async def test_sigterm_with_the_broker_frozen_exits_at_the_deadline_and_loses_nothing(
    fleet: Fleet, own_broker: Settings
) -> None:
    # the records go to this test's own broker, which it freezes
    fleet.extra_env.update({"WAL_SHUTDOWN_TIMEOUT_S": str(DEADLINE_S), "WAL_STALL_AFTER_S": "3"})
    table = f"sd_{fleet.prefix}"
    fleet.apply(insert_only(table))
    total = 20_000
    first = await fleet.worker(WAL_BATCH_SIZE="200").ready()
    await produce(
        fleet.topic("ingest"), (request("orders", {"seq": i, "body": "b"}) for i in range(total))
    )
    await eventually(lambda: _rows_at_least(table, 500), timeout=60, what="some rows")

    pid = kafka_pid(own_broker)
    os.kill(pid, signal.SIGSTOP)  # mid-stream: produce, commit, leave all hang
    try:
        # nothing is acked, yet the worker does not pass for idle: it names what is stuck
        stalled = await eventually(lambda: _stalled(first), timeout=30, what="503 stalled")
        assert {p["topic"] for p in stalled} & {fleet.topic("ingest"), fleet.topic("deliver")}
        assert first.proc is not None
        os.killpg(first.proc.pid, signal.SIGTERM)
        since = time.monotonic()
        code = await asyncio.to_thread(first.proc.wait, DEADLINE_S + 20)
        took = time.monotonic() - since
    finally:
        os.kill(pid, signal.SIGCONT)
    assert code == 3, f"exit {code} after {took:.1f}s:\n{first.tail()}"
    assert took < DEADLINE_S + 5, f"took {took:.1f}s"
    assert "shutdown passed its deadline" in first.log.read_text()
    abandoned_at = pg_count(table)
    assert abandoned_at < total, "the stream was done before the stop: nothing was proven"

    await fleet.worker(WAL_BATCH_SIZE="2000").ready(timeout=120)
    await eventually(lambda: _rows_at_least(table, total), timeout=180, what="every row")
    count, distinct = pg_query(f'SELECT count(*), count(DISTINCT seq) FROM "{table}"')[0]
    assert (count, distinct) == (total, total)
    print(f"exited {code} {took:.1f}s after SIGTERM with {abandoned_at} of {total} rows")


async def _stalled(worker: Worker) -> list[dict[str, object]] | None:
    async with httpx.AsyncClient(timeout=3.0) as client:
        r = await client.get(f"{worker.url}/health/ready")
    body = r.json()
    ok = r.status_code == 503 and body["status"] == "stalled" and body["stalled"]
    return body["stalled"] if ok else None


async def _rows_at_least(table: str, n: int) -> bool:
    return pg_count(table) >= n
