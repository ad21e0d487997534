"""Retry policy arithmetic."""

from __future__ import annotations

import random

from app.backoff import delay_ms, effective, should_retry
from app.models import NamespaceRetryPolicy, RetryPolicy


def policy(**kw: object) -> NamespaceRetryPolicy:
    return NamespaceRetryPolicy.model_validate({"jitterMs": 0, **kw})


def test_strategies() -> None:
    exp = effective(policy(initialDelayMs=100, maxDelayMs=1000), None)
    assert [delay_ms(exp, n) for n in range(1, 6)] == [100, 200, 400, 800, 1000]
    lin = effective(policy(backoffStrategy="linear", initialDelayMs=100), None)
    assert [delay_ms(lin, n) for n in range(1, 4)] == [100, 200, 300]
    const = effective(policy(backoffStrategy="constant", initialDelayMs=250), None)
    assert [delay_ms(const, n) for n in range(1, 4)] == [250, 250, 250]
    custom = effective(policy(backoffStrategy="custom", customDelaysMs=[10, 500, 2000]), None)
    assert [delay_ms(custom, n) for n in range(1, 6)] == [10, 500, 2000, 2000, 2000]


def test_jitter_stays_within_its_bound_and_retry_after_wins() -> None:
    p = effective(policy(initialDelayMs=1000, jitterMs=200), None)
    rand = random.Random(7)
    waits = {delay_ms(p, 1, rand=rand) for _ in range(200)}
    assert min(waits) >= 1000 and max(waits) <= 1200 and len(waits) > 20
    assert delay_ms(effective(policy(initialDelayMs=100), None), 1, retry_after_s=3) == 3000


def test_request_overrides_namespace() -> None:
    p = effective(
        policy(maxAttempts=5, initialDelayMs=100), RetryPolicy(max_attempts=2, jitter_ms=0)
    )
    assert p.max_attempts == 2 and p.initial_ms == 100
    assert effective(policy(), RetryPolicy(max_attempts=0)).max_attempts == 1


def test_should_retry_counts_attempts_and_codes() -> None:
    p = effective(policy(maxAttempts=3), None)
    assert should_retry(p, 1, "TARGET_UNAVAILABLE") and should_retry(p, 2, "TARGET_ERROR")
    assert not should_retry(p, 3, "TARGET_UNAVAILABLE")
    assert not should_retry(p, 1, "TARGET_REJECTED")
