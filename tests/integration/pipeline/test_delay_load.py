"""A thousand delayed requests with spread due times, under an ordinary load beside them.

Each is delivered within due .. due + max(1 s, 1 %) on a steady fleet; through a
SIGKILL none is early, none lost, none applied twice.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from tests.integration.harness import BOOTSTRAP, Fleet, eventually, pg_query, request

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.slow]

DELAYED = 1000
SPREAD_S = 20  # the delayed requests are sent over this long, each delayed 1..30 s


def namespace(table: str) -> dict[str, Any]:
    pg_query(
        f'CREATE TABLE "{table}" (seq integer NOT NULL, due bigint NOT NULL, '
        "at_ms bigint NOT NULL DEFAULT (extract(epoch from clock_timestamp()) * 1000))"
    )
    return {
        "name": "later",
        "targets": [
            {
                "identifier": "pg",
                "type": "sql",
                "config": {
                    "mode": "rows",
                    "table": table,
                    "operation": "insert",
                    "ledgerTable": f"{table}_ledger",
                },
            }
        ],
    }


async def send(fleet: Fleet, seed: int) -> tuple[dict[int, int], int]:
    """Send the delayed requests (seq >= 0) spread over SPREAD_S, and meanwhile an ordinary
    stream (seq < 0, due 0). Returns each delayed seq's delay in seconds, and how many
    ordinary requests were sent."""
    rnd = random.Random(seed)
    delays: dict[int, int] = {}
    producer = AIOKafkaProducer(bootstrap_servers=BOOTSTRAP, acks="all", linger_ms=5)
    await producer.start()
    ordinary = 0

    async def load() -> None:
        nonlocal ordinary
        while not stop.is_set():  # ~100 a second
            batch = [request("later", {"seq": -(ordinary + i + 1), "due": 0}) for i in range(10)]
            await asyncio.gather(
                *[await producer.send(fleet.topic("ingest"), value) for value in batch]
            )
            ordinary += len(batch)
            await asyncio.sleep(0.1)

    stop = asyncio.Event()
    background = asyncio.ensure_future(load())
    try:
        started = time.monotonic()
        for seq in range(DELAYED):
            await asyncio.sleep(max(0.0, started + seq * SPREAD_S / DELAYED - time.monotonic()))
            delay = rnd.randint(1, 30)
            sent = int(time.time() * 1000)
            delays[seq] = delay
            value = request(
                "later", {"seq": seq, "due": sent + delay * 1000}, lifecycle={"delay": delay}
            )
            await producer.send(fleet.topic("ingest"), value, timestamp_ms=sent)
        stop.set()
        await background  # every ordinary request sent is counted
        await producer.flush()
    finally:
        stop.set()
        if not background.done():
            background.cancel()
        await producer.stop()
    return delays, ordinary


async def rows(table: str, expected: int) -> list[tuple[int, int, int]] | None:
    found = pg_query(f'SELECT seq, due, at_ms FROM "{table}"')
    return found if len(found) >= expected else None


def lateness(found: list[tuple[int, int, int]]) -> list[int]:
    return sorted(at - due for seq, due, at in found if seq >= 0)


def check_once(found: list[tuple[int, int, int]], ordinary: int) -> None:
    seqs = [seq for seq, _, _ in found]
    assert len(seqs) == len(set(seqs)), "a request was applied twice"
    assert set(seqs) == set(range(DELAYED)) | set(range(-ordinary, 0)), "a request was lost"


async def test_a_thousand_delays_arrive_on_time_under_load(fleet: Fleet) -> None:
    table = f"dl_{uuid.uuid4().hex[:8]}"
    fleet.apply(namespace(table))
    await fleet.worker().ready()
    delays, ordinary = await send(fleet, seed=7)

    found = await eventually(lambda: rows(table, DELAYED + ordinary), timeout=90, what="every row")
    check_once(found, ordinary)
    late = lateness(found)
    print(
        f"{DELAYED} delays 1-30 s under {ordinary} ordinary requests: lateness p50 "
        f"{late[len(late) // 2]} ms, p99 {late[int(len(late) * 0.99)]} ms, max {late[-1]} ms"
    )
    for seq, due, at in found:
        if seq >= 0:
            bound = max(1000, delays[seq] * 10)  # max(1 s, 1 %)
            assert due <= at <= due + bound, (seq, delays[seq], at - due)


async def test_delays_through_a_sigkill_none_early_none_lost(fleet: Fleet) -> None:
    table = f"dk_{uuid.uuid4().hex[:8]}"
    fleet.apply(namespace(table))
    one, two = fleet.worker(), fleet.worker()
    await one.ready()
    await two.ready()
    sending = asyncio.ensure_future(send(fleet, seed=11))
    await asyncio.sleep(SPREAD_S / 2)
    one.kill9()  # mid-run: its delay tiers' partitions, paused and holding, move to two
    _, ordinary = await sending

    found = await eventually(lambda: rows(table, DELAYED + ordinary), timeout=120, what="every row")
    check_once(found, ordinary)
    late = lateness(found)
    assert late[0] >= 0, f"a delayed request arrived {-late[0]} ms early"
    print(
        f"through a SIGKILL: lateness p50 {late[len(late) // 2]} ms, "
        f"p99 {late[int(len(late) * 0.99)]} ms, max {late[-1]} ms (session timeout 10 s)"
    )
