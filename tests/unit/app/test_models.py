"""The wire models' limits and aliases (reference section 5 and 6.1)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from app.models import Namespace, WriteRequest


def test_camel_and_snake_case_are_both_accepted() -> None:
    a = WriteRequest.model_validate(
        {
            "namespace": " Orders ",
            "payload": {},
            "messageId": "m1",
            "lifecycle": {"delayUnit": "minutes", "delay": 2, "enableDLQ": False},
        }
    )
    b = WriteRequest.model_validate(
        {
            "namespace": "orders",
            "payload": {},
            "message_id": "m1",
            "lifecycle": {"delay_unit": "minutes", "delay": 2, "enable_dlq": False},
        }
    )
    assert a == b and a.namespace == "orders" and a.lifecycle.delay_seconds == 120


@pytest.mark.parametrize(
    "lifecycle",
    [
        {"delay": 86_401},
        {"delay": 8, "delayUnit": "days"},
        {"ttl": 59},
        {"ttl": 604_801},
        {"delay": 120, "ttl": 60},
        {"retryPolicy": {"maxAttempts": 11}},
        {"retryPolicy": {"initialDelayMs": 99}},
        {"retryPolicy": {"jitterMs": 5001}},
        {"delayUnit": "weeks", "delay": 1},
    ],
)
def test_lifecycle_limits(lifecycle: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        WriteRequest.model_validate({"namespace": "n", "payload": {}, "lifecycle": lifecycle})


def test_transactions_need_two_mutations() -> None:
    one = WriteRequest.model_validate(
        {"namespace": "n", "payload": {"transactions": [{"operation": "update", "target": "pg"}]}}
    )
    two = WriteRequest.model_validate(
        {
            "namespace": "n",
            "payload": {
                "transactions": [
                    {"operation": "update", "target": "pg"},
                    {"operation": "insert", "target": "pg"},
                ]
            },
        }
    )
    assert one.mutations is None
    assert two.mutations is not None and len(two.mutations) == 2


def test_namespace_defaults_and_target_kinds() -> None:
    ns = Namespace.model_validate(
        {
            "name": "n",
            "targets": [
                {"identifier": "db", "type": "database"},
                {"identifier": "hook", "type": "webhook"},
            ],
        }
    )
    assert [t.type for t in ns.targets] == ["sql", "http"]
    assert ns.max_message_size == 1024 * 1024 and ns.message_ttl_seconds == 86_400
    with pytest.raises(ValidationError, match="duplicate"):
        Namespace.model_validate({"name": "n", "targets": [{"identifier": "a", "type": "sql"}] * 2})
    with pytest.raises(ValidationError, match="keyPath"):
        Namespace.model_validate({"name": "n", "shardConfig": {"strategy": "custom"}})
