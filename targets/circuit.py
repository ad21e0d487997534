"""Circuit breaker: stop calling a target that keeps failing; probe it until it answers.

States::

    closed ──(threshold consecutive failed calls)──► open
    open ──(cooldown passed)──► half_open: one real call is let through (a *trial*)
    half_open ──trial succeeds──► closed          (cooldown back to its base)
    half_open ──trial fails──► open               (cooldown doubled, up to max_cooldown)
    open, half_open ──a probe finds it up──► closed, on probation

A *call* is one ``deliver()`` of a batch. It *fails* when nothing in it was
delivered and at least one item came back retryable: the target could not do
any work. A call with a delivered item, or only permanent outcomes (the target
answered, it just refused the data), is a success - the target is up.

Probes
    While the circuit is not closed, a target that can probe
    (:meth:`~targets.base.Target.probe`: SQL, Redis, HTTP with a ``probe`` in its
    config) is asked every ``probe_interval`` seconds (``WAL_CIRCUIT_PROBE_MS``);
    a failed probe doubles the wait, up to twice the interval. A target that
    comes back is written to again within about two intervals, not after a
    cooldown that doubled while it was down. The circuit a probe closes is *on
    probation*: one failed call opens it again (not ``threshold``), and the
    probes then wait twice as long as before, up to ``max_cooldown`` - a target
    that answers probes but fails real writes is not hammered. A call that
    succeeds ends the probation and resets every wait.

The cooldown keeps its two jobs: a target without a probe gets its trial call
when the cooldown ends, and writes an open circuit turns away are told to come
back then (``retry_after``), so they spend their retry attempts no faster than
before probes existed.

Times come from an injectable ``clock`` (wall-clock seconds by default, so
:meth:`CircuitBreaker.snapshot` can show them as epoch times).

:class:`GuardedTarget` wraps a target with a breaker: while the circuit is open
it answers a whole batch with retryable ``TARGET_UNAVAILABLE`` "circuit open"
outcomes, without calling the target, and runs the probes in a task of its own
(started when the circuit opens, ended when it closes or the target is closed).
:func:`guard` builds one and registers its breaker in :data:`BREAKERS` under
``"<namespace>/<target>"`` for status views.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

from targets.base import Outcome, Target, Write, retryable

State = Literal["closed", "open", "half_open"]

log = logging.getLogger("wal.circuit")

#: Live breakers by ``"<namespace>/<target>"``, for status views.
BREAKERS: dict[str, CircuitBreaker] = {}


class CircuitBreaker:
    def __init__(
        self,
        threshold: int = 5,
        cooldown: float = 30.0,
        max_cooldown: float = 300.0,
        clock: Callable[[], float] = time.time,
        probe_interval: float = 2.0,
    ) -> None:
        if threshold < 1 or cooldown <= 0 or max_cooldown < cooldown or probe_interval <= 0:
            raise ValueError("threshold >= 1, 0 < cooldown <= max_cooldown, probe_interval > 0")
        self.threshold = threshold
        self.base_cooldown = cooldown
        self.max_cooldown = max_cooldown
        self.clock = clock
        self.cooldown = cooldown
        self.failures = 0
        self.opened_at: float | None = None
        #: When the next trial call may go (None: closed).
        self.next_probe_at: float | None = None
        self._probe_started_at: float | None = None
        self.probe_interval = probe_interval
        self.probe_wait = probe_interval
        #: When the next probe is due (None: closed).
        self.next_check_at: float | None = None
        #: Set once the target has answered a probe call: its snapshot shows the probes.
        self.probing = False
        self._probation = False
        #: Called each time the circuit opens, whoever recorded the failure (the guard's probes).
        self.on_open: Callable[[], None] | None = None

    @property
    def state(self) -> State:
        if self.next_probe_at is None:
            return "closed"
        if self._probe_started_at is not None or self.clock() >= self.next_probe_at:
            return "half_open"
        return "open"

    def allow(self) -> bool:
        """May a call go to the target now? In half-open, only one trial at a time.

        A trial that never reports back (its caller was cancelled) stops
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
        """Seconds until the next trial call may go (0 when calls are allowed)."""
        if self.next_probe_at is None:
            return 0.0
        return max(0.0, self.next_probe_at - self.clock())

    def check_in(self) -> float | None:
        """Seconds until the next probe is due (0: now); None while the circuit is closed."""
        if self.next_check_at is None:
            return None
        return max(0.0, self.next_check_at - self.clock())

    def record(self, outcomes: Sequence[Outcome]) -> None:
        """Fold in the outcomes of one call."""
        if not outcomes:
            return
        # A throttled answer is an answer: the target is up, it asks for a slower pace
        # (agents/deliver/pace.py), and that is not what the breaker is for.
        answered = any(o.ok or o.code == "TARGET_THROTTLED" for o in outcomes)
        failed = not answered and any(o.status == "retryable" for o in outcomes)
        if not failed:
            self._close()
            return
        self.failures += 1
        if self._probe_started_at is not None:  # the trial failed: back off further
            self.cooldown = min(self.cooldown * 2, self.max_cooldown)
            self._open()
        elif self.next_probe_at is None and self.failures >= self.threshold:
            if self._probation:  # a probe said up, a real call says not: probe less often
                self.probe_wait = min(self.probe_wait * 2, max(self.max_cooldown, self.probe_wait))
            self._open()

    def probed(self, outcome: Outcome) -> None:
        """Fold in a probe's outcome: up closes the circuit on probation, down waits longer."""
        self.probing = True
        if self.next_check_at is None:  # closed meanwhile, by a trial call
            return
        if outcome.status != "retryable":
            self.failures = self.threshold - 1  # on probation: one failed call reopens
            self._probation = True
            self.opened_at = self.next_probe_at = self._probe_started_at = None
            self.next_check_at = None
            return
        self.probe_wait = max(self.probe_wait, min(self.probe_wait * 2, 2 * self.probe_interval))
        self.next_check_at = self.clock() + self.probe_wait

    def snapshot(self) -> dict[str, Any]:
        """The breaker's state for status views (times in the clock's seconds).

        ``next_probe_at`` is when the target is next tried: by a probe when it
        has them (then ``probe_wait_s`` shows their spacing), else by a trial call.
        """
        snapshot = {
            "state": self.state,
            "consecutive_failures": self.failures,
            "opened_at": self.opened_at,
            "next_probe_at": self.next_probe_at,
            "cooldown_s": self.cooldown,
        }
        if self.probing:
            if self.next_check_at is not None and self.next_probe_at is not None:
                snapshot["next_probe_at"] = min(self.next_check_at, self.next_probe_at)
            snapshot["probe_wait_s"] = self.probe_wait
        return snapshot

    def _open(self) -> None:
        now = self.clock()
        self.opened_at = now
        self.next_probe_at = now + self.cooldown
        self._probe_started_at = None
        self.next_check_at = now + self.probe_wait
        self._probation = False
        if self.on_open is not None:
            self.on_open()

    def _close(self) -> None:
        self.failures = 0
        self.cooldown = self.base_cooldown
        self.probe_wait = self.probe_interval
        self._probation = False
        self.opened_at = self.next_probe_at = self._probe_started_at = self.next_check_at = None


class GuardedTarget(Target):
    """A target behind a :class:`CircuitBreaker`; otherwise it is the target itself."""

    kind = "guarded"

    def __init__(self, key: str, inner: Target, breaker: CircuitBreaker) -> None:
        # Not Target.__init__: the inner target already resolved its config.
        self.name, self.config, self.settings = inner.name, inner.config, inner.settings
        self.key = key
        self.inner = inner
        self.breaker = breaker
        self._prober: asyncio.Task[None] | None = None
        self._can_probe = True  # until the target says it has no probe
        self._closed = False
        breaker.on_open = self._start_probing

    async def open(self) -> None:
        await self.inner.open()

    async def warm(self) -> None:  # not a delivery: the breaker does not count it
        await self.inner.warm()

    async def deliver(self, batch: Sequence[Write]) -> list[Outcome]:
        if not batch:
            return []
        if not self.breaker.allow():
            self._start_probing()  # normally running already: started when the circuit opened
            wait = self.breaker.retry_in()
            return [retryable("TARGET_UNAVAILABLE", "circuit open", wait or None)] * len(batch)
        outcomes = await self.inner.deliver(batch)
        self.breaker.record(outcomes)
        return outcomes

    async def probe(self) -> Outcome | None:
        return await self.inner.probe()

    async def close(self) -> None:
        self._closed = True
        prober = self._prober
        if prober is not None:
            prober.cancel()
            await asyncio.wait([prober])  # not `await prober`: our own cancellation must pass
        if BREAKERS.get(self.key) is self.breaker:
            del BREAKERS[self.key]
        await self.inner.close()

    def _start_probing(self) -> None:
        """Start the probe task, unless it runs, the target has no probe, or it is closed."""
        if self._prober is not None or not self._can_probe or self._closed:
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # opened outside a loop (a test): the next turned-away call starts it
            return
        self._prober = asyncio.create_task(self._probe_until_closed(), name=f"probe {self.key}")

    async def _probe_until_closed(self) -> None:
        """Probe the target on the breaker's schedule until its circuit closes."""
        try:
            while (wait := self.breaker.check_in()) is not None:
                if wait > 0:
                    await asyncio.sleep(wait)
                    continue
                outcome = await self._probe_once()
                if outcome is None:  # no probe: the trial calls decide, as before
                    self._can_probe = False
                    return
                self.breaker.probed(outcome)
                if outcome.status == "retryable":
                    log.debug("target %s: probe failed: %s", self.key, outcome.message)
                else:
                    log.info("target %s answers again: circuit closed", self.key)
        finally:
            self._prober = None

    async def _probe_once(self) -> Outcome | None:
        try:
            return await self.inner.probe()
        except Exception as exc:  # probes never raise; one that does must not end the loop
            return retryable("TARGET_ERROR", f"probe raised {type(exc).__name__}")

    def __repr__(self) -> str:
        return f"<GuardedTarget {self.key} {self.breaker.state}>"


def guard(namespace: str, target: Target, **breaker_options: Any) -> GuardedTarget:
    """Wrap ``target`` in a fresh breaker, registered in :data:`BREAKERS`.

    Probes are spaced by ``WAL_CIRCUIT_PROBE_MS`` unless ``probe_interval`` is given.
    """
    key = f"{namespace}/{target.name}"
    breaker_options.setdefault("probe_interval", target.settings.circuit_probe_ms / 1000)
    breaker = BREAKERS[key] = CircuitBreaker(**breaker_options)
    return GuardedTarget(key, target, breaker)
