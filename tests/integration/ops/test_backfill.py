"""``wal backfill`` against a real fleet: a Redis target added to a live namespace is
filled from what ``wal-deliver`` holds, while new writes keep flowing (to both targets,
before, during and after the backfill); a second run changes nothing; the SQL target
never sees a write twice.

The SQL target inserts into a table without a unique key, so only its ledger keeps a
write from landing twice; and its delivered count (the metrics view) says whether it
was even asked again.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer

from tests.integration.harness import (
    BOOTSTRAP,
    REDIS_URL,
    ROOT,
    WAL,
    Fleet,
    eventually,
    group_lag,
    insert_only,
    metrics_view,
    pg_count,
    pg_query,
    produce,
    request,
)

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.redis]

OLD = 10_000  # writes before the Redis target exists
LIVE_RATE = 100  # new writes a second, from before the first backfill to its end
DURING = 100  # of them at least, sent while it runs (after the end it reads to)
RATE = 4_000  # the first backfill's --rate: ~2.5 s, while the live writes go on


def writes(namespace: str, first: int, n: int) -> list[bytes]:
    return [request(namespace, {"seq": i, "body": f"v{i}"}) for i in range(first, first + n)]


async def redis_keys(client: aioredis.Redis, pattern: str) -> int:
    return sum([1 async for _ in client.scan_iter(match=pattern, count=5000)])


async def test_a_new_redis_target_is_filled_from_the_log_while_writes_flow(
    fleet: Fleet,
) -> None:
    name = f"bf{uuid.uuid4().hex[:8]}"  # Redis markers are per namespace: a name of its own
    table, prefix = f"b_{fleet.prefix}", f"{fleet.prefix}:"
    sql = insert_only(table, name=name)
    fleet.apply(sql)
    worker = await fleet.worker().ready()
    await produce(fleet.topic("ingest"), writes(name, 0, OLD))
    await eventually(lambda: _rows(table, OLD), timeout=180, what=f"{OLD} rows")

    cache = {
        "identifier": "cache",
        "type": "redis",
        "config": {"keyPrefix": prefix, "keyPath": "seq", "valuePath": "body"},
    }
    added = datetime.now(UTC).isoformat()  # every old write was admitted before this
    fleet.apply({**sql, "targets": [*sql["targets"], cache]})
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        await _wait_for_target(fleet, worker.url, name)
        running = asyncio.Event()
        live = asyncio.ensure_future(_live_writes(fleet, name, running))
        await running.wait()
        started = time.monotonic()
        first = await asyncio.to_thread(_backfill, fleet, name, "--rate", str(RATE))
        took = time.monotonic() - started
        running.clear()
        sent = await live
        assert first.returncode == 0, first.stderr.decode() + first.stdout.decode()
        summary = _summary(first.stdout.decode())
        assert summary["re-emitted"] >= OLD and summary["skipped"] == 0, summary
        # the backfill read up to the end wal-deliver had when it began: writes past it
        # were sent while it ran
        assert sent - (summary["read"] - OLD) >= DURING, (sent, summary)
        assert summary["matched"] == summary["re-emitted"], summary
        assert took >= summary["re-emitted"] / RATE, f"--rate {RATE} not kept: {took:.1f} s"
        bar = re.findall(r"(\d+)/(\d+) \[", first.stderr.decode())
        assert bar and bar[-1][0] == bar[-1][1] == str(summary["read"]), bar[-3:]

        want = OLD + sent
        await eventually(lambda: _rows(table, want), timeout=180, what=f"{want} rows")
        await eventually(
            lambda: _at(client, f"{prefix}*", want), timeout=180, what=f"{want} Redis keys"
        )
        await _drained(fleet)
        assert await redis_keys(client, f"{prefix}*") == want
        assert await redis_keys(client, f"wal:applied:{name}:cache:*") == want
        sample = await client.mget([f"{prefix}{i}" for i in (0, 4999, OLD - 1, want - 1)])
        assert sample == [b"v0", b"v4999", f"v{OLD - 1}".encode(), f"v{want - 1}".encode()]

        second = await asyncio.to_thread(_backfill, fleet, name, "--no-progress")
        assert second.returncode == 0, second.stderr.decode()
        again = _summary(second.stdout.decode())
        assert again["re-emitted"] >= want, again  # everything again, to the ledger's refusal
        await _drained(fleet)
        assert await redis_keys(client, f"{prefix}*") == want
        assert await redis_keys(client, f"wal:applied:{name}:cache:*") == want

        # --since/--until choose by admission time; a dry run counts and emits nothing
        after = await asyncio.to_thread(_backfill, fleet, name, "--dry-run", "--since", added)
        before = await asyncio.to_thread(_backfill, fleet, name, "--dry-run", "--until", added)
        assert after.returncode == before.returncode == 0, after.stderr + before.stderr
        assert _summary(after.stdout.decode())["would re-emit"] == sent
        assert _summary(before.stdout.decode())["would re-emit"] == OLD
        assert "(dry run: nothing emitted)" in after.stdout.decode()

        rows, distinct = pg_query(f'SELECT count(*), count(DISTINCT seq) FROM "{table}"')[0]
        assert (rows, distinct) == (want, want)
        assert pg_count(f"{table}_ledger") == want
        # the SQL target was never asked again: each of its writes delivered once; the
        # cache was asked for each live write and each re-emitted one (the ledger said
        # "done" to those it had)
        cache_asked = sent + summary["re-emitted"] + again["re-emitted"]
        view = await metrics_view(worker, name, delivered=want + cache_asked)
        assert view["targets"]["pg"]["delivered"] == want
        assert view["targets"]["cache"]["delivered"] == cache_asked
        assert view["totals"]["dead_lettered"] == view["totals"]["retried"] == 0
        print(f"first run ({took:.1f} s, {sent} new writes meanwhile): {summary}; second: {again}")
    finally:
        await client.aclose()


async def _wait_for_target(fleet: Fleet, url: str, name: str) -> None:
    async def check() -> bool:
        async with httpx.AsyncClient(timeout=5.0) as http:
            r = await http.get(f"{url}/wal/namespaces/{name}/status")
        return any(t["identifier"] == "cache" for t in r.json().get("targets", []))

    await eventually(check, timeout=30, what="the worker sees the new target")


async def _live_writes(fleet: Fleet, name: str, running: asyncio.Event) -> int:
    """New writes at ``LIVE_RATE`` a second until ``running`` is cleared; how many."""
    producer = AIOKafkaProducer(bootstrap_servers=BOOTSTRAP, acks="all", linger_ms=5)
    await producer.start()
    sent, step = OLD, 10
    try:
        running.set()
        while running.is_set() and sent < OLD + 60 * LIVE_RATE:
            started = time.monotonic()
            batch = [
                await producer.send(fleet.topic("ingest"), value)
                for value in writes(name, sent, step)
            ]
            await asyncio.gather(*batch)
            sent += step
            await asyncio.sleep(max(0.0, step / LIVE_RATE - (time.monotonic() - started)))
    finally:
        await producer.stop()
    return sent - OLD


def _backfill(fleet: Fleet, name: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    url = fleet.workers[0].url
    return subprocess.run(
        [WAL, "backfill", "--namespace", name, "--target", "cache", "--url", url, *args],
        env=fleet.env(),
        capture_output=True,
        cwd=ROOT,
        timeout=300,
        check=False,
    )


def _summary(out: str) -> dict[str, int]:
    """``backfill NS -> T: read 1, matched 2, re-emitted 3, skipped 0`` as numbers."""
    line = next(x for x in out.splitlines() if x.startswith("backfill "))
    found: dict[str, Any] = {}
    for part in line.split(":", 1)[1].split("(")[0].split(","):
        words = part.split()
        found[" ".join(words[:-1])] = int(words[-1])
    return found


async def _rows(table: str, n: int) -> bool:
    return pg_count(table) >= n


async def _at(client: aioredis.Redis, pattern: str, n: int) -> bool:
    return await redis_keys(client, pattern) >= n


async def _drained(fleet: Fleet) -> None:
    """Every record on ingest and deliver processed and committed (re-emitted ones too)."""

    async def check() -> dict[str, int] | None:
        lag = await group_lag(fleet.prefix, [fleet.topic("ingest"), fleet.topic("deliver")])
        return lag if not any(lag.values()) else None

    await eventually(check, timeout=120, what="ingest and deliver drained")
