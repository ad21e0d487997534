"""SQL target: SQLAlchemy Core over PostgreSQL (psycopg 3) or SQLite (aiosqlite).

Two modes (``config.mode``):

``journal`` (default)
    Each write becomes one row of ``config.table`` (default ``wal_messages``):
    message id, namespace, the payload as JSON, receive time. The message id
    is the primary key, so a replay inserts nothing.

``rows``
    The payload *is* the row: ``insert``, ``upsert``, ``update`` or ``delete``
    on ``config.table`` (the operation comes from the message, else
    ``config.operation``, else ``upsert``). ``config.keyColumns`` names the key;
    ``config.columns`` maps column names to dotted paths in the payload
    (default: the payload's own keys). Applied ids are recorded in a ledger
    table (``config.ledgerTable``, default ``wal_ledger``) in the same
    transaction, so a replay changes nothing.

A batch is one transaction and as few round trips as the database allows
(multi-row statements). When it fails on the data, each item is tried in a
transaction of its own, so a poison row fails alone.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from app.errors import ConfigError
from targets.base import DELIVERED, Outcome, Target, Write, permanent, retryable

_OPERATIONS = {"insert", "upsert", "update", "delete"}


class SqlTarget(Target):
    kind = "sql"

    _engine: AsyncEngine | None = None

    async def open(self) -> None:
        url = self.config.get("url") or self.settings.sql_url
        self.mode = self.config.get("mode", "journal")
        if self.mode not in ("journal", "rows"):
            raise ConfigError(f"sql target {self.name}: mode must be 'journal' or 'rows'")
        try:
            self._engine = create_async_engine(url, pool_pre_ping=True, pool_size=4)
        except (sa_exc.ArgumentError, ImportError) as exc:
            raise ConfigError(f"sql target {self.name}: unusable url ({type(exc).__name__})") from None
        if self._engine.dialect.name == "sqlite":
            sa.event.listen(self._engine.sync_engine, "connect", _sqlite_pragmas)
        self._metadata = sa.MetaData()
        self._ledger = _ledger_table(self._metadata, self.config.get("ledgerTable", "wal_ledger"))
        if self.mode == "journal":
            self._table = _journal_table(self._metadata, self.config.get("table", "wal_messages"))
        else:
            self._rows = _RowsSpec.from_config(self.name, self.config)
        self._ready = False
        self._ready_lock = asyncio.Lock()

    async def close(self) -> None:
        if self._engine is not None:
            await self._engine.dispose()

    @property
    def engine(self) -> AsyncEngine:
        assert self._engine is not None, "open() first"
        return self._engine

    async def deliver(self, batch: Sequence[Write]) -> list[Outcome]:
        try:
            await self._prepare()
            async with self.engine.begin() as conn:
                await self._apply(conn, batch)
            return [DELIVERED] * len(batch)
        except (sa_exc.IntegrityError, sa_exc.DataError, sa_exc.ProgrammingError):
            if len(batch) == 1:
                return [await self._deliver_one(batch[0])]
            return [await self._deliver_one(item) for item in batch]
        except Exception as exc:
            return [_classify(exc)] * len(batch)

    async def _deliver_one(self, item: Write) -> Outcome:
        try:
            async with self.engine.begin() as conn:
                await self._apply(conn, [item])
            return DELIVERED
        except Exception as exc:
            return _classify(exc)

    async def _prepare(self) -> None:
        """Create the journal or ledger table on first use (not in open: the DB may be down)."""
        if self._ready:
            return
        async with self._ready_lock:
            if not self._ready:
                async with self.engine.begin() as conn:
                    await conn.run_sync(self._metadata.create_all)
                    if self.mode == "rows":
                        self._rows.table = await conn.run_sync(self._rows.reflect)
                self._ready = True

    async def _apply(self, conn: AsyncConnection, batch: Sequence[Write]) -> None:
        if self.mode == "journal":
            await self._apply_journal(conn, batch)
        else:
            await self._apply_rows(conn, batch)

    async def _apply_journal(self, conn: AsyncConnection, batch: Sequence[Write]) -> None:
        now_ms = int(time.time() * 1000)
        rows = [
            {
                "message_id": w.id,
                "namespace": w.namespace,
                "payload": dict(w.payload),
                "received_at_ms": w.received_at_ms,
                "delivered_at_ms": now_ms,
            }
            for w in batch
        ]
        stmt = _insert(conn, self._table).on_conflict_do_nothing(index_elements=["message_id"])
        await conn.execute(stmt, rows)

    async def _apply_rows(self, conn: AsyncConnection, batch: Sequence[Write]) -> None:
        fresh = await self._claim(conn, batch)
        spec = self._rows
        for operation, items in _runs((w for w in batch if w.id in fresh), spec.operation):
            rows = [spec.row(w) for w in items]
            await spec.execute(conn, operation, rows)

    async def _claim(self, conn: AsyncConnection, batch: Sequence[Write]) -> set[str]:
        """Record the batch's ids in the ledger; return the ids not applied before."""
        ids = list(dict.fromkeys(w.id for w in batch))
        stmt = (
            _insert(conn, self._ledger)
            .values([{"target": self.name, "id": i} for i in ids])
            .on_conflict_do_nothing(index_elements=["target", "id"])
            .returning(self._ledger.c.id)
        )
        result = await conn.execute(stmt)
        return set(result.scalars())


class _RowsSpec:
    """What ``rows`` mode writes where: table, key, column mapping, default operation."""

    def __init__(
        self, table_name: str, keys: list[str], columns: dict[str, str], operation: str
    ) -> None:
        self.table_name = table_name
        self.keys = keys
        self.columns = columns
        self.default_operation = operation
        self.table: sa.Table | None = None

    @classmethod
    def from_config(cls, name: str, config: Mapping[str, Any]) -> _RowsSpec:
        table = config.get("table")
        if not table:
            raise ConfigError(f"sql target {name}: mode 'rows' needs a table")
        keys = list(config.get("keyColumns") or [])
        operation = config.get("operation", "upsert")
        if operation not in _OPERATIONS:
            raise ConfigError(f"sql target {name}: operation must be one of {sorted(_OPERATIONS)}")
        if not keys and operation != "insert":
            raise ConfigError(f"sql target {name}: '{operation}' needs keyColumns")
        return cls(table, keys, dict(config.get("columns") or {}), operation)

    def reflect(self, sync_conn: sa.Connection) -> sa.Table:
        return sa.Table(self.table_name, sa.MetaData(), autoload_with=sync_conn)

    def operation(self, item: Write) -> str:
        op = (item.operation or item.options.get("operation") or self.default_operation).lower()
        if op not in _OPERATIONS:
            raise sa_exc.DataError(f"unknown operation {op!r}", None, ValueError(op))
        return op

    def row(self, item: Write) -> dict[str, Any]:
        if not self.columns:
            return dict(item.payload)
        return {col: _at_path(item.payload, path) for col, path in self.columns.items()}

    async def execute(self, conn: AsyncConnection, operation: str, rows: list[dict[str, Any]]) -> None:
        table = self.table
        assert table is not None
        if operation == "insert":
            await conn.execute(_insert(conn, table), rows)
        elif operation == "upsert":
            rows = list({tuple(r.get(k) for k in self.keys): r for r in rows}.values())
            for shape in _by_columns(rows):
                stmt = _insert(conn, table)
                updates = {c: stmt.excluded[c] for c in shape[0] if c not in self.keys}
                stmt = (
                    stmt.on_conflict_do_update(index_elements=self.keys, set_=updates)
                    if updates
                    else stmt.on_conflict_do_nothing(index_elements=self.keys)
                )
                await conn.execute(stmt, shape)
        elif operation == "update":
            for shape in _by_columns(rows):
                where = sa.and_(*(table.c[k] == sa.bindparam(f"k_{k}") for k in self.keys))
                values = {c: sa.bindparam(f"v_{c}") for c in shape[0] if c not in self.keys}
                params = [
                    {**{f"k_{k}": r[k] for k in self.keys},
                     **{f"v_{c}": r[c] for c in r if c not in self.keys}}
                    for r in shape
                ]
                await conn.execute(table.update().where(where).values(values), params)
        else:
            where = sa.and_(*(table.c[k] == sa.bindparam(f"k_{k}") for k in self.keys))
            await conn.execute(
                table.delete().where(where), [{f"k_{k}": r.get(k) for k in self.keys} for r in rows]
            )


def _journal_table(metadata: sa.MetaData, name: str) -> sa.Table:
    payload_type = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
    return sa.Table(
        name,
        metadata,
        sa.Column("message_id", sa.String(200), primary_key=True),
        sa.Column("namespace", sa.String(100), nullable=False, index=True),
        sa.Column("payload", payload_type, nullable=False),
        sa.Column("received_at_ms", sa.BigInteger, nullable=False),
        sa.Column("delivered_at_ms", sa.BigInteger, nullable=False),
    )


def _ledger_table(metadata: sa.MetaData, name: str) -> sa.Table:
    return sa.Table(
        name,
        metadata,
        sa.Column("target", sa.String(100), primary_key=True),
        sa.Column("id", sa.String(300), primary_key=True),
        sa.Column("applied_at", sa.DateTime(timezone=True), server_default=sa.func.now()),
    )


def _insert(conn: AsyncConnection, table: sa.Table) -> Any:
    """The dialect's INSERT, which knows ON CONFLICT."""
    return (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(table)


def _runs(items: Any, operation_of: Any) -> list[tuple[str, list[Write]]]:
    """Split items into consecutive runs of one operation, keeping their order."""
    runs: list[tuple[str, list[Write]]] = []
    for item in items:
        op = operation_of(item)
        if runs and runs[-1][0] == op:
            runs[-1][1].append(item)
        else:
            runs.append((op, [item]))
    return runs


def _by_columns(rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Group rows by their set of columns: one multi-row statement per shape."""
    shapes: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for row in rows:
        shapes.setdefault(tuple(sorted(row)), []).append(row)
    return list(shapes.values())


def _at_path(payload: Mapping[str, Any], path: str) -> Any:
    value: Any = payload
    for part in path.removeprefix("payload.").split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()


def _classify(exc: BaseException) -> Outcome:
    """Translate a database error into an outcome; the message never holds the URL."""
    if isinstance(exc, asyncio.CancelledError):
        raise exc
    name = type(getattr(exc, "orig", None) or exc).__name__
    if isinstance(exc, (sa_exc.IntegrityError, sa_exc.DataError)):
        return permanent("TARGET_REJECTED", f"{name}: {_first_line(exc)}")
    if isinstance(exc, sa_exc.ProgrammingError) and not _is_transient(exc):
        return permanent("TARGET_REJECTED", f"{name}: {_first_line(exc)}")
    if isinstance(exc, (sa_exc.OperationalError, sa_exc.InterfaceError, OSError, TimeoutError)):
        return retryable("TARGET_UNAVAILABLE", f"{name}: {_first_line(exc)}")
    if isinstance(exc, sa_exc.DBAPIError):
        return retryable("TARGET_ERROR", f"{name}: {_first_line(exc)}")
    return retryable("TARGET_ERROR", name)


def _is_transient(exc: sa_exc.DBAPIError) -> bool:
    # "relation does not exist" while a table is being created is the one
    # programming error worth retrying.
    return "does not exist" in str(exc.orig) and "relation" in str(exc.orig)


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip().splitlines()
    return (text[0] if text else type(orig).__name__)[:300]
