"""Operating views across two worker processes: stats routed to their owner, the fleet, status.

Stats deltas are produced straight to the stats topic with a plain producer
(values built by :func:`tables.stats.delta`, the function the agents use), so
this exercises the stats agent, its table and the routed view on their own.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import orjson
import pytest
from aiokafka.partitioner import DefaultPartitioner
from prometheus_client.parser import text_string_to_metric_families

from tables.stats import delta
from tests.integration.harness import Fleet, Worker, eventually, produce, request
from tests.integration.ops.conftest import Settled

pytestmark = [pytest.mark.kafka]


def names_covering(partitions: int) -> list[str]:
    """Namespace names whose stats keys fall on every partition (the producer's partitioner)."""
    found: dict[int, str] = {}
    partitioner = DefaultPartitioner()
    for i in range(1000):
        name = f"ops-{i}"
        found.setdefault(partitioner(name.encode(), list(range(partitions)), []), name)
        if len(found) == partitions:
            return [found[p] for p in range(partitions)]
    raise AssertionError("no names for every partition")


def deltas_for(names: list[str]) -> tuple[list[bytes], list[bytes], dict[str, dict[str, int]]]:
    """Three deltas per namespace (different targets, some latencies); the totals they make."""
    keys, values, expected = [], [], {}
    for i, name in enumerate(names):
        parts = [
            delta(name, accepted=100 + i, rejected=i),
            delta(name, delivered=90 + i, target="pg", latency_ms=[5, 8, 13, 250]),
            delta(name, retried=3, dead_lettered=1, target="cache", latency_ms=[1500]),
        ]
        keys += [r.key or b"" for r in parts]
        values += [r.value or b"" for r in parts]
        expected[name] = {
            "accepted": 100 + i,
            "rejected": i,
            "delivered": 90 + i,
            "retried": 3,
            "dead_lettered": 1,
            "dropped": 0,
            "parked": 0,
            "replayed": 0,
        }
    return keys, values, expected


async def get(url: str, **params: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=10.0, follow_redirects=False) as client:
        return await client.get(url, params=params)


def stats_owner(view: dict[str, Any], fleet: Fleet, name: str) -> str:
    partition = DefaultPartitioner()(name.encode(), list(range(fleet.partitions)), [])
    (owner,) = view["assignment"][fleet.topic("stats")][str(partition)]
    return str(owner)


async def test_namespace_metrics_are_the_same_from_either_worker(
    fleet: Fleet, settled: Settled
) -> None:
    names = names_covering(fleet.partitions)
    fleet.apply(*({"name": n} for n in names))
    first, second = await fleet.worker().ready(), await fleet.worker().ready()
    view = await settled(first, 2)
    owners = {stats_owner(view, fleet, n) for n in names}
    assert owners == {first.url, second.url}, "each worker must own some of these namespaces"

    keys, values, expected = deltas_for(names)
    await produce(fleet.topic("stats"), [*values, b"not a delta"], keys=[*keys, names[0].encode()])

    async def folded(worker: Worker, name: str) -> dict[str, Any] | None:
        r = await get(f"{worker.url}/wal/namespaces/{name}/metrics")
        body = r.json() if r.status_code == 200 else None
        return body if body and body["totals"] == expected[name] else None

    for name in names:
        a = await eventually(lambda n=name: folded(first, n), timeout=60, what=f"{name} on 1")
        b = await eventually(lambda n=name: folded(second, n), timeout=60, what=f"{name} on 2")
        assert (
            a["targets"]
            == b["targets"]
            == {
                "cache": {"dead_lettered": 1, "retried": 3},
                "pg": {"delivered": expected[name]["delivered"]},
            }
        )
        assert a["latencyMs"] == b["latencyMs"]
        assert a["latencyMs"]["1h"]["count"] == 5
        assert a["latencyMs"]["1h"]["p50"] == pytest.approx(13, rel=0.1)
        assert a["latencyMs"]["1h"]["p99"] == pytest.approx(1500, rel=0.1)
        assert a["rates"]["1h"]["accepted"] == pytest.approx(b["rates"]["1h"]["accepted"], rel=0.1)
        assert a["rates"]["1h"]["accepted"] > 0

    assert (await get(f"{first.url}/wal/namespaces/nobody/metrics")).status_code == 404
    moved = await get(f"{second.url}/wal/namespaces/{names[0].upper()}/metrics")
    assert moved.status_code == 308
    assert moved.headers["Location"] == f"/wal/namespaces/{names[0]}/metrics"
    assert "skipped 1 records that are not deltas" in "".join(w.tail(400) for w in fleet.workers)


async def test_fleet_view_lists_both_workers_and_every_partition_once(
    fleet: Fleet, settled: Settled
) -> None:
    first, second = await fleet.worker().ready(), await fleet.worker().ready()
    view = await settled(second, 2)  # asserts: both listed, every partition held exactly once
    assert sorted(w["url"] for w in view["workers"]) == sorted([first.url, second.url])
    ingest = fleet.topic("ingest")
    mine = [set(w["assigned"][ingest]) for w in view["workers"]]
    assert mine[0] and mine[1] and not mine[0] & mine[1]
    assert mine[0] | mine[1] == set(range(fleet.partitions))
    for w in view["workers"]:  # its table partitions follow its stats partitions
        tables = w["tables"][f"{fleet.prefix}-stats-changelog"]
        assert tables == w["assigned"][fleet.topic("stats")]
    local = (await get(f"{first.url}/wal/fleet")).json()
    assert local["url"] == first.url
    assert {m["url"] for m in local["members"]} == {first.url, second.url}
    assert "circuits" in local and "lag" in local
    ready = (await get(f"{first.url}/health/ready")).json()
    assert ready["checks"] == {
        "assigned": True,
        "recovered": True,
        "commitsAdvancing": True,
        "partitionsMoving": True,
        "ready": True,
    }
    assert ready["stalled"] == [] and local["stalled"] == []


async def test_status_shows_delay_backlog_dlq_depth_and_lag(fleet: Fleet, settled: Settled) -> None:
    fleet.apply({"name": "orders"})
    first, second = await fleet.worker().ready(), await fleet.worker().ready()
    await settled(first, 2)
    garbage = [b"{not json %d" % i for i in range(7)]
    await produce(fleet.topic("ingest"), garbage)  # 7 dead letters
    due = str(int(time.time() * 1000) + 600_000).encode()  # waits in the 15 min tier
    waiting = [request("orders", {"i": i}) for i in range(5)]
    await produce(
        fleet.topic("delay-15m"),
        waiting,
        keys=[b"k%d" % i for i in range(5)],
        headers=[("wal-due-at", due), ("wal-message-id", b"m-wait"), ("wal-attempt", b"1")],
    )

    async def status(worker: Worker) -> dict[str, Any] | None:
        body = (await get(f"{worker.url}/wal/namespaces/orders/status")).json()
        done = body["dlq"]["depth"] == 7 and body["backlog"].get("total") == 5
        return body if done else None

    body = await eventually(lambda: status(second), timeout=60, what="backlog and DLQ depth")
    assert body["dlq"] == {"topic": fleet.topic("dlq"), "depth": 7, "sharedTopic": True}
    assert body["backlog"]["byTopic"][fleet.topic("delay-15m")] == 5
    assert body["backlog"]["scope"] == "fleet"
    assert "config" not in orjson.dumps(body).decode()  # no target configs in views

    async def lag_behind() -> int | None:
        total = 0
        for w in (first, second):
            lag = (await get(f"{w.url}/wal/namespaces/orders/status")).json()["consumerLag"]
            total += sum(lag.get(fleet.topic("delay-15m"), {}).values())
        return total if total == 5 else None

    assert await eventually(lag_behind, timeout=30, what="lag of the sleeping tier") == 5

    async def gauge() -> float | None:  # wal_consumer_lag, refreshed by a timer every 5 s
        total = 0.0
        for w in (first, second):
            text = (await get(f"{w.url}/metrics")).text
            total += sum(
                s.value
                for family in text_string_to_metric_families(text)
                for s in family.samples
                if s.name == "wal_consumer_lag" and s.labels["topic"] == fleet.topic("delay-15m")
            )
        return total if total == 5 else None

    assert await eventually(gauge, timeout=30, what="wal_consumer_lag of the tier") == 5
