"""Status: fold the bundles on ``wal-status`` into this worker's :class:`StatusBook`.

Live bundles come through the agent like any other stream (committed as they
are folded). When this worker is given ``wal-status`` partitions, a *rebuild*
reads each of them from the start of what Kafka retains up to its end at that
moment with a plain consumer outside the group, so the book knows what the
partition's previous owner knew (see :mod:`tables.status`); folding is
idempotent, so what the agent and the rebuild both read counts once. A record
that is not a bundle of entries is logged and skipped: nothing on this topic
stops the stream (faust #175).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import orjson

from app import metrics
from app.engine.batching import each_batch, fold_within
from app.engine.clients import TopicPartition, plain_consumer
from app.engine.reading import read_to_end
from app.fleet import fleet, settings
from app.topics import NAMES, status_topic
from tables.status import StatusBook

book = StatusBook(settings.status_capacity)
_rebuilding: set[asyncio.Task[None]] = set()


@fleet.agent(status_topic, concurrency=1)
async def fold_statuses(stream: Any) -> None:
    """Fold every bundle on ``wal-status``; never raises."""
    within = fold_within(settings.batch_within_ms)
    await each_batch(stream, _fold_events, size=settings.batch_size, within=within)


async def _fold_events(events: list[Any]) -> None:
    metrics.BATCH_SIZE.labels("status").observe(len(events))
    skipped = _fold([(e.message.partition, e.message.offset, e.message.value) for e in events])
    if skipped:
        fleet.log.warning(
            "status: skipped %d records that are not status bundles (first: %s)",
            len(skipped),
            skipped[0][:300],
        )


def _fold(records: list[tuple[int, int, bytes | None]]) -> list[str]:
    """Fold (partition, offset, value) records; return why the bad ones were skipped."""
    skipped = []
    for partition, offset, value in records:
        try:
            bundle = orjson.loads(value or b"")
            if isinstance(bundle, dict):
                book.fold_groups(partition, _groups(bundle))
            else:
                book.fold(partition, _entries(bundle))
        except (ValueError, KeyError, TypeError) as exc:
            skipped.append(f"{NAMES['status']}/{partition}/{offset}: {exc}")
    return skipped


def _groups(bundle: dict[str, Any]) -> list[list[Any]]:
    """A grouped bundle's groups, checked: ``[namespace, step, at, fields or None, ids]``."""
    groups = bundle.get("g")
    if not isinstance(groups, list) or not all(
        isinstance(g, list)
        and len(g) == 5
        and isinstance(g[0], str)
        and isinstance(g[1], str)
        and isinstance(g[2], int)
        and (g[3] is None or isinstance(g[3], dict))
        and isinstance(g[4], list)
        and all(isinstance(i, str) for i in g[4])
        for g in groups
    ):
        raise ValueError("not a bundle of status groups")
    return groups


def _entries(entries: Any) -> list[dict[str, Any]]:
    """A bundle of the first format (a list of entries), checked."""
    if not isinstance(entries, list) or not all(
        isinstance(e, dict) and isinstance(e.get("id"), str) and isinstance(e.get("at"), int)
        for e in entries
    ):
        raise ValueError("not a list of status entries")
    return entries


async def rebuild(partitions: list[int]) -> int:
    """Fold ``partitions`` of ``wal-status`` from their first retained record to their end."""
    consumer = plain_consumer(settings)
    await consumer.start()
    folded = 0
    try:
        tps = [TopicPartition(NAMES["status"], p) for p in partitions]
        async for records in read_to_end(consumer, tps):
            _fold([(r.partition, r.offset, r.value) for r in records])
            folded += len(records)
    finally:
        await consumer.stop()
    return folded


@fleet.on_partitions_assigned.connect
async def _rebuild_on_assignment(app: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
    """Forget the old book and rebuild it from this worker's ``wal-status`` partitions."""
    assigned = args[0] if args else kwargs.get("assigned", set())
    mine = sorted(tp.partition for tp in assigned if tp.topic == NAMES["status"])
    for task in list(_rebuilding):
        task.cancel()
    book.forget()
    if mine:
        task = asyncio.ensure_future(_rebuild_logged(mine))
        _rebuilding.add(task)
        task.add_done_callback(_rebuilding.discard)


async def _rebuild_logged(partitions: list[int]) -> None:
    try:
        folded = await rebuild(partitions)
        fleet.log.info("status: rebuilt partitions %s from %d bundles", partitions, folded)
    except asyncio.CancelledError:
        raise
    except Exception:  # the live stream goes on; older statuses stay unknown here
        fleet.log.exception("status: rebuilding partitions %s failed", partitions)


@fleet.on_before_shutdown.connect
async def _stop_rebuilds(app: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
    for task in list(_rebuilding):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
