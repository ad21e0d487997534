"""The one token bucket: refusing (API requests) and owing (a paced replay)."""

from __future__ import annotations

import asyncio

import pytest

from app.rates import TokenBucket
from tests.unit.web.test_access import Clock


def test_take_refuses_when_empty_and_says_when_a_token_is_there() -> None:
    clock = Clock(100.0)
    bucket = TokenBucket(rate=2, capacity=2, clock=clock)
    assert [bucket.take(), bucket.take()] == [0, 0]
    assert bucket.take() == pytest.approx(0.5)
    assert bucket.take() == pytest.approx(0.5)  # refused: nothing was taken
    clock.now += 0.5
    assert bucket.take() == 0


def test_paces_to_the_rate_after_its_capacity() -> None:
    clock = Clock(100.0)
    bucket = TokenBucket(rate=20, capacity=1, clock=clock)
    assert bucket.owe() == 0  # starts full
    waits = []
    for _ in range(39):
        wait = bucket.owe()
        waits.append(wait)
        clock.now += wait  # the caller sleeps as told
    assert waits == pytest.approx([0.05] * 39)
    assert clock.now - 100.0 == pytest.approx(39 / 20)


def test_refills_while_idle_but_not_beyond_capacity() -> None:
    clock = Clock(100.0)
    bucket = TokenBucket(rate=10, capacity=3, clock=clock)
    assert [bucket.owe() for _ in range(3)] == [0, 0, 0]
    assert bucket.owe() == pytest.approx(0.1)
    clock.now += 60  # a long pause refills three tokens, not 600
    assert [bucket.owe() for _ in range(3)] == [0, 0, 0]
    assert bucket.owe() == pytest.approx(0.1)


def test_debt_accumulates_when_the_caller_does_not_wait() -> None:
    bucket = TokenBucket(rate=4, clock=Clock(100.0))
    assert [bucket.owe() for _ in range(4)] == pytest.approx([0, 0.25, 0.5, 0.75])


async def test_wait_sleeps_only_when_in_debt() -> None:
    bucket = TokenBucket(rate=1000)
    loop = asyncio.get_running_loop()
    start = loop.time()
    for _ in range(21):
        await bucket.wait()
    assert loop.time() - start >= 0.0195


def test_refuses_a_rate_of_zero() -> None:
    with pytest.raises(ValueError, match="positive"):
        TokenBucket(rate=0)
