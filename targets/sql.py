"""SQL target: SQLAlchemy Core over PostgreSQL (psycopg 3) or SQLite (aiosqlite).

Two modes (``config.mode``):

``journal`` (default)
    Each write becomes one row of ``config.table`` (default ``wal_messages``):
    message id, namespace, the payload as JSON, receive time. (namespace,
    message id) is the primary key, so a replay inserts nothing.

``rows``
    The payload *is* the row: ``insert``, ``upsert``, ``update`` or ``delete``
    on ``config.table`` (the operation comes from the message, else
    ``config.operation``, else ``upsert``). ``config.keyColumns`` names the key;
    ``config.columns`` maps column names to dotted paths in the payload
    (default: the payload's own keys). A mapped path the payload lacks leaves
    its column out (an upsert or update keeps the stored value), it does not
    write NULL. Applied ids are recorded in a ledger table
    (``config.ledgerTable``, default ``wal_ledger``, keyed by namespace, target
    and id) in the same transaction, so a replay changes nothing.

A batch is one transaction and as few round trips as the database allows
(multi-row statements). Items that can never apply (unknown column, missing
key, unknown operation) are refused before the database sees them. When the
database refuses the batch for its data, each item is tried in a transaction
of its own, so a poison row fails alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import weakref
from collections.abc import Sequence
from typing import Any

import orjson
import psycopg
import sqlalchemy as sa
from psycopg import sql as pgsql
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from app.errors import ConfigError
from targets.base import (
    DELIVERED,
    Outcome,
    Target,
    Write,
    permanent,
    retryable,
)
from targets.sql_errors import classify
from targets.sql_rows import Invalid, Plan, RowsSpec, dialect_insert, runs

#: The most a :meth:`SqlTarget.probe` waits (for a pooled connection, connecting, the answer).
PROBE_TIMEOUT_S = 2.0


class _Engines:
    """One engine (connection pool) per database URL, shared by every SQL target on it.

    A pool per namespace opened 14 connections for ~20 namespaces on one database
    (issue 16); now a worker holds at most ``WAL_SQL_POOL_SIZE`` per database, and a
    batch that finds them all busy waits for one. The last target to close disposes it.
    """

    def __init__(self) -> None:
        self._open: dict[str, tuple[AsyncEngine, int]] = {}

    def acquire(self, url: str, pool_size: int, application_name: str) -> AsyncEngine:
        engine, users = self._open.get(url, (None, 0))
        if engine is None:
            engine = _engine(url, pool_size, application_name)
        self._open[url] = (engine, users + 1)
        return engine

    async def release(self, url: str) -> None:
        engine, users = self._open.get(url, (None, 0))
        if engine is None:
            return
        if users > 1:
            self._open[url] = (engine, users - 1)
            return
        del self._open[url]
        with contextlib.suppress(Exception):  # close never raises
            await engine.dispose()


def _engine(url: str, pool_size: int, application_name: str) -> AsyncEngine:
    parsed = sa.engine.make_url(url)
    connect_args = (
        {"application_name": application_name} if parsed.get_backend_name() == "postgresql" else {}
    )
    engine = create_async_engine(
        url,
        pool_pre_ping=True,
        pool_size=pool_size,
        max_overflow=0,
        json_serializer=_json_text,
        connect_args=connect_args,
    )
    if engine.dialect.name == "sqlite":
        sa.event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
    return engine


ENGINES = _Engines()


class SqlTarget(Target):
    kind = "sql"

    _engine: AsyncEngine | None = None
    _url: str = ""

    async def open(self) -> None:
        url = self.config.get("url") or self.settings.sql_url
        self.mode = self.config.get("mode", "journal")
        if self.mode not in ("journal", "rows"):
            raise ConfigError(f"sql target {self.name}: mode must be 'journal' or 'rows'")
        self._metadata = sa.MetaData()
        if self.mode == "journal":
            self._table = _journal_table(self._metadata, self.config.get("table", "wal_messages"))
        else:
            self._rows = RowsSpec.from_config(self.name, self.config)
            ledger = self.config.get("ledgerTable", "wal_ledger")
            self._ledger = _ledger_table(self._metadata, ledger)
        try:  # last: a target whose config fails holds no share of a pool
            self._password = sa.engine.make_url(url).password
            self._engine = ENGINES.acquire(
                url, self.settings.sql_pool_size, f"wal-{self.settings.app_id}"
            )
        except (sa_exc.ArgumentError, ImportError, ValueError) as exc:
            kind = type(exc).__name__
            raise ConfigError(f"sql target {self.name}: unusable url ({kind})") from None
        self._url = url
        self._ready = False
        self._ready_lock = asyncio.Lock()
        #: psycopg connections whose session has the journal's staging table.
        self._staged: weakref.WeakSet[Any] = weakref.WeakSet()

    async def warm(self) -> None:
        """A pooled connection, and the journal or ledger table in place."""
        await self._prepare()

    async def probe(self) -> Outcome:
        """A pooled connection and ``SELECT 1``, within :data:`PROBE_TIMEOUT_S`."""
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_S), self.engine.connect() as conn:
                await conn.execute(sa.text("SELECT 1"))
        except TimeoutError:
            return retryable("TARGET_UNAVAILABLE", f"no answer within {PROBE_TIMEOUT_S:g} s")
        except Exception as exc:  # whatever it was, the database did not answer
            return retryable("TARGET_UNAVAILABLE", self._classify(exc).message)
        return DELIVERED

    async def close(self) -> None:
        if self._engine is not None:
            self._engine = None
            await ENGINES.release(self._url)

    @property
    def engine(self) -> AsyncEngine:
        assert self._engine is not None, "open() first"
        return self._engine

    async def deliver(self, batch: Sequence[Write]) -> list[Outcome]:
        if not batch:
            return []
        try:
            await self._prepare()
        except Exception as exc:  # nothing can apply before the tables are there
            # Not the writes' fault: retryable under every policy, whatever the cause.
            outcome = self._classify(exc)
            return [retryable("TARGET_UNAVAILABLE", outcome.message)] * len(batch)
        outcomes: list[Outcome | None] = [None] * len(batch)
        first: dict[tuple[str, str], int] = {}  # the first item of each id; copies are replays
        plans: list[Plan] = []
        for i, item in enumerate(batch):
            if (item.namespace, item.id) in first:
                continue
            first[(item.namespace, item.id)] = i
            try:
                plans.append(self._plan(i, item))
            except Invalid as exc:
                outcomes[i] = permanent("TARGET_REJECTED", str(exc)[:300])
        for plan, outcome in zip(plans, await self._apply_batch(plans), strict=True):
            outcomes[plan.position] = outcome
        return [
            o or outcomes[first[(item.namespace, item.id)]] or DELIVERED
            for item, o in zip(batch, outcomes, strict=True)
        ]

    async def _apply_batch(self, plans: list[Plan]) -> list[Outcome]:
        """Apply in one transaction; on a data error, each item in a transaction of its own."""
        if not plans:
            return []
        try:
            async with self.engine.begin() as conn:
                await self._apply(conn, plans)
            return [DELIVERED] * len(plans)
        except Exception as exc:
            outcome = self._classify(exc)
            if outcome.status != "permanent" or len(plans) == 1:
                return [outcome] * len(plans)
        return [(await self._apply_batch([plan]))[0] for plan in plans]

    def _plan(self, index: int, item: Write) -> Plan:
        if self.mode == "journal":
            return Plan(index, item, "journal", {})
        operation, row = self._rows.plan(item)
        return Plan(index, item, operation, row)

    async def _prepare(self) -> None:
        """Create the journal or ledger table on first use (not in open: the DB may be down)."""
        if self._ready:
            return
        async with self._ready_lock:
            for attempt in range(3):
                if self._ready:
                    return
                try:
                    async with self.engine.begin() as conn:
                        await conn.run_sync(self._metadata.create_all)
                        if self.mode == "rows":
                            self._rows.table = await conn.run_sync(self._rows.reflect)
                    self._ready = True
                except (sa_exc.ProgrammingError, sa_exc.IntegrityError) as exc:
                    # Another worker created the table between our check and our
                    # CREATE (PostgreSQL: DuplicateTable/DuplicateObject on its row
                    # type): the next create_all finds it there.
                    if "already exists" not in str(exc) or attempt == 2:
                        raise

    async def _apply(self, conn: AsyncConnection, plans: list[Plan]) -> None:
        if self.mode == "journal":
            await self._apply_journal(conn, plans)
        else:
            await self._apply_rows(conn, plans)

    async def _apply_journal(self, conn: AsyncConnection, plans: list[Plan]) -> None:
        now_ms = int(time.time() * 1000)
        if conn.dialect.name == "postgresql":
            await self._copy_journal(conn, plans, now_ms)
            return
        rows = [
            {
                "namespace": p.write.namespace,
                "message_id": p.write.id,
                "payload": dict(p.write.payload),
                "received_at_ms": p.write.received_at_ms,
                "delivered_at_ms": now_ms,
            }
            for p in plans
        ]
        stmt = dialect_insert(conn, self._table).on_conflict_do_nothing(
            index_elements=["namespace", "message_id"]
        )
        await conn.execute(stmt, rows)

    async def _copy_journal(self, conn: AsyncConnection, plans: list[Plan], now_ms: int) -> None:
        """PostgreSQL: COPY the rows into a session's staging table, then one INSERT … ON
        CONFLICT DO NOTHING from it. A quarter of the CPU of a multi-row INSERT's
        parameters (measured: 3.5 against 15 µs a row of 1 KB), in the same transaction."""
        raw = await conn.get_raw_connection()
        pg: Any = raw.driver_connection
        stage = pgsql.Identifier(f"wal_stage_{self._table.name}")
        table = pgsql.Identifier(self._table.name)
        columns = pgsql.SQL(_JOURNAL_COLUMNS)
        data = b"".join(
            b"%s\t%s\t%s\t%d\t%d\n"
            % (
                _copy_text(p.write.namespace),
                _copy_text(p.write.id),
                orjson.dumps(p.write.payload).replace(b"\\", b"\\\\"),  # JSON has no raw controls
                p.write.received_at_ms,
                now_ms,
            )
            for p in plans
        )
        try:
            async with pg.cursor() as cur:
                if pg not in self._staged:
                    await cur.execute(
                        pgsql.SQL(
                            "CREATE TEMP TABLE IF NOT EXISTS {} (LIKE {} INCLUDING DEFAULTS)"
                            " ON COMMIT DELETE ROWS"
                        ).format(stage, table)
                    )
                    self._staged.add(pg)
                copy_in = pgsql.SQL("COPY {} ({}) FROM STDIN").format(stage, columns)
                async with cur.copy(copy_in) as copy:
                    await copy.write(data)
                await cur.execute(
                    pgsql.SQL(
                        "INSERT INTO {} ({}) SELECT {} FROM {}"
                        " ON CONFLICT (namespace, message_id) DO NOTHING"
                    ).format(table, columns, columns, stage)
                )
        except psycopg.Error as exc:  # as SQLAlchemy would have raised it, for classify
            self._staged.discard(pg)  # created in a transaction that is rolled back
            raise sa_exc.DBAPIError.instance(None, None, exc, psycopg.Error) from exc
        except BaseException:
            self._staged.discard(pg)
            raise

    async def _apply_rows(self, conn: AsyncConnection, plans: list[Plan]) -> None:
        fresh = await self._claim(conn, plans)
        todo = [p for p in plans if (p.write.namespace, p.write.id) in fresh]
        for operation, run in runs(todo):
            await self._rows.execute(conn, operation, [p.row for p in run])

    async def _claim(self, conn: AsyncConnection, plans: list[Plan]) -> set[tuple[str, str]]:
        """Record the plans' ids in the ledger; return the (namespace, id) not applied before."""
        ledger = self._ledger
        stmt = (
            dialect_insert(conn, ledger)
            .on_conflict_do_nothing(index_elements=["namespace", "target", "id"])
            .returning(ledger.c.namespace, ledger.c.id)
        )
        # executemany + RETURNING: SQLAlchemy's "insertmanyvalues" sends one multi-row
        # INSERT from a cached compilation.
        params = [
            {"namespace": p.write.namespace, "target": self.name, "id": p.write.id} for p in plans
        ]
        result = await conn.execute(stmt, params)
        return {(ns, i) for ns, i in result}

    def _classify(self, exc: BaseException) -> Outcome:
        outcome = classify(exc)
        if self._password and self._password in outcome.message:
            message = outcome.message.replace(self._password, "***")
            return Outcome(outcome.status, outcome.code, message, outcome.retry_after)
        return outcome


_JOURNAL_COLUMNS = "namespace, message_id, payload, received_at_ms, delivered_at_ms"
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


_COPY_SPECIAL = re.compile(r"[\\\t\n\r]")


def _copy_text(value: str) -> bytes:
    """A text value in COPY's text format (backslash, tab, newline and CR escaped)."""
    if _COPY_SPECIAL.search(value) is None:
        return value.encode()
    return value.translate(_COPY_ESCAPES).encode()


def _json_text(value: Any) -> str:
    """JSON columns' serializer: orjson, several times faster than the stdlib's on payloads."""
    return orjson.dumps(value).decode()


def _journal_table(metadata: sa.MetaData, name: str) -> sa.Table:
    payload_type = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
    return sa.Table(
        name,
        metadata,
        sa.Column("namespace", sa.String(100), primary_key=True),
        sa.Column("message_id", sa.String(300), primary_key=True),
        sa.Column("payload", payload_type, nullable=False),
        sa.Column("received_at_ms", sa.BigInteger, nullable=False),
        sa.Column("delivered_at_ms", sa.BigInteger, nullable=False),
    )


def _ledger_table(metadata: sa.MetaData, name: str) -> sa.Table:
    return sa.Table(
        name,
        metadata,
        sa.Column("namespace", sa.String(100), primary_key=True),
        sa.Column("target", sa.String(100), primary_key=True),
        sa.Column("id", sa.String(300), primary_key=True),
        sa.Column("applied_at", sa.DateTime(timezone=True), server_default=sa.func.now()),
    )


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()
