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

A batch is one transaction and as few round trips as the database allows: on
PostgreSQL, COPY into a staging table and one set-based statement per run
(:mod:`targets.sql_copy`); elsewhere, multi-row statements. Items that can never
apply (unknown column, missing key, unknown operation, an object for a text
column) are refused before the database sees them. When the
database refuses the batch for its data, each item is tried in a transaction
of its own, so a poison row fails alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from typing import Any

import orjson
import psycopg
import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.errors import ConfigError
from targets.base import (
    DELIVERED,
    Outcome,
    Target,
    Write,
    condition_failed,
    conditions_of,
    permanent,
    retryable,
)
from targets.sql_copy import (
    Staging,
    copy_columns,
    copy_rows,
    copy_text,
    insert_new,
    rows_statement,
)
from targets.sql_engines import ENGINES
from targets.sql_errors import classify
from targets.sql_rows import Invalid, Plan, RowsSpec, by_columns, dialect_insert, runs

#: The most a :meth:`SqlTarget.probe` waits (for a pooled connection, connecting, the answer).
PROBE_TIMEOUT_S = 2.0


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
        #: PostgreSQL sessions' staging tables (journal, ledger, rows).
        self._staging = Staging()

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
                failed = await self._apply(conn, plans)
            return [failed.get(p.position, DELIVERED) for p in plans]
        except Exception as exc:
            outcome = self._classify(exc)
            if outcome.status != "permanent" or len(plans) == 1:
                return [outcome] * len(plans)
        return [(await self._apply_batch([plan]))[0] for plan in plans]

    def _plan(self, index: int, item: Write) -> Plan:
        if self.mode == "journal":
            if conditions_of(item):
                raise Invalid("journal mode takes no conditions (rows mode does)")
            return Plan(index, item, "journal", {})
        operation, row = self._rows.plan(item)
        return Plan(index, item, operation, row, self._rows.conditions(item))

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

    async def _apply(self, conn: AsyncConnection, plans: list[Plan]) -> dict[int, Outcome]:
        """Apply ``plans`` in ``conn``'s transaction; the outcomes of those whose conditions
        did not hold, by position (the rest are applied)."""
        if self.mode == "journal":
            await self._apply_journal(conn, plans)
            return {}
        return await self._apply_rows(conn, plans)

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
        """PostgreSQL: the batch by COPY into staging, then one INSERT … ON CONFLICT DO
        NOTHING from it (:mod:`targets.sql_copy`)."""
        data = b"".join(
            b"%s\t%s\t%s\t%d\t%d\n"
            % (
                copy_text(p.write.namespace),
                copy_text(p.write.id),
                orjson.dumps(p.write.payload).replace(b"\\", b"\\\\"),  # JSON has no raw controls
                p.write.received_at_ms,
                now_ms,
            )
            for p in plans
        )
        name = self._table.name
        async with self._copying(conn) as cur:
            await self._staging.load(cur, name, _JOURNAL_COLUMNS, data)
            await cur.execute(insert_new(name, _JOURNAL_COLUMNS, ("namespace", "message_id")))

    async def _apply_rows(self, conn: AsyncConnection, plans: list[Plan]) -> dict[int, Outcome]:
        if conn.dialect.name == "postgresql":
            return await self._copy_rows(conn, plans)
        fresh = await self._claim(conn, plans)
        todo = [p for p in plans if (p.write.namespace, p.write.id) in fresh]
        failed: dict[int, Outcome] = {}
        for operation, run in runs(todo):
            if run[0].conditions:
                await self._conditioned(conn, run[0], failed)
            else:
                await self._rows.execute(conn, operation, [p.row for p in run])
        return failed

    async def _conditioned(
        self, conn: AsyncConnection, plan: Plan, failed: dict[int, Outcome]
    ) -> None:
        """Apply a conditioned plan; if its conditions do not hold, take back its ledger
        claim (the same id may apply once they do) and note it in ``failed``."""
        if await self._rows.execute_conditioned(conn, plan):
            return
        ledger = self._ledger
        await conn.execute(
            ledger.delete().where(
                ledger.c.namespace == plan.write.namespace,
                ledger.c.target == self.name,
                ledger.c.id == plan.write.id,
            )
        )
        names = ", ".join(sorted(plan.conditions))
        why = "a row holds" if plan.operation == "insert" else "the row does not hold"
        failed[plan.position] = condition_failed(
            f"{plan.operation} on {self._rows.table_name}: {why} {names}"
        )

    async def _copy_rows(self, conn: AsyncConnection, plans: list[Plan]) -> dict[int, Outcome]:
        """PostgreSQL: the ledger claim and every run of one operation by COPY into
        staging and one set-based statement each (:mod:`targets.sql_copy`)."""
        spec, ledger = self._rows, self._ledger.name
        writes = [p.write for p in plans]
        claims = copy_columns(
            [[w.namespace for w in writes], [self.name] * len(writes), [w.id for w in writes]],
            ("value", "value", "value"),
        )
        async with self._copying(conn) as cur:
            await self._staging.load(cur, ledger, _LEDGER_COLUMNS, claims)
            claim = insert_new(ledger, _LEDGER_COLUMNS, _LEDGER_COLUMNS, ("namespace", "id"))
            await cur.execute(claim)
            fresh = {(ns, i) for ns, i in await cur.fetchall()}
            todo = [p for p in plans if (p.write.namespace, p.write.id) in fresh]
            loaded, failed = False, dict[int, Outcome]()
            for operation, run in runs(todo):
                if run[0].conditions:
                    await self._conditioned(conn, run[0], failed)
                    continue
                rows = [p.row for p in run]
                if operation in ("upsert", "update"):
                    rows = spec.merged(rows)
                for shape in by_columns(rows):
                    columns = tuple(sorted(shape[0]))
                    data = copy_rows(shape, columns, spec.kinds)
                    await self._staging.load(
                        cur, spec.table_name, columns, data, empty_first=loaded
                    )
                    loaded = True
                    statement = rows_statement(
                        operation, spec.table_name, tuple(spec.keys), columns
                    )
                    await cur.execute(statement)
        return failed

    @contextlib.asynccontextmanager
    async def _copying(self, conn: AsyncConnection) -> Any:
        """A psycopg cursor on ``conn``'s connection; its errors as SQLAlchemy raises them
        (for :func:`classify`), and the session's staging forgotten after any failure."""
        raw = await conn.get_raw_connection()
        pg: Any = raw.driver_connection
        try:
            async with pg.cursor() as cur:
                yield cur
        except psycopg.Error as exc:
            self._staging.forget(pg)
            raise sa_exc.DBAPIError.instance(None, None, exc, psycopg.Error) from exc
        except BaseException:
            self._staging.forget(pg)
            raise

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


_JOURNAL_COLUMNS = ("namespace", "message_id", "payload", "received_at_ms", "delivered_at_ms")
_LEDGER_COLUMNS = ("namespace", "target", "id")


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
