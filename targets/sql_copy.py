"""PostgreSQL's fast path for the SQL target: a batch goes by COPY into a staging
table of the session, then one set-based statement moves it where it belongs.

COPY costs a fraction of the CPU of a multi-row statement's parameters on both
ends (measured for the journal: 3.5 against 15 µs a row of 1 KB). Both modes use
it on PostgreSQL: the journal (one INSERT … ON CONFLICT DO NOTHING) and rows mode
(the ledger claim, then per run of one operation an INSERT, an upsert, an UPDATE
… FROM or a DELETE … USING the staged rows), all in the batch's transaction.

A staging table is a temporary table with the source table's columns and types
and no constraints (a partial upsert row may lack a NOT NULL column the stored
row has), created once per database session and emptied at every commit. Values
go in COPY's text format, which PostgreSQL parses with each column's own input
function: ``"42"`` fills an integer column, a JSON object or array a json/jsonb
one; a value a column cannot take fails the statement as a data error, and the
target then tries each item alone, so it fails alone.
"""

from __future__ import annotations

import functools
import re
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from operator import itemgetter
from typing import Any, Literal

import orjson
import sqlalchemy as sa
from psycopg import sql as pgsql

_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})
_COPY_SPECIAL = re.compile(r"[\\\t\n\r]")
NULL = "\\N"


def copy_text(value: str) -> bytes:
    """A text value in COPY's text format (backslash, tab, newline and CR escaped)."""
    if _COPY_SPECIAL.search(value) is None:
        return value.encode()
    return value.translate(_COPY_ESCAPES).encode()


#: How a column's values become COPY text: ``value`` (a scalar for the column's input
#: function), ``json`` (json/jsonb: any value as JSON text) or ``array`` (a list as an
#: array literal).
Kind = Literal["value", "json", "array"]
_NONE = type(None)
#: A scalar's text by its exact type; any other type goes as ``str(value)``.
_SCALAR_TEXT: dict[type, Callable[[Any], str]] = {
    str: str,
    int: int.__repr__,
    float: float.__repr__,
    bool: {True: "true", False: "false"}.__getitem__,
    _NONE: {None: NULL}.__getitem__,
}


def _value_text(value: Any) -> str:
    """A scalar JSON value as COPY text, unescaped (NULL, true/false, number, text)."""
    return _SCALAR_TEXT.get(type(value), str)(value)


def _array_literal(value: Any) -> str:
    if isinstance(value, list):
        return "{" + ",".join(_array_literal(e) for e in value) + "}"
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def _array_text(value: Any) -> str:
    """A list as a PostgreSQL array literal (``{1,"a b",NULL}``), anything else as a scalar."""
    return _array_literal(value) if isinstance(value, list) else _value_text(value)


def kinds(table: sa.Table) -> dict[str, Kind]:
    """Each column's :data:`Kind`, from its reflected type."""
    found: dict[str, Kind] = {}
    for column in table.columns:
        if isinstance(column.type, sa.JSON):
            found[column.name] = "json"
        elif isinstance(column.type, sa.ARRAY):
            found[column.name] = "array"
        else:
            found[column.name] = "value"
    return found


def _texts(values: list[Any], kind: Kind) -> tuple[list[str], int]:
    """A column's values as unescaped COPY text, and how many are NULL (``\\N``)."""
    if kind == "json":  # JSON null for None, as SQLAlchemy's JSON type stores it
        return [orjson.dumps(v).decode() for v in values], 0
    types = list(map(type, values))
    nulls = types.count(_NONE)
    if kind == "array":
        return list(map(_array_text, values)), nulls
    one = set(types)
    if len(one) == 1 and (text := _SCALAR_TEXT.get(one.pop())) is not None:
        return values if text is str else list(map(text, values)), nulls
    return list(map(_value_text, values)), nulls


def _escaped(values: list[Any], texts: list[str], kind: Kind) -> list[str]:
    """``texts`` escaped for COPY, but for NULLs (``None`` outside a json column)."""
    return [
        NULL if v is None and kind != "json" else t.translate(_COPY_ESCAPES)
        for v, t in zip(values, texts, strict=True)
    ]


def copy_columns(columns: Sequence[list[Any]], column_kinds: Sequence[Kind]) -> bytes:
    """Rows given column by column (lists of one length, at least one) as COPY text.

    The whole batch is joined first and escaped only if a value needs it: with no
    value holding a backslash, tab, newline or CR, the text holds exactly one tab
    between fields, one newline a row and one backslash a NULL, and that is what
    the counts check (escaping each value costs several times the rest).
    """
    found = [_texts(values, kind) for values, kind in zip(columns, column_kinds, strict=True)]
    texts = [t for t, _ in found]
    body = _lines(texts)
    rows, width = len(columns[0]), len(columns)
    if (
        body.count("\\") != sum(n for _, n in found)
        or body.count("\t") != rows * (width - 1)
        or body.count("\n") != rows
        or "\r" in body
    ):
        escaped = [_escaped(*c) for c in zip(columns, texts, column_kinds, strict=True)]
        body = _lines(escaped)
    return body.encode()


def _lines(texts: list[list[str]]) -> str:
    return "\n".join(map("\t".join, zip(*texts, strict=True))) + "\n"


def copy_rows(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[str], column_kinds: Mapping[str, Kind]
) -> bytes:
    """Rows (each holding every one of ``columns``) as COPY text, one line each."""
    return copy_columns(
        [list(map(itemgetter(c), rows)) for c in columns],
        [column_kinds.get(c, "value") for c in columns],
    )


def names(columns: Iterable[str]) -> pgsql.Composed:
    return pgsql.SQL(", ").join(pgsql.Identifier(c) for c in columns)


def stage_of(table: str) -> pgsql.Identifier:
    return pgsql.Identifier(f"wal_stage_{table}")


class Staging:
    """The staging tables made on each psycopg connection (one per source table).

    A table made in a transaction that is rolled back is gone with it: after any
    failure, :meth:`forget` the connection and the next batch makes them again
    (``IF NOT EXISTS``: harmless when they did survive).
    """

    def __init__(self) -> None:
        self._made: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()

    async def load(
        self,
        cur: Any,
        table: str,
        columns: tuple[str, ...],
        data: bytes,
        *,
        empty_first: bool = False,
    ) -> pgsql.Identifier:
        """COPY ``data`` into ``table``'s staging table; ``empty_first`` when an earlier
        load of this transaction left rows in it."""
        stage = stage_of(table)
        made = self._made.setdefault(cur.connection, set())
        if table not in made:
            await cur.execute(
                pgsql.SQL(
                    "CREATE TEMP TABLE IF NOT EXISTS {} ON COMMIT DELETE ROWS"
                    " AS SELECT * FROM {} WITH NO DATA"
                ).format(stage, pgsql.Identifier(table))
            )
            made.add(table)
        if empty_first:
            await cur.execute(pgsql.SQL("DELETE FROM {}").format(stage))
        async with cur.copy(_copy_into(table, columns)) as copy:
            await copy.write(data)
        return stage

    def forget(self, pg: Any) -> None:
        self._made.pop(pg, None)


@functools.lru_cache(maxsize=256)
def _copy_into(table: str, columns: tuple[str, ...]) -> pgsql.Composed:
    return pgsql.SQL("COPY {} ({}) FROM STDIN").format(stage_of(table), names(columns))


# The statements are cached (a batch's few cost more to compose than to send): hence
# tuples for arguments, and a bound for tables whose writes bring many sets of columns.
@functools.lru_cache(maxsize=256)
def insert_new(
    table: str,
    columns: tuple[str, ...],
    conflict: tuple[str, ...],
    returning: tuple[str, ...] = (),
) -> pgsql.Composed:
    """INSERT the staged rows into ``table``, skipping those whose ``conflict`` key is
    there already; ``RETURNING`` the ``returning`` columns of the rows it inserted."""
    cols = names(columns)
    insert = pgsql.SQL("INSERT INTO {} ({}) SELECT {} FROM {} ON CONFLICT ({}) DO NOTHING")
    statement = insert.format(pgsql.Identifier(table), cols, cols, stage_of(table), names(conflict))
    if returning:
        statement += pgsql.SQL(" RETURNING {}").format(names(returning))
    return statement


@functools.lru_cache(maxsize=256)
def rows_statement(
    operation: str, table: str, keys: tuple[str, ...], columns: tuple[str, ...]
) -> pgsql.Composed:
    """The set-based statement applying one staged run of ``operation`` to ``table``."""
    target, stage = pgsql.Identifier(table), stage_of(table)
    cols = names(columns)
    values = [c for c in columns if c not in keys]
    if operation in ("insert", "upsert"):
        insert = pgsql.SQL("INSERT INTO {} ({}) SELECT {} FROM {}").format(
            target, cols, cols, stage
        )
        if operation == "insert":
            return insert
        if not values:
            return insert + pgsql.SQL(" ON CONFLICT ({}) DO NOTHING").format(names(keys))
        sets = pgsql.SQL(", ").join(
            pgsql.SQL("{} = EXCLUDED.{}").format(pgsql.Identifier(c), pgsql.Identifier(c))
            for c in values
        )
        return insert + pgsql.SQL(" ON CONFLICT ({}) DO UPDATE SET {}").format(names(keys), sets)
    match = pgsql.SQL(" AND ").join(
        pgsql.SQL("t.{} = s.{}").format(pgsql.Identifier(k), pgsql.Identifier(k)) for k in keys
    )
    if operation == "update":
        sets = pgsql.SQL(", ").join(
            pgsql.SQL("{} = s.{}").format(pgsql.Identifier(c), pgsql.Identifier(c)) for c in values
        )
        return pgsql.SQL("UPDATE {} AS t SET {} FROM {} AS s WHERE {}").format(
            target, sets, stage, match
        )
    assert operation == "delete", operation
    return pgsql.SQL("DELETE FROM {} AS t USING {} AS s WHERE {}").format(target, stage, match)
