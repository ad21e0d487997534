"""Conditions checked where the write happens: version-checked updates from many requests,
and transfers whose condition fails compensate, with a worker SIGKILLed mid-run."""

from __future__ import annotations

import random
from typing import Any

import orjson
import pytest

from app import names
from tests.integration.harness import (
    Fleet,
    eventually,
    group_lag,
    pg_query,
    produce,
    read_all,
    totals,
)
from tests.integration.transactions.test_transfers import status

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]

ROWS, VERSIONS, TRIES = 6, 8, 3
LEGS = ("debit", "debit-undo", "credit", "credit-undo")


def rows_target(table: str, operation: str, keys: list[str]) -> dict[str, Any]:
    config = {"mode": "rows", "table": table, "operation": operation, "keyColumns": keys}
    return {"identifier": "db", "type": "sql", "config": config}


def versioned(run: str, namespace: str, n: str, row: int, version: int) -> bytes:
    """Set ``row`` to ``version + 1`` if it is at ``version``; ``n`` names the request.

    Message ids are unique per test run: the targets' ledgers remember ids for good."""
    return orjson.dumps(
        {
            "namespace": namespace,
            "messageId": f"{run}-{namespace}-{n}",
            "payload": {"id": row, "version": version + 1, "winner": n},
            "target": {"identifier": "db", "config": {"conditions": {"version": version}}},
        }
    )


async def condition_failures(fleet: Fleet) -> dict[str, int]:
    """Dead letters with CONDITION_FAILED, by namespace."""
    found: dict[str, int] = {}
    for record in await read_all(fleet.topic("dlq")):
        headers = {k: v.decode() for k, v in record.headers}
        if headers.get(names.ERROR_CODE) == "CONDITION_FAILED":
            namespace = headers.get(names.NAMESPACE, "?")
            found[namespace] = found.get(namespace, 0) + 1
    return found


async def test_version_checked_updates_one_wins_per_version(fleet: Fleet) -> None:
    table = f"v_{fleet.prefix}"
    pg_query(f'CREATE TABLE "{table}" (id int PRIMARY KEY, version int NOT NULL, winner text)')
    pg_query(f'INSERT INTO "{table}" SELECT g, 0, NULL FROM generate_series(0, {ROWS - 1}) g')
    keyed = {"strategy": "custom", "keyPath": "payload.id"}
    spread = {"strategy": "round_robin", "partitionCount": 8}
    fleet.apply(
        # In order: the requests for one row are applied one after another.
        {
            "name": "ordered",
            "shardConfig": keyed,
            "targets": [rows_target(table, "update", ["id"])],
        },
        # Racing: requests for one row on every partition, both workers at once.
        {
            "name": "racing",
            "shardConfig": spread,
            "targets": [rows_target(table, "update", ["id"])],
        },
    )
    one, two = fleet.worker(), fleet.worker()
    await one.ready()
    await two.ready()

    values, keys = [], []
    for version in range(VERSIONS):  # TRIES requests for each version of each row
        for row in range(ROWS):
            for t in range(TRIES):
                n = f"r{row}v{version}t{t}"
                values.append(versioned(fleet.prefix, "ordered", n, row, version))
                keys.append(str(row).encode())
    await produce(fleet.topic("ingest"), values, keys=keys)
    applied = ROWS * VERSIONS
    lost = len(values) - applied
    await totals(one, "ordered", accepted=len(values), delivered=applied, dead_lettered=lost)
    found = pg_query(f'SELECT id, version, winner FROM "{table}" ORDER BY id')
    assert [(i, v) for i, v, _ in found] == [(row, VERSIONS) for row in range(ROWS)]
    assert all(w == f"r{i}v{VERSIONS - 1}t0" for i, _, w in found), found  # the first, each time

    racers = 40  # all conditioned on the version every row is at now
    race = [versioned(fleet.prefix, "racing", f"x{n}", n % ROWS, VERSIONS) for n in range(racers)]
    await produce(fleet.topic("ingest"), race)
    await totals(two, "racing", accepted=racers, delivered=ROWS, dead_lettered=racers - ROWS)
    found = pg_query(f'SELECT id, version, winner FROM "{table}" ORDER BY id')
    assert [v for _, v, _ in found] == [VERSIONS + 1] * ROWS  # each row: exactly one winner
    assert {w for _, _, w in found} <= {f"x{n}" for n in range(racers)}

    failures = await condition_failures(fleet)  # each dead letter, for the one reason
    assert failures == {"ordered": lost, "racing": racers - ROWS}, failures


def transfer(run: str, n: int, src: str, dst: str, amount: int) -> bytes:
    """Debit ``src``, touch ``dst``'s account only while it is open, credit ``dst``."""

    def entry(leg: str, account: str, signed: int) -> dict[str, Any]:
        return {"entry_id": f"t{n}-{leg}", "account": account, "amount": signed}

    steps = [
        {
            "operation": "insert",
            "target": "ledger",
            "data": entry("debit", src, -amount),
            "compensation": {"operation": "insert", "data": entry("debit-undo", src, amount)},
        },
        {
            "operation": "update",
            "target": "accounts",
            "data": {"id": dst, "last_credit": f"t{n}"},
            "conditions": {"status": "open"},
            "compensation": {"operation": "update", "data": {"id": dst, "last_credit": None}},
        },
        {
            "operation": "insert",
            "target": "ledger",
            "data": entry("credit", dst, amount),
            "compensation": {"operation": "insert", "data": entry("credit-undo", dst, -amount)},
        },
    ]
    return orjson.dumps(
        {"namespace": "bank", "messageId": f"{run}-t{n}", "payload": {"transactions": steps}}
    )


async def test_a_transfer_whose_condition_fails_compensates_through_a_sigkill(
    fleet: Fleet,
) -> None:
    ledger, accounts = f"cl_{fleet.prefix}", f"ca_{fleet.prefix}"
    pg_query(
        f'CREATE TABLE "{ledger}" (entry_id text PRIMARY KEY, account text NOT NULL, '
        "amount bigint NOT NULL)"
    )
    pg_query(f'CREATE TABLE "{accounts}" (id text PRIMARY KEY, status text, last_credit text)')
    open_accounts = [f"acct-{i}" for i in range(6)]
    for account in open_accounts:
        pg_query(f"INSERT INTO \"{accounts}\" VALUES ('{account}', 'open', NULL)")
    pg_query(f"INSERT INTO \"{accounts}\" VALUES ('closed', 'closed', NULL)")
    fleet.apply(
        {
            "name": "bank",
            "transactionTimeoutSeconds": 600,
            "retryPolicy": {"maxAttempts": 5, "backoffStrategy": "constant", "initialDelayMs": 200},
            "targets": [
                {**rows_target(ledger, "insert", ["entry_id"]), "identifier": "ledger"},
                {**rows_target(accounts, "update", ["id"]), "identifier": "accounts"},
            ],
        }
    )
    one, two = fleet.worker(), fleet.worker()
    await one.ready()
    await two.ready()

    rnd, total = random.Random(7), 200
    plans, closed = [], set()
    for n in range(total):
        src, dst = rnd.sample(open_accounts, 2)
        if n % 8 == 5:
            dst = "closed"
            closed.add(n)
        plans.append(transfer(fleet.prefix, n, src, dst, rnd.randint(1, 100)))
    keys = [f"t{n}".encode() for n in range(total)]
    await produce(fleet.topic("ingest"), plans[: total // 2], keys=keys[: total // 2])

    async def some_done() -> bool:
        return int(pg_query(f'SELECT count(*) FROM "{ledger}"')[0][0]) >= 40

    await eventually(some_done, timeout=60, what="first entries")
    one.kill9()
    await produce(fleet.topic("ingest"), plans[total // 2 :], keys=keys[total // 2 :])

    seen: dict[str, int] = {}

    async def all_final() -> dict[str, int] | None:
        seen.clear()
        for n in range(total):
            state = await status(two, f"txn_{fleet.prefix}-t{n}")
            final = state["status"] if state else "missing"
            seen[final] = seen.get(final, 0) + 1
        return dict(seen) if set(seen) <= {"completed", "compensated"} else None

    try:
        counts = await eventually(all_final, timeout=240, interval=2.0, what="all final")
    except AssertionError as exc:
        raise AssertionError(f"transactions not all final: {seen}") from exc
    assert counts == {"completed": total - len(closed), "compensated": len(closed)}, counts

    async def drained() -> bool:
        topics = [fleet.topic(t) for t in ("ingest", "deliver", "txn-events")]
        return not any((await group_lag(fleet.prefix, topics)).values())

    await eventually(drained, timeout=60, what="every topic committed to its end")
    rows = pg_query(f'SELECT entry_id, amount FROM "{ledger}"')
    entries = {entry_id for entry_id, _ in rows}
    assert len(entries) == len(rows), "an entry was applied twice"
    assert sum(amount for _, amount in rows) == 0, "money was created or destroyed"
    for n in range(total):
        legs = {leg for leg in LEGS if f"t{n}-{leg}" in entries}
        if n in closed:  # the debit undone; the credit, if it had landed, undone too
            assert legs in (set(LEGS[:2]), set(LEGS)), (n, legs)
        else:
            assert legs == {"debit", "credit"}, (n, legs)
    touched = dict(pg_query(f'SELECT id, last_credit FROM "{accounts}"'))
    assert touched["closed"] is None, "a closed account was written"
    print(f"transactions: {counts}; ledger entries: {len(rows)}")
