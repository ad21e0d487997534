"""ordering: key - a key's writes stay in order through retries; other keys are not held up."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.integration.harness import Fleet, eventually, produce, request
from tests.integration.targets.target_services import Webhook

pytestmark = [pytest.mark.kafka]


@pytest.fixture
async def hook() -> AsyncIterator[Webhook]:
    h = Webhook()
    await h.start()
    yield h
    await h.stop()


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
    fleet.apply(
        {
            "name": "ordered",
            "ordering": "key",
            "shardConfig": {"strategy": "hash", "keyPath": "payload.key"},
            "retryPolicy": {
                "maxAttempts": 10,
                "backoffStrategy": "constant",
                "initialDelayMs": 700,
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
    )
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
