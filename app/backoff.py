"""Retry policy arithmetic: when to try a failed delivery again, and whether to.

A namespace's ``retryPolicy`` is the default; a request's
``lifecycle.retryPolicy`` overrides any of its fields. ``maxAttempts`` counts
every attempt, the first included (a request's ``0`` means "no retries").
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from app.models import BackoffStrategy, NamespaceRetryPolicy, RetryPolicy


@dataclass(frozen=True, slots=True)
class Policy:
    max_attempts: int
    strategy: BackoffStrategy
    initial_ms: int
    max_ms: int
    jitter_ms: int
    custom_ms: tuple[int, ...]
    retryable_codes: frozenset[str]


def effective(namespace: NamespaceRetryPolicy, override: RetryPolicy | None) -> Policy:
    """The namespace's policy with the request's overrides applied."""
    o = override or RetryPolicy()
    ns = namespace
    return Policy(
        max_attempts=max(1, ns.max_attempts if o.max_attempts is None else o.max_attempts),
        strategy=o.backoff_strategy or ns.backoff_strategy,
        initial_ms=ns.initial_delay_ms if o.initial_delay_ms is None else o.initial_delay_ms,
        max_ms=ns.max_delay_ms if o.max_delay_ms is None else o.max_delay_ms,
        jitter_ms=ns.jitter_ms if o.jitter_ms is None else o.jitter_ms,
        custom_ms=tuple(o.custom_delays_ms or ns.custom_delays_ms),
        retryable_codes=frozenset(o.retryable_error_codes or ns.retryable_error_codes),
    )


def delay_ms(
    policy: Policy,
    failures: int,
    *,
    retry_after_s: float | None = None,
    rand: random.Random | None = None,
) -> int:
    """How long to wait after the ``failures``-th failed attempt (1 = the first try failed)."""
    n = max(1, failures)
    if policy.strategy is BackoffStrategy.EXPONENTIAL:
        base = policy.initial_ms * 2 ** (n - 1)
    elif policy.strategy is BackoffStrategy.LINEAR:
        base = policy.initial_ms * n
    elif policy.strategy is BackoffStrategy.CUSTOM and policy.custom_ms:
        base = policy.custom_ms[min(n, len(policy.custom_ms)) - 1]
    else:
        base = policy.initial_ms
    jitter = (rand or random).randint(0, policy.jitter_ms) if policy.jitter_ms else 0
    wait = min(base, policy.max_ms) + jitter
    if retry_after_s:
        wait = max(wait, int(retry_after_s * 1000))
    return wait


def should_retry(policy: Policy, attempt: int, code: str | None) -> bool:
    """May attempt number ``attempt`` (which just failed with ``code``) be followed by another?"""
    return attempt < policy.max_attempts and (code or "") in policy.retryable_codes
