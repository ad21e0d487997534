"""Delay: hold records in Kafka until they are due, then hand them to ``wal-deliver``.

One agent per delay tier (``wal-delay-1s`` … ``wal-delay-15m``). A record enters
the largest tier that does not overshoot its due time (``wal-due-at``), so a
record produced at *t* into tier *T* needs looking at again no earlier than
*t + T*. Records of a tier partition arrive in produce order, so the agent
sleeps until the head record's wake time, then forwards it: to ``wal-deliver``
when it is due, or into the tier that fits what is left. Nothing waits in
memory but the record at the head: the backlog lives in Kafka.

Acks: records are acked once their forward is acknowledged by Kafka, and
before any sleep, so a crash replays at most the records not yet forwarded;
a replayed forward carries the same message id, which targets apply once.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from app import topics
from app.fleet import fleet, settings
from app.topics import DELAY_TIERS, Record, delay_topics, tier_name

#: A record this close to its due time goes to delivery rather than another hop.
DUE_SLACK_MS = 20


def wake_at_ms(produced_ms: int, due_ms: int, tier_seconds: int) -> int:
    """When a record produced into a tier needs looking at again."""
    return min(due_ms, produced_ms + tier_seconds * 1000)


def forward(message: Any, now_ms: int) -> Record:
    """Where a record goes when it wakes: delivery if due, else the tier that fits."""
    headers = topics.decode_headers(message.headers)
    due_ms = int(headers.get(topics.DUE_AT) or 0)
    remaining = due_ms - now_ms
    topic = (
        topics.NAMES["deliver"] if remaining <= DUE_SLACK_MS else topics.delay_topic_for(remaining)
    )
    return Record(topic, message.key, message.value, dict(headers))


def _make_agent(tier_seconds: int) -> Any:
    async def delay(stream: Any) -> None:
        """Wake each record of this tier at its time and forward it; never raises."""
        async for events in stream.noack_take(settings.batch_size, 0.2):
            ready: list[tuple[Any, Record]] = []
            for event in events:
                message = event.message
                headers = topics.decode_headers(message.headers)
                due_ms = int(headers.get(topics.DUE_AT) or 0)
                produced_ms = int((message.timestamp or time.time()) * 1000)
                wait_ms = wake_at_ms(produced_ms, due_ms, tier_seconds) - int(time.time() * 1000)
                if wait_ms > 0:
                    await _flush(stream, ready)
                    await asyncio.sleep(wait_ms / 1000)
                ready.append((event, forward(message, int(time.time() * 1000))))
            await _flush(stream, ready)

    delay.__name__ = delay.__qualname__ = f"delay_{tier_name(tier_seconds)}"
    return fleet.agent(delay_topics[tier_seconds], name=f"delay-{tier_name(tier_seconds)}")(delay)


async def _flush(stream: Any, ready: list[tuple[Any, Record]]) -> None:
    if not ready:
        return
    await topics.emit_until_durable([r for _, r in ready], what=f"{len(ready)} delayed records")
    for event, _ in ready:
        await stream.ack(event)
    ready.clear()


agents = {seconds: _make_agent(seconds) for seconds in DELAY_TIERS}
