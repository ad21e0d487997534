"""Rows mode on PostgreSQL goes by COPY into a staging table: every value a write can
carry lands as the column's own type would take it, the same as a parameter would."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from app.settings import Settings
from targets.base import Write
from targets.sql import SqlTarget
from tests.integration.targets.target_services import PG_URL

pytestmark = pytest.mark.postgres

TRICKY = "tab\there, newline\nthere, back\\slash, CR\r, quote \" and ' and \\N and ∑ ✓"


@pytest.fixture
async def table(pg_url: str) -> AsyncIterator[str]:
    name = f"copy_{uuid.uuid4().hex[:8]}"
    engine = create_async_engine(PG_URL)
    async with engine.begin() as conn:
        await conn.execute(
            sa.text(
                f"CREATE TABLE {name} (id bigint PRIMARY KEY, name text NOT NULL, "
                "doc jsonb, tags text[], flag boolean, amount numeric, at timestamptz, "
                "n integer DEFAULT 7)"
            )
        )
    yield name
    async with engine.begin() as conn:
        await conn.execute(sa.text(f"DROP TABLE IF EXISTS {name}, {name}_ledger"))
    await engine.dispose()


async def target_on(table: str, **config: Any) -> SqlTarget:
    config = {"mode": "rows", "table": table, "keyColumns": ["id"], **config}
    target = SqlTarget(
        "pg", {"url": PG_URL, "ledgerTable": f"{table}_ledger", **config}, Settings()
    )
    await target.open()
    return target


async def stored(table: str) -> list[tuple[Any, ...]]:
    engine = create_async_engine(PG_URL)
    try:
        async with engine.connect() as conn:
            found = await conn.execute(
                sa.text(
                    "SELECT id, name, doc, tags, flag, amount::text, at, n "
                    f"FROM {table} ORDER BY id"
                )
            )
            return [tuple(r) for r in found]
    finally:
        await engine.dispose()


def w(id: str, payload: dict[str, Any], op: str | None = None) -> Write:
    return Write(id=id, namespace="ns", payload=payload, operation=op, received_at_ms=1)


async def test_every_kind_of_value_lands_as_its_column_takes_it(table: str) -> None:
    target = await target_on(table)
    try:
        outcomes = await target.deliver(
            [
                w("1", {"id": 1, "name": TRICKY, "doc": {"k": TRICKY, "a": [1, None]}}),
                w(
                    "2",
                    {"id": "2", "name": "", "doc": "just a string", "tags": ["a b", 'q"', None]},
                ),
                w("3", {"id": 3, "name": "x", "doc": None, "flag": True, "amount": 1.5}),
                w("4", {"id": 4, "name": "\\N", "at": "2026-12-01T10:00:00Z", "n": None}),
            ]
        )
        assert [o.status for o in outcomes] == ["delivered"] * 4
        rows = await stored(table)
    finally:
        await target.close()
    assert rows[0][:4] == (1, TRICKY, {"k": TRICKY, "a": [1, None]}, None)
    assert rows[0][7] == 7  # a column the write leaves out takes its default
    assert rows[1][:4] == (2, "", "just a string", ["a b", 'q"', None])
    assert rows[2][2:6] == (None, None, True, "1.5")  # JSON null in a jsonb column
    assert rows[3][1] == "\\N" and rows[3][6].isoformat() == "2026-12-01T10:00:00+00:00"
    assert rows[3][7] is None


async def test_runs_of_each_operation_apply_in_order_in_one_batch(table: str) -> None:
    target = await target_on(table)
    try:
        outcomes = await target.deliver(
            [
                w("a", {"id": 1, "name": "one", "n": 1}, "insert"),
                w("b", {"id": 2, "name": "two", "n": 2}, "insert"),
                w("c", {"id": 1, "n": 10}, "update"),  # partial: name keeps its value
                w("d", {"id": 1, "n": 11}, "update"),  # the same key again: the later wins
                w("e", {"id": 2}, "delete"),
                w("f", {"id": 2, "name": "two again"}, "upsert"),
                w("g", {"id": 3, "name": "three", "doc": {"v": 1}}, "upsert"),
                w("h", {"id": 3, "doc": {"v": 2}}, "upsert"),  # NOT NULL name stays stored
            ]
        )
        assert [o.status for o in outcomes] == ["delivered"] * 8
        rows = [(r[0], r[1], r[2], r[7]) for r in await stored(table)]
        assert rows == [(1, "one", None, 11), (2, "two again", None, 7), (3, "three", {"v": 2}, 7)]
        # A replay of the whole batch is claimed in the ledger already: nothing changes.
        again = await target.deliver(
            [w("e", {"id": 2}, "delete"), w("d", {"id": 1, "n": 0}, "update")]
        )
        assert [o.status for o in again] == ["delivered"] * 2
        assert [(r[0], r[7]) for r in await stored(table)] == [(1, 11), (2, 7), (3, 7)]
    finally:
        await target.close()


async def test_a_value_its_column_cannot_take_fails_alone(table: str) -> None:
    target = await target_on(table)
    try:
        outcomes = await target.deliver(
            [
                w("1", {"id": 1, "name": "ok"}),
                w("2", {"id": 2, "name": "bad", "amount": "lots"}),  # the database refuses it
                w("3", {"id": 3, "name": {"an": "object"}}),  # refused before the database
                w("4", {"id": 4, "name": "ok", "tags": ["fine"]}),
            ]
        )
        assert [o.status for o in outcomes] == ["delivered", "permanent", "permanent", "delivered"]
        assert "numeric" in outcomes[1].message
        assert "takes no JSON object or array" in outcomes[2].message
        assert [r[0] for r in await stored(table)] == [1, 4]
        # the refused ids are not in the ledger: fixed data under the same id applies
        fixed = await target.deliver([w("2", {"id": 2, "name": "fixed", "amount": 2})])
        assert [o.status for o in fixed] == ["delivered"]
    finally:
        await target.close()
