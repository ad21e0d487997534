"""Deliver: apply each admitted request to its namespace's targets.

A batch taken from ``wal-deliver`` is split by (namespace, target); each
target gets its share as one ``deliver()`` call, all targets concurrently.
Outcomes steer what happens next:

* delivered - done (a replay is delivered too: targets are idempotent);
* retryable - re-emitted to a delay tier (``wal-delay-<tier>``) with the
  next attempt number, due after the retry policy's backoff, *for that target
  only* (``wal-target``), so a request with several targets is never
  re-applied where it succeeded; when the policy is spent, the TTL passed or
  the code is not retryable, dead-lettered instead;
* permanent - dead-lettered with the code, message and target in headers.

``lifecycle.enableDLQ: false`` (or a namespace's ``dlqConfig.enabled: false``)
drops what would be dead-lettered: counted and logged, never silent.

The batch's records are acked only once every item is delivered or durably
dead-lettered: a crash replays the batch, and the targets' ledgers make the
replay change nothing.

One target does not hold up the others (a hung webhook, a locked table):

* every call has a deadline (``WAL_TARGET_DEADLINE_S``); past it the call is
  abandoned, its breaker counts the failure at once and its writes go to the
  retry path;
* a call still running ``WAL_TARGET_SLOW_MS`` after it started (or four times
  the target's usual call time) no longer holds its batch: the follow-ups
  decided so far are made durable, the agent takes the next batch, and this
  one's records are acked when the call has ended and its own follow-ups are
  durable (the commit rule keeps its partitions' commits behind them
  meanwhile). While such a *slow call* runs, later calls to that target queue
  behind it (a key's writes reach the target in order; at most
  ``MAX_LATE_BATCHES`` batches wait so, then the agent waits too: a busy target
  slows its own traffic). Once a call to the target has passed its deadline,
  the calls queued behind it send their writes to the retry path uncalled, and
  for a minute later writes for it wait in the 1 s delay tier (attempt count
  unchanged) while a call to it is slow, rather than queue behind a target that
  does not answer.

Calls of ``ordering: key`` namespaces are always waited for: their key states
must be saved before the next batch decides anything about the same keys.

Here: the agent, a batch's plan (each record's writes, one per target) and its
flow. Each target's share of a wave runs in :mod:`agents.deliver.calls`; what becomes
of each write is decided, noted and counted in :mod:`agents.deliver.outcomes`;
``ordering: key`` waves are :mod:`agents.deliver.waves`; the record being worked on is
:class:`agents.deliver.items.Item`. The targets themselves, each behind its circuit
breaker, come from :class:`targets.pool.TargetPool`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import defaultdict
from typing import Any

import orjson

from agents.deliver import calls as target_calls
from agents.deliver import pace
from agents.deliver.calls import (
    Call,
    missed_lately,
    settle,
    slow_ended,
    start_call,
    target_for,
)
from agents.deliver.items import JOURNAL, Item, ordered
from agents.deliver.outcomes import (
    begin,
    current,
    dead_letter_of,
    follow_ups_of,
    hold,
    park,
    stats_deltas,
    withdraw,
)
from agents.deliver.waves import parked, wave
from app import metrics, names, topics
from app.engine import producing
from app.engine.lanes import Batch, each_batch
from app.fleet import fleet, settings
from app.models import Namespace, TargetDef, TargetRef, WriteRequest
from app.names import Record
from app.pausing import pause_of
from app.topics import deliver_topic
from tables import cancellations, ordering
from tables.namespaces import all_names, lookup
from tables.status import CANCEL_STEP
from targets.base import Write

log = logging.getLogger("wal.deliver")


#: Batches finishing in the background (behind a slow call) at most; then the agent waits.
MAX_LATE_BATCHES = 8


#: Batches whose records are acked once their slow calls have ended.
_late_batches: set[asyncio.Future[None]] = set()


_warming: set[asyncio.Task[int]] = set()


#: At most this many namespaces are warmed (each SQL target is an engine of its own, and
#: warming opens a connection: a worker must not open one per idle namespace of hundreds).
WARM_NAMESPACES = 16


@fleet.on_rebalance_complete.connect
async def _warm_on_rebalance(app: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
    """Connect every namespace's targets in the background once partitions are assigned."""
    task = asyncio.ensure_future(warm_targets())
    _warming.add(task)
    task.add_done_callback(_warming.discard)


@fleet.on_before_shutdown.connect
async def _stop_warming(app: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
    for task in list(_warming):
        task.cancel()
    for late in list(_late_batches):  # released unacked: read again by the next owner
        late.cancel()


async def warm_targets() -> int:
    """Open and :meth:`~targets.base.Target.warm` the targets writes without named targets
    go to, for every enabled namespace: the first batch after a start or a rebalance found
    its SQL connection and tables not there yet (370 ms, ``make bench``). A failure is
    logged; delivery connects lazily as before. Returns how many targets were warmed."""
    warmed = 0
    enabled = [n for n in map(lookup, all_names()) if n is not None and n.enabled]
    for namespace in enabled[:WARM_NAMESPACES]:
        name = namespace.name
        for definition, _ in _default_targets(namespace):
            try:
                await (await target_for(name, definition)).warm()
                warmed += 1
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # down or misconfigured: delivery reports it properly
                log.warning(
                    "warming target %s/%s failed: %s",
                    name,
                    definition.identifier,
                    type(exc).__name__,
                )
    return warmed


@fleet.agent(deliver_topic, concurrency=1)
async def deliver(stream: Any) -> None:
    """Deliver every record on ``wal-deliver``; never raises (faust #175)."""
    await each_batch(stream, _deliver_batch, settings)


async def _deliver_batch(batch: Batch) -> None:
    begin()  # this batch's counts and notes, apart from any other batch's
    metrics.BATCH_SIZE.labels("deliver").observe(len(batch))
    items = [_item(message) for message in batch.records]
    follow_ups = [r for item in items if (r := _plan(item)) is not None]
    if cancellations.index.ids():  # some message was cancelled: are these of one?
        _mark_cancelled(items, batch.records)
    done, late = await _deliver_all(items)
    follow_ups += done
    if not late:
        await _finish(batch, follow_ups)
        return
    for call in late:
        target_calls.slow_calls[call.key] += 1
        metrics.SLOW_CALLS.labels(*call.key).inc()
        call.task.add_done_callback(functools.partial(slow_ended, call.key))
    log.info(
        "target %s: a call of %d writes is slow; its batch of %d goes on in the background",
        ", ".join(f"{c.namespace}/{c.identifier}" for c in late),
        sum(len(c.members) for c in late),
        len(batch),
        extra={"agent": "deliver", "count": len(batch)},
    )
    if follow_ups:  # what is decided goes out now (a transaction waits for its outcomes)
        await producing.emit_until_durable(follow_ups, what=f"{len(follow_ups)} follow-ups")
    batch.hand_over()  # acked by _finish_late, not released when the agent goes on
    finishing = asyncio.ensure_future(_finish_late(batch, [], late))
    _late_batches.add(finishing)
    finishing.add_done_callback(_late_batches.discard)
    while len(_late_batches) >= MAX_LATE_BATCHES:
        await asyncio.wait(set(_late_batches), return_when=asyncio.FIRST_COMPLETED)


async def _finish_late(batch: Batch, follow_ups: list[Record], late: list[Call]) -> None:
    """Wait for a batch's slow calls (each ends by its deadline), then finish the batch."""
    try:
        await asyncio.wait([call.task for call in late])
        for call in late:
            follow_ups += follow_ups_of(call, {})
        await _finish(batch, follow_ups)
    except asyncio.CancelledError:
        for call in late:
            call.task.cancel()
        batch.release()
        raise
    except Exception:  # the agent's own catch-all does not see this task (faust #175)
        log.exception("a batch of %d failed unexpectedly; released, to be read again", len(batch))
        batch.release()


async def _finish(batch: Batch, follow_ups: list[Record]) -> None:
    """Make the batch's follow-ups durable, then ack its records."""
    follow_ups += stats_deltas()
    follow_ups += current().status.drain(topics.NAMES["status"], settings.partitions)
    if follow_ups:
        what = f"{len(follow_ups)} retries/dead letters"
        await producing.emit_until_durable(follow_ups, what=what)
    batch.ack()
    log.info(
        "delivered a batch of %d (%d follow-up records)",
        len(batch),
        len(follow_ups),
        extra={"agent": "deliver", "count": len(batch)},
    )


def _kept_back(
    write: tuple[Item, str],
    states: dict[bytes, dict[str, ordering.KeyState]],
    follow_ups: list[Record],
) -> bool:
    """Take a cancelled message's write out (its status: cancelled), or hold a write back
    while its namespace or target is paused; say whether it was."""
    item, identifier = write
    if item.cancelled:
        record = withdraw(item, identifier, states)
        if record is not None:
            follow_ups.append(record)
        return True
    assert item.namespace is not None
    if pause_of(item.namespace, item.namespace.target(identifier)) is None:
        return False
    follow_ups.append(hold(item, identifier, states))
    return True


def _item(message: Any) -> Item:
    """One ``wal-deliver`` record (aiokafka's ``ConsumerRecord``) as an item."""
    return Item(
        raw=message.value,
        headers=names.decode_headers(message.headers),
        key=message.key,
        source=f"{message.topic}/{message.partition}/{message.offset}",
    )


def _plan(item: Item) -> Record | None:
    """Work out the item's writes, one per target; a dead letter if it has none to make
    (a cancel record: its mark, see :mod:`tables.cancellations`)."""
    if names.CANCEL in item.headers:
        return _cancel(item)
    admitted = _as_admitted(item)
    if admitted is not None:  # the common case: nothing to check again
        namespace, payload = admitted
        refs: list[TargetRef] = []
    else:
        try:
            request = WriteRequest.model_validate(orjson.loads(item.raw or b"null"))
        except (orjson.JSONDecodeError, ValueError) as exc:
            return dead_letter_of(item, "VALIDATION_ERROR", f"not a write request: {exc}"[:500])
        found = lookup(request.namespace)
        if found is None:
            return dead_letter_of(
                item, "NAMESPACE_NOT_FOUND", f"namespace '{request.namespace}' was deleted"
            )
        item.request = request
        namespace, payload, refs = found, request.payload, request.targets
    item.namespace = namespace
    message_id = item.headers.get(names.MESSAGE_ID) or (item.request and item.request.message_id)
    if not message_id:
        return dead_letter_of(item, "VALIDATION_ERROR", "record has no wal-message-id header")
    only = item.headers.get(names.TARGET)  # a retry is for one target only
    for definition, ref in _targets_of(namespace, refs):
        if only and definition.identifier != only:
            continue
        options = ref.config.model_dump(exclude_none=True) if ref else {}
        item.writes[definition.identifier] = Write(
            id=message_id,
            namespace=namespace.name,
            payload=payload,
            operation=options.get("operation"),
            options=options,
            received_at_ms=int(item.headers.get(names.RECEIVED_AT) or 0),
            headers={h: v for h in names.PASSTHROUGH if (v := item.headers.get(h))},
        )
    return None


def _cancel(item: Item) -> Record:
    """A cancel record: mark its message cancelled in this partition from here on."""
    _, partition, offset = item.source.rsplit("/", 2)
    message_id, by = item.headers[names.CANCEL], item.headers.get(names.CANCELLED_BY, "")
    namespace = item.headers.get(names.NAMESPACE) or metrics.UNKNOWN
    current().status.note(message_id, namespace, CANCEL_STEP, by=by or None)
    log.info(
        "message %s cancelled in %s", message_id, item.source, extra={"message_id": message_id}
    )
    return cancellations.mark(message_id, int(partition), int(offset), by)


def _mark_cancelled(items: list[Item], records: list[Any]) -> None:
    """Mark the items whose message was cancelled before their record was read (never a
    transaction's mutation: its transaction must hear of each)."""
    ids = cancellations.index.ids()
    for item, record in zip(items, records, strict=True):
        if not item.writes or item.headers.get(names.TRANSACTION_ID):
            continue
        message_id = item.writes[next(iter(item.writes))].id
        if message_id in ids:
            item.cancelled = cancellations.cancelled(message_id, record.partition, record.offset)


def _as_admitted(item: Item) -> tuple[Namespace, dict[str, Any]] | None:
    """(namespace, payload) of a record as ``wal-ingest`` admitted it, without validating again.

    Ingest validated the request before it produced this record, so a record
    with its message id header, a known namespace under its canonical name, a
    payload object and no per-request targets needs only its payload read. Any
    other record (written here by something else, or naming targets) is
    validated in full by the caller.
    """
    if not item.headers.get(names.MESSAGE_ID):
        return None
    try:
        data = orjson.loads(item.raw or b"null")
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict) or "target" in data:
        return None
    name, payload = data.get("namespace"), data.get("payload")
    if not isinstance(name, str) or not isinstance(payload, dict):
        return None
    namespace = lookup(name)
    return (namespace, payload) if namespace is not None else None


_defaults: dict[int, tuple[Namespace, list[tuple[TargetDef, TargetRef | None]]]] = {}


def _default_targets(namespace: Namespace) -> list[tuple[TargetDef, TargetRef | None]]:
    """A namespace's targets when a request names none, worked out once per namespace
    object (they are immutable: a change is a new object)."""
    known = _defaults.get(id(namespace))
    if known is not None and known[0] is namespace:
        return known[1]
    found: list[tuple[TargetDef, TargetRef | None]] = (
        [(t, None) for t in namespace.targets if t.enabled]
        if namespace.targets
        else [(JOURNAL, None)]
    )
    if len(_defaults) >= 256:
        _defaults.clear()
    _defaults[id(namespace)] = (namespace, found)
    return found


def _targets_of(
    namespace: Namespace, refs: list[TargetRef]
) -> list[tuple[TargetDef, TargetRef | None]]:
    if not refs:
        return _default_targets(namespace)
    if not namespace.targets:
        return [(JOURNAL, None)]
    found = [(namespace.target(ref.identifier), ref) for ref in refs if ref.enabled]
    return [(d, ref) for d, ref in found if d is not None and d.enabled]


async def _deliver_all(items: list[Item]) -> tuple[list[Record], list[Call]]:
    """Deliver every planned write. Returns the retries, parked writes and dead letters so
    far, and the slow calls the batch must not wait for (their follow-ups come later).

    Writes of ``ordering: key`` namespaces go in waves - at most one per (key,
    target) in each - so a write that fails blocks the ones behind it before they
    reach the target (see :mod:`tables.ordering`).
    """
    pending = [(item, identifier) for item in items for identifier in item.writes]
    follow_ups: list[Record] = []
    states: dict[bytes, dict[str, ordering.KeyState]] = {}
    late: list[Call] = []
    while pending:
        going, pending = wave(pending)
        going = [w for w in going if not parked(w, states, follow_ups)]
        going = [w for w in going if not _kept_back(w, states, follow_ups)]
        groups: dict[tuple[str, str], list[Item]] = defaultdict(list)
        for item, identifier in going:
            assert item.namespace is not None
            key = (item.namespace.name, identifier)
            if key in target_calls.slow_calls and missed_lately(key) and not ordered(item):
                follow_ups.append(park(item, identifier, None))  # wait in Kafka, not here
            else:
                groups[key].append(item)
        calls = []
        for (ns, identifier), members in groups.items():
            definition = members[0].namespace.target(identifier) if members[0].namespace else None
            go, waiting = pace.admit(ns, definition or JOURNAL, members)
            for item, seconds, booked in waiting:  # its turn is later: it waits in Kafka
                wait_ms = int(seconds * 1000)
                follow_ups.append(park(item, identifier, None, wait_ms=wait_ms, paced=booked))
            if go:
                calls.append(start_call(ns, identifier, go))
        try:
            slow = await settle(calls)
        except asyncio.CancelledError:  # the agent is stopping: no call outlives its batch
            for call in calls:
                call.task.cancel()
            raise
        late += slow
        for call in calls:
            if call not in slow:
                follow_ups += follow_ups_of(call, states)
    # The sequencing state goes out with the follow-ups, durable before the acks.
    follow_ups += [ordering.save(key, per_target) for key, per_target in states.items()]
    return follow_ups, late
