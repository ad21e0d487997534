"""Money transfers as transactions: completed or compensated, never stuck, never doubled."""

from __future__ import annotations

import random
from typing import Any

import httpx
import orjson
import pytest

from tests.integration.harness import Fleet, Worker, eventually, group_lag, pg_query, produce

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]

ACCOUNTS = [f"acct-{i}" for i in range(8)]


def bank(table: str) -> dict[str, Any]:
    return {
        "name": "bank",
        "transactionTimeoutSeconds": 600,
        "retryPolicy": {
            "maxAttempts": 5,
            "backoffStrategy": "constant",
            "initialDelayMs": 200,
            "jitterMs": 0,
        },
        "targets": [
            {
                "identifier": "ledger",
                "type": "sql",
                "config": {"mode": "rows", "table": table, "operation": "insert"},
            }
        ],
    }


def entry(entry_id: str, account: str, amount: int) -> dict[str, Any]:
    return {"entry_id": entry_id, "account": account, "amount": amount}


def transfer(run: str, n: int, src: str, dst: str, amount: int) -> bytes:
    """A debit and a credit, each with the entry that undoes it.

    Message ids are unique per test run: the targets' ledgers remember ids for good.
    """
    steps = []
    for leg, account, signed in (("debit", src, -amount), ("credit", dst, amount)):
        steps.append(
            {
                "operation": "insert",
                "target": "ledger",
                "data": entry(f"t{n}-{leg}", account, signed),
                "compensation": {
                    "operation": "insert",
                    "data": entry(f"t{n}-{leg}-undo", account, -signed),
                },
            }
        )
    return orjson.dumps(
        {"namespace": "bank", "messageId": f"{run}-t{n}", "payload": {"transactions": steps}}
    )


def create_ledger(table: str) -> None:
    # Credits to the frozen account violate a constraint: a permanent failure.
    pg_query(
        f'CREATE TABLE "{table}" (entry_id text NOT NULL, account text NOT NULL, '
        "amount bigint NOT NULL, CHECK (NOT (account = 'frozen' AND amount > 0)))"
    )


async def status(worker: Worker, txn_id: str) -> dict[str, Any] | None:
    async with httpx.AsyncClient(timeout=10) as client:
        r = await client.get(f"{worker.url}/wal/transactions/{txn_id}")
    return r.json() if r.status_code == 200 else None


async def final_counts(worker: Worker, run: str, total: int) -> dict[str, int]:
    """Status -> how many of the transfers of ``run`` have it now (``missing``: unknown)."""
    counts: dict[str, int] = {}
    for n in range(total):
        state = await status(worker, f"txn_{run}-t{n}")
        final = state["status"] if state else "missing"
        counts[final] = counts.get(final, 0) + 1
    return counts


async def all_final(worker: Worker, run: str, total: int, timeout: float = 240) -> dict[str, int]:
    """Status -> count, once every transfer of ``run`` has ended (completed or compensated);
    an assertion naming what each was when they do not."""
    seen: dict[str, int] = {}

    async def check() -> dict[str, int] | None:
        seen.clear()
        seen.update(await final_counts(worker, run, total))
        return dict(seen) if set(seen) <= {"completed", "compensated"} else None

    try:
        counts: dict[str, int] = await eventually(
            check, timeout=timeout, interval=2.0, what="all final"
        )
    except AssertionError as exc:
        raise AssertionError(f"transactions not all final: {seen}") from exc
    return counts


def ledger_exact(table: str, total: int) -> list[str]:
    """Assert the ledger holds exactly the entries each outcome implies, once each, and no
    money made or lost: a completed transfer its debit and credit; one to the frozen account
    (every tenth, n % 10 == 3) its debit and the debit's undo (the credit never applied)."""
    expected = set()
    for n in range(total):
        legs = ("debit", "debit-undo") if n % 10 == 3 else ("debit", "credit")
        expected |= {f"t{n}-{leg}" for leg in legs}
    rows = pg_query(f'SELECT entry_id, amount FROM "{table}"')
    entries = [entry_id for entry_id, _ in rows]
    assert len(entries) == len(set(entries)), "a mutation or compensation was applied twice"
    missing, extra = sorted(expected - set(entries)), sorted(set(entries) - expected)
    assert not missing and not extra, f"missing {missing[:5]}, extra {extra[:5]}"
    assert sum(amount for _, amount in rows) == 0, "money was created or destroyed"
    return entries


def plans(run: str, total: int) -> list[bytes]:
    """``total`` transfers between random accounts (seeded), every tenth to the frozen one."""
    rnd = random.Random(42)
    out = []
    for n in range(total):
        src, dst = rnd.sample(ACCOUNTS, 2)
        if n % 10 == 3:
            dst = "frozen"
        out.append(transfer(run, n, src, dst, rnd.randint(1, 100)))
    return out


async def test_transfers_complete_or_compensate_through_a_sigkill(fleet: Fleet) -> None:
    table = f"l_{fleet.prefix}"
    create_ledger(table)
    fleet.apply(bank(table))
    one, two = fleet.worker(), fleet.worker()
    await one.ready()
    await two.ready()

    total = 300
    plans_ = plans(fleet.prefix, total)
    await produce(
        fleet.topic("ingest"),
        plans_[: total // 2],
        keys=[f"t{n}".encode() for n in range(total // 2)],
    )

    async def some_done() -> bool:
        return int(pg_query(f'SELECT count(*) FROM "{table}"')[0][0]) >= 50

    await eventually(some_done, timeout=60, what="first entries")
    one.kill9()  # mid-run: the other worker takes over its partitions
    await produce(
        fleet.topic("ingest"),
        plans_[total // 2 :],
        keys=[f"t{n}".encode() for n in range(total // 2, total)],
    )

    counts = await all_final(two, fleet.prefix, total)
    assert counts == {"completed": total - total // 10, "compensated": total // 10}, counts

    async def drained() -> bool:  # nothing left to replay or dispatch before counting
        topics = [fleet.topic(t) for t in ("ingest", "deliver", "txn-events")]
        return not any((await group_lag(fleet.prefix, topics)).values())

    await eventually(drained, timeout=60, what="every topic committed to its end")
    entries = ledger_exact(table, total)
    print(f"transactions: {counts}; ledger entries: {len(entries)}")


async def test_status_is_answered_for_a_transaction_owned_by_the_other_worker(fleet: Fleet) -> None:
    """Transactions on all 4 partitions, two workers: each owns some, and a answers for all."""
    from aiokafka.partitioner import murmur2

    table = f"o_{fleet.prefix}"
    create_ledger(table)
    fleet.apply(bank(table))
    a, b = fleet.worker(), fleet.worker()
    await a.ready()
    await b.ready()
    numbers: dict[int, int] = {}  # partition -> a transfer number whose txn lives there
    n = 0
    while len(numbers) < fleet.partitions:
        key = f"txn_{fleet.prefix}-t{n}".encode()
        numbers.setdefault((murmur2(key) & 0x7FFFFFFF) % fleet.partitions, n)
        n += 1
    await produce(
        fleet.topic("ingest"),
        [transfer(fleet.prefix, n, "acct-1", "acct-2", 5) for n in numbers.values()],
    )
    for worker in (a, b):  # every partition, from either worker
        for n in numbers.values():
            txn_id = f"txn_{fleet.prefix}-t{n}"
            state = await eventually(
                lambda t=txn_id, w=worker: status(w, t), timeout=60, what=txn_id
            )
            assert state["transactionId"] == txn_id
            assert len(state["mutations"]) == 2
