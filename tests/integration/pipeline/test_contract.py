"""The write-request contract over Kafka: each rejection path, and live namespace changes."""

from __future__ import annotations

import time

import orjson
import pytest

from tests.integration.harness import (
    BOOTSTRAP,
    Fleet,
    eventually,
    header,
    pg_count,
    pg_query,
    read_all,
    request,
)

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]


def shop(table: str, **extra: object) -> dict[str, object]:
    return {
        "name": "shop",
        "maxMessageSize": 1024,
        "targets": [{"identifier": "pg", "type": "sql", "config": {"table": table}}],
        **extra,
    }


async def test_each_rejection_path_dead_letters_one_record_while_good_ones_flow(
    fleet: Fleet,
) -> None:
    from aiokafka import AIOKafkaProducer

    table = f"c_{fleet.prefix}"
    fleet.apply(shop(table), {"name": "closed", "enabled": False})
    await fleet.worker().ready()

    bad = {
        "INVALID_JSON": b'{"namespace": "shop", "payload": ',
        "VALIDATION_ERROR": orjson.dumps({"namespace": "shop", "payload": {}, "priority": 99}),
        "NAMESPACE_NOT_FOUND": request("nowhere", {"a": 1}),
        "NAMESPACE_DISABLED": request("closed", {"a": 1}),
        "MESSAGE_SIZE_LIMIT_EXCEEDED": request("shop", {"blob": "z" * 2000}),
        "TARGET_NOT_FOUND": request("shop", {"a": 1}, target="elsewhere"),
        "MESSAGE_EXPIRED": request("shop", {"a": 1}, lifecycle={"ttl": 60}),
    }
    producer = AIOKafkaProducer(bootstrap_servers=BOOTSTRAP, acks="all")
    await producer.start()
    good = 0
    try:
        for code, raw in bad.items():
            for _ in range(30):  # good requests keep flowing around each bad one
                await producer.send(fleet.topic("ingest"), request("shop", {"seq": good}))
                good += 1
            # An expired request is one produced (timestamped) longer ago than its TTL.
            stamp = int(time.time() * 1000) - 3_600_000 if code == "MESSAGE_EXPIRED" else None
            await producer.send(fleet.topic("ingest"), raw, timestamp_ms=stamp)
        await producer.flush()
    finally:
        await producer.stop()

    await eventually(lambda: _rows(table, good), timeout=60, what=f"{good} rows")
    dead = await eventually(lambda: _records(fleet.topic("dlq"), len(bad)), timeout=60, what="dlq")
    assert sorted(header(r, "wal-error-code") or "" for r in dead) == sorted(bad)
    for record in dead:
        assert record.value == bad[header(record, "wal-error-code") or ""], (
            "DLQ value is not the original"
        )
    assert {int(r[0]) for r in pg_query(f"SELECT payload->>'seq' FROM \"{table}\"")} == set(
        range(good)
    )


async def test_a_namespace_change_takes_effect_on_a_running_worker(fleet: Fleet) -> None:
    first, second = f"l1_{fleet.prefix}", f"l2_{fleet.prefix}"
    fleet.apply(shop(first))
    worker = await fleet.worker().ready()
    pid = worker.proc.pid if worker.proc else None

    async def send(seq: int) -> None:
        from tests.integration.harness import produce

        await produce(fleet.topic("ingest"), [request("shop", {"seq": seq})])

    await send(1)
    await eventually(lambda: _rows(first, 1), timeout=30, what="row in first table")

    fleet.apply(shop(first, enabled=False))  # disable: requests are now dead-lettered

    async def disabled_seen() -> bool:
        await send(2)
        dead = await read_all(fleet.topic("dlq"))
        return any(header(r, "wal-error-code") == "NAMESPACE_DISABLED" for r in dead)

    await eventually(disabled_seen, timeout=30, interval=1.0, what="NAMESPACE_DISABLED")

    fleet.apply(shop(second))  # enabled again, with a new target table
    await send(3)
    await eventually(lambda: _rows(second, 1), timeout=30, what="row in second table")
    assert pg_count(first) == 1
    worker.assert_alive()
    assert worker.proc is not None and worker.proc.pid == pid


async def _rows(table: str, n: int) -> bool:
    return pg_count(table) >= n


async def _records(topic: str, n: int) -> list[object] | None:
    records = await read_all(topic)
    return records if len(records) >= n else None
