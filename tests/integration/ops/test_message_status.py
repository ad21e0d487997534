"""``GET /wal/messages/{id}``: answered by the owner from either worker, and after it dies.

Two workers; messages that complete, one that exhausts its retries, one that
is rejected and one delayed for longer than the test. Every id is asked of
both workers (so about half the answers are routed); then one worker is
SIGKILLed and the survivor, rebuilding its book from ``wal-status``, answers
for every id again.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import pytest

from tests.integration.harness import Fleet, Worker, eventually, produce, request, totals
from tests.integration.ops.conftest import Settled

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]


async def status_of(worker: Worker, message_id: str) -> tuple[int, dict[str, Any]]:
    async with httpx.AsyncClient(timeout=10.0) as client:
        response = await client.get(f"{worker.url}/wal/messages/{message_id}")
    return response.status_code, response.json()


async def test_message_status_from_any_worker_and_after_its_owner_dies(
    fleet: Fleet, settled: Settled
) -> None:
    run = uuid.uuid4().hex[:8]
    table = f"ms_{fleet.prefix}"
    fleet.apply(
        {
            "name": "ok",
            "targets": [{"identifier": "pg", "type": "sql", "config": {"table": table}}],
        },
        {
            "name": "down",
            "retryPolicy": {"maxAttempts": 2, "backoffStrategy": "constant", "initialDelayMs": 200},
            "targets": [
                {
                    "identifier": "nowhere",
                    "type": "sql",
                    "config": {"url": "postgresql+psycopg://wal:wal@127.0.0.1:1/wal"},
                }
            ],
        },
    )
    first, second = await fleet.worker().ready(), await fleet.worker().ready()
    await settled(first, 2)

    done = [f"ok-{run}-{n}" for n in range(40)]
    values = [request("ok", {"n": n}, messageId=i) for n, i in enumerate(done)]
    values.append(request("down", {"n": 0}, messageId=f"down-{run}"))
    values.append(request("nope", {"n": 0}, messageId=f"bad-{run}"))  # no such namespace
    later = {"delay": 1, "delayUnit": "hours"}
    values.append(request("ok", {"n": -1}, messageId=f"later-{run}", lifecycle=later))
    await produce(fleet.topic("ingest"), values)

    expected = {i: "completed" for i in done}
    expected |= {f"down-{run}": "dlq", f"bad-{run}": "rejected", f"later-{run}": "delayed"}

    wrong: list[Any] = []

    async def all_known(via: list[Worker]) -> dict[str, dict[str, Any]] | None:
        seen = {}
        for message_id, status in expected.items():
            for worker in via:
                code, body = await status_of(worker, message_id)
                if code != 200 or body["status"] != status:
                    wrong[:] = [worker.url, message_id, code, body]
                    return None
                seen[message_id] = body
        return seen

    seen = await eventually(lambda: all_known([first, second]), timeout=90, what="statuses")
    assert seen[done[0]]["targets"]["pg"]["status"] == "delivered"
    assert seen[done[0]]["namespace"] == "ok"
    down = seen[f"down-{run}"]["targets"]["nowhere"]
    assert down["status"] == "dead_lettered" and down["attempts"] == 2
    assert down["lastError"]["code"] == "RETRIES_EXHAUSTED"
    assert seen[f"bad-{run}"]["error"]["code"] == "NAMESPACE_NOT_FOUND"
    assert seen[f"later-{run}"]["dueAt"] > seen[f"later-{run}"]["acceptedAt"] + 3_500_000

    code, body = await status_of(second, f"never-{run}")
    assert code == 404 and body["error"]["code"] == "NOT_FOUND"

    second.kill9()
    await settled(first, 1)
    try:
        await eventually(lambda: all_known([first]), timeout=90, what="statuses after a SIGKILL")
    finally:
        print("last wrong answer:", wrong)


async def test_status_tracking_levels_note_all_failures_or_nothing(
    fleet: Fleet, settled: Settled
) -> None:
    """``statusTracking``: ``all`` knows every message; ``failures`` only those that met a
    failure (and their end); ``none`` none. The counts know all of them either way."""
    run = uuid.uuid4().hex[:8]
    table = f"mt_{fleet.prefix}"
    nowhere = {"url": "postgresql+psycopg://wal:wal@127.0.0.1:1/wal"}
    retries = {"maxAttempts": 2, "backoffStrategy": "constant", "initialDelayMs": 200}
    levels = ("all", "failures", "none")
    fleet.apply(
        *[
            {
                "name": f"t-{level}",
                "statusTracking": level,
                "maxMessageSize": 256,
                "retryPolicy": retries,
                "targets": [{"identifier": "pg", "type": "sql", "config": {"table": table}}],
            }
            for level in levels
        ],
        *[
            {
                "name": f"d-{level}",
                "statusTracking": level,
                "retryPolicy": retries,
                "targets": [{"identifier": "nowhere", "type": "sql", "config": nowhere}],
            }
            for level in levels
        ],
    )
    worker = await fleet.worker().ready()
    await settled(worker, 1)
    values = []
    for level in levels:
        ids = [f"ok-{level}-{run}-{n}" for n in range(5)]
        values += [request(f"t-{level}", {"n": n}, messageId=i) for n, i in enumerate(ids)]
        values.append(request(f"d-{level}", {"n": 0}, messageId=f"down-{level}-{run}"))
        big = {"text": "x" * 400}  # over the namespace's maxMessageSize: rejected at ingest
        values.append(request(f"t-{level}", big, messageId=f"big-{level}-{run}"))
    await produce(fleet.topic("ingest"), values)

    # Everything has happened once the counts say so (they do not depend on tracking).
    for level in levels:
        await totals(worker, f"t-{level}", accepted=5, rejected=1, delivered=5)
        await totals(worker, f"d-{level}", accepted=1, dead_lettered=1)

    expected = {
        **{f"ok-all-{run}-{n}": "completed" for n in range(5)},
        f"down-all-{run}": "dlq",
        f"big-all-{run}": "rejected",
        f"down-failures-{run}": "dlq",
        f"big-failures-{run}": "rejected",
    }
    unknown = [f"ok-failures-{run}-{n}" for n in range(5)]
    unknown += [f"ok-none-{run}-{n}" for n in range(5)]
    unknown += [f"down-none-{run}", f"big-none-{run}"]

    async def known() -> bool | None:
        for message_id, status in expected.items():
            code, body = await status_of(worker, message_id)
            if code != 200 or body["status"] != status:
                return None
        return True

    await eventually(known, timeout=60, what="the tracked statuses")
    _, down = await status_of(worker, f"down-failures-{run}")
    assert down["targets"]["nowhere"]["attempts"] == 2  # its story from the first failure
    for _ in range(2):  # and again a little later: nothing arrives late for the others
        for message_id in unknown:
            code, body = await status_of(worker, message_id)
            assert code == 404, (message_id, body)
        await asyncio.sleep(2)
