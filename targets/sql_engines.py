"""The SQL target's connection pools: one engine per database URL, shared by every
SQL target on it, created on first use and disposed with its last user."""

from __future__ import annotations

import contextlib
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine


class Engines:
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


ENGINES = Engines()


def _json_text(value: Any) -> str:
    """JSON columns' serializer: orjson, several times faster than the stdlib's on payloads."""
    return orjson.dumps(value).decode()


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()
