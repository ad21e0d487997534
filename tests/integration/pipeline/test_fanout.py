"""Through the fleet: fan-out to independent targets, and retries spaced by the backoff."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import httpx
import pytest

from app import names
from tests.integration.harness import (
    Fleet,
    eventually,
    header,
    messages_total,
    produce,
    read_all,
    request,
)
from tests.integration.targets.target_services import Webhook

pytestmark = [pytest.mark.kafka]


@pytest.fixture
async def hooks() -> AsyncIterator[tuple[Webhook, Webhook]]:
    good, flaky = Webhook(), Webhook()
    await good.start()
    await flaky.start()
    yield good, flaky
    await good.stop()
    await flaky.stop()


async def test_retries_are_spaced_by_the_backoff_and_never_repeat_other_targets(
    fleet: Fleet, hooks: tuple[Webhook, Webhook]
) -> None:
    good, flaky = hooks
    fleet.apply(
        {
            "name": "hooks",
            "retryPolicy": {
                "maxAttempts": 5,
                "backoffStrategy": "exponential",
                "initialDelayMs": 500,
                "maxDelayMs": 10_000,
                "jitterMs": 100,
            },
            "targets": [
                {"identifier": "good", "type": "http", "config": {"url": good.url()}},
                {"identifier": "flaky", "type": "http", "config": {"url": flaky.url()}},
            ],
        }
    )
    flaky.fail(3, 503)
    await fleet.worker().ready()
    await produce(fleet.topic("ingest"), [request("hooks", {"n": 1}, messageId="fan-1")])

    async def four_attempts() -> bool:
        return len(flaky.received) >= 4

    await eventually(four_attempts, timeout=60, what="four attempts at the flaky target")
    assert flaky.keys() == ["fan-1"] * 4
    gaps_ms = [
        round((b.at - a.at) * 1000)
        for a, b in zip(flaky.received, flaky.received[1:], strict=False)
    ]
    # Exponential from 500 ms: each retry is scheduled 500, 1000, 2000 ms after its failure,
    # plus up to 100 ms of jitter (the retry records say so), and none comes sooner. How
    # late a due write may be is the delay promise, tested in test_delay*.py.
    scheduled = {}
    for record in await read_all(fleet.topic("delay-1s")):
        attempt = int(header(record, names.ATTEMPT) or 0)
        due, failed = header(record, names.DUE_AT), header(record, names.LAST_FAILED_AT)
        if due and failed:
            scheduled.setdefault(attempt, int(due) - int(failed))
    assert sorted(scheduled) == [2, 3, 4], scheduled
    for attempt, base in zip([2, 3, 4], [500, 1000, 2000], strict=True):
        assert base <= scheduled[attempt] <= base + 100, scheduled
    for gap, base in zip(gaps_ms, [500, 1000, 2000], strict=True):
        assert gap >= base, gaps_ms
    assert good.keys() == ["fan-1"], "a retry of one target re-delivered to another"


async def test_a_failing_target_opens_its_circuit_and_closes_when_it_recovers(
    fleet: Fleet, hooks: tuple[Webhook, Webhook]
) -> None:

    hook, _ = hooks
    fleet.apply(
        {
            "name": "breaker",
            "retryPolicy": {
                "maxAttempts": 20,
                "backoffStrategy": "constant",
                "initialDelayMs": 200,
                "jitterMs": 0,
            },
            "targets": [
                {
                    "identifier": "hook",
                    "type": "http",
                    "config": {"url": hook.url()},
                    "circuit": {"threshold": 3, "cooldownMs": 1500, "maxCooldownMs": 1500},
                }
            ],
        }
    )
    hook.fail(1000, 503)
    worker = await fleet.worker().ready()
    await produce(
        fleet.topic("ingest"), [request("breaker", {"n": i}, messageId=f"b-{i}") for i in range(5)]
    )

    async def circuit() -> str:
        async with httpx.AsyncClient() as client:
            status = (await client.get(f"{worker.url}/wal/namespaces/breaker/status")).json()
        return str(status.get("circuits", {}).get("hook", {}).get("state", ""))

    await eventually(lambda: _is(circuit, "open"), timeout=30, what="circuit open")
    # Open: retries (every 200 ms for 5 messages) no longer reach the target; at most
    # one trial batch (up to 5 writes) may, per 1.5 s cooldown. Wait for 20 retries.
    calls_when_open = len(hook.received)
    retried_when_open = await messages_total(worker.url, "retried")
    opened_at = time.monotonic()

    async def retried_20() -> bool:
        return await messages_total(worker.url, "retried") >= retried_when_open + 20

    await eventually(retried_20, timeout=30, what="20 retries")
    trials = 1 + int((time.monotonic() - opened_at) / 1.5)
    reached = len(hook.received) - calls_when_open
    assert reached <= 5 * trials, f"{reached} calls reached an open circuit's target"
    recovered_at = time.time()
    hook.failures.clear()  # the target recovers

    async def delivered() -> bool:
        keys = {r.headers.get("Idempotency-Key") for r in hook.received if r.at >= recovered_at}
        return keys == {f"b-{i}" for i in range(5)}

    await eventually(delivered, timeout=60, what="all five delivered")
    await eventually(lambda: _is(circuit, "closed"), timeout=10, what="circuit closed")


async def _is(check: object, value: str) -> bool:
    return await check() == value  # type: ignore[operator]
