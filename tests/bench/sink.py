"""Sink benchmark: rows/s through the SQL target against raw psycopg COPY, same run, same table.

    .venv/bin/python -m tests.bench.sink [OUT.json] [--rows 100000] [--batch 500] [--url URL]

The SQL target runs in ``rows`` mode (upsert, ledger included) into a table of
~1 KB rows; COPY loads the same rows into a table of the same shape, one COPY
and commit per batch, so both pay a transaction per batch; each is timed in
alternating rounds and the best round counts. Needs the local
PostgreSQL (``make stack-up``). Prints both rates and their ratio and writes
them to OUT.json (default ``var/bench-sink.json``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import sqlalchemy as sa

from app.settings import Settings
from targets.base import Write
from targets.sql import SqlTarget

DEFAULT_URL = "postgresql+psycopg://wal:wal@127.0.0.1:5432/wal"
TEXT_COLUMNS = ("c1", "c2", "c3", "c4")


def payloads(count: int) -> list[dict[str, Any]]:
    """``count`` rows of about 1 KB: an id, four 240-character texts, two numbers."""
    filler = "abcdefghijklmnopqrstuvwxyz0123456789" * 7
    return [
        {
            "id": i,
            **{c: f"{i:010d}{c}{filler}"[:240] for c in TEXT_COLUMNS},
            "qty": i % 1000,
            "ts": 1_700_000_000_000 + i,
        }
        for i in range(count)
    ]


def create_table(conn: psycopg.Connection[Any], name: str) -> None:
    texts = ", ".join(f"{c} text NOT NULL" for c in TEXT_COLUMNS)
    conn.execute(f"DROP TABLE IF EXISTS {name}")
    conn.execute(f"CREATE TABLE {name} (id bigint PRIMARY KEY, {texts}, qty integer, ts bigint)")
    conn.commit()


async def through_target(
    url: str, table: str, ledger: str, rows: list[dict[str, Any]], batch: int
) -> float:
    target = SqlTarget(
        "bench",
        {"url": url, "mode": "rows", "table": table, "keyColumns": ["id"], "ledgerTable": ledger},
        Settings(),
    )
    await target.open()
    writes = [Write(id=f"bench-{r['id']}", namespace="bench", payload=r) for r in rows]
    try:
        await target.deliver(writes[:1])  # creates the ledger, reflects the table
        started = time.perf_counter()
        for i in range(1, len(writes), batch):
            outcomes = await target.deliver(writes[i : i + batch])
            failed = [o for o in outcomes if not o.ok]
            if failed:
                raise SystemExit(f"the SQL target failed: {failed[0]}")
        return time.perf_counter() - started
    finally:
        await target.close()


def through_copy(
    conn: psycopg.Connection[Any], table: str, rows: list[dict[str, Any]], batch: int
) -> float:
    columns = ["id", *TEXT_COLUMNS, "qty", "ts"]
    statement = f"COPY {table} ({', '.join(columns)}) FROM STDIN"
    started = time.perf_counter()
    for i in range(0, len(rows), batch):
        with conn.cursor() as cur, cur.copy(statement) as copy:
            for row in rows[i : i + batch]:
                copy.write_row([row[c] for c in columns])
        conn.commit()
    return time.perf_counter() - started


def measure(
    conn: psycopg.Connection[Any], url: str, rows: list[dict[str, Any]], batch: int, rounds: int
) -> dict[str, Any]:
    """Best of ``rounds`` alternating runs of each, on fresh tables dropped afterwards."""
    sink_best = copy_best = float("inf")
    size = None
    for n in range(rounds):
        sink, copy, ledger = (f"bench_{w}_{os.getpid()}_{n}" for w in ("sink", "copy", "ledger"))
        try:
            create_table(conn, sink)
            create_table(conn, copy)
            sink_best = min(sink_best, asyncio.run(through_target(url, sink, ledger, rows, batch)))
            copy_best = min(copy_best, through_copy(conn, copy, rows, batch))
            for table in (sink, copy):
                found = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
                if not found or found[0] != len(rows):
                    raise SystemExit(f"{table} holds {found} rows, not {len(rows)}")
            size = conn.execute(f"SELECT avg(pg_column_size(t.*))::int FROM {copy} t").fetchone()
        finally:
            for table in (sink, copy, ledger):
                conn.execute(f"DROP TABLE IF EXISTS {table}")
            conn.commit()
    sink_rate = (len(rows) - 1) / sink_best  # the first row went before the clock started
    copy_rate = len(rows) / copy_best
    return {
        "rows": len(rows),
        "batch": batch,
        "rounds": rounds,
        "row_bytes": size[0] if size else None,
        "sql_target_rows_per_s": round(sink_rate),
        "copy_rows_per_s": round(copy_rate),
        "ratio": round(sink_rate / copy_rate, 3),
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.sink", description=__doc__)
    parser.add_argument("out", nargs="?", default="var/bench-sink.json")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=2, help="best of this many runs of each")
    parser.add_argument("--url", default=None, help=f"PostgreSQL SQLAlchemy URL ({DEFAULT_URL})")
    args = parser.parse_args(argv)
    configured = Settings().database_url
    url = args.url or (configured if configured.startswith("postgresql") else DEFAULT_URL)
    libpq = sa.engine.make_url(url).set(drivername="postgresql")
    try:
        conn = psycopg.connect(libpq.render_as_string(hide_password=False))
    except psycopg.OperationalError as exc:
        print(
            f"PostgreSQL is not reachable ({type(exc).__name__}): run `make stack-up`",
            file=sys.stderr,
        )
        return 2
    with conn:
        result = measure(conn, url, payloads(args.rows), args.batch, args.rounds)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"SQL target (rows mode, upsert + ledger): {result['sql_target_rows_per_s']:>10,} rows/s")
    print(f"psycopg COPY (same batches):            {result['copy_rows_per_s']:>10,} rows/s")
    print(
        f"ratio target/COPY: {result['ratio']:.3f}  ({result['rows']} rows of "
        f"~{result['row_bytes']} B, batches of {result['batch']}, best of {args.rounds})"
    )
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
