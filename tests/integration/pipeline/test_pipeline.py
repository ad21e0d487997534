"""The walking skeleton end to end: plain producer → ingest → deliver → PostgreSQL / DLQ."""

from __future__ import annotations

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.harness import (
    Fleet,
    committed_count,
    eventually,
    group_lag,
    header,
    insert_only,
    pg_count,
    pg_query,
    produce,
    read_all,
    request,
)

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]

#: One of each kind of garbage a producer can send, by the code it must get.
GARBAGE: list[tuple[bytes, str]] = [
    (b"{not json", "INVALID_JSON"),
    (b"\xff\xfe\x00garbage", "INVALID_JSON"),
    (b"[1, 2, 3]", "INVALID_JSON"),
    (b'"just a string"', "INVALID_JSON"),
    (b"", "INVALID_JSON"),
    (orjson.dumps({"payload": {"a": 1}}), "VALIDATION_ERROR"),  # no namespace
    (orjson.dumps({"namespace": "orders"}), "VALIDATION_ERROR"),  # no payload
    (orjson.dumps({"namespace": "orders", "payload": [1, 2]}), "VALIDATION_ERROR"),
    (orjson.dumps({"namespace": "orders", "payload": "text"}), "VALIDATION_ERROR"),
    (orjson.dumps({"namespace": "nobody", "payload": {"a": 1}}), "NAMESPACE_NOT_FOUND"),
]


def journal_namespace(table: str) -> dict[str, object]:
    return {
        "name": "orders",
        "targets": [{"identifier": "pg", "type": "sql", "config": {"table": table}}],
    }


async def test_every_valid_request_lands_once_and_every_bad_one_is_dead_lettered(
    fleet: Fleet,
) -> None:
    table = f"j_{fleet.prefix}"
    total, every = 10_000, 20
    values: list[bytes] = []
    expected_codes: dict[bytes, str] = {}
    valid_seqs = set()
    for i in range(total):
        if i % every == 7:
            raw, code = GARBAGE[(i // every) % len(GARBAGE)]
            raw = raw if raw in (b"",) else raw + b" " * (i % 3)  # distinct bytes, same meaning
            values.append(raw)
            expected_codes[raw] = code
        else:
            values.append(request("orders", {"seq": i, "note": "x" * 50}))
            valid_seqs.add(i)
    bad = total - len(valid_seqs)

    fleet.apply(journal_namespace(table))
    worker = fleet.worker()
    await worker.ready()
    await produce(fleet.topic("ingest"), values)

    await eventually(lambda: _at_least(table, len(valid_seqs)), timeout=180, what="all rows")
    rows = pg_query(f"SELECT payload->>'seq' FROM \"{table}\"")
    assert len(rows) == len(valid_seqs)
    assert {int(r[0]) for r in rows} == valid_seqs

    dead = await eventually(lambda: _dlq_with(fleet, bad), timeout=60, what="dead letters")
    assert len(dead) == bad
    for record in dead:
        assert record.value in expected_codes or record.value is None
        code = header(record, "wal-error-code")
        assert code == expected_codes.get(record.value or b"", "INVALID_JSON"), (record.value, code)
        assert header(record, "wal-error-message")
        assert header(
            record,
            "wal-source",
        ).startswith(fleet.topic("ingest") + "/")  # type: ignore[union-attr]

    # Everything processed is committed: nothing is left for a restart to redo.
    lag = await eventually(
        lambda: _zero_lag(fleet, ["ingest", "deliver"]), timeout=30, what="committed offsets"
    )
    assert lag == {fleet.topic("ingest"): 0, fleet.topic("deliver"): 0}

    # The worker's own counts agree with what the database and the DLQ hold.
    counts = await scrape(worker.url)
    assert counts[("orders", "ingest", "accepted")] == len(valid_seqs)
    assert counts[("orders", "deliver", "delivered")] == len(valid_seqs)
    rejected = sum(v for (ns, stage, outcome), v in counts.items() if outcome == "rejected")
    assert rejected == bad


async def test_sigkill_mid_stream_loses_nothing_and_applies_nothing_twice(fleet: Fleet) -> None:
    """Rows mode *inserts* into a table without a unique key: only the ledger prevents doubles."""
    table = f"k_{fleet.prefix}"
    fleet.apply(insert_only(table))
    total = 20_000
    # no periodic commit before the kill (it comes a few seconds in, at 2 000 rows, well
    # below Faust's commit-every-10 000): every row applied by then must be read again
    first = await fleet.worker(WAL_BATCH_SIZE="200", WAL_COMMIT_INTERVAL_S="60").ready()
    await produce(
        fleet.topic("ingest"),
        (request("orders", {"seq": i, "body": "b" * 200}) for i in range(total)),
    )

    await eventually(lambda: _at_least(table, 2_000), timeout=120, what="some rows")

    async def applied_past_the_commit() -> bool:
        """Rows applied past the committed offsets (Faust commits every 10 000 acks, and
        ingest acks fast: a commit may just have caught up with every applied row)."""
        committed = await committed_count(fleet.prefix, fleet.topic("deliver"))
        return pg_count(table) > committed

    worker, replayed, killed_at = first, 0, 0
    for _ in range(3):  # a commit may still land between the check and the kill: again
        await eventually(applied_past_the_commit, timeout=60, interval=0.05, what="uncommitted")
        worker.kill9()  # nothing commits after this, and no applied row goes away
        killed_at = pg_count(table)
        assert killed_at < total, "the kill came too late to prove anything"
        # Rows applied past the committed deliver offsets: the next worker must read those
        # records again, and the ledger must keep their rows from doubling.
        replayed = killed_at - await committed_count(fleet.prefix, fleet.topic("deliver"))
        if replayed > 0:
            break
        worker = await fleet.worker(WAL_BATCH_SIZE="200", WAL_COMMIT_INTERVAL_S="60").ready()
    assert replayed > 0, f"nothing to replay ({killed_at} rows, all committed): proves nothing"

    await fleet.worker(WAL_BATCH_SIZE="200").ready()
    await eventually(lambda: _at_least(table, total), timeout=240, what="all rows after restart")
    await eventually(lambda: _zero_lag(fleet, ["ingest", "deliver"]), timeout=30, what="commits")

    count, distinct, low, high = pg_query(
        f'SELECT count(*), count(DISTINCT seq), min(seq), max(seq) FROM "{table}"'
    )[0]
    assert (count, distinct, low, high) == (total, total, 0, total - 1)
    # (the helper counts what it should: every request's deliver record is committed - and
    # more, as ingest's own replay after the kill produced some of them again)
    assert await committed_count(fleet.prefix, fleet.topic("deliver")) >= total
    print(
        f"killed at {killed_at} rows ({replayed} of them not committed: read again); "
        f"after restart {count} rows, {distinct} distinct"
    )


async def test_two_workers_starting_on_a_backlog_deliver_every_record_once(fleet: Fleet) -> None:
    """The first worker reads for a moment alone, then the second joins: what the first
    had fetched and not finished - before the group committed anything - is read again
    (it was skipped for good about one run in four of ``make bench``)."""
    table = f"b_{fleet.prefix}"
    fleet.apply(insert_only(table))
    total = 60_000
    await produce(
        fleet.topic("ingest"),
        (request("orders", {"seq": i, "body": "b" * 200}) for i in range(total)),
    )
    workers = [fleet.worker(), fleet.worker()]
    for worker in workers:
        await worker.ready()
    await eventually(lambda: _at_least(table, total), timeout=120, what="all rows")
    await eventually(lambda: _zero_lag(fleet, ["ingest", "deliver"]), timeout=60, what="commits")
    count, distinct = pg_query(f'SELECT count(*), count(DISTINCT seq) FROM "{table}"')[0]
    assert (count, distinct) == (total, total)


async def scrape(url: str) -> dict[tuple[str, str, str], float]:
    """``wal_messages_total`` from a worker's /metrics, by (namespace, stage, outcome)."""
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"{url}/metrics")).text
    out: dict[tuple[str, str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "wal_messages_total":
                labels = sample.labels
                out[(labels["namespace"], labels["stage"], labels["outcome"])] = sample.value
    return out


async def _at_least(table: str, n: int) -> bool:
    return pg_count(table) >= n


async def _dlq_with(fleet: Fleet, n: int) -> list[object] | None:
    records = await read_all(fleet.topic("dlq"))
    return records if len(records) >= n else None


async def _zero_lag(fleet: Fleet, roles: list[str]) -> dict[str, int] | None:
    lag = await group_lag(fleet.prefix, [fleet.topic(r) for r in roles])
    return lag if not any(lag.values()) else None
