"""Pause and resume (issue 21, item 1): a paused target receives nothing while writes keep
arriving, the namespace's other targets go on; a paused namespace holds every target, a
worker SIGKILLed meanwhile; after resume every write arrives, exactly once where the
target's ledger decides (rows inserted into a table without a unique key), and each
key's writes in order."""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
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
from tests.integration.targets.target_services import Webhook

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.slow]

KEYS = 10
QUIET_S = 12  # long enough for held writes to ask again twice (every 5 s)


def held(hook: Webhook, table: str) -> dict[str, Any]:
    """Rows inserted into ``table`` (only the ledger keeps them from doubling), and
    ``hook``; each key's writes in order."""
    namespace = insert_only(table, "held")
    namespace["targets"].append(
        {"identifier": "hook", "type": "http", "config": {"url": hook.url()}}
    )
    return {**namespace, "ordering": "key", "shardConfig": {"keyPath": "payload.body"}}


async def send(fleet: Fleet, first: int, count: int) -> None:
    """``count`` writes for each of the keys, numbered from ``first``."""
    numbered = [(n, k) for n in range(first, first + count) for k in range(KEYS)]
    writes = [
        request("held", {"seq": n * KEYS + k, "body": f"key{k}"}, messageId=f"m-{n}-{k}")
        for n, k in numbered
    ]
    # keyed on ingest too: a key's order is the order its writes were produced in
    await produce(fleet.topic("ingest"), writes, keys=[f"key{k}".encode() for _, k in numbered])


async def admin(worker: Worker, action: str, **body: Any) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=10) as client:
        r = await client.post(
            f"{worker.url}/wal/admin/namespaces/held/{action}",
            json=body,
            headers={"X-API-Key": ADMIN_KEY},
        )
        assert r.status_code == 200, r.text
        return dict(r.json())


async def pauses_seen(worker: Worker) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(timeout=10) as client:
        r = await client.get(f"{worker.url}/wal/namespaces/held/status")
        return list(r.json()["paused"])


def wal(fleet: Fleet, *args: str) -> str:
    done = fleet.wal("namespaces", *args)
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout.decode()


async def test_a_paused_target_gets_nothing_then_everything_in_order_after_resume(
    fleet: Fleet, webhook: Webhook
) -> None:
    hook = webhook
    table = f"hold_{uuid.uuid4().hex[:8]}"
    fleet.apply(held(hook, table))
    one, two = fleet.worker(), fleet.worker()
    await one.ready()
    await two.ready()

    # 1. the webhook paused: the namespace's database target goes on
    assert "paused  held/hook" in wal(fleet, "pause", "held", "--target", "hook", "--reason", "x")
    await eventually(lambda: _paused_on(two, "hook"), timeout=10, what="the pause on a worker")
    await send(fleet, 0, 5)
    await eventually(lambda: _rows(table, 5 * KEYS), timeout=60, what="rows while hook paused")
    await asyncio.sleep(QUIET_S)
    assert hook.received == [], "a paused target was called"

    # 2. the whole namespace paused (over HTTP), a worker killed while it is
    answer = await admin(one, "pause", reason="db maintenance")
    assert answer["changed"] and answer["paused"]
    await eventually(lambda: _paused_on(two, None), timeout=10, what="the namespace pause")
    seen = await pauses_seen(two)
    assert {(p["target"], p["reason"]) for p in seen} == {("hook", "x"), (None, "db maintenance")}
    assert all(p["by"].startswith("admin:") and p["sinceMs"] > 0 for p in seen)
    await send(fleet, 5, 5)
    await asyncio.sleep(3)
    one.kill9()
    await send(fleet, 10, 5)
    three = await fleet.worker().ready()
    await asyncio.sleep(QUIET_S)
    assert pg_count(table) == 5 * KEYS, "a paused namespace's target was written"
    assert hook.received == [], "a paused target was called"

    # 3. resumed: the namespace by the CLI, the webhook over HTTP
    assert "resumed  held" in wal(fleet, "resume", "held")
    assert (await admin(three, "resume", target="hook"))["changed"]
    total = 15 * KEYS
    await eventually(lambda: _rows(table, total), timeout=120, what="every row after resume")

    async def hook_done() -> bool:
        return len({r.headers.get("Idempotency-Key") for r in hook.received if r.ok}) >= total

    await eventually(hook_done, timeout=120, what="every webhook write after resume")
    await asyncio.sleep(6)  # anything held twice (the kill) has come back by now
    rows = pg_query(f'SELECT seq FROM "{table}"')
    assert sorted(r[0] for r in rows) == list(range(total)), "a row lost or inserted twice"
    firsts: dict[str, list[int]] = defaultdict(list)
    seen_ids: set[str] = set()
    for r in hook.received:
        key = r.headers.get("Idempotency-Key", "")
        if r.ok and key not in seen_ids:
            seen_ids.add(key)
            firsts[r.body["body"]].append(r.body["seq"])
    assert len(seen_ids) == total
    for key, seqs in firsts.items():
        assert seqs == sorted(seqs), f"{key} out of order: {seqs}"
    again = sum(r.ok for r in hook.received) - total
    print(
        f"paused then resumed: {total} rows exactly once; webhook {total} writes in per-key "
        f"order ({again} repeated with the same Idempotency-Key after the SIGKILL)"
    )
    assert await pauses_seen(three) == []


async def _paused_on(worker: Worker, target: str | None) -> bool:
    return any(p["target"] == target for p in await pauses_seen(worker))


async def _rows(table: str, n: int) -> bool:
    return pg_count(table) >= n
