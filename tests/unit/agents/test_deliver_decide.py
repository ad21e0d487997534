"""The fate of a write after its target's answer (``outcomes.decide``): pure policy."""

from __future__ import annotations

import orjson

from agents.deliver.items import Item
from agents.deliver.outcomes import Decision, Fate, decide
from app import names
from app.models import Namespace
from targets.base import DELIVERED, permanent, retryable

NOW = 1_800_000_000_000
ORDERS = Namespace.model_validate(
    {
        "name": "orders",
        "retryPolicy": {
            "maxAttempts": 3,
            "backoffStrategy": "constant",
            "initialDelayMs": 500,
            "jitterMs": 0,
        },
        "messageTtlSeconds": 60,
    }
)


def item(attempt: int = 1, received: int = NOW, **headers: str) -> Item:
    raw = orjson.dumps({"namespace": "orders", "payload": {}})
    base = {names.ATTEMPT: str(attempt), names.RECEIVED_AT: str(received), **headers}
    return Item(raw=raw, headers=base, key=b"k", source="d/0/1", namespace=ORDERS)


def test_delivered_is_delivered() -> None:
    assert decide(item(), DELIVERED, NOW) == Decision(Fate.DELIVERED)


def test_a_retryable_failure_waits_by_the_policy_until_its_attempts_are_spent() -> None:
    failed = retryable("TARGET_UNAVAILABLE", "down")
    again = decide(item(attempt=1), failed, NOW)
    assert (again.fate, again.code, again.wait_ms) == (Fate.RETRIED, "TARGET_UNAVAILABLE", 500)
    assert not again.fate.final
    spent = decide(item(attempt=3), failed, NOW)
    assert (spent.fate, spent.code) == (Fate.DEAD_LETTERED, "RETRIES_EXHAUSTED")


def test_a_retry_past_the_time_to_live_is_dead_lettered_as_expired() -> None:
    old = item(received=NOW - 59_800)  # 200 ms left, the wait is 500
    assert decide(old, retryable("TARGET_UNAVAILABLE", "down"), NOW).code == "MESSAGE_EXPIRED"


def test_a_permanent_failure_keeps_its_code_and_a_mutation_fails_to_its_transaction() -> None:
    refused = permanent("TARGET_REJECTED", "no such column")
    assert decide(item(), refused, NOW) == Decision(
        Fate.DEAD_LETTERED, "TARGET_REJECTED", "no such column"
    )
    mutation = item(**{names.TRANSACTION_ID: "txn_1"})
    assert decide(mutation, refused, NOW).fate is Fate.FAILED
