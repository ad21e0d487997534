"""Time under faults: a SIGKILL while messages wait in Kafka, and a redrive after a fix."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest

from tests.integration.harness import (
    Fleet,
    eventually,
    group_lag,
    messages_total,
    pg_count,
    pg_query,
    produce,
    request,
)
from tests.integration.targets.target_services import TcpProxy

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]


@pytest.fixture
async def pg_proxy() -> AsyncIterator[TcpProxy]:
    """PostgreSQL behind a proxy the test can take down and bring back."""
    proxy = TcpProxy(5432)
    yield proxy
    await proxy.stop()


def rows_namespace(table: str, port: int, **retry: object) -> dict[str, object]:
    return {
        "name": "mix",
        "retryPolicy": {"backoffStrategy": "constant", "jitterMs": 0, **retry},
        "targets": [
            {
                "identifier": "pg",
                "type": "sql",
                "circuit": {"threshold": 1000},
                "config": {
                    "url": f"postgresql+psycopg://wal:wal@127.0.0.1:{port}/wal",
                    "mode": "rows",
                    "table": table,
                    "operation": "insert",
                },
            }
        ],
    }


def create_table(table: str) -> None:
    pg_query(
        f'CREATE TABLE "{table}" (seq integer NOT NULL, kind text NOT NULL, '
        "at_ms bigint NOT NULL DEFAULT (extract(epoch from clock_timestamp()) * 1000))"
    )


async def test_sigkill_while_messages_wait_in_delay_and_retry_tiers(
    fleet: Fleet, pg_proxy: TcpProxy
) -> None:
    table = f"w_{fleet.prefix}"
    create_table(table)
    fleet.apply(rows_namespace(table, pg_proxy.port, maxAttempts=20, initialDelayMs=2000))
    first = await fleet.worker().ready()  # the database is "down": the proxy is not listening

    sent_ms = int(time.time() * 1000)
    await produce(
        fleet.topic("ingest"),
        [
            *(request("mix", {"seq": i, "kind": "retry"}) for i in range(500)),
            *(
                request("mix", {"seq": 500 + i, "kind": "delayed"}, lifecycle={"delay": 12})
                for i in range(500)
            ),
        ],
    )

    async def all_failed_once() -> bool:
        return await messages_total(first.url, "retried") >= 500

    await eventually(all_failed_once, timeout=60, what="500 writes in the retry tiers")
    first.kill9()
    (nothing,) = pg_query(f'SELECT count(*) FROM "{table}"')[0]  # the table exists: strict
    assert nothing == 0

    await pg_proxy.start()  # the database comes back
    await fleet.worker().ready()

    async def all_rows() -> bool:
        return pg_count(table) >= 1000

    await eventually(all_rows, timeout=120, what="1000 rows")
    await eventually(lambda: _drained(fleet, delay=True), timeout=60, what="every tier drained")
    count, distinct = pg_query(f'SELECT count(*), count(DISTINCT seq) FROM "{table}"')[0]
    assert (count, distinct) == (1000, 1000)
    (earliest_delayed,) = pg_query(f"SELECT min(at_ms) FROM \"{table}\" WHERE kind = 'delayed'")[0]
    assert earliest_delayed >= sent_ms + 12_000, "a delayed message arrived early"


async def test_a_redrive_after_the_fix_delivers_each_message_once(
    fleet: Fleet, pg_proxy: TcpProxy
) -> None:
    table = f"r_{fleet.prefix}"
    create_table(table)
    fleet.apply(rows_namespace(table, pg_proxy.port, maxAttempts=2, initialDelayMs=200))
    await fleet.worker().ready()
    await produce(
        fleet.topic("ingest"), [request("mix", {"seq": i, "kind": "x"}) for i in range(50)]
    )

    async def dead_lettered() -> bool:
        listed = fleet.wal("dlq", "list", "--code", "RETRIES_EXHAUSTED", "--json")
        return listed.returncode == 0 and len(listed.stdout.splitlines()) == 50

    await eventually(dead_lettered, timeout=60, interval=1.0, what="50 dead letters")
    await pg_proxy.start()  # the target is fixed

    for _ in range(2):  # a second replay of the same dead letters changes nothing
        done = fleet.wal("dlq", "replay", "--yes", "--no-progress", "--namespace", "mix")
        assert done.returncode == 0, done.stderr.decode()

        async def fifty() -> bool:
            return pg_count(table) >= 50

        await eventually(fifty, timeout=60, what="50 rows")
    # Let the second replay finish before counting (it was produced; wait for the worker).
    await eventually(lambda: _drained(fleet), timeout=30, what="replays processed")
    count, distinct = pg_query(f'SELECT count(*), count(DISTINCT seq) FROM "{table}"')[0]
    assert (count, distinct) == (50, 50)


async def _drained(fleet: Fleet, *, delay: bool = False) -> bool:
    """Nothing left uncommitted on ingest and deliver (and the delay tiers, if asked)."""
    roles = ["ingest", "deliver"]
    if delay:
        roles += [f"delay-{tier}" for tier in ("1s", "5s", "30s", "2m", "15m")]
    lag = await group_lag(fleet.prefix, [fleet.topic(role) for role in roles])
    return not any(lag.values())
