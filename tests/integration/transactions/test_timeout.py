"""A transaction whose mutation hangs is ended by its deadline alone, through a SIGKILL.

Nothing but the ``expire_transactions`` timer sends a ``timeout`` event: the hung
mutation never answers (a webhook that accepts and does not reply, with a call
deadline longer than the whole test's wait), so without the timer the
transaction would stay ``in_progress`` for as long as the webhook hangs.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest

from tests.integration.harness import Fleet, Worker, eventually, pg_query, produce
from tests.integration.targets.target_services import Webhook

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.slow]

TIMEOUT_S = 12


@pytest.fixture
async def hung_webhook() -> AsyncIterator[Webhook]:
    hook = Webhook()
    hook.gate = asyncio.Event()  # accepts, answers only once set free
    await hook.start()
    yield hook
    hook.gate.set()
    await hook.stop()


async def transaction(worker: Worker, txn_id: str) -> dict[str, Any] | None:
    async with httpx.AsyncClient(timeout=10) as client:
        r = await client.get(f"{worker.url}/wal/transactions/{txn_id}")
    return r.json() if r.status_code == 200 else None


async def test_the_timer_alone_ends_a_transaction_whose_mutation_hangs(
    fleet: Fleet, hung_webhook: Webhook
) -> None:
    table = f"ledger_{uuid.uuid4().hex[:8]}"
    pg_query(f'CREATE TABLE "{table}" (entry_id text NOT NULL, amount bigint NOT NULL)')
    fleet.apply(
        {
            "name": "bank",
            "transactionTimeoutSeconds": TIMEOUT_S,
            "retryPolicy": {
                "maxAttempts": 3,
                "backoffStrategy": "constant",
                "initialDelayMs": 500,
                "jitterMs": 0,
            },
            "targets": [
                {
                    "identifier": "ledger",
                    "type": "sql",
                    "config": {"mode": "rows", "table": table, "operation": "insert"},
                },
                {
                    "identifier": "notify",
                    "type": "http",
                    "config": {"url": hung_webhook.url(), "timeoutMs": 120_000},
                },
            ],
        }
    )
    # A call deadline well past the transaction's: only the timer can end it in time.
    env = {"WAL_TARGET_DEADLINE_S": "120"}
    worker = await fleet.worker(**env).ready()
    run = uuid.uuid4().hex[:6]
    request = {
        "namespace": "bank",
        "messageId": f"{run}-t1",
        "payload": {
            "transactions": [
                {
                    "operation": "insert",
                    "target": "ledger",
                    "data": {"entry_id": "debit", "amount": -10},
                    "compensation": {
                        "operation": "insert",
                        "data": {"entry_id": "debit-undo", "amount": 10},
                    },
                },
                {
                    "operation": "insert",
                    "target": "notify",
                    "data": {"event": "transfer"},
                    "compensation": {"operation": "insert", "data": {"event": "cancelled"}},
                },
            ]
        },
    }
    txn_id = f"txn_{run}-t1"
    started = time.monotonic()
    await produce(fleet.topic("ingest"), [orjson.dumps(request)], keys=[b"t1"])

    async def debit_done() -> bool:
        state = await transaction(worker, txn_id)
        return bool(state and state["mutations"][0]["status"] == "completed")

    await eventually(debit_done, timeout=60, what="the debit mutation completed")
    assert hung_webhook.received, "the notify mutation never reached the webhook"

    # The owner of the transaction dies before the deadline; a new one recovers the table.
    worker.kill9()
    assert time.monotonic() - started < TIMEOUT_S, "too slow to kill before the deadline"
    worker = await fleet.worker(**env).ready()

    async def compensating() -> dict[str, Any] | None:
        state = await transaction(worker, txn_id)
        return state if state and state["status"] != "in_progress" else None

    state = await eventually(compensating, timeout=60, what="the transaction timed out")
    print(
        f"transaction left in_progress {time.monotonic() - started:.1f} s after it began "
        f"(timeout {TIMEOUT_S} s, one SIGKILL)"
    )
    assert state["status"] in ("compensating", "compensated"), state
    assert state["error"] == "transaction timed out", state
    # The notify mutation is still hanging (well inside its 120 s timeout and deadline).
    assert not any(r.ok for r in hung_webhook.received)

    # The webhook answers: the late mutation completes, and it is undone too.
    assert hung_webhook.gate is not None
    hung_webhook.gate.set()

    async def ended() -> dict[str, Any] | None:
        state = await transaction(worker, txn_id)
        return state if state and state["status"] in ("compensated", "failed") else None

    state = await eventually(ended, timeout=120, what="the transaction ended")
    assert state["status"] == "compensated", state
    assert state["error"] == "transaction timed out", state
    rows = pg_query(f'SELECT entry_id, amount FROM "{table}" ORDER BY entry_id')
    assert rows == [("debit", -10), ("debit-undo", 10)], rows
    # at least once at an HTTP target (the dead worker's request was answered too)
    delivered = {r.headers.get("Idempotency-Key", "") for r in hung_webhook.received if r.ok}
    assert delivered == {f"{txn_id}:1", f"{txn_id}:1:undo"}, delivered
