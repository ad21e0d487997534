"""/health/ready says 503, and why, while a worker's commits stall - and 200 once they move.

An endpoint that always answered 200 fails both tests; so does one that stays 503.
"""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from app.settings import Settings
from tests.integration.harness import (
    Fleet,
    Worker,
    eventually,
    kafka_pid,
    pg_query,
    produce,
    request,
    totals,
)
from tests.integration.ops.test_broker_kill import TOTAL, streaming
from tests.integration.targets.target_services import Webhook

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.slow]


async def ready(worker: Worker) -> tuple[int, dict[str, Any]]:
    async with httpx.AsyncClient(timeout=3.0) as client:
        r = await client.get(f"{worker.url}/health/ready")
    return r.status_code, r.json()


@pytest.fixture
async def hung_webhook() -> AsyncIterator[Webhook]:
    hook = Webhook()
    hook.gate = asyncio.Event()
    await hook.start()
    yield hook
    hook.gate.set()
    await hook.stop()


async def test_a_partition_held_by_a_hung_target_makes_the_worker_not_ready_until_it_moves(
    fleet: Fleet, hung_webhook: Webhook
) -> None:
    # ordering: key waits for its calls, and the call deadline is long: the partition is held
    fleet.apply(
        {
            "name": "seq",
            "ordering": "key",
            "targets": [
                {
                    "identifier": "hook",
                    "type": "http",
                    "config": {"url": hung_webhook.url(), "timeoutMs": 120_000},
                }
            ],
        }
    )
    worker = await fleet.worker(WAL_STALL_AFTER_S="3", WAL_TARGET_DEADLINE_S="120").ready()
    assert (await ready(worker))[0] == 200
    await produce(
        fleet.topic("ingest"),
        [request("seq", {"n": n}, messageId=f"seq-{n}") for n in range(5)],
        keys=[b"one-key"] * 5,
    )

    async def not_ready() -> dict[str, Any] | None:
        code, body = await ready(worker)
        return body if code == 503 else None

    body = await eventually(not_ready, timeout=30, what="503 while the partition is held")
    assert body["status"] == "stalled" and body["checks"]["partitionsMoving"] is False, body
    # the held partitions are the deliver partitions of the waiting writes, and only those,
    # each past the 3 s limit (the view rounds to 0.1 s: just past it reads 3.0)
    assert body["stalled"] and all(
        p["topic"] == fleet.topic("deliver") and p["seconds"] >= 3 for p in body["stalled"]
    ), body

    assert hung_webhook.gate is not None
    hung_webhook.gate.set()  # the target answers: the partition moves on

    async def ready_again() -> bool:
        return (await ready(worker))[0] == 200

    await eventually(ready_again, timeout=60, what="ready again once the partition moved")
    keys = {r.headers.get("Idempotency-Key") for r in hung_webhook.received if r.ok}
    assert keys == {f"seq-{n}" for n in range(5)}


async def test_a_paused_broker_makes_the_worker_not_ready_until_it_is_back(
    fleet: Fleet, own_broker: Settings
) -> None:
    fleet.extra_env["WAL_STALL_AFTER_S"] = "3"
    table = f"rd_{uuid.uuid4().hex[:8]}"
    worker, total = await streaming(fleet, table), TOTAL
    pid = kafka_pid(own_broker)
    os.kill(pid, signal.SIGSTOP)
    try:

        async def not_ready() -> dict[str, Any] | None:
            code, body = await ready(worker)
            return body if code == 503 else None

        body = await eventually(not_ready, timeout=60, what="503 with the broker paused")
        assert body["status"] == "stalled", body
        reasons = {p["topic"] for p in body["stalled"]}
        assert not body["checks"]["commitsAdvancing"] or reasons, body
    finally:
        os.kill(pid, signal.SIGCONT)

    async def ready_again() -> bool:
        return (await ready(worker))[0] == 200

    await eventually(ready_again, timeout=120, what="ready again with the broker back")

    async def all_rows() -> bool:
        return int(pg_query(f'SELECT count(*) FROM "{table}"')[0][0]) >= total

    await eventually(all_rows, timeout=180, what="every row")
    count, distinct = pg_query(f'SELECT count(*), count(DISTINCT seq) FROM "{table}"')[0]
    assert (count, distinct) == (total, total)
    worker.assert_alive()
    counted = await totals(worker, "orders", accepted=total, delivered=total)
    print(f"broker paused; {count} rows, {distinct} distinct; re-read {counted['replayed']}")
