"""Scaling a live fleet 1 → 3 → 1 while a stream runs: nothing lost, nothing applied twice.

A producer keeps a steady few hundred requests a second flowing for the whole
test; rows-mode SQL *inserts* into a table without a unique key, so only the
target's ledger keeps a replayed write (partitions move twice) from doubling.
A poller asks the surviving worker's views every half second throughout.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

import httpx
import pytest
from aiokafka import AIOKafkaProducer

from tests.integration.harness import (
    BOOTSTRAP,
    Fleet,
    Worker,
    eventually,
    group_lag,
    insert_only,
    messages_total,
    pg_count,
    pg_query,
    request,
)
from tests.integration.ops.conftest import Settled

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.slow]

RATE_PER_S = 300
TICK_S = 0.1


@dataclass
class Stream:
    """A producer at a steady rate until stopped; counts what Kafka acknowledged."""

    topic: str
    sent: int = 0
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=BOOTSTRAP, acks="all", linger_ms=5)
        await producer.start()
        try:
            per_tick = int(RATE_PER_S * TICK_S)
            next_tick = time.monotonic()
            while not self.stop.is_set():
                batch = range(self.sent, self.sent + per_tick)
                futures = [
                    await producer.send(
                        self.topic, request("orders", {"seq": i, "body": "b" * 100})
                    )
                    for i in batch
                ]
                await asyncio.gather(*futures)
                self.sent += per_tick
                next_tick += TICK_S
                await asyncio.sleep(max(0.0, next_tick - time.monotonic()))
        finally:
            await producer.stop()


@dataclass
class Poller:
    """GETs a worker's views every half second; remembers every answer that was not 200."""

    worker: Worker
    paths: tuple[str, ...] = ("/health/live", "/wal/namespaces")
    answered: int = 0
    failures: list[str] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        async with httpx.AsyncClient(base_url=self.worker.url, timeout=3.0) as client:
            while not self.stop.is_set():
                for path in self.paths:
                    try:
                        status = (await client.get(path)).status_code
                    except httpx.HTTPError as exc:
                        self.failures.append(f"{time.strftime('%X')} {path}: {exc!r}")
                        continue
                    self.answered += 1
                    if status != 200:
                        self.failures.append(f"{time.strftime('%X')} {path}: {status}")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), 0.5)


async def test_scaling_one_three_one_under_load_delivers_each_message_once(
    fleet: Fleet, settled: Settled
) -> None:
    fleet.partitions = 6
    table = f"s_{fleet.prefix}"
    fleet.apply(insert_only(table))
    first = await fleet.worker().ready()
    stream, poller = Stream(fleet.topic("ingest")), Poller(first)
    tasks = [asyncio.create_task(stream.run()), asyncio.create_task(poller.run())]
    try:
        await eventually(lambda: _rows_at_least(table, 500), timeout=60, what="first rows")

        sent = [stream.sent]  # the stream keeps flowing through every phase
        extra = [fleet.worker(), fleet.worker()]
        for w in extra:
            await w.ready(timeout=90)
        await settled(first, 3)
        scaled_at = pg_count(table)

        async def shared() -> bool:  # each new worker delivers a share of the stream
            shares = [await messages_total(w.url, "delivered") for w in extra]
            return all(shares) and pg_count(table) > scaled_at + 200

        await eventually(shared, timeout=90, what="three workers delivering")
        sent.append(stream.sent)

        await asyncio.gather(*(asyncio.to_thread(w.stop) for w in extra))  # SIGTERM
        await settled(first, 1)
        alone_at = pg_count(table)

        async def alone() -> bool:  # and the views kept answering through every phase
            return poller.answered >= 40 and pg_count(table) >= alone_at + 200

        await eventually(alone, timeout=60, what="one worker again")
        sent.append(stream.sent)
    finally:
        stream.stop.set()
        poller.stop.set()
        await asyncio.gather(*tasks)

    total = stream.sent
    assert sent[0] < sent[1] < sent[2] <= total, f"the stream stopped during a phase: {sent}"
    await eventually(lambda: _committed(fleet), timeout=180, what="every offset committed")
    # Committed means delivered (deliver acks after the target's write): rows are all there,
    # or some offset was committed past a message that never reached the target.
    with contextlib.suppress(AssertionError):
        await eventually(lambda: _rows_at_least(table, total), timeout=10, what="every row")
    count, distinct, low, high = pg_query(
        f'SELECT count(*), count(DISTINCT seq), min(seq), max(seq) FROM "{table}"'
    )[0]
    lost = sorted(set(range(total)) - {r[0] for r in pg_query(f'SELECT seq FROM "{table}"')})
    assert lost == [], f"{len(lost)} of {total} never delivered (offsets committed): {lost[:20]}"
    assert (count, distinct, low, high) == (total, total, 0, total - 1)
    assert poller.failures == [], poller.failures[:10]
    assert poller.answered >= 40, f"the views were asked only {poller.answered} times"
    print(f"{total} messages through 1 → 3 → 1 workers; views answered {poller.answered} times")


async def _rows_at_least(table: str, n: int) -> bool:
    return pg_count(table) >= n


async def _committed(fleet: Fleet) -> bool:
    lag = await group_lag(fleet.prefix, [fleet.topic("ingest"), fleet.topic("deliver")])
    return not any(lag.values())
