"""Rows mode of the SQL target: which table, key and columns a write maps to, the
statements for each operation (insert, update, upsert, delete), and runs of writes
that can go in one statement."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from app.errors import ConfigError
from targets.base import (
    MISSING,
    Write,
    at_path,
    conditions_of,
)
from targets.sql_copy import Kind, kinds

OPERATIONS = {"insert", "upsert", "update", "delete"}
_STRUCTURED = (dict, list)
_SCALARS = frozenset((str, int, float, bool, type(None)))  # none of them a dict or list


class Plan(NamedTuple):
    """One item ready to apply: its position in the batch, operation, row and conditions."""

    position: int
    write: Write
    operation: str
    row: dict[str, Any]
    conditions: Mapping[str, Any] = {}


def dialect_insert(conn: AsyncConnection, table: sa.Table) -> Any:
    """The dialect's INSERT, which knows ON CONFLICT."""
    return (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(table)


class Invalid(Exception):
    """An item that can never apply, found before the database is asked."""


class RowsSpec:
    """What ``rows`` mode writes where: table, key, column mapping, default operation."""

    def __init__(
        self, table_name: str, keys: list[str], columns: dict[str, str], operation: str
    ) -> None:
        self.table_name = table_name
        self.keys = keys
        self.columns = columns
        self.default_operation = operation
        self.table = None
        #: Columns that take a JSON object or array: json/jsonb, and (arrays) array columns.
        self.structured: set[str] = set()
        #: Each column's value encoding for PostgreSQL's COPY (:mod:`targets.sql_copy`).
        self.kinds: dict[str, Kind] = {}

    @property
    def table(self) -> sa.Table | None:
        return self._table

    @table.setter
    def table(self, table: sa.Table | None) -> None:
        self._table = table
        #: The table's column names, looked up for every write.
        self.names = frozenset(table.c.keys()) if table is not None else frozenset[str]()

    @classmethod
    def from_config(cls, name: str, config: Mapping[str, Any]) -> RowsSpec:
        table = config.get("table")
        if not table:
            raise ConfigError(f"sql target {name}: mode 'rows' needs a table")
        keys = list(config.get("keyColumns") or [])
        operation = config.get("operation", "upsert")
        if operation not in OPERATIONS:
            raise ConfigError(f"sql target {name}: operation must be one of {sorted(OPERATIONS)}")
        if not keys and operation != "insert":
            raise ConfigError(f"sql target {name}: '{operation}' needs keyColumns")
        return cls(table, keys, dict(config.get("columns") or {}), operation)

    def reflect(self, sync_conn: sa.Connection) -> sa.Table:
        table = sa.Table(self.table_name, sa.MetaData(), autoload_with=sync_conn)
        self.structured = {c.name for c in table.columns if isinstance(c.type, sa.JSON | sa.ARRAY)}
        self.kinds = kinds(table)
        return table

    def plan(self, item: Write) -> tuple[str, dict[str, Any]]:
        """The item's operation and row; :class:`Invalid` if it can never apply."""
        assert self.table is not None
        op = str(item.operation or item.options.get("operation") or self.default_operation).lower()
        if op not in OPERATIONS:
            raise Invalid(f"unknown operation {op!r}")
        if self.columns:
            row = {
                c: v
                for c, path in self.columns.items()
                if (v := at_path(item.payload, path)) is not MISSING
            }
        else:
            row = dict(item.payload)
        if not self.names.issuperset(row):
            unknown = ", ".join(sorted(set(row) - self.names))
            raise Invalid(f"table {self.table_name} has no column {unknown}")
        flat = self.flat(row)
        if flat:
            raise Invalid(f"column {', '.join(flat)} takes no JSON object or array")
        if op != "insert":
            if not self.keys:
                raise Invalid(f"'{op}' needs keyColumns")
            missing = [k for k in self.keys if row.get(k) is None]
            if missing:
                raise Invalid(f"no value for key column {', '.join(missing)}")
        if op == "delete":
            row = {k: row[k] for k in self.keys}
        elif op == "update" and set(row) <= set(self.keys):
            raise Invalid("update has no column to set")
        elif not row:
            raise Invalid("no column to write")
        return op, row

    def flat(self, values: Mapping[str, Any]) -> list[str]:
        """The columns given an object or array that take neither (not JSON, not array)."""
        if _SCALARS.issuperset(map(type, values.values())):
            return []  # nearly every write: no Python-level loop
        return sorted(
            c for c, v in values.items() if isinstance(v, _STRUCTURED) and c not in self.structured
        )

    def conditions(self, item: Write) -> Mapping[str, Any]:
        """The item's conditions (column -> value the stored row must hold); :class:`Invalid`
        for a column the table lacks, or an object or array for a column of neither kind."""
        assert self.table is not None
        conditions = conditions_of(item) if item.options else {}
        if not conditions:  # nearly every write: no per-write work
            return conditions
        if not self.names.issuperset(conditions):
            unknown = ", ".join(sorted(set(conditions) - self.names))
            raise Invalid(f"condition on no column of {self.table_name}: {unknown}")
        flat = self.flat(conditions)
        if flat:
            raise Invalid(f"condition on column {', '.join(flat)} takes no JSON object or array")
        return conditions

    async def execute_conditioned(self, conn: AsyncConnection, plan: Plan) -> bool:
        """Apply one conditioned plan; False (nothing changed) when its conditions do not hold.

        ``update``/``delete``: the key's row, only where the named columns hold the given
        values (``None``: IS NULL). ``upsert``: inserts an absent row, updates a present one
        only where they hold. ``insert``: only if no row holds them (atomic where the named
        columns are a unique key)."""
        table = self.table
        assert table is not None
        held = [table.c[c] == v for c, v in plan.conditions.items()]
        row, keys = plan.row, self.keys
        if plan.operation == "insert":
            chosen = sa.select(*[sa.literal(v, type_=table.c[c].type) for c, v in row.items()])
            absent = ~sa.exists().where(*held)
            stmt: Any = sa.insert(table).from_select(list(row), chosen.where(absent))
        elif plan.operation == "upsert":
            insert = dialect_insert(conn, table)
            updates = {c: insert.excluded[c] for c in row if c not in keys}
            updates = updates or {keys[0]: insert.excluded[keys[0]]}  # a no-op when it holds
            stmt = insert.values(row).on_conflict_do_update(
                index_elements=keys, set_=updates, where=sa.and_(*held)
            )
        else:
            where = sa.and_(*(table.c[k] == row[k] for k in keys), *held)
            if plan.operation == "update":
                values = {c: v for c, v in row.items() if c not in keys}
                stmt = table.update().where(where).values(values)
            else:
                stmt = table.delete().where(where)
        if plan.operation in ("insert", "upsert"):
            # An INSERT's rowcount is -1 through SQLAlchemy and psycopg: count what it returns.
            first = table.c[next(iter(row))]
            return bool((await conn.execute(stmt.returning(first))).all())
        return bool((await conn.execute(stmt)).rowcount)

    async def execute(
        self, conn: AsyncConnection, operation: str, rows: list[dict[str, Any]]
    ) -> None:
        table = self.table
        assert table is not None
        if operation == "insert":
            for shape in by_columns(rows):
                await conn.execute(dialect_insert(conn, table), shape)
        elif operation == "upsert":
            for shape in by_columns(self.merged(rows)):
                stmt = dialect_insert(conn, table)
                updates = {c: stmt.excluded[c] for c in shape[0] if c not in self.keys}
                stmt = (
                    stmt.on_conflict_do_update(index_elements=self.keys, set_=updates)
                    if updates
                    else stmt.on_conflict_do_nothing(index_elements=self.keys)
                )
                await conn.execute(stmt, shape)
        elif operation == "update":
            where = sa.and_(*(table.c[k] == sa.bindparam(f"k_{k}") for k in self.keys))
            for shape in by_columns(self.merged(rows)):
                columns = [c for c in shape[0] if c not in self.keys]
                values: dict[str, Any] = {c: sa.bindparam(f"v_{c}") for c in columns}
                params = [
                    {f"{'k' if c in self.keys else 'v'}_{c}": v for c, v in r.items()}
                    for r in shape
                ]
                await conn.execute(table.update().where(where).values(values), params)
        else:
            where = sa.and_(*(table.c[k] == sa.bindparam(f"k_{k}") for k in self.keys))
            params = [{f"k_{k}": r[k] for k in self.keys} for r in rows]
            await conn.execute(table.delete().where(where), params)

    def merged(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One row per key, later values over earlier ones: the same effect as applying
        them in order, and what one multi-row statement can do (PostgreSQL refuses to
        touch a row twice in one ON CONFLICT statement)."""
        merged: dict[tuple[Any, ...], dict[str, Any]] = {}
        for row in rows:
            key = tuple([row[k] for k in self.keys])
            earlier = merged.get(key)
            merged[key] = row if earlier is None else {**earlier, **row}
        return list(merged.values())


def runs(plans: list[Plan]) -> list[tuple[str, list[Plan]]]:
    """Split plans into consecutive runs of one operation, keeping their order; a plan with
    conditions is a run of its own (it is checked against the row as it stands then)."""
    runs: list[tuple[str, list[Plan]]] = []
    for plan in plans:
        last = runs[-1] if runs else None
        if last and last[0] == plan.operation and not plan.conditions and not last[1][0].conditions:
            last[1].append(plan)
        else:
            runs.append((plan.operation, [plan]))
    return runs


def by_columns(rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Group rows by their set of columns: one multi-row statement per shape."""
    shapes: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    sorted_of: dict[tuple[str, ...], tuple[str, ...]] = {}  # rows' own key orders, few
    for row in rows:
        order = tuple(row)
        shape = sorted_of.get(order)
        if shape is None:
            shape = sorted_of[order] = tuple(sorted(order))
        shapes.setdefault(shape, []).append(row)
    return list(shapes.values())
