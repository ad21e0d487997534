"""Delay: hold records in Kafka until they are due, then hand them to ``wal-deliver``.

One agent per delay tier (``wal-delay-1s`` … ``wal-delay-15m``). A record enters
the largest tier that does not overshoot its due time (``wal-due-at``), so a
record produced at *t* into tier *T* needs looking at again no earlier than
*t + T*. Records of a tier partition arrive in produce order, so when the head
record of a partition is not awake yet, nothing behind it is either.

The agent never sleeps holding its stream (a stream that stops draining fills
its buffer and then blocks the conductor, and with it every agent of the
worker). A record that wakes within :data:`LEAD_MS` is *held*: kept in memory
(at most :data:`HOLD_MAX` per tier) and forwarded by a timer when it wakes. A
record that wakes later *parks* its partition: the agent pauses fetching from
it, lets the records already buffered behind it pass unprocessed and unacked,
and :data:`LEAD_MS` before the record wakes seeks the partition back to its
offset and resumes, so it is read again - and held - in time (re-reading takes
up to Faust's fetch long-poll, 1.5 s). Nothing else waits in memory: one
offset and one timer per parked partition, the backlog lives in Kafka, and
memory does not depend on how many records wait.

Acks: a record is acked once its forward is acknowledged by Kafka. Held and
parked records are not acked, and the consumer commits no further than the
first unacked offset of a partition (:mod:`app.engine.consumer`), so the committed
offset never passes a record still waiting; a crash replays at most the
records forwarded but not yet committed, and a replayed forward carries the
same message id, which targets apply once.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
from typing import Any

from app import names, topics
from app.engine import producing
from app.engine.batching import batches
from app.engine.parking import Parking
from app.fleet import fleet, settings
from app.names import Record, tier_name
from app.topics import DELAY_TIERS, delay_topics

#: A tier wake-up this close before the due time waits for the due time instead,
#: so the record goes straight to delivery rather than hopping once more.
DUE_SLACK_MS = 20
#: Records waking within this long are held in memory; parked partitions are
#: rewound this long before their head wakes.
LEAD_MS = 2_500
#: Most records one tier holds in memory; beyond it, even close ones are parked.
HOLD_MAX = 10_000


def wake_at_ms(produced_ms: int, due_ms: int, tier_seconds: int) -> int:
    """When a record produced into a tier needs looking at again: at its due time, or
    when the tier's time is up if that is more than ``DUE_SLACK_MS`` before it."""
    tier_up = produced_ms + tier_seconds * 1000
    return tier_up if due_ms - tier_up > DUE_SLACK_MS else due_ms


def forward(message: Any, now_ms: int) -> Record:
    """Where a record goes when it wakes: delivery if due, else the tier that fits.

    Never delivery before the due time: a record woken a little early by its tier
    takes one more (short) hop rather than arriving early."""
    headers = names.decode_headers(message.headers)
    due_ms = int(headers.get(names.DUE_AT) or 0)
    remaining = due_ms - now_ms
    topic = topics.NAMES["deliver"] if remaining <= 0 else topics.delay_topic_for(remaining)
    return Record(topic, message.key, message.value, dict(headers))


class Holding:
    """Records of one tier that wake soon, in memory until they do (earliest first)."""

    def __init__(self, limit: int = HOLD_MAX) -> None:
        self.limit = limit
        self._heap: list[tuple[int, int, Any]] = []
        self._order = itertools.count()
        self._added = asyncio.Event()

    def __len__(self) -> int:
        return len(self._heap)

    def has_room(self) -> bool:
        return len(self._heap) < self.limit

    def hold(self, event: Any, wake_ms: int) -> None:
        heapq.heappush(self._heap, (wake_ms, next(self._order), event))
        self._added.set()

    def due(self, now_ms: int) -> list[Any]:
        """The held events awake at ``now_ms``, in wake order; no longer held."""
        awake = []
        while self._heap and self._heap[0][0] <= now_ms:
            awake.append(heapq.heappop(self._heap)[2])
        return awake

    async def wait(self) -> None:
        """Until the earliest held event wakes, or another is held."""
        self._added.clear()
        timeout = self._heap[0][0] / 1000 - time.time() if self._heap else None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._added.wait(), timeout)


async def _forward_held(stream: Any, holding: Holding) -> None:
    """Forward held records as they wake (a task beside the agent's loop); never raises."""
    while True:
        await holding.wait()
        now_ms = int(time.time() * 1000)
        awake = holding.due(now_ms)
        try:
            await _flush(stream, [(event, forward(event.message, now_ms)) for event in awake])
        except Exception:  # unacked: the commit holds, and the heal re-reads them
            fleet.log.exception("delay: forwarding %d held records failed", len(awake))


#: One parking per tier, created when its agent starts (the consumer exists then).
parkings: dict[int, Parking] = {}


def _make_agent(tier_seconds: int) -> Any:
    async def delay(stream: Any) -> None:
        """Forward each record of this tier when it wakes; park its partition until then."""
        parking = parkings[tier_seconds] = Parking(fleet.consumer)
        holding = Holding()
        forwarder = asyncio.ensure_future(_forward_held(stream, holding))
        try:
            async for events in batches(
                stream, settings.batch_size, settings.batch_within_ms / 1000
            ):
                ready: list[tuple[Any, Record]] = []
                now_ms = int(time.time() * 1000)
                for event in events:
                    message = event.message
                    if not parking.passes(message):
                        continue
                    headers = names.decode_headers(message.headers)
                    due_ms = int(headers.get(names.DUE_AT) or 0)
                    produced_ms = int((message.timestamp or now_ms / 1000) * 1000)
                    wake_ms = wake_at_ms(produced_ms, due_ms, tier_seconds)
                    if wake_ms - now_ms > LEAD_MS:
                        parking.park(message, wake_ms, lead_ms=LEAD_MS)
                        continue
                    if wake_ms > now_ms:
                        if holding.has_room():
                            holding.hold(event, wake_ms)
                        else:  # back when it is awake
                            parking.park(message, wake_ms)
                        continue
                    ready.append((event, forward(message, now_ms)))
                del events
                await _flush(stream, ready)
        finally:
            forwarder.cancel()
            parking.forget()

    delay.__name__ = delay.__qualname__ = f"delay_{tier_name(tier_seconds)}"
    return fleet.agent(delay_topics[tier_seconds], name=f"delay-{tier_name(tier_seconds)}")(delay)


async def _flush(stream: Any, ready: list[tuple[Any, Record]]) -> None:
    if not ready:
        return
    await producing.emit_until_durable([r for _, r in ready], what=f"{len(ready)} delayed records")
    for event, _ in ready:
        await stream.ack(event)
    ready.clear()


@fleet.on_partitions_revoked.connect
async def _forget_parked(app: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
    """A rebalance seeks every partition to its committed offset: parked heads come again."""
    for parking in parkings.values():
        parking.forget()


agents = {seconds: _make_agent(seconds) for seconds in DELAY_TIERS}
