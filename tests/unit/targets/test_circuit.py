"""The circuit breaker's state machine, on a fake clock."""

from __future__ import annotations

from collections.abc import Sequence

from app.settings import Settings
from targets.base import DELIVERED, Outcome, Target, Write, permanent, retryable
from targets.circuit import BREAKERS, CircuitBreaker, guard

DOWN = [retryable("TARGET_UNAVAILABLE", "connection refused")]
UP = [DELIVERED]


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def breaker(clock: Clock, **options: float) -> CircuitBreaker:
    return CircuitBreaker(clock=clock, **options)  # type: ignore[arg-type]


def test_opens_after_threshold_consecutive_failures() -> None:
    clock = Clock()
    cb = breaker(clock, threshold=3)
    for _ in range(2):
        assert cb.allow()
        cb.record(DOWN)
    assert cb.state == "closed"
    cb.record(DOWN)
    assert cb.state == "open"
    assert not cb.allow()
    assert cb.snapshot() == {
        "state": "open",
        "consecutive_failures": 3,
        "opened_at": 1_000.0,
        "next_probe_at": 1_030.0,
        "cooldown_s": 30.0,
    }


def test_a_success_resets_the_count() -> None:
    cb = breaker(Clock(), threshold=3)
    cb.record(DOWN)
    cb.record(DOWN)
    cb.record(UP)
    cb.record(DOWN)
    cb.record(DOWN)
    assert cb.state == "closed"
    assert cb.snapshot()["consecutive_failures"] == 2


def test_partial_and_permanent_batches_count_as_the_target_being_up() -> None:
    cb = breaker(Clock(), threshold=1)
    cb.record([DELIVERED, DOWN[0]])
    cb.record([permanent("TARGET_REJECTED", "bad row")])
    cb.record([])
    assert cb.state == "closed"
    cb.record(DOWN * 2)
    assert cb.state == "open"


def test_a_throttling_target_is_up_its_pace_deals_with_it() -> None:
    cb = breaker(Clock(), threshold=1)
    cb.record([retryable("TARGET_THROTTLED", "HTTP 429", 1.0)] * 3)
    assert cb.state == "closed"
    cb.record([retryable("TARGET_THROTTLED", "HTTP 429"), DOWN[0]])
    assert cb.state == "closed"


def test_half_open_allows_one_probe_and_closes_on_success() -> None:
    clock = Clock()
    cb = breaker(clock, threshold=1, cooldown=30)
    cb.record(DOWN)
    clock.now += 29.9
    assert not cb.allow()
    clock.now += 0.1
    assert cb.state == "half_open"
    assert cb.allow()
    assert not cb.allow()  # the probe is in flight
    cb.record(UP)
    assert cb.state == "closed"
    assert cb.allow() and cb.allow()
    assert cb.snapshot()["opened_at"] is None


def test_failed_probes_double_the_cooldown_up_to_the_cap() -> None:
    clock = Clock()
    cb = breaker(clock, threshold=1, cooldown=30, max_cooldown=100)
    cb.record(DOWN)
    waits = []
    for _ in range(4):
        waits.append(cb.retry_in())
        clock.now += cb.retry_in()
        assert cb.allow()
        cb.record(DOWN)
        assert cb.state == "open"
    assert waits == [30, 60, 100, 100]
    clock.now += 100
    assert cb.allow()
    cb.record(UP)
    cb.record(DOWN)  # closed again, with the base cooldown: one failure of threshold 1 opens
    assert cb.retry_in() == 30


def test_a_probe_that_never_reports_stops_blocking_after_a_cooldown() -> None:
    clock = Clock()
    cb = breaker(clock, threshold=1, cooldown=10)
    cb.record(DOWN)
    clock.now += 10
    assert cb.allow()
    clock.now += 9
    assert not cb.allow()
    clock.now += 1
    assert cb.allow()


class Recording(Target):
    kind = "recording"

    def __init__(self, outcomes: list[Outcome]) -> None:
        super().__init__("db", {}, Settings())
        self.outcomes = outcomes
        self.calls = 0
        self.closed = False

    async def deliver(self, batch: Sequence[Write]) -> list[Outcome]:
        self.calls += 1
        return [self.outcomes[0]] * len(batch)

    async def close(self) -> None:
        self.closed = True


async def test_guarded_target_answers_circuit_open_without_calling() -> None:
    clock = Clock()
    inner = Recording(DOWN)
    guarded = guard("orders", inner, threshold=2, cooldown=5, clock=clock)
    assert BREAKERS["orders/db"] is guarded.breaker
    batch = [Write(id=str(i), namespace="orders", payload={}) for i in range(3)]
    for _ in range(2):
        assert [o.code for o in await guarded.deliver(batch)] == ["TARGET_UNAVAILABLE"] * 3
    assert inner.calls == 2
    outcomes = await guarded.deliver(batch)
    assert inner.calls == 2
    assert {(o.status, o.message, o.retry_after) for o in outcomes} == {
        ("retryable", "circuit open", 5.0)
    }
    inner.outcomes = UP
    clock.now += 5
    assert await guarded.deliver(batch) == [DELIVERED] * 3
    assert guarded.breaker.state == "closed"
    await guarded.close()
    assert inner.closed and "orders/db" not in BREAKERS


async def test_closing_a_replaced_target_keeps_its_successors_breaker() -> None:
    old = guard("orders", Recording(UP))
    new = guard("orders", Recording(UP))
    await old.close()
    assert BREAKERS["orders/db"] is new.breaker
    await new.close()
