"""Stats: fold the per-batch deltas on ``wal-stats`` into the ``stats`` table.

A batch's deltas are folded per namespace (each namespace's value is read and
written once per batch), the table's changelog records are emitted and
acknowledged by Kafka (:func:`app.engine.changelog.changelog_record`), and only then are the
events acked. A record that is not a delta is logged and skipped: nothing on
this topic stops the stream (faust #175).
"""

from __future__ import annotations

import time
from typing import Any

from app import metrics
from app.engine import producing
from app.engine.batching import each_batch, fold_within
from app.engine.changelog import changelog_record
from app.fleet import fleet, settings
from app.topics import stats_topic
from tables.stats import NamespaceStats, fold, parse, stats


@fleet.agent(stats_topic, concurrency=1)
async def fold_stats(stream: Any) -> None:
    """Fold every delta on ``wal-stats``; never raises."""
    within = fold_within(settings.batch_within_ms)
    await each_batch(stream, _fold_events, size=settings.batch_size, within=within)


async def _fold_events(events: list[Any]) -> None:
    metrics.BATCH_SIZE.labels("stats").observe(len(events))
    folded = _fold_batch(events, int(time.time() * 1000))
    if folded:
        records = [changelog_record(stats, key, value) for key, value in folded.items()]
        await producing.emit_until_durable(records, what=f"{len(records)} stats values")


def _fold_batch(events: list[Any], now_ms: int) -> dict[bytes, bytes]:
    """The batch folded into the table's current values: namespace key → new value."""
    values: dict[bytes, NamespaceStats] = {}
    changed: set[bytes] = set()
    malformed: list[str] = []
    for event in events:
        message = event.message
        try:
            d = parse(message.value)
            if message.key != d.namespace.encode():  # its value lives in another partition
                raise ValueError(f"key {message.key!r} is not the namespace {d.namespace!r}")
        except ValueError as exc:
            malformed.append(f"{message.topic}/{message.partition}/{message.offset}: {exc}")
            continue
        key = d.namespace.encode()
        if key not in values:
            values[key] = NamespaceStats.loads(stats.get(key))
        if fold(values[key], d, partition=message.partition, offset=message.offset, now_ms=now_ms):
            changed.add(key)
    if malformed:
        fleet.log.warning(
            "stats: skipped %d records that are not deltas (first: %s)",
            len(malformed),
            malformed[0][:300],
        )
    fleet.log.debug("stats: folded %d deltas into %d namespaces", len(events), len(changed))
    return {key: values[key].dumps() for key in changed}
