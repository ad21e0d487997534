"""Fifty namespaces on one database share one pool: a worker's connections stay within it."""

from __future__ import annotations

import psycopg
import pytest

from tests.integration.harness import Fleet, eventually, pg_query, produce, request

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]

NAMESPACES, EACH, POOL = 50, 40, 4


async def test_fifty_namespaces_on_one_database_stay_within_one_pool(fleet: Fleet) -> None:
    names = [f"pool{i}-{fleet.prefix}" for i in range(NAMESPACES)]
    fleet.apply(*({"name": name} for name in names))  # no targets: the default database
    worker = await fleet.worker(WAL_SQL_POOL_SIZE=str(POOL), WAL_BATCH_SIZE="50").ready()
    await produce(
        fleet.topic("ingest"),
        (request(name, {"i": i}) for i in range(EACH) for name in names),
    )
    peak = 0

    async def delivered() -> bool:
        nonlocal peak
        peak = max(peak, _connections(fleet.prefix))
        return _journaled(fleet.prefix) >= NAMESPACES * EACH

    await eventually(delivered, timeout=120, interval=0.1, what="every request journaled")
    worker.assert_alive()
    assert 0 < peak <= POOL, f"{peak} connections for {NAMESPACES} namespaces (pool {POOL})"
    counts = pg_query(
        "SELECT namespace, count(*) FROM wal_messages WHERE namespace LIKE %s GROUP BY 1",
        f"pool%-{fleet.prefix}",
    )
    assert sorted(counts) == sorted((name, EACH) for name in names)
    print(f"{NAMESPACES} namespaces, peak {peak} connections (pool {POOL})")


def _connections(prefix: str) -> int:
    return int(
        pg_query(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", f"wal-{prefix}"
        )[0][0]
    )


def _journaled(prefix: str) -> int:
    try:
        rows = pg_query(
            "SELECT count(*) FROM wal_messages WHERE namespace LIKE %s", f"pool%-{prefix}"
        )
    except psycopg.errors.UndefinedTable:  # the first batch creates it
        return 0
    return int(rows[0][0])
