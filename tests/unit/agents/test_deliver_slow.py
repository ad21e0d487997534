"""A slow or hung target does not hold its batch, and its calls end by a deadline."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest

from agents import deliver
from agents.deliver import calls, outcomes
from app import names, topics
from app.models import Namespace
from app.names import Record
from app.settings import Settings
from targets.base import DELIVERED, Outcome, Target, Write
from targets.circuit import BREAKERS
from targets.pool import TargetPool


def _namespace(name: str, threshold: int = 1, **extra: Any) -> Namespace:
    return Namespace.model_validate(
        {
            "name": name,
            "targets": [{"identifier": "t", "type": "sql", "circuit": {"threshold": threshold}}],
            **extra,
        }
    )


NAMESPACES = {
    "slow": _namespace("slow"),
    "fast": _namespace("fast"),
    "patient": _namespace("patient", threshold=100),  # its circuit stays closed
    "ordered": _namespace("ordered", ordering="key"),
}


class Fake(Target):
    """Delivers at once, except for namespaces in ``hung``: those wait for ``release``."""

    kind = "fake"
    hung: set[str] = set()
    release = asyncio.Event()
    delivered: list[str] = []

    async def deliver(self, batch: Sequence[Write]) -> list[Outcome]:
        if batch[0].namespace in Fake.hung:
            await Fake.release.wait()
        Fake.delivered += [w.id for w in batch]
        return [DELIVERED] * len(batch)


@dataclass
class Message:
    value: bytes
    key: bytes
    offset: int
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    topic: str = "wal-deliver"
    partition: int = 0


class FakeBatch:
    def __init__(self, *records: Message) -> None:
        self.records = list(records)
        self.acked = self.released = self.handed_over = False

    def __len__(self) -> int:
        return len(self.records)

    def ack(self) -> None:
        self.acked = True

    def release(self) -> None:
        self.released = True

    def hand_over(self) -> None:
        self.handed_over = True


def message(namespace: str, n: int) -> Message:
    value = orjson.dumps({"namespace": namespace, "payload": {"n": n}})
    headers = [(names.MESSAGE_ID, f"{namespace}-{n}".encode())]
    return Message(value, f"k{n}".encode(), n, headers)


def tune(monkeypatch: pytest.MonkeyPatch, **settings: Any) -> None:
    tuned = deliver.settings.model_copy(update=settings)
    monkeypatch.setattr(deliver, "settings", tuned)
    monkeypatch.setattr(calls, "settings", tuned)


@pytest.fixture(autouse=True)
def fakes(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Record]]:
    Fake.hung, Fake.release, Fake.delivered = set(), asyncio.Event(), []
    emitted: list[Record] = []

    async def emit(records: list[Record], what: str = "") -> None:
        emitted.extend(records)

    def create(kind: str, name: str, config: dict[str, object], settings: Settings) -> Target:
        return Fake(name, config, settings)

    monkeypatch.setattr(deliver, "lookup", NAMESPACES.get)
    monkeypatch.setattr(calls, "slow_calls", Counter())
    monkeypatch.setattr(calls, "_usual", {})
    monkeypatch.setattr(calls, "_latest", {})
    monkeypatch.setattr(calls, "_missed", {})
    monkeypatch.setattr(calls, "POOL", TargetPool(deliver.settings, create=create))
    monkeypatch.setattr(deliver.producing, "emit_until_durable", emit)
    tune(monkeypatch, target_slow_ms=50, target_deadline_s=5.0)
    yield emitted
    Fake.release.set()
    for late in list(deliver._late_batches):
        late.cancel()
    BREAKERS.clear()


def retries(emitted: list[Record]) -> list[Record]:
    tiers = {name for role, name in topics.NAMES.items() if role.startswith("delay-")}
    return [r for r in emitted if r.topic in tiers]


async def test_a_hung_target_lets_its_batch_go_on_and_acks_it_when_it_ends(
    fakes: list[Record],
) -> None:
    Fake.hung = {"slow"}
    first = FakeBatch(message("slow", 1), message("fast", 2))
    started = time.monotonic()
    await deliver._deliver_batch(first)  # type: ignore[arg-type]
    assert time.monotonic() - started < 2.0  # did not wait for the hung call
    assert Fake.delivered == ["fast-2"] and not first.acked  # its hung write is not done
    assert first.handed_over  # finished in the background: the lane must not release it
    assert ("slow", "t") in calls.slow_calls

    # The target's later writes queue behind its slow call (in order), their batch going on
    # too; the other namespace's go through at once.
    second = FakeBatch(message("slow", 3), message("fast", 4))
    await deliver._deliver_batch(second)  # type: ignore[arg-type]
    assert Fake.delivered == ["fast-2", "fast-4"] and not second.acked
    assert not retries(fakes)

    Fake.release.set()  # the call answers: both batches are acked, in order, the target free
    await asyncio.wait(set(deliver._late_batches))
    assert first.acked and second.acked
    assert Fake.delivered == ["fast-2", "fast-4", "slow-1", "slow-3"]
    assert ("slow", "t") not in calls.slow_calls


async def test_a_call_past_its_deadline_goes_to_the_retry_path_and_counts_for_the_breaker(
    fakes: list[Record], monkeypatch: pytest.MonkeyPatch
) -> None:
    tune(monkeypatch, target_deadline_s=0.3)
    Fake.hung = {"slow"}
    batch = FakeBatch(message("slow", 1))
    started = time.monotonic()
    await deliver._deliver_batch(batch)  # type: ignore[arg-type]
    await asyncio.wait(set(deliver._late_batches), timeout=5)
    assert batch.acked and 0.3 <= time.monotonic() - started < 3.0
    (retry,) = retries(fakes)
    assert retry.headers[names.ATTEMPT] == "2"
    assert "deadline" in (retry.headers[names.ERROR_MESSAGE] or "")
    assert BREAKERS["slow/t"].state == "open"  # threshold 1: counted at the deadline


async def test_after_a_missed_deadline_calls_behind_are_not_made_and_later_writes_wait_in_kafka(
    fakes: list[Record], monkeypatch: pytest.MonkeyPatch
) -> None:
    tune(monkeypatch, target_deadline_s=0.5)
    Fake.hung = {"patient"}
    first, second = FakeBatch(message("patient", 1)), FakeBatch(message("patient", 2))
    await deliver._deliver_batch(first)  # type: ignore[arg-type]
    await deliver._deliver_batch(second)  # type: ignore[arg-type]  (queued behind the first)
    await asyncio.wait(set(deliver._late_batches), timeout=5)
    assert first.acked and second.acked and Fake.delivered == []
    first_retry, second_retry = retries(fakes)
    assert "deadline" in (first_retry.headers[names.ERROR_MESSAGE] or "")
    assert "not called" in (second_retry.headers[names.ERROR_MESSAGE] or "")
    assert second_retry.headers[names.ATTEMPT] == "2"

    # The target missed its deadline: while a call to it is slow, its writes wait in Kafka.
    fakes.clear()
    third, fourth = FakeBatch(message("patient", 3)), FakeBatch(message("patient", 4))
    await deliver._deliver_batch(third)  # type: ignore[arg-type]  (a new call, slow again)
    await deliver._deliver_batch(fourth)  # type: ignore[arg-type]
    assert fourth.acked and not third.acked
    (parked,) = retries(fakes)
    assert parked.topic == topics.delay_topic_for(outcomes.PARK_MS)
    assert parked.headers[names.TARGET] == "t"
    assert parked.headers.get(names.ATTEMPT) is None and names.ORDER_SEQ not in parked.headers


async def test_ordered_namespaces_wait_for_their_calls(
    fakes: list[Record], monkeypatch: pytest.MonkeyPatch
) -> None:
    tune(monkeypatch, target_deadline_s=0.3)
    Fake.hung = {"ordered"}
    batch = FakeBatch(message("ordered", 1))
    started = time.monotonic()
    await deliver._deliver_batch(batch)  # type: ignore[arg-type]
    assert batch.acked and time.monotonic() - started >= 0.3  # waited up to the deadline
    assert not deliver._late_batches
