"""Cancel (issue 21, item 2): 1 000 delayed writes, 300 of them cancelled - 200 long
before they are due, 100 racing their due time - every write ends delivered or
cancelled, never both and never neither, and each cancellation's answer says which."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import httpx
import pytest

from tests.integration.harness import (
    ADMIN_KEY,
    Fleet,
    Worker,
    eventually,
    insert_only,
    pg_count,
    pg_query,
    produce,
    request,
)

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.slow]

TOTAL, EARLY, RACING = 1_000, 200, 100
DELAY_S, RACE_S = 16, 10  # the racing ones come due after 10 s and are cancelled then


async def cancel(client: httpx.AsyncClient, worker: Worker, message_id: str) -> str:
    r = await client.delete(
        f"{worker.url}/wal/messages/{message_id}", headers={"X-API-Key": ADMIN_KEY}
    )
    assert r.status_code == 200, r.text
    return str(r.json()["outcome"])


async def status(client: httpx.AsyncClient, worker: Worker, message_id: str) -> dict[str, Any]:
    r = await client.get(f"{worker.url}/wal/messages/{message_id}")
    assert r.status_code == 200, r.text
    return dict(r.json())


async def test_cancelled_delayed_writes_are_never_delivered_and_the_rest_are(fleet: Fleet) -> None:
    table = f"cancel_{uuid.uuid4().hex[:8]}"
    fleet.apply(insert_only(table, "later"))
    one, two = fleet.worker(), fleet.worker()
    await one.ready()
    await two.ready()
    run = uuid.uuid4().hex[:6]
    ids = [f"{run}-{i}" for i in range(TOTAL)]
    racing = set(ids[EARLY : EARLY + RACING])
    writes = [
        request(
            "later",
            {"seq": i, "body": ids[i]},
            messageId=ids[i],
            lifecycle={"delay": RACE_S if ids[i] in racing else DELAY_S},
        )
        for i in range(TOTAL)
    ]
    sent_at = time.monotonic()
    await produce(fleet.topic("ingest"), writes, keys=[i.encode() for i in ids])

    answers: dict[str, str] = {}
    gate = asyncio.Semaphore(RACING)

    async def cancel_one(client: httpx.AsyncClient, worker: Worker, message_id: str) -> None:
        async with gate:
            answers[message_id] = await cancel(client, worker, message_id)

    async with httpx.AsyncClient(timeout=60) as client:
        await asyncio.sleep(1.5)  # accepted and delayed by now
        early = [cancel_one(client, (one, two)[i % 2], ids[i]) for i in range(EARLY)]
        await asyncio.gather(*early)
        # the racing ones come due RACE_S after they were sent: cancel them from 1.5 s
        # before until 0.5 s after
        assert time.monotonic() < sent_at + RACE_S - 2, "the early cancellations took too long"

        async def race(n: int, message_id: str) -> None:
            at = sent_at + RACE_S - 1.5 + 2.0 * n / RACING
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            await cancel_one(client, (one, two)[n % 2], message_id)

        await asyncio.gather(*(race(n, m) for n, m in enumerate(sorted(racing))))
        again = await cancel(client, one, ids[0])  # cancelling twice is harmless
        assert again == "cancelled"

        cancelled = {m for m, word in answers.items() if word == "cancelled"}
        delivered_first = {m for m, word in answers.items() if word == "delivered"}
        assert cancelled | delivered_first == set(answers), f"unsettled: {set(answers.values())}"
        assert set(ids[:EARLY]) <= cancelled, "a cancellation long before its due time lost"
        expected = TOTAL - len(cancelled)

        await eventually(lambda: _rows(table, expected), timeout=90, what=f"{expected} rows")
        await asyncio.sleep(max(3.0, sent_at + DELAY_S + 5 - time.monotonic()))
        rows = [r[0] for r in pg_query(f'SELECT body FROM "{table}"')]
        assert len(rows) == len(set(rows)) == expected, "a write lost or applied twice"
        assert not cancelled & set(rows), "a write both cancelled and delivered"
        assert set(rows) | cancelled == set(ids), "a write neither delivered nor cancelled"
        assert delivered_first <= set(rows)
        statuses = [await status(client, one, m) for m in (ids[0], ids[-1])]
        assert [s["status"] for s in statuses] == ["cancelled", "completed"]
    print(
        f"{TOTAL} delayed writes, {len(answers)} cancelled: {len(cancelled)} cancelled "
        f"({len(cancelled & racing)} of {RACING} racing their due time), "
        f"{len(delivered_first)} lost the race (delivered); {len(rows)} rows, none twice"
    )


async def _rows(table: str, n: int) -> bool:
    return pg_count(table) >= n
