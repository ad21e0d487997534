"""The broker SIGKILLed mid-stream and restarted, or paused while the worker dies: every
request lands once (acked only after Kafka had what it caused), and the counts show the
records that were read again."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid

import pytest

from app.ops import stack
from app.settings import Settings
from tests.integration.harness import (
    Fleet,
    Worker,
    eventually,
    group_lag,
    insert_only,
    kafka_pid,
    pg_query,
    produce,
    request,
    totals,
)

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.slow]


TOTAL = 20_000


def rows(table: str) -> int:
    return int(pg_query(f'SELECT count(*) FROM "{table}"')[0][0])


async def streaming(fleet: Fleet, table: str, **env: str) -> Worker:
    """A worker delivering TOTAL requests into ``table``, some 500 rows in."""
    fleet.apply(insert_only(table))
    worker = await fleet.worker(WAL_BATCH_SIZE="200", **env).ready()
    await produce(
        fleet.topic("ingest"), (request("orders", {"seq": i, "body": "b"}) for i in range(TOTAL))
    )

    async def some_rows() -> bool:
        return rows(table) >= 500

    await eventually(some_rows, timeout=60, what="some rows")
    return worker


async def test_a_broker_killed_and_restarted_mid_stream_loses_and_doubles_nothing(
    fleet: Fleet, own_broker: Settings
) -> None:
    table = f"bk_{uuid.uuid4().hex[:8]}"
    worker, total = await streaming(fleet, table), TOTAL
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
    # Whether anything is read again depends on where the outage caught each batch (in
    # runs: 0 to 4 738 records): reported, not required. The test below makes it certain.
    counted = await totals(worker, "orders", accepted=total, delivered=total)
    print(
        f"broker SIGKILLed at {at_kill} of {total} rows, back 12 s later; rows again "
        f"{resumed:.1f} s after it was up; {count} rows, {distinct} distinct; "
        f"records read again: {counted['replayed']}"
    )


async def test_a_worker_killed_while_the_broker_is_paused_loses_and_doubles_nothing(
    fleet: Fleet, own_broker: Settings
) -> None:
    """Batches written to the target but not yet in Kafka when the worker dies: their
    records must be read again (they were never acked) and applied once."""
    table = f"bp_{uuid.uuid4().hex[:8]}"
    # Commits a minute apart (and every 10 000 acks): what the worker applied and acked
    # before the pause is surely uncommitted, so the next worker must read it again and
    # ``replayed`` must show it. With commits every 0.5 s that depended on timing: when
    # the last commit came just before the pause, only writes whose counts never left the
    # producer were read again, and those are counted as first reads.
    first, total = await streaming(fleet, table, WAL_COMMIT_INTERVAL_S="60"), TOTAL
    pid = kafka_pid(own_broker)
    os.kill(pid, signal.SIGSTOP)
    try:
        at_pause = rows(table)

        async def settled_rows() -> bool:  # what was in flight reached the target
            before = rows(table)
            await asyncio.sleep(1)
            return rows(table) == before

        await eventually(settled_rows, timeout=30, what="the target quiet")
        first.kill9()
    finally:
        os.kill(pid, signal.SIGCONT)
    at_kill = rows(table)
    assert at_kill < total, "the stream was done before the pause: nothing was proven"

    second = await fleet.worker(WAL_BATCH_SIZE="200").ready(timeout=120)

    async def all_rows() -> bool:
        return rows(table) >= total

    await eventually(all_rows, timeout=240, what="every row")

    async def drained() -> bool:
        lag = await group_lag(fleet.prefix, [fleet.topic(r) for r in ("ingest", "deliver")])
        return not any(lag.values())

    await eventually(drained, timeout=60, what="every record committed")
    count, distinct = pg_query(f'SELECT count(*), count(DISTINCT seq) FROM "{table}"')[0]
    print(  # before the checks: a failure's captured output says which one and why
        f"broker paused at {at_pause} rows, worker killed at {at_kill}; {count} rows, "
        f"{distinct} distinct"
    )
    assert (count, distinct) == (total, total)
    counted = await totals(second, "orders", accepted=total, delivered=total)
    print(f"totals: {counted}")
    assert counted["replayed"] > 0, "nothing was read again: the kill proved nothing"
