"""Circuit breaker: stop calling a target that keeps failing, probe it now and then.

States::

    closed ──(threshold consecutive failed calls)──► open
    open ──(cooldown passed)──► half_open: one probe call is let through
    half_open ──probe succeeds──► closed       (cooldown back to its base)
    half_open ──probe fails──► open            (cooldown doubled, up to max_cooldown)

A *call* is one ``deliver()`` of a batch. It *fails* when nothing in it was
delivered and at least one item came back retryable: the target could not do
any work. A call with a delivered item, or only permanent outcomes (the target
answered, it just refused the data), is a success - the target is up.

Times come from an injectable ``clock`` (wall-clock seconds by default, so
:meth:`CircuitBreaker.snapshot` can show them as epoch times).

:class:`GuardedTarget` wraps a target with a breaker: while the circuit is open
it answers a whole batch with retryable ``TARGET_UNAVAILABLE`` "circuit open"
outcomes, without calling the target. :func:`guard` builds one and registers its
breaker in :data:`BREAKERS` under ``"<namespace>/<target>"`` for status views.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

from targets.base import Outcome, Target, Write, retryable

State = Literal["closed", "open", "half_open"]

#: Live breakers by ``"<namespace>/<target>"``, for status views.
BREAKERS: dict[str, CircuitBreaker] = {}


class CircuitBreaker:
    def __init__(
        self,
        threshold: int = 5,
        cooldown: float = 30.0,
        max_cooldown: float = 300.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if threshold < 1 or cooldown <= 0 or max_cooldown < cooldown:
            raise ValueError("threshold >= 1 and 0 < cooldown <= max_cooldown")
        self.threshold = threshold
        self.base_cooldown = cooldown
        self.max_cooldown = max_cooldown
        self.clock = clock
        self.cooldown = cooldown
        self.failures = 0
        self.opened_at: float | None = None
        self.next_probe_at: float | None = None
        self._probe_started_at: float | None = None

    @property
    def state(self) -> State:
        if self.next_probe_at is None:
            return "closed"
        if self._probe_started_at is not None or self.clock() >= self.next_probe_at:
            return "half_open"
        return "open"

    def allow(self) -> bool:
        """May a call go to the target now? In half-open, only one probe at a time.

        A probe that never reports back (its caller was cancelled) stops
        blocking once a cooldown has passed since it started.
        """
        state = self.state
        if state == "closed":
            return True
        if state == "open":
            return False
        now = self.clock()
        if self._probe_started_at is not None and now - self._probe_started_at < self.cooldown:
            return False
        self._probe_started_at = now
        return True

    def retry_in(self) -> float:
        """Seconds until the next probe may go (0 when calls are allowed)."""
        if self.next_probe_at is None:
            return 0.0
        return max(0.0, self.next_probe_at - self.clock())

    def record(self, outcomes: Sequence[Outcome]) -> None:
        """Fold in the outcomes of one call."""
        if not outcomes:
            return
        failed = not any(o.ok for o in outcomes) and any(o.status == "retryable" for o in outcomes)
        if not failed:
            self._close()
            return
        self.failures += 1
        if self._probe_started_at is not None:  # the probe failed: back off further
            self.cooldown = min(self.cooldown * 2, self.max_cooldown)
            self._open()
        elif self.next_probe_at is None and self.failures >= self.threshold:
            self._open()

    def snapshot(self) -> dict[str, Any]:
        """The breaker's state for status views (times in the clock's seconds)."""
        return {
            "state": self.state,
            "consecutive_failures": self.failures,
            "opened_at": self.opened_at,
            "next_probe_at": self.next_probe_at,
            "cooldown_s": self.cooldown,
        }

    def _open(self) -> None:
        now = self.clock()
        self.opened_at = now
        self.next_probe_at = now + self.cooldown
        self._probe_started_at = None

    def _close(self) -> None:
        self.failures = 0
        self.cooldown = self.base_cooldown
        self.opened_at = self.next_probe_at = self._probe_started_at = None


class GuardedTarget(Target):
    """A target behind a :class:`CircuitBreaker`; otherwise it is the target itself."""

    kind = "guarded"

    def __init__(self, key: str, inner: Target, breaker: CircuitBreaker) -> None:
        # Not Target.__init__: the inner target already resolved its config.
        self.name, self.config, self.settings = inner.name, inner.config, inner.settings
        self.key = key
        self.inner = inner
        self.breaker = breaker

    async def open(self) -> None:
        await self.inner.open()

    async def warm(self) -> None:  # not a delivery: the breaker does not count it
        await self.inner.warm()

    async def deliver(self, batch: Sequence[Write]) -> list[Outcome]:
        if not batch:
            return []
        if not self.breaker.allow():
            wait = self.breaker.retry_in()
            return [retryable("TARGET_UNAVAILABLE", "circuit open", wait or None)] * len(batch)
        outcomes = await self.inner.deliver(batch)
        self.breaker.record(outcomes)
        return outcomes

    async def close(self) -> None:
        if BREAKERS.get(self.key) is self.breaker:
            del BREAKERS[self.key]
        await self.inner.close()

    def __repr__(self) -> str:
        return f"<GuardedTarget {self.key} {self.breaker.state}>"


def guard(namespace: str, target: Target, **breaker_options: Any) -> GuardedTarget:
    """Wrap ``target`` in a fresh breaker, registered in :data:`BREAKERS`."""
    key = f"{namespace}/{target.name}"
    breaker = BREAKERS[key] = CircuitBreaker(**breaker_options)
    return GuardedTarget(key, target, breaker)
