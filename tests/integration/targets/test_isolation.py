"""One hung target does not hold up the other namespaces on the worker (issue 16, item 4).

A webhook that accepts requests and never answers gets 100 writes; meanwhile an
unrelated namespace writes a steady stream to PostgreSQL through the same worker
(same batches, same partitions). Its rows must land promptly - p99 ingest -> row
under a second - and once the webhook answers again every hung write arrives:
nothing lost, nothing applied twice.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from tests.integration.harness import Fleet, eventually, pg_query, produce, request
from tests.integration.targets.target_services import Webhook

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.slow]

HUNG = 100
CALM = 600  # 20 a second for 30 s
RATE = 20


def percentile(values: list[int], q: float) -> int:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def test_a_hung_webhook_does_not_delay_another_namespace(
    fleet: Fleet, webhook: Webhook
) -> None:
    table = f"calm_{uuid.uuid4().hex[:8]}"
    fleet.apply(
        {
            "name": "hooks",
            # generous: every hung write must come through once the webhook answers
            "retryPolicy": {
                "maxAttempts": 20,
                "backoffStrategy": "exponential",
                "initialDelayMs": 1000,
                "maxDelayMs": 5000,
                "jitterMs": 0,
            },
            "targets": [
                {
                    "identifier": "hook",
                    "type": "http",
                    "config": {"url": webhook.url(), "timeoutMs": 10_000},
                    "circuit": {"threshold": 3, "cooldownMs": 2000, "maxCooldownMs": 4000},
                }
            ],
        },
        {
            "name": "calm",
            "targets": [
                {
                    "identifier": "db",
                    "type": "sql",
                    "config": {"mode": "journal", "table": table},
                }
            ],
        },
    )
    await fleet.worker().ready()
    webhook.gate = asyncio.Event()  # accepted, never answered until set free

    hung = [request("hooks", {"n": i}, messageId=f"hook-{i}") for i in range(HUNG)]
    await produce(fleet.topic("ingest"), hung, keys=[f"k{i}".encode() for i in range(HUNG)])

    async def hanging() -> bool:
        return len(webhook.received) >= 16

    await eventually(hanging, timeout=30, what="hung calls")

    started = time.monotonic()
    for second in range(CALM // RATE):
        batch = [
            request("calm", {"n": n}, messageId=f"calm-{n}")
            for n in range(second * RATE, (second + 1) * RATE)
        ]
        await produce(fleet.topic("ingest"), batch, keys=[f"k{n}".encode() for n in range(RATE)])
        await asyncio.sleep(max(0.0, started + second + 1 - time.monotonic()))

    async def calm_rows() -> list[tuple[str, int]] | None:
        rows = pg_query(f'SELECT message_id, delivered_at_ms - received_at_ms FROM "{table}"')
        return rows if len(rows) >= CALM else None

    rows = await eventually(calm_rows, timeout=60, what=f"{CALM} calm rows")
    ids = [message_id for message_id, _ in rows]
    assert len(ids) == len(set(ids)) == CALM, "a calm write was lost or applied twice"
    waits = [int(ms) for _, ms in rows]
    p50, p99, worst = percentile(waits, 0.5), percentile(waits, 0.99), max(waits)
    print(
        f"calm ingest -> row with {HUNG} writes hung at a webhook: p50 {p50} ms, "
        f"p99 {p99} ms, max {worst} ms over {CALM} writes"
    )
    assert p99 < 1000, f"p99 {p99} ms (p50 {p50}, max {worst})"

    # The webhook answers again: every hung write arrives, each id answered once.
    webhook.gate.set()

    async def answered() -> set[str] | None:
        keys = {r.headers.get("Idempotency-Key", "") for r in webhook.received if r.ok}
        return keys if len(keys) >= HUNG else None

    keys = await eventually(answered, timeout=120, what=f"{HUNG} hook writes answered")
    assert keys == {f"hook-{i}" for i in range(HUNG)}
