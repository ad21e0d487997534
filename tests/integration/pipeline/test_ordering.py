"""ordering: key - a key's writes stay in order through retries; other keys are not held up."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.integration.harness import Fleet, eventually, header, produce, read_all, request
from tests.integration.targets.target_services import Webhook

pytestmark = [pytest.mark.kafka]


@pytest.fixture
async def hook() -> AsyncIterator[Webhook]:
    h = Webhook()
    await h.start()
    yield h
    await h.stop()


def ordered(hook: Webhook, strategy: str, *, attempts: int, delay_ms: int) -> dict[str, Any]:
    """An ``ordering: key`` namespace routed by ``payload.key``, delivering to ``hook``."""
    return {
        "name": "ordered",
        "ordering": "key",
        "shardConfig": {"strategy": strategy, "keyPath": "payload.key"},
        "retryPolicy": {
            "maxAttempts": attempts,
            "backoffStrategy": "constant",
            "initialDelayMs": delay_ms,
            "jitterMs": 0,
        },
        "targets": [
            {
                "identifier": "hook",
                "type": "http",
                "config": {"url": hook.url()},
                "circuit": {"threshold": 1000},
            }
        ],
    }


def successes(hook: Webhook, key: str) -> list[int]:
    """Payload sequence numbers of the key's requests the hook accepted, in arrival order."""
    return [r.body["n"] for r in hook.received if r.body and r.body["key"] == key and r.ok]


async def test_a_key_stays_in_order_through_failures_while_others_flow(
    fleet: Fleet, hook: Webhook
) -> None:
    remaining = {"A": 3}  # A's first write fails three times, then succeeds

    def fail_if(body: Any) -> int | None:
        if (
            isinstance(body, dict)
            and body.get("key") == "A"
            and body.get("n") == 1
            and remaining["A"]
        ):
            remaining["A"] -= 1
            return 503
        return None

    hook.fail_if = fail_if
    fleet.apply(ordered(hook, "hash", attempts=10, delay_ms=700))
    await fleet.worker().ready()
    pairs = [(key, n) for n in range(1, 6) for key in ("A", "B")]
    # The client keys its records: Kafka keeps a key's order within its ingest partition.
    await produce(
        fleet.topic("ingest"),
        [request("ordered", {"key": k, "n": n}, messageId=f"{k}-{n}") for k, n in pairs],
        keys=[k.encode() for k, _ in pairs],
    )

    async def done() -> bool:
        return len(successes(hook, "A")) == 5 and len(successes(hook, "B")) == 5

    await eventually(done, timeout=60, what="all writes of A and B")
    assert successes(hook, "A") == [1, 2, 3, 4, 5]
    assert successes(hook, "B") == [1, 2, 3, 4, 5]
    # B was not held up behind A: all of B landed before A's first write got through.
    first_a = next(i for i, r in enumerate(hook.received) if r.body["key"] == "A" and r.ok)
    last_b = max(i for i, r in enumerate(hook.received) if r.body["key"] == "B")
    assert last_b < first_a
    assert remaining["A"] == 0


KEYS = [f"k{i}" for i in range(12)]
PER_KEY = 40
DOOMED = ("k3", 5)  # fails every attempt: dead-lettered, and its key must go on after it


async def test_every_key_stays_in_order_through_a_sigkill_and_a_dead_lettered_head(
    fleet: Fleet, hook: Webhook
) -> None:
    def fail_if(body: Any) -> int | None:
        doomed = isinstance(body, dict) and (body.get("key"), body.get("n")) == DOOMED
        return 503 if doomed else None

    hook.fail_if = fail_if
    fleet.apply(ordered(hook, "custom", attempts=3, delay_ms=500))
    one, two = fleet.worker(), fleet.worker()
    await one.ready()
    await two.ready()

    async def send(numbers: range) -> None:
        pairs = [(key, n) for n in numbers for key in KEYS]
        await produce(
            fleet.topic("ingest"),
            [request("ordered", {"key": k, "n": n}, messageId=f"{k}-{n}") for k, n in pairs],
            keys=[k.encode() for k, _ in pairs],
        )

    for start in range(0, PER_KEY // 2, 4):  # spread over a few seconds
        await send(range(start, start + 4))
        await asyncio.sleep(0.5)
    one.kill9()  # mid-run: two takes over one's partitions (and their blocked keys)
    for start in range(PER_KEY // 2, PER_KEY, 4):
        await send(range(start, start + 4))
        await asyncio.sleep(0.5)

    expected = {(k, n) for k in KEYS for n in range(PER_KEY)} - {DOOMED}

    async def all_arrived() -> bool:
        arrived = {(r.body["key"], r.body["n"]) for r in hook.received if r.ok}
        return arrived >= expected

    await eventually(all_arrived, timeout=180, what="every write but the doomed one")
    dead = await eventually(lambda: _dead_letters(fleet), timeout=60, what="the dead letter")
    # (a dead letter is at least once: the SIGKILL may have come between it and its commit)
    assert {header(r, "wal-message-id") for r in dead} == {"k3-5"}
    assert {header(r, "wal-error-code") for r in dead} == {"RETRIES_EXHAUSTED"}

    partitions = {_partition_of(fleet, key) for key in KEYS}
    assert len(partitions) > 1, "the keys must spread over partitions"
    for key in KEYS:
        # A replay after the SIGKILL may send a write again: the order is that of first
        # arrivals, and it must be the order the key's writes were produced in.
        first: list[int] = []
        for r in hook.received:
            if r.ok and r.body["key"] == key and r.body["n"] not in first:
                first.append(r.body["n"])
        wanted = [n for n in range(PER_KEY) if (key, n) != DOOMED]
        assert first == wanted, f"{key}: {first}"
    # The doomed head held its key until it was dead-lettered: nothing after it went first.
    attempts = [r.at for r in hook.received if (r.body["key"], r.body["n"]) == DOOMED]
    after = min(r.at for r in hook.received if r.ok and r.body["key"] == "k3" and r.body["n"] > 5)
    assert len(attempts) >= 3 and after > max(attempts), (attempts, after)


async def _dead_letters(fleet: Fleet) -> list[Any] | None:
    records = await read_all(fleet.topic("dlq"))
    return records or None


def _partition_of(fleet: Fleet, key: str) -> int:
    from aiokafka.partitioner import murmur2

    return (murmur2(key.encode()) & 0x7FFFFFFF) % fleet.partitions
