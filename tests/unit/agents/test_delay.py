"""Parking a delay-tier partition: pure logic against a recording consumer."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from faust.types import TP

from agents.delay import DUE_SLACK_MS, Holding, forward, wake_at_ms
from app import names, topics
from app.engine.parking import Parking


@dataclass(frozen=True)
class Msg:
    topic: str
    offset: int
    partition: int = 0


class RecordingConsumer:
    def __init__(self, assigned: set[TP]) -> None:
        self.assigned = assigned
        self.paused: set[TP] = set()
        self.released: list[Msg] = []
        self.seeks: list[tuple[TP, int]] = []

    def pause_partitions(self, tps: set[TP]) -> None:
        self.paused |= tps

    def resume_partitions(self, tps: set[TP]) -> None:
        self.paused -= tps

    def release(self, message: Any) -> None:
        self.released.append(message)

    async def seek(self, tp: TP, offset: int) -> None:
        self.seeks.append((tp, offset))

    def assignment(self) -> set[TP]:
        return self.assigned


def test_a_record_wakes_at_the_earlier_of_its_tier_and_its_due_time() -> None:
    assert wake_at_ms(1_000, 100_000, 60) == 61_000
    assert wake_at_ms(1_000, 30_000, 60) == 30_000


def test_a_tier_ending_within_the_slack_before_due_waits_for_the_due_time() -> None:
    tier_up = 1_000 + 60_000
    assert wake_at_ms(1_000, tier_up + DUE_SLACK_MS, 60) == tier_up + DUE_SLACK_MS
    assert wake_at_ms(1_000, tier_up + DUE_SLACK_MS + 1, 60) == tier_up


@dataclass(frozen=True)
class Held:
    headers: list[tuple[str, bytes]]
    key: bytes = b"k"
    value: bytes = b"{}"


def test_nothing_is_forwarded_to_delivery_before_its_due_time() -> None:
    due = 50_000
    message = Held([(names.DUE_AT, str(due).encode())])
    assert forward(message, due).topic == topics.NAMES["deliver"]
    assert forward(message, due + 5).topic == topics.NAMES["deliver"]
    for early in (1, DUE_SLACK_MS, 2_000):  # woken early: one more hop, not delivery
        assert forward(message, due - early).topic != topics.NAMES["deliver"]


async def test_a_parked_partition_holds_what_follows_its_head_and_rereads_from_it() -> None:
    consumer = RecordingConsumer({TP("a", 0), TP("b", 0)})
    parking = Parking(consumer)
    assert parking.passes(Msg("a", 5))
    parking.park(Msg("a", 5), int(time.time() * 1000) + 50)
    assert consumer.paused == {TP("a", 0)}
    # buffered behind the head: handed back, not handled; other partitions flow
    assert not parking.passes(Msg("a", 6))
    assert not parking.passes(Msg("a", 7))
    assert parking.passes(Msg("b", 3))
    assert consumer.released == [Msg("a", 5), Msg("a", 6), Msg("a", 7)]

    await asyncio.sleep(0.15)
    assert consumer.seeks == [(TP("a", 0), 5)]
    assert consumer.paused == set()
    # still queued from before the seek: stale until the head comes round again
    assert not parking.passes(Msg("a", 8))
    assert parking.passes(Msg("a", 5))
    assert parking.passes(Msg("a", 6))
    assert len(parking) == 0


async def test_a_forgotten_or_revoked_partition_is_not_rewound() -> None:
    consumer = RecordingConsumer({TP("a", 0)})
    parking = Parking(consumer)
    soon = int(time.time() * 1000) + 30
    parking.park(Msg("a", 1), soon)
    parking.forget()
    parking.park(Msg("b", 9), soon)  # not (or no longer) assigned here
    await asyncio.sleep(0.1)
    assert consumer.seeks == []
    assert len(parking) == 0
    assert parking.passes(Msg("a", 2)) and parking.passes(Msg("b", 10))


async def test_a_partition_is_rewound_its_lead_before_its_head_wakes() -> None:
    consumer = RecordingConsumer({TP("a", 0)})
    parking = Parking(consumer)
    parking.park(Msg("a", 3), int(time.time() * 1000) + 1_050, lead_ms=1_000)
    await asyncio.sleep(0.2)
    assert consumer.seeks == [(TP("a", 0), 3)]


async def test_held_records_come_out_in_wake_order_when_awake() -> None:
    holding = Holding(limit=3)
    now = int(time.time() * 1000)
    holding.hold("late", now + 150)
    holding.hold("early", now + 50)
    holding.hold("same-as-early", now + 50)
    assert not holding.has_room()
    assert holding.due(now) == []
    await holding.wait()  # until the earliest wakes
    assert time.time() * 1000 >= now + 50
    assert holding.due(int(time.time() * 1000)) == ["early", "same-as-early"]
    assert len(holding) == 1 and holding.has_room()
