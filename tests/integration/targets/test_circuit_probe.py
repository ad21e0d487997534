"""A database that comes back is written to again within seconds (issue 16, item 7).

A worker delivers a steady stream to a PostgreSQL of the test's own; the test stops
that server for 35 s (`pg_ctl stop -m fast`: connections cut, then refused), starts
it again and measures how long after it is back the first new row lands. With the
default circuit settings the breaker opens within the first second of the outage;
before probes its one trial call came 30 s later, failed (the server was still down),
and the next came 60 s after that: ~55 s without writes after the server was back.
Then it counts that every request arrived exactly once (none lost, none doubled).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psycopg
import pytest
from aiokafka import AIOKafkaProducer

from app.ops import stack
from app.settings import Settings
from tests.integration.harness import BOOTSTRAP, Fleet, eventually, free_port, request

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.timeout(420)]

OUTAGE_S = 35.0  # not a multiple of the 30 s cooldown: the old trial call must miss it
RATE = 20  # requests a second, throughout
RECOVERY_BOUND_S = 10.0


class PrivatePostgres:
    """A PostgreSQL server of this test's own, started and stopped with the stack's code
    (Kafka and Redis are reused from the local stack and left alone)."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.settings = Settings(stack_dir=tmp / "stack", postgres_port=self.port)
        self.dsn = f"postgresql://wal:wal@127.0.0.1:{self.port}/wal"
        self.url = f"postgresql+psycopg://wal:wal@127.0.0.1:{self.port}/wal"
        self.root: Path | None = None

    def start(self) -> None:
        stack.up(self.settings)
        (pg,) = [s for s in stack.status(self.settings) if s.name == "postgres"]
        assert pg.running and isinstance(pg.pid, int), f"private postgres not ours: {pg.line()}"
        assert pg.log is not None
        self.root = pg.log.parent

    def stop(self) -> None:
        stack.down(self.settings)

    def query(self, sql: str) -> list[tuple[int, ...]]:
        with psycopg.connect(self.dsn, autocommit=True, connect_timeout=3) as conn:
            cursor = conn.execute(sql.encode())
            return cursor.fetchall() if cursor.description else []


@pytest.fixture
def private_pg(tmp_path: Path) -> Iterator[PrivatePostgres]:
    pg = PrivatePostgres(tmp_path)
    pg.start()
    try:
        yield pg
    finally:
        pg.stop()
        if pg.root is not None:
            shutil.rmtree(pg.root.parent if "wal-stack-" in str(pg.root) else pg.root, True)


@contextlib.asynccontextmanager
async def steady_stream(topic: str, namespace: str) -> AsyncIterator[list[int]]:
    """Produce ``RATE`` requests a second (payload ``{"seq": n}``) until the block ends;
    yields the list of sequence numbers Kafka acknowledged."""
    sent: list[int] = []
    done = asyncio.Event()
    producer = AIOKafkaProducer(bootstrap_servers=BOOTSTRAP, acks="all", linger_ms=5)
    await producer.start()

    async def run() -> None:
        started = time.monotonic()
        while not done.is_set():
            seq = len(sent)
            await (await producer.send(topic, request(namespace, {"seq": seq})))
            sent.append(seq)
            await asyncio.sleep(max(0.0, started + (seq + 1) / RATE - time.monotonic()))

    task = asyncio.create_task(run())
    try:
        yield sent
    finally:
        done.set()  # not cancel: a request in flight is counted once Kafka has it
        await task
        await producer.stop()


async def test_writes_flow_again_within_seconds_of_the_database_coming_back(
    fleet: Fleet, private_pg: PrivatePostgres
) -> None:
    table = f"p_{fleet.prefix}"
    private_pg.query(
        f'CREATE TABLE "{table}" (seq integer NOT NULL, '
        "at_ms bigint NOT NULL DEFAULT (extract(epoch from clock_timestamp()) * 1000))"
    )
    namespace = "probed"
    fleet.apply(
        {
            "name": namespace,
            "targets": [  # default circuit and retry policy: what the issue measured
                {
                    "identifier": "pg",
                    "type": "sql",
                    "config": {
                        "url": private_pg.url,
                        "mode": "rows",
                        "table": table,
                        "operation": "insert",
                        "ledgerTable": f"{table}_ledger",
                    },
                }
            ],
        }
    )
    worker = await fleet.worker().ready()

    def rows() -> tuple[int, int]:
        count, distinct = private_pg.query(f'SELECT count(*), count(DISTINCT seq) FROM "{table}"')[
            0
        ]
        return int(count), int(distinct)

    async with steady_stream(fleet.topic("ingest"), namespace) as sent:

        async def flowing() -> bool:
            return rows()[0] >= 2 * RATE

        await eventually(flowing, timeout=60, what="rows before the outage")
        await asyncio.to_thread(private_pg.stop)
        stopped = time.time()
        await asyncio.sleep(OUTAGE_S)  # the outage itself, not a wait for a result
        await asyncio.to_thread(private_pg.start)
        back_ms = int(time.time() * 1000)
        print(f"\nprivate postgres down for {time.time() - stopped:.1f} s")

        async def first_new_row() -> int | None:
            (at_ms,) = private_pg.query(
                f'SELECT min(at_ms) FROM "{table}" WHERE at_ms >= {back_ms}'
            )[0]
            return at_ms

        first_ms = await eventually(
            first_new_row, timeout=120, interval=0.1, what="a row after the database is back"
        )
        recovery_s = (first_ms - back_ms) / 1000
        print(f"first new row {recovery_s:.2f} s after the database was back")
        await asyncio.sleep(5)  # the stream goes on a little: new writes flow normally too

    produced = len(sent)

    async def all_arrived() -> bool:
        return rows()[1] >= produced

    await eventually(all_arrived, timeout=240, interval=0.5, what=f"{produced} distinct rows")
    worker.assert_alive()
    (last_ms,) = private_pg.query(f'SELECT max(at_ms) FROM "{table}"')[0]
    print(
        f"{produced} requests: all in {(last_ms - back_ms) / 1000:.1f} s after the database "
        f"was back (writes turned away by the open circuit come back after its cooldown)"
    )
    assert rows() == (produced, produced), "lost or doubled writes"
    assert recovery_s < RECOVERY_BOUND_S, f"writes flowed again only after {recovery_s:.1f} s"
