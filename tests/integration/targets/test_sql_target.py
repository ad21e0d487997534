"""The SQL target against SQLite (a temporary file) and the local stack's PostgreSQL."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from app.settings import Settings
from targets.base import Outcome, Write
from targets.sql import SqlTarget
from tests.integration.targets.target_services import PG_URL, TcpProxy, free_port, unique


@dataclass
class Db:
    """One backend under test: its URL, an engine to look with, and names to clean up."""

    kind: str
    url: str
    engine: AsyncEngine
    tables: list[str]

    async def create_items(self) -> str:
        """A fresh rows-mode table: items(id pk, name not null, qty int, tags json, note)."""
        name = unique("items_")
        json_type = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
        table = sa.Table(
            name,
            sa.MetaData(),
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
            sa.Column("name", sa.Text, nullable=False),
            sa.Column("qty", sa.Integer),
            sa.Column("tags", json_type),
            sa.Column("note", sa.Text),
        )
        async with self.engine.begin() as conn:
            await conn.run_sync(table.metadata.create_all)
        self.tables.append(name)
        return name

    async def rows(self, table: str, order: str = "id") -> list[tuple[Any, ...]]:
        """The table's rows, typed by its reflected columns (JSON comes back decoded)."""
        async with self.engine.connect() as conn:
            reflected = await conn.run_sync(
                lambda sync: sa.Table(table, sa.MetaData(), autoload_with=sync)
            )
            result = await conn.execute(reflected.select().order_by(sa.text(order)))
            return [tuple(r) for r in result]

    async def count(self, table: str, where: str = "1=1") -> int:
        async with self.engine.connect() as conn:
            result = await conn.execute(sa.text(f"SELECT count(*) FROM {table} WHERE {where}"))
            return int(result.scalar_one())


async def _backend(kind: str, tmp_path: Path) -> Db:
    url = PG_URL if kind == "postgres" else f"sqlite+aiosqlite:///{tmp_path / 'wal.db'}"
    return Db(kind, url, create_async_engine(url), [])


async def _drop(backend: Db) -> None:
    async with backend.engine.begin() as conn:
        for table in backend.tables:
            await conn.execute(sa.text(f"DROP TABLE IF EXISTS {table}"))
    await backend.engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Db]:
    """Each backend in turn."""
    if request.param == "postgres":
        request.getfixturevalue("pg_url")  # fails with the stack hint when PostgreSQL is down
    backend = await _backend(request.param, tmp_path)
    yield backend
    await _drop(backend)


@pytest.fixture
async def pg(pg_url: str, tmp_path: Path) -> AsyncIterator[Db]:
    backend = await _backend("postgres", tmp_path)
    yield backend
    await _drop(backend)


@pytest.fixture
async def lite(tmp_path: Path) -> AsyncIterator[Db]:
    backend = await _backend("sqlite", tmp_path)
    yield backend
    await _drop(backend)


@pytest.fixture
async def sql_target() -> AsyncIterator[Callable[..., Any]]:
    """Opens targets on a backend with tables of their own (dropped with the backend's)."""
    opened: list[SqlTarget] = []

    async def make(db: Db, name: str = "db", **config: Any) -> SqlTarget:
        config.setdefault("ledgerTable", unique("ledger_"))
        if config.get("mode") != "rows":
            config.setdefault("table", unique("journal_"))
        db.tables.extend(t for t in (config["ledgerTable"], config["table"]) if t not in db.tables)
        target = SqlTarget(name, {"url": db.url, **config}, Settings())
        await target.open()
        opened.append(target)
        return target

    yield make
    for target in opened:
        await target.close()


def w(id: str, payload: dict[str, Any], op: str | None = None, ns: str = "shop") -> Write:
    return Write(id=id, namespace=ns, payload=payload, operation=op, received_at_ms=1_000)


def statuses(outcomes: list[Outcome]) -> list[str]:
    return [o.status for o in outcomes]


async def test_journal_records_each_message_once_per_namespace(
    db: Db, sql_target: Callable[..., Any]
) -> None:
    target = await sql_target(db)
    batch = [w("m1", {"a": 1}), w("m2", {"b": [1, 2]}), w("m1", {"a": 1}, ns="other")]
    assert statuses(await target.deliver(batch)) == ["delivered"] * 3
    assert statuses(await target.deliver(batch)) == ["delivered"] * 3  # replay
    assert statuses(await target.deliver([])) == []
    rows = await db.rows(target.config["table"], order="namespace, message_id")
    assert [(r[0], r[1]) for r in rows] == [("other", "m1"), ("shop", "m1"), ("shop", "m2")]


async def test_journal_keeps_every_character_and_survives_a_refused_batch(
    db: Db, sql_target: Callable[..., Any]
) -> None:
    # PostgreSQL's journal goes through COPY's text format: these must be escaped.
    odd_id = "id\twith\\ tab\nnewline\r"
    payload = {"path": "C:\\dir\\x", "quote": '"\t"', "line": "a\nb", "uni": "ünï 🚀"}
    target = await sql_target(db)
    poison = w("bad", {"nul": "\u0000"})  # PostgreSQL's jsonb refuses NUL; SQLite takes it
    outcomes = await target.deliver([w(odd_id, payload), poison, w("m2", {"b": 1})])
    assert outcomes[0].ok and outcomes[2].ok
    assert outcomes[1].ok == (db.kind == "sqlite")
    # the refused batch rolled back (with PostgreSQL's staging table): the next one lands
    assert (await target.deliver([w("m3", {"c": 3})]))[0].ok
    rows = await db.rows(target.config["table"], order="message_id")
    by_id = {r[1]: r[2] for r in rows}
    assert by_id[odd_id] == payload
    assert {"m2", "m3"} <= set(by_id)


async def test_rows_operations_with_mapping_and_keys(
    db: Db, sql_target: Callable[..., Any]
) -> None:
    table = await db.create_items()
    columns = {"id": "order.id", "name": "order.name", "qty": "qty", "tags": "tags"}
    target = await sql_target(db, mode="rows", table=table, keyColumns=["id"], columns=columns)
    batch = [
        w("1", {"order": {"id": 1, "name": "apple"}, "qty": 3, "tags": {"c": "red"}}, "insert"),
        w("2", {"order": {"id": 2, "name": "pear"}, "qty": 1}, "upsert"),
        w("3", {"order": {"id": 3, "name": "fig"}}, "upsert"),
        w("4", {"order": {"id": 2}, "qty": 9}, "update"),
        w("5", {"order": {"id": 1, "name": "apple"}, "qty": 4}),  # config default: upsert
        w("6", {"order": {"id": 3}}, "delete"),
        w("7", {"order": {"id": 4, "name": "kiwi"}, "qty": None}, "insert"),
    ]
    assert statuses(await target.deliver(batch)) == ["delivered"] * len(batch)
    expected = [
        (1, "apple", 4, {"c": "red"}, None),  # the upsert left the unmapped-in-payload tags
        (2, "pear", 9, None, None),
        (4, "kiwi", None, None, None),
    ]
    assert await db.rows(table) == expected
    # Replaying the whole batch changes nothing, even after the rows moved on.
    async with db.engine.begin() as conn:
        await conn.execute(sa.text(f"UPDATE {table} SET qty = 100 WHERE id = 2"))
    assert statuses(await target.deliver(batch)) == ["delivered"] * len(batch)
    assert await db.rows(table) == [expected[0], (2, "pear", 100, None, None), expected[2]]
    assert await db.count(target.config["ledgerTable"]) == len(batch)


async def test_one_key_written_twice_in_a_batch_ends_with_the_later_values(
    db: Db, sql_target: Callable[..., Any]
) -> None:
    table = await db.create_items()
    target = await sql_target(db, mode="rows", table=table, keyColumns=["id"])
    batch = [
        w("a", {"id": 1, "name": "one", "qty": 1, "note": "n1"}),
        w("b", {"id": 1, "name": "uno", "qty": 2}),  # keeps a's note
        w("c", {"id": 1, "qty": 3}, "update"),
        w("d", {"id": 1, "qty": 5, "name": "dos"}, "update"),
        w("e", {"id": 1, "qty": 4}, "update"),  # last: qty ends as 4
    ]
    assert statuses(await target.deliver(batch)) == ["delivered"] * 5
    assert await db.rows(table) == [(1, "dos", 4, None, "n1")]


async def test_the_same_write_twice_in_a_batch_applies_once(
    db: Db, sql_target: Callable[..., Any]
) -> None:
    name = unique("log_")
    async with db.engine.begin() as conn:
        await conn.execute(sa.text(f"CREATE TABLE {name} (seq INTEGER, body TEXT)"))  # no key
    db.tables.append(name)
    target = await sql_target(db, mode="rows", table=name, operation="insert")
    batch = [w("x", {"seq": 1, "body": "a"}), w("x", {"seq": 1, "body": "a"}), w("y", {"seq": 2})]
    assert statuses(await target.deliver(batch)) == ["delivered"] * 3
    assert statuses(await target.deliver(batch[:1])) == ["delivered"]
    assert await db.rows(name, order="seq") == [(1, "a"), (2, None)]


async def test_a_poison_row_fails_alone(db: Db, sql_target: Callable[..., Any]) -> None:
    table = await db.create_items()
    target = await sql_target(db, mode="rows", table=table, keyColumns=["id"])
    await target.deliver([w("seed", {"id": 9, "name": "taken"}, "insert")])
    batch = [
        w("1", {"id": 1, "name": "ok"}),
        w("2", {"id": 2, "name": None}),  # NOT NULL
        w("3", {"id": 3, "name": "ok", "colour": "red"}),  # no such column
        w("4", {"id": 9, "name": "dup"}, "insert"),  # primary key taken
        w("5", {"name": "keyless"}),  # no key for an upsert
        w("6", {"id": 6, "name": "ok"}, "merge"),  # no such operation
        w("7", {"id": 7, "name": "ok"}),
    ]
    outcomes = await target.deliver(batch)
    assert statuses(outcomes) == ["delivered"] + ["permanent"] * 5 + ["delivered"]
    assert {o.code for o in outcomes[1:6]} == {"TARGET_REJECTED"}
    assert await db.rows(table) == [
        (1, "ok", None, None, None),
        (7, "ok", None, None, None),
        (9, "taken", None, None, None),
    ]
    # Refused writes are not in the ledger: fixed data under the same id applies.
    assert await db.count(target.config["ledgerTable"], "id = '2'") == 0
    assert statuses(await target.deliver([w("2", {"id": 2, "name": "fixed"})])) == ["delivered"]


@pytest.mark.postgres
async def test_postgres_type_errors_fail_alone(pg: Db, sql_target: Callable[..., Any]) -> None:
    db = pg  # SQLite would store "many" in an INTEGER column: nothing to refuse there
    table = await db.create_items()
    target = await sql_target(db, mode="rows", table=table, keyColumns=["id"])
    batch = [
        w("1", {"id": 1, "name": "a", "qty": "many"}),
        w("2", {"id": 2, "name": "b"}),
        w("3", {"id": 3, "name": {"not": "text"}}),
    ]
    outcomes = await target.deliver(batch)
    assert statuses(outcomes) == ["permanent", "delivered", "permanent"]
    assert "invalid input syntax for type integer" in outcomes[0].message
    assert await db.count(table) == 1


async def test_missing_table_is_retryable_until_it_exists(
    db: Db, sql_target: Callable[..., Any]
) -> None:
    name = unique("later_")
    target = await sql_target(db, mode="rows", table=name, keyColumns=["id"])
    [outcome] = await target.deliver([w("1", {"id": 1, "name": "x"})])
    assert outcome.status == "retryable"
    async with db.engine.begin() as conn:
        await conn.execute(sa.text(f"CREATE TABLE {name} (id INTEGER PRIMARY KEY, name TEXT)"))
    db.tables.append(name)
    assert statuses(await target.deliver([w("1", {"id": 1, "name": "x"})])) == ["delivered"]


@pytest.mark.postgres
async def test_postgres_down_then_back(
    pg_proxy: TcpProxy, sql_target: Callable[..., Any], pg: Db
) -> None:
    db = pg
    table = await db.create_items()
    url = str(
        sa.engine.make_url(PG_URL)
        .set(host="127.0.0.1", port=pg_proxy.port)
        .render_as_string(hide_password=False)
    )
    target = await sql_target(db, url=url, mode="rows", table=table, keyColumns=["id"])
    assert statuses(await target.deliver([w("1", {"id": 1, "name": "a"})])) == ["delivered"]
    await pg_proxy.stop()
    batch = [w("2", {"id": 2, "name": "b"}), w("3", {"id": 3, "name": "c"})]
    outcomes = await target.deliver(batch)
    assert {(o.status, o.code) for o in outcomes} == {("retryable", "TARGET_UNAVAILABLE")}
    await pg_proxy.start()
    assert statuses(await target.deliver(batch)) == ["delivered"] * 2
    assert await db.count(table) == 3


@pytest.mark.slow
async def test_sqlite_locked_is_retryable(
    lite: Db, sql_target: Callable[..., Any], tmp_path: Path
) -> None:
    db = lite
    target = await sql_target(db)
    assert statuses(await target.deliver([w("1", {})])) == ["delivered"]
    holder = sqlite3.connect(tmp_path / "wal.db", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        [outcome] = await target.deliver([w("2", {})])  # waits out busy_timeout (5 s)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert (outcome.status, outcome.code) == ("retryable", "TARGET_UNAVAILABLE")
    assert "locked" in outcome.message
    assert statuses(await target.deliver([w("2", {})])) == ["delivered"]


@pytest.mark.postgres
async def test_credentials_never_reach_messages_or_logs(
    pg_url: str, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    secret = "pw-91c2-SECRET-do-not-log"
    caplog.set_level(logging.DEBUG)
    outcomes: list[Outcome] = []
    for url in (
        f"postgresql+psycopg://wal:{secret}@127.0.0.1:{free_port()}/wal",  # nothing listens
        str(
            sa.engine.make_url(pg_url)
            .set(username="nobody", password=secret)
            .render_as_string(hide_password=False)
        ),  # no such role
    ):
        target = SqlTarget("db", {"url": url}, Settings())
        await target.open()
        outcomes += await target.deliver([w("1", {})])
        await target.close()
    assert [(o.status, o.code) for o in outcomes] == [("retryable", "TARGET_UNAVAILABLE")] * 2
    for o in outcomes:
        assert secret not in o.message
    assert secret not in caplog.text


def cw(id: str, payload: dict[str, Any], op: str, **conditions: Any) -> Write:
    """A write with conditions, as a request's ``target.config.conditions`` gives them."""
    return Write(
        id=id,
        namespace="shop",
        payload=payload,
        operation=op,
        options={"conditions": conditions},
        received_at_ms=1_000,
    )


async def test_conditions_decide_at_the_row(db: Db, sql_target: Callable[..., Any]) -> None:
    table = await db.create_items()
    target = await sql_target(db, mode="rows", table=table, keyColumns=["id"])
    seed = [w("s1", {"id": 1, "name": "a", "qty": 7}), w("s2", {"id": 2, "name": "b", "qty": 7})]
    assert statuses(await target.deliver(seed)) == ["delivered"] * 2
    outcomes = await target.deliver(
        [
            cw("u1", {"id": 1, "qty": 8}, "update", qty=7),  # holds: 7 -> 8
            cw("u2", {"id": 1, "qty": 9}, "update", qty=7),  # no longer holds (the same batch)
            cw("u3", {"id": 1, "qty": 9}, "update", qty=8),  # holds after u1
            cw("d1", {"id": 2}, "delete", qty=6),  # does not hold: stays
            cw("i1", {"id": 3, "name": "c"}, "insert", name="c"),  # no row holds it: inserted
            cw("i2", {"id": 4, "name": "c"}, "insert", name="c"),  # one does now: refused
            cw("p1", {"id": 2, "name": "b2"}, "upsert", qty=7),  # present and holds: updated
            cw("p2", {"id": 5, "name": "e"}, "upsert", qty=1),  # absent: inserted
            cw("p3", {"id": 5, "name": "e2"}, "upsert", qty=1),  # present, qty NULL: refused
            cw("n1", {"id": 5, "note": "x"}, "update", qty=None),  # None is IS NULL: holds
        ]
    )
    assert statuses(outcomes) == [
        "delivered",
        "permanent",
        "delivered",
        "permanent",
        "delivered",
        "permanent",
        "delivered",
        "delivered",
        "permanent",
        "delivered",
    ]
    assert {o.code for o in outcomes if not o.ok} == {"CONDITION_FAILED"}
    assert "qty" in outcomes[1].message
    assert await db.rows(table) == [
        (1, "a", 9, None, None),
        (2, "b2", 7, None, None),
        (3, "c", None, None, None),
        (5, "e", None, None, "x"),
    ]
    # A refused write is not in the ledger: once its condition holds, the same id applies.
    assert statuses(await target.deliver([cw("d1", {"id": 2}, "delete", qty=7)])) == ["delivered"]
    assert [r[0] for r in await db.rows(table)] == [1, 3, 5]
    # An applied one is: its replay changes nothing, whatever the row holds now.
    assert statuses(await target.deliver([cw("u3", {"id": 1, "qty": 0}, "update", qty=8)])) == [
        "delivered"
    ]
    assert (await db.rows(table))[0][2] == 9


async def test_conditions_on_a_column_the_table_lacks_are_refused(
    db: Db, sql_target: Callable[..., Any]
) -> None:
    table = await db.create_items()
    rows = await sql_target(db, mode="rows", table=table, keyColumns=["id"])
    outcomes = await rows.deliver(
        [
            cw("x1", {"id": 1, "name": "a"}, "upsert", nope=1),
            cw("x2", {"id": 1, "name": "a"}, "upsert", name={"an": "object"}),
        ]
    )
    assert [o.code for o in outcomes] == ["TARGET_REJECTED"] * 2
    journal = await sql_target(db)
    refused = await journal.deliver([cw("j1", {"a": 1}, "insert", a=1)])
    assert refused[0].code == "TARGET_REJECTED" and "journal" in refused[0].message
