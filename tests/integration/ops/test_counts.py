"""The numbers operators read, against a counted run of real traffic.

A client sends every write twice (the same ``messageId``), some requests are
garbage, and the first worker is SIGKILLed before it has committed anything,
so the next workers read ingest and deliver records again. Afterwards the
metrics view and the dashboard must show exactly what was sent: requests
accepted and rejected once each, deliveries once per record and target, the
re-reads apart - per namespace, whichever worker answers.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.integration.harness import (
    Fleet,
    committed_count,
    eventually,
    group_lag,
    insert_only,
    metrics_view,
    pg_count,
    pg_query,
    produce,
    request,
)
from tests.integration.ops.test_dashboard import chromium, visible_text

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]

DISTINCT = 2_000  # writes to "orders", each sent twice
OTHER = 300  # writes to "other", once each
GARBAGE = 40  # requests to "other" that fail validation


def traffic() -> list[bytes]:
    """The first half of the writes twice in a row, the second half again at the end."""
    first = [
        request("orders", {"seq": i, "body": "b" * 100}, messageId=f"w-{i}")
        for i in range(DISTINCT)
    ]
    out: list[bytes] = []
    for i, body in enumerate(first):
        out += [body, body] if i < DISTINCT // 2 else [body]
    out += [request("other", {"n": i}) for i in range(OTHER)]
    out += [request("other", [1, 2]) for _ in range(GARBAGE)]  # type: ignore[arg-type]
    return out + first[DISTINCT // 2 :]


def expected() -> dict[str, dict[str, int]]:
    return {
        "orders": {"accepted": 2 * DISTINCT, "rejected": 0, "delivered": 2 * DISTINCT},
        "other": {"accepted": OTHER, "rejected": GARBAGE, "delivered": OTHER},
    }


async def test_figures_match_the_traffic_through_a_sigkill_and_client_duplicates(
    fleet: Fleet, tmp_path: Path
) -> None:
    table = f"c_{fleet.prefix}"
    fleet.apply(
        insert_only(table),
        {
            "name": "other",
            "targets": [{"identifier": "pg", "type": "sql", "config": {"table": f"j_{table}"}}],
        },
    )
    # no periodic commit: whatever the first worker did before the kill is read again
    first = await fleet.worker(WAL_BATCH_SIZE="100", WAL_COMMIT_INTERVAL_S="60").ready()
    await produce(fleet.topic("ingest"), traffic())
    await eventually(lambda: _at_least(table, DISTINCT // 4), timeout=120, what="some rows")
    first.kill9()
    applied = pg_count(table)
    uncommitted = applied - await committed_count(fleet.prefix, fleet.topic("deliver"))
    assert uncommitted > 0, "everything was committed before the kill: nothing is re-read"

    workers = [await fleet.worker().ready(), await fleet.worker().ready()]
    await eventually(lambda: _at_least(table, DISTINCT), timeout=240, what="every write")
    await eventually(lambda: _drained(fleet), timeout=60, what="ingest and deliver drained")
    count, distinct = pg_query(f'SELECT count(*), count(DISTINCT seq) FROM "{table}"')[0]
    assert (count, distinct) == (DISTINCT, DISTINCT)

    want = expected()
    views = {}
    for worker in workers:  # each answers for every namespace (one routes to the other)
        for name in want:
            views[(worker.url, name)] = await metrics_view(worker, name, **want[name])
    orders = views[(workers[0].url, "orders")]
    assert orders["totals"]["retried"] == orders["totals"]["dead_lettered"] == 0
    # the kill made the next workers read records again: counted apart, never as new
    assert orders["totals"]["replayed"] >= uncommitted
    assert orders["targets"]["pg"]["delivered"] == 2 * DISTINCT
    assert views[(workers[1].url, "orders")]["totals"] == orders["totals"]
    other = views[(workers[1].url, "other")]
    assert other["targets"]["pg"]["delivered"] == OTHER

    async def dashboard() -> str | None:  # the same figures, on the page people read
        url = f"{workers[1].url}/wal/dashboard"
        text = visible_text(await chromium(tmp_path, "--dump-dom", url))
        rows = [
            rf"orders {2 * DISTINCT:,} {2 * DISTINCT:,} 0 0 0 [\d,]+ ",
            rf"other {OTHER:,} {OTHER:,} 0 0 {GARBAGE:,} [\d,]+ ",
        ]
        return text if all(re.search(r, text) for r in rows) else None

    await eventually(dashboard, timeout=60, interval=2.0, what="the dashboard's figures")
    o = orders["totals"]
    print(
        f"killed at {applied} rows ({uncommitted} applied, not committed); "
        f"orders totals {o}; other totals {other['totals']}"
    )


async def _at_least(table: str, n: int) -> bool:
    return pg_count(table) >= n


async def _drained(fleet: Fleet) -> dict[str, int] | None:
    lag = await group_lag(fleet.prefix, [fleet.topic("ingest"), fleet.topic("deliver")])
    return lag if not any(lag.values()) else None
