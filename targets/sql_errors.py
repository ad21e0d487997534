"""How the SQL target tells a failure it may retry (the database away, a deadlock, a
lock timeout) from one it may not (a constraint, a bad value): SQLAlchemy's and the
drivers' errors mapped to outcomes."""

from __future__ import annotations

import asyncio

from sqlalchemy import exc as sa_exc

from targets.base import (
    Outcome,
    permanent,
    retryable,
)


def classify(exc: BaseException) -> Outcome:
    """Translate a database error into an outcome; the message never holds the URL."""
    if isinstance(exc, asyncio.CancelledError):
        raise exc
    name = type(getattr(exc, "orig", None) or exc).__name__
    message = f"{name}: {_first_line(exc)}"
    if isinstance(exc, sa_exc.DBAPIError) and _is_transient(exc):
        return retryable("TARGET_UNAVAILABLE", message)
    if isinstance(exc, (sa_exc.IntegrityError, sa_exc.DataError, sa_exc.ProgrammingError)):
        return permanent("TARGET_REJECTED", message)
    sqlite_refusal = _is_sqlite(exc) and not _is_sqlite_transient(exc)
    if isinstance(exc, sa_exc.OperationalError) and sqlite_refusal:
        return permanent("TARGET_REJECTED", message)
    if isinstance(exc, (sa_exc.OperationalError, sa_exc.InterfaceError, OSError, TimeoutError)):
        return retryable("TARGET_UNAVAILABLE", message)
    if isinstance(exc, sa_exc.DBAPIError):
        return retryable("TARGET_ERROR", message)
    if isinstance(exc, (sa_exc.StatementError, sa_exc.CompileError)):
        # Raised before the database saw the statement: a value no column type takes.
        return permanent("TARGET_REJECTED", message)
    return retryable("TARGET_ERROR", name)


def _is_transient(exc: sa_exc.DBAPIError) -> bool:
    # A table missing while it is being created (PostgreSQL undefined_table,
    # SQLite "no such table") is the one schema error worth retrying.
    sqlstate = getattr(exc.orig, "sqlstate", None)
    return sqlstate == "42P01" or "no such table" in str(exc.orig)


def _is_sqlite(exc: BaseException) -> bool:
    orig = getattr(exc, "orig", None)
    return type(orig).__module__.startswith(("sqlite3", "aiosqlite"))


def _is_sqlite_transient(exc: BaseException) -> bool:
    # SQLite reports schema and SQL errors as OperationalError too; only these pass.
    text = str(getattr(exc, "orig", exc)).lower()
    return any(s in text for s in ("locked", "busy", "unable to open", "disk i/o", "readonly"))


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip().splitlines()
    return (text[0] if text else type(orig).__name__)[:300]
