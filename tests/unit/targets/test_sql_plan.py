"""Rows-mode planning (what is refused before the database sees it) and error classification."""

from __future__ import annotations

import sqlite3
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from targets.base import Write
from targets.sql_errors import classify
from targets.sql_rows import Invalid, RowsSpec

TABLE = sa.Table(
    "items",
    sa.MetaData(),
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.Text),
    sa.Column("n", sa.Integer),
)


def spec(columns: dict[str, str] | None = None, operation: str = "upsert") -> RowsSpec:
    config = {"table": "items", "keyColumns": ["id"], "columns": columns, "operation": operation}
    s = RowsSpec.from_config("db", config)
    s.table = TABLE
    return s


def plan(s: RowsSpec, payload: dict[str, Any], op: str | None = None) -> tuple[str, dict]:
    return s.plan(Write(id="m", namespace="ns", payload=payload, operation=op))


def test_mapping_takes_paths_and_leaves_out_what_is_missing() -> None:
    s = spec({"id": "order.id", "name": "payload.order.name", "n": "qty"})
    full = {"order": {"id": 1, "name": "x"}, "qty": 2}
    assert plan(s, full) == ("upsert", {"id": 1, "name": "x", "n": 2})
    assert plan(s, {"order": {"id": 1}}) == ("upsert", {"id": 1})
    assert plan(s, {"order": {"id": 1}, "qty": None}) == ("upsert", {"id": 1, "n": None})
    assert plan(s, {"order": {"id": 1}}, "DELETE") == ("delete", {"id": 1})


@pytest.mark.parametrize(
    ("payload", "op", "fault"),
    [
        ({"id": 1, "colour": "red"}, None, "no column colour"),
        ({"name": "x"}, None, "no value for key column id"),
        ({"id": None, "name": "x"}, "update", "no value for key column id"),
        ({"id": 1}, "update", "no column to set"),
        ({}, "insert", "no column to write"),
        ({"id": 1}, "merge", "unknown operation"),
    ],
)
def test_refused_before_the_database(payload: dict[str, Any], op: str | None, fault: str) -> None:
    with pytest.raises(Invalid, match=fault):
        plan(spec(), payload, op)


def test_merged_rows_apply_later_values_over_earlier() -> None:
    rows = [{"id": 1, "name": "a", "n": 1}, {"id": 2, "name": "b"}, {"id": 1, "n": 5}]
    assert spec().merged(rows) == [{"id": 1, "name": "a", "n": 5}, {"id": 2, "name": "b"}]


def wrapped(cls: type[sa_exc.DBAPIError], orig: Exception) -> sa_exc.DBAPIError:
    return cls("INSERT INTO items VALUES (?)", {"secret": "param"}, orig)


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (
            wrapped(sa_exc.OperationalError, sqlite3.OperationalError("database is locked")),
            "retryable",
            "TARGET_UNAVAILABLE",
        ),
        (
            wrapped(sa_exc.OperationalError, sqlite3.OperationalError("no such table: items")),
            "retryable",
            "TARGET_UNAVAILABLE",
        ),
        (
            wrapped(
                sa_exc.OperationalError, sqlite3.OperationalError("table items has no column x")
            ),
            "permanent",
            "TARGET_REJECTED",
        ),
        (
            wrapped(sa_exc.IntegrityError, sqlite3.IntegrityError("UNIQUE constraint failed")),
            "permanent",
            "TARGET_REJECTED",
        ),
        (
            wrapped(sa_exc.OperationalError, ConnectionRefusedError(111, "refused")),
            "retryable",
            "TARGET_UNAVAILABLE",
        ),
        (
            sa_exc.StatementError("bind failed", "INSERT", {}, TypeError("no datetime")),
            "permanent",
            "TARGET_REJECTED",
        ),
        (OSError(111, "refused"), "retryable", "TARGET_UNAVAILABLE"),
        (RuntimeError("surprise"), "retryable", "TARGET_ERROR"),
    ],
)
def test_classify(exc: Exception, status: str, code: str) -> None:
    outcome = classify(exc)
    assert (outcome.status, outcome.code) == (status, code)
    assert "param" not in outcome.message and "INSERT" not in outcome.message
