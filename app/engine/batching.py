"""Batches of stream events that cost nothing while the stream is idle.

The agents of the quieter topics (delay tiers, status, statistics,
transactions) take their events in batches and ack them themselves once their
effects are durable; ingest and deliver skip Faust's events altogether
(:mod:`app.engine.lanes`). Faust's ``noack_take(n, within)`` batches that way, but it wakes
every ``within`` seconds whether or not anything arrived: with a 50 ms window
on the busy agents and the delay tiers' 200 ms, an idle worker woke about 90
times a second, most of its idle CPU. :func:`batches` keeps the same contract -
a batch is yielded when it holds ``size`` events, or ``within`` seconds after
its *first* event; events are not acked - and arms its timer only when a batch
has begun.

It builds on the same Stream primitives as Faust's own buffering (a processor
that collects ``current_event`` while the stream is drained in the
background), so rebalances, flow control and ``wait_empty`` treat it alike.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

log = logging.getLogger("wal.batching")

#: Pause after a batch failed unexpectedly, before the next one is taken (every agent).
RETRY_PAUSE_S = 1.0

#: How much longer than ``WAL_BATCH_WITHIN_MS`` the folds of statuses and statistics wait
#: to fill a batch (at least :data:`FOLD_MIN_WITHIN_S`): nobody waits on them, and each
#: batch rewrites a table value per namespace or id it touches.
FOLD_WAIT_FACTOR = 10
FOLD_MIN_WITHIN_S = 0.2


def fold_within(batch_within_ms: int) -> float:
    """The batch wait of a fold agent (status, stats), seconds."""
    return max(FOLD_MIN_WITHIN_S, FOLD_WAIT_FACTOR * batch_within_ms / 1000)


async def batches(stream: Any, size: int, within: float) -> AsyncIterator[list[Any]]:
    """Yield lists of up to ``size`` events of ``stream``, unacked (the caller acks)."""
    loop = asyncio.get_running_loop()
    buffer: list[Any] = []
    ready = asyncio.Event()  # full, or the first event's window is over
    taken = asyncio.Event()  # the agent took the buffer: room again
    timer: asyncio.TimerHandle | None = None

    async def collect(value: Any) -> Any:
        nonlocal timer
        event = stream.current_event
        if event is None:
            raise RuntimeError("batches: the stream has no current event")
        buffer.append(event)
        if len(buffer) == 1:
            timer = loop.call_later(within, ready.set)
        if len(buffer) >= size:
            ready.set()
            taken.clear()
            await stream.wait(taken)  # hold the stream until this batch is taken
        return value

    acks_were = stream.enable_acks
    stream.enable_acks = False
    stream.add_processor(collect)
    stream._enable_passive(aiter(stream.channel))
    try:
        while not stream.should_stop:
            await stream.wait_for_stopped(ready)
            ready.clear()
            if timer is not None:
                timer.cancel()
                timer = None
            if not buffer:
                continue
            batch = buffer[:]
            buffer.clear()
            taken.set()
            yield batch
    finally:
        if timer is not None:
            timer.cancel()
        stream.enable_acks = acks_were
        stream._processors.remove(collect)


async def each_batch(
    stream: Any, handle: Callable[[list[Any]], Awaitable[None]], *, size: int, within: float
) -> None:
    """Run ``handle`` on every batch of ``stream``'s events, then ack the batch: the same
    contract as :func:`app.engine.lanes.each_batch` for ingest and deliver.

    ``handle`` returns once the batch's effects are durable, and routes every failure
    it knows of. One it did not foresee (a bug) must not end the agent (faust #175): it
    is logged and the batch is left unacked - the commit rule holds its partitions and
    :meth:`app.engine.consumer.StrictConsumer.heal` has them read again."""
    async for events in batches(stream, size, within):
        try:
            await handle(events)
        except Exception:
            log.exception(
                "%s: a batch of %d failed unexpectedly; released, to be read again",
                stream.channel,
                len(events),
            )
            await asyncio.sleep(RETRY_PAUSE_S)
            continue
        for event in events:
            await stream.ack(event)
