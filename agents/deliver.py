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
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

from app import backoff, metrics, names, topics
from app.engine import producing
from app.engine.lanes import Batch, each_batch
from app.errors import ConfigError
from app.fleet import fleet, settings
from app.models import Lifecycle, Namespace, TargetDef, TargetRef, WriteRequest
from app.names import Record
from app.topics import deliver_topic
from tables import ordering, stats, transactions
from tables.namespaces import all_names, lookup
from tables.status import Collector
from targets import create as create_target
from targets.base import Outcome, Target, Write, permanent, retryable
from targets.circuit import BREAKERS, guard

log = logging.getLogger("wal.deliver")

#: ``wal_circuit_state`` values.
CIRCUIT_LEVELS = {"closed": 0, "half_open": 1, "open": 2}

#: Outcomes for ``wal-stats`` since the last batch emitted them: (namespace, target,
#: outcome) -> the sources (``Item.source``) counted; latencies per (namespace, target).
_tally: dict[tuple[str, str, str], list[str]] = defaultdict(list)
_latencies: dict[tuple[str, str], list[int]] = defaultdict(list)
STATUS = Collector()

#: How long a write parked behind its key (or a slow target) waits before it asks again.
PARK_MS = 1000
#: Batches finishing in the background (behind a slow call) at most; then the agent waits.
MAX_LATE_BATCHES = 8
#: The usual call time of a target is at most counted up to this, for slowness.
MAX_USUAL_S = 5.0

#: After a call to a target passed its deadline, for this long its writes do not queue
#: behind a slow call to it: they wait in the delay tier.
MISSED_FOR_S = 60.0

#: Slow calls in flight per (namespace, target).
_slow: Counter[tuple[str, str]] = Counter()
#: The latest call started per (namespace, target): a later one waits for it while it is slow.
_latest: dict[tuple[str, str], asyncio.Task[list[Outcome]]] = {}
#: When a call per (namespace, target) last passed its deadline (loop time).
_missed: dict[tuple[str, str], float] = {}
#: Smoothed call time per (namespace, target), seconds.
_usual: dict[tuple[str, str], float] = {}
#: Batches whose records are acked once their slow calls have ended.
_late_batches: set[asyncio.Future[None]] = set()

#: The target a namespace without targets delivers to: the default database's journal.
JOURNAL = TargetDef(identifier="journal", type="sql", config={})


@dataclass(slots=True)
class Item:
    """One record of a batch on its way to its targets."""

    raw: bytes | None
    headers: dict[str, str]
    key: bytes | None
    source: str
    namespace: Namespace | None = None
    request: WriteRequest | None = None
    writes: dict[str, Write] = field(default_factory=dict)  # target identifier -> write
    seqs: dict[str, int | None] = field(default_factory=dict)  # ordering: number per target

    @property
    def attempt(self) -> int:
        try:
            return max(1, int(self.headers.get(names.ATTEMPT) or 1))
        except ValueError:
            return 1


@dataclass(slots=True, eq=False)
class _Call:
    """One target's share of a wave: a ``deliver()`` call running as a task of its own."""

    namespace: str
    identifier: str
    members: list[Item]
    ordered: bool
    task: asyncio.Task[list[Outcome]]
    #: Loop time from which the call no longer holds its batch (never, when ordered).
    slow_at: float

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.identifier)


@dataclass(slots=True)
class _Open:
    fingerprint: bytes
    target: Target


_targets: dict[tuple[str, str], _Open] = {}
#: Opening a target is rare; two batches (or a warm-up) asking at once open it once.
_opening = asyncio.Lock()


async def target_for(namespace: str, definition: TargetDef) -> Target:
    """The open target for a namespace's target definition; reopened when it changes."""
    fingerprint = orjson.dumps(definition.model_dump(), option=orjson.OPT_SORT_KEYS)
    slot = _targets.get((namespace, definition.identifier))
    if slot is not None and slot.fingerprint == fingerprint:
        return slot.target
    async with _opening:
        slot = _targets.get((namespace, definition.identifier))
        if slot is not None and slot.fingerprint == fingerprint:
            return slot.target
        target = create_target(definition.type, definition.identifier, definition.config, settings)
        circuit = definition.circuit  # a circuit breaker per (namespace, target)
        target = guard(
            namespace,
            target,
            threshold=circuit.threshold,
            cooldown=circuit.cooldown_ms / 1000,
            max_cooldown=circuit.max_cooldown_ms / 1000,
        )
        await target.open()
        _targets[(namespace, definition.identifier)] = _Open(fingerprint, target)
    if slot is not None:
        await slot.target.close()
    return target


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
    metrics.BATCH_SIZE.labels("deliver").observe(len(batch))
    items = [_item(message) for message in batch.records]
    follow_ups = [r for item in items if (r := _plan(item)) is not None]
    done, late = await _deliver_all(items)
    follow_ups += done
    if not late:
        await _finish(batch, follow_ups)
        return
    for call in late:
        _slow[call.key] += 1
        metrics.SLOW_CALLS.labels(*call.key).inc()
        call.task.add_done_callback(functools.partial(_slow_ended, call.key))
    log.info(
        "target %s: a call of %d writes is slow; its batch of %d goes on in the background",
        ", ".join(f"{c.namespace}/{c.identifier}" for c in late),
        sum(len(c.members) for c in late),
        len(batch),
        extra={"agent": "deliver", "count": len(batch)},
    )
    if follow_ups:  # what is decided goes out now (a transaction waits for its outcomes)
        await producing.emit_until_durable(follow_ups, what=f"{len(follow_ups)} follow-ups")
    finishing = asyncio.ensure_future(_finish_late(batch, [], late))
    _late_batches.add(finishing)
    finishing.add_done_callback(_late_batches.discard)
    while len(_late_batches) >= MAX_LATE_BATCHES:
        await asyncio.wait(set(_late_batches), return_when=asyncio.FIRST_COMPLETED)


def _slow_ended(key: tuple[str, str], _: object) -> None:
    _slow[key] -= 1
    if _slow[key] <= 0:
        del _slow[key]
    metrics.SLOW_CALLS.labels(*key).dec()


async def _finish_late(batch: Batch, follow_ups: list[Record], late: list[_Call]) -> None:
    """Wait for a batch's slow calls (each ends by its deadline), then finish the batch."""
    try:
        await asyncio.wait([call.task for call in late])
        for call in late:
            follow_ups += _outcomes(call, {})
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
    # Shared with a batch of other partitions worked on meanwhile: its outcomes so far
    # may go out with this one (statistics and statuses are at-least-once, idempotent).
    follow_ups += _stats_deltas()
    follow_ups += STATUS.drain(topics.NAMES["status"], settings.partitions)
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


def _item(message: Any) -> Item:
    """One ``wal-deliver`` record (aiokafka's ``ConsumerRecord``) as an item."""
    return Item(
        raw=message.value,
        headers=names.decode_headers(message.headers),
        key=message.key,
        source=f"{message.topic}/{message.partition}/{message.offset}",
    )


def _plan(item: Item) -> Record | None:
    """Work out the item's writes, one per target; a dead letter if it has none to make."""
    admitted = _as_admitted(item)
    if admitted is not None:  # the common case: nothing to check again
        namespace, payload = admitted
        refs: list[TargetRef] = []
    else:
        try:
            request = WriteRequest.model_validate(orjson.loads(item.raw or b"null"))
        except (orjson.JSONDecodeError, ValueError) as exc:
            return _dead_letter(item, "VALIDATION_ERROR", f"not a write request: {exc}"[:500])
        found = lookup(request.namespace)
        if found is None:
            return _dead_letter(
                item, "NAMESPACE_NOT_FOUND", f"namespace '{request.namespace}' was deleted"
            )
        item.request = request
        namespace, payload, refs = found, request.payload, request.targets
    item.namespace = namespace
    message_id = item.headers.get(names.MESSAGE_ID) or (item.request and item.request.message_id)
    if not message_id:
        return _dead_letter(item, "VALIDATION_ERROR", "record has no wal-message-id header")
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


def _lifecycle(item: Item) -> Lifecycle:
    """The request's lifecycle (validated when first needed: on a failure)."""
    if item.request is None:
        try:
            item.request = WriteRequest.model_validate(orjson.loads(item.raw or b"null"))
        except (orjson.JSONDecodeError, ValueError):
            return Lifecycle()
    return item.request.lifecycle


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


async def _deliver_all(items: list[Item]) -> tuple[list[Record], list[_Call]]:
    """Deliver every planned write. Returns the retries, parked writes and dead letters so
    far, and the slow calls the batch must not wait for (their follow-ups come later).

    Writes of ``ordering: key`` namespaces go in waves - at most one per (key,
    target) in each - so a write that fails blocks the ones behind it before they
    reach the target (see :mod:`tables.ordering`).
    """
    pending = [(item, identifier) for item in items for identifier in item.writes]
    follow_ups: list[Record] = []
    states: dict[bytes, dict[str, ordering.KeyState]] = {}
    late: list[_Call] = []
    while pending:
        wave, pending = _wave(pending)
        wave = [w for w in wave if not _parked(w, states, follow_ups)]
        groups: dict[tuple[str, str], list[Item]] = defaultdict(list)
        for item, identifier in wave:
            assert item.namespace is not None
            key = (item.namespace.name, identifier)
            if key in _slow and _missed_lately(key) and not _ordered(item):
                follow_ups.append(_park(item, identifier, None))  # wait in Kafka, not here
            else:
                groups[key].append(item)
        calls = [_call(ns, identifier, members) for (ns, identifier), members in groups.items()]
        try:
            slow = await _settle(calls)
        except asyncio.CancelledError:  # the agent is stopping: no call outlives its batch
            for call in calls:
                call.task.cancel()
            raise
        late += slow
        for call in calls:
            if call not in slow:
                follow_ups += _outcomes(call, states)
    # The sequencing state goes out with the follow-ups, durable before the acks.
    follow_ups += [ordering.save(key, per_target) for key, per_target in states.items()]
    return follow_ups, late


def _call(namespace: str, identifier: str, members: list[Item]) -> _Call:
    """Start one target's share of a wave - after the target's slow call, if one runs."""
    key = (namespace, identifier)
    ordered = any(_ordered(m) for m in members)
    usual = min(_usual.get(key, 0.0) * 4, MAX_USUAL_S)
    slow_after = max(settings.target_slow_ms / 1000, usual)
    previous = _latest.get(key)
    if previous is not None and not previous.done() and key in _slow and not ordered:
        task = asyncio.ensure_future(_after(previous, namespace, identifier, members))
    else:
        task = asyncio.ensure_future(_deliver_group(namespace, identifier, members))
    _latest[key] = task
    task.add_done_callback(functools.partial(_forget, key))
    loop = asyncio.get_running_loop()
    return _Call(
        namespace,
        identifier,
        members,
        ordered,
        task,
        float("inf") if ordered else loop.time() + slow_after,
    )


def _forget(key: tuple[str, str], task: asyncio.Task[list[Outcome]]) -> None:
    if _latest.get(key) is task:
        del _latest[key]


async def _after(
    previous: asyncio.Task[list[Outcome]], namespace: str, identifier: str, members: list[Item]
) -> list[Outcome]:
    """A call queued behind the target's slow one: a key's writes reach it in order. When
    the one before passes its deadline, this one's writes go to the retry path uncalled."""
    queued = asyncio.get_running_loop().time()
    await asyncio.wait([previous])
    if _missed.get((namespace, identifier), float("-inf")) >= queued:
        message = "not called: the call before it passed its deadline"
        return [retryable("TARGET_UNAVAILABLE", message)] * len(members)
    return await _deliver_group(namespace, identifier, members)


def _missed_lately(key: tuple[str, str]) -> bool:
    missed = _missed.get(key)
    return missed is not None and asyncio.get_running_loop().time() - missed < MISSED_FOR_S


async def _settle(calls: list[_Call]) -> list[_Call]:
    """Wait for the calls until each has ended or become slow; return the slow ones."""
    loop = asyncio.get_running_loop()
    while True:
        running = [c for c in calls if not c.task.done()]
        if not running:
            return []
        now = loop.time()
        if all(c.slow_at <= now for c in running):
            return running
        until = min(c.slow_at for c in running) - now
        await asyncio.wait(
            [c.task for c in running],
            timeout=None if until == float("inf") else max(until, 0.0),
            return_when=asyncio.FIRST_COMPLETED,
        )


def _outcomes(call: _Call, states: dict[bytes, dict[str, ordering.KeyState]]) -> list[Record]:
    """The follow-up records of an ended call's outcomes."""
    records = []
    for item, outcome in zip(call.members, call.task.result(), strict=True):
        record = _next_step(item, call.identifier, outcome, states)
        if record is not None:
            records.append(record)
    return records


def _wave(pending: list[tuple[Item, str]]) -> tuple[list[tuple[Item, str]], list[tuple[Item, str]]]:
    """Split off what may go to the targets together: one write per ordered (key, target)."""
    if not any(_ordered(item) for item, _ in pending):
        return pending, []
    wave, rest, seen = [], [], set()
    for item, identifier in pending:
        slot = (item.key, identifier)
        if _ordered(item) and slot in seen:
            rest.append((item, identifier))
        else:
            seen.add(slot)
            wave.append((item, identifier))
    return wave, rest


def _ordered(item: Item) -> bool:
    return item.namespace is not None and item.namespace.ordering == "key"


def _parked(
    write: tuple[Item, str],
    states: dict[bytes, dict[str, ordering.KeyState]],
    follow_ups: list[Record],
) -> bool:
    """Gate an ordered write; when it must wait behind its key, park it and say so."""
    item, identifier = write
    if not _ordered(item):
        return False
    per_target = states.setdefault(item.key or b"", ordering.load(item.key or b""))
    action, state, seq = ordering.gate(
        per_target.get(identifier), item.writes[identifier].id, _carried_seq(item, identifier)
    )
    if state is not None:
        per_target[identifier] = state
    item.seqs[identifier] = seq
    if action == "deliver":
        return False
    follow_ups.append(_park(item, identifier, seq))
    return True


def _next_step(
    item: Item,
    identifier: str,
    outcome: Outcome,
    states: dict[bytes, dict[str, ordering.KeyState]],
) -> Record | None:
    """After a write's outcome: its follow-up record, and its key's sequencing."""
    record, final = (None, True) if outcome.ok else _after_failure(item, identifier, outcome)
    if outcome.ok:
        _note(item, "delivered", identifier)
    if outcome.ok and item.headers.get(names.TRANSACTION_ID):
        record = _mutation_outcome(item, None)  # the transaction decides what follows
    if not _ordered(item):
        return record
    per_target = states.setdefault(item.key or b"", ordering.load(item.key or b""))
    message_id = item.writes[identifier].id
    seq = item.seqs.get(identifier)
    if not final:  # going round again: the key waits behind it
        assert record is not None
        per_target[identifier], seq = ordering.block(per_target.get(identifier), message_id, seq)
        return replace(record, headers={**record.headers, names.ORDER_SEQ: str(seq)})
    released = ordering.release(per_target.get(identifier), message_id, seq)
    if released is None:
        per_target.pop(identifier, None)
    else:
        per_target[identifier] = released
    return record


def _mutation_outcome(item: Item, error: str | None) -> Record:
    """A mutation's final outcome, for its transaction (``error`` None: completed)."""
    return transactions.outcome(
        item.headers[names.TRANSACTION_ID],
        int(item.headers.get(names.MUTATION_INDEX) or 0),
        item.headers.get(names.MUTATION_KIND) or "forward",
        error is None,
        error,
    )


def _carried_seq(item: Item, identifier: str) -> int | None:
    if item.headers.get(names.TARGET) != identifier or not item.headers.get(names.ORDER_SEQ):
        return None
    return int(item.headers[names.ORDER_SEQ])


def _park(item: Item, identifier: str, seq: int | None) -> Record:
    """Send a write round the shortest delay tier until its key (or its slow target) lets
    it through; its attempt count is unchanged."""
    due = int(time.time() * 1000) + PARK_MS
    headers: dict[str, str | None] = dict(item.headers)
    headers.update({names.TARGET: identifier, names.DUE_AT: str(due)})
    if seq is not None:
        headers[names.ORDER_SEQ] = str(seq)
    _count(item, identifier, "parked")
    return Record(topics.delay_topic_for(PARK_MS), item.key, item.raw, headers)


async def _deliver_group(
    namespace_name: str, identifier: str, members: list[Item]
) -> list[Outcome]:
    """One target's share of a wave: one ``deliver()`` call; an outcome per member."""
    namespace = members[0].namespace
    assert namespace is not None
    definition = namespace.target(identifier) or JOURNAL
    try:
        target = await target_for(namespace_name, definition)
    except ConfigError as exc:
        return [permanent("TARGET_REJECTED", exc.message)] * len(members)
    breaker = BREAKERS.get(f"{namespace_name}/{identifier}")
    deadline = settings.target_deadline_s
    started = time.monotonic()
    try:
        async with asyncio.timeout(deadline):
            outcomes = await target.deliver([m.writes[identifier] for m in members])
    except TimeoutError:
        outcomes = [
            retryable("TARGET_UNAVAILABLE", f"no answer within the {deadline:g} s deadline")
        ] * len(members)
        metrics.TARGET_DEADLINES.labels(namespace_name, identifier).inc()
        _missed[(namespace_name, identifier)] = asyncio.get_running_loop().time()
        if breaker is not None:  # abandoned, so the target's own accounting never ran
            breaker.record(outcomes)
    else:
        usual = _usual.get((namespace_name, identifier))
        took = time.monotonic() - started
        _usual[(namespace_name, identifier)] = took if usual is None else 0.8 * usual + 0.2 * took
    metrics.DELIVERY_SECONDS.labels(namespace_name, identifier).observe(time.monotonic() - started)
    _count_delivered(namespace_name, identifier, members, outcomes)
    if breaker is not None:
        metrics.CIRCUIT_STATE.labels(namespace_name, identifier).set(CIRCUIT_LEVELS[breaker.state])
    failed = [o for o in outcomes if not o.ok]
    if failed:
        log.warning(
            "target %s/%s: %d of %d writes failed (first: %s: %s)",
            namespace_name,
            identifier,
            len(failed),
            len(members),
            failed[0].code,
            failed[0].message,
            extra={"namespace": namespace_name, "target": identifier},
        )
    return outcomes


def _after_failure(item: Item, identifier: str, outcome: Outcome) -> tuple[Record | None, bool]:
    """A failed write's next step: a retry in a delay tier (not final), or a dead letter."""
    assert item.namespace is not None
    lifecycle = _lifecycle(item)
    policy = backoff.effective(item.namespace.retry_policy, lifecycle.retry_policy)
    now = int(time.time() * 1000)
    received = int(item.headers.get(names.RECEIVED_AT) or now)
    expires = received + 1000 * (lifecycle.ttl or item.namespace.message_ttl_seconds)
    failure = f"{outcome.code}: {outcome.message}"
    if outcome.status == "retryable" and backoff.should_retry(policy, item.attempt, outcome.code):
        wait = backoff.delay_ms(policy, item.attempt, retry_after_s=outcome.retry_after)
        if now + wait < expires:
            _count(item, identifier, "retried")
            return _retry(item, identifier, outcome, now, wait), False
        code, message = "MESSAGE_EXPIRED", f"ttl passed before a retry; last {failure}"
    elif outcome.status == "retryable" and item.attempt >= policy.max_attempts:
        code, message = "RETRIES_EXHAUSTED", f"{item.attempt} attempts failed; last {failure}"
    else:
        code, message = outcome.code or "TARGET_REJECTED", outcome.message
    if item.headers.get(names.TRANSACTION_ID):  # its transaction decides, not the DLQ
        _note(item, "failed", identifier, code=code, message=message[:300])
        return _mutation_outcome(item, f"{code}: {message}"), True
    return _dead_letter(item, code, message, identifier), True


def _retry(item: Item, identifier: str, outcome: Outcome, now: int, wait: int) -> Record:
    _note(
        item,
        "retrying",
        identifier,
        code=outcome.code,
        message=outcome.message[:300],
        next=now + wait,
    )
    headers: dict[str, str | None] = dict(item.headers)
    headers.update(
        {
            names.ATTEMPT: str(item.attempt + 1),
            names.TARGET: identifier,
            names.DUE_AT: str(now + wait),
            names.ERROR_CODE: outcome.code,
            names.ERROR_MESSAGE: outcome.message[:1000],
            names.FIRST_FAILED_AT: item.headers.get(names.FIRST_FAILED_AT) or str(now),
            names.LAST_FAILED_AT: str(now),
        }
    )
    return Record(topics.delay_topic_for(wait), item.key, item.raw, headers)


def _note(item: Item, step: str, target: str | None, **fields: Any) -> None:
    """Note a write's step for ``GET /wal/messages/{id}`` (emitted with the batch)."""
    STATUS.note(
        item.headers.get(names.MESSAGE_ID),
        item.namespace.name if item.namespace else metrics.UNKNOWN,
        step,
        target=target,
        attempt=item.attempt,
        transactionId=item.headers.get(names.TRANSACTION_ID),
        **fields,
    )


def _count(item: Item, target: str | None, outcome: str) -> None:
    """Count an outcome in Prometheus and in the next stats delta, naming its record."""
    namespace = item.namespace.name if item.namespace else metrics.UNKNOWN
    metrics.MESSAGES.labels(namespace, "deliver", outcome).inc()
    counted = item.source if outcome in ("retried", "parked") else _origin(item)
    _tally[(namespace, target or "", outcome)].append(counted)


def _origin(item: Item) -> str:
    """The record a write's final outcome is counted against.

    On its first pass, its ingest record: ingest re-reading a request after a crash
    sends the write to ``wal-deliver`` again, and it must not count twice. Written as
    ``ingest-topic/partition:deliver-partition/offset``, so each run of counted offsets
    comes from one ingest partition through one deliver partition: in order (see
    :func:`tables.stats.delta`). A write back from a delay tier (a retry, a park) and
    a transaction's mutation count by their own ``wal-deliver`` record.
    """
    origin = item.headers.get(names.SOURCE) or ""
    parts = origin.rsplit("/", 2)
    if item.headers.get(names.TARGET) or len(parts) != 3:
        return item.source
    topic, partition, offset = parts
    if not (partition.isdigit() and offset.isdigit()):
        return item.source
    through = item.source.rsplit("/", 2)[1]
    return f"{topic}/{partition}:{through}/{offset}"


def _count_delivered(
    namespace: str, identifier: str, members: list[Item], outcomes: list[Outcome]
) -> None:
    now = time.time()
    latency = metrics.END_TO_END_SECONDS.labels(namespace)
    waits = _latencies[(namespace, identifier)]  # since the last stats delta: other calls' too
    sources = _tally[(namespace, identifier, "delivered")]
    delivered = 0
    for member, outcome in zip(members, outcomes, strict=True):
        if outcome.ok:
            received = member.headers.get(names.RECEIVED_AT)
            if received:
                seconds = max(0.0, now - int(received) / 1000)
                latency.observe(seconds)
                waits.append(int(seconds * 1000))
            sources.append(_origin(member))
            delivered += 1
    metrics.MESSAGES.labels(namespace, "deliver", "delivered").inc(delivered)


def _stats_deltas() -> list[Record]:
    """The outcomes counted since the last call as ``wal-stats`` records (durable with the
    batch's output), one per (namespace, target), naming the records they count."""
    per_call: dict[tuple[str, str], dict[str, list[str]]] = defaultdict(dict)
    for (ns, target, outcome), sources in _tally.items():
        per_call[(ns, target)][outcome] = sources
    records = [
        stats.delta(
            ns,
            target=target or None,
            sources=sources,
            latency_ms=_latencies.get((ns, target)),
        )
        for (ns, target), sources in per_call.items()
    ]
    _latencies.clear()
    _tally.clear()
    return records


def _dead_letter(item: Item, code: str, message: str, target: str | None = None) -> Record | None:
    """The dead letter for an item, or None when its DLQ is disabled (then logged, dropped)."""
    name = item.namespace.name if item.namespace else metrics.UNKNOWN
    metrics.DEAD_LETTERS.labels(name, code).inc()
    step = "dropped" if _dlq_disabled(item) else "dead_lettered"
    _note(item, step, target, code=code, message=message[:300])
    if _dlq_disabled(item):
        _count(item, target, "dropped")
        message_id = item.headers.get(names.MESSAGE_ID)
        log.warning(
            "dropped %s (DLQ disabled): %s: %s",
            message_id or item.source,
            code,
            message,
            extra={"message_id": message_id, "namespace": name},
        )
        return None
    _count(item, target, "dead_lettered")
    headers: dict[str, str | None] = dict(item.headers)
    headers.update(
        {names.TARGET: target, names.SOURCE: item.headers.get(names.SOURCE) or item.source}
    )
    key = item.headers.get(names.ORIGINAL_KEY)
    original = key.encode() if key else None
    return names.dead_letter(
        _dlq_topic(item), original, item.raw, headers, code=code, message=message
    )


def _dlq_topic(item: Item) -> str:
    return (item.namespace.dlq_config.topic_name if item.namespace else None) or topics.NAMES["dlq"]


def _dlq_disabled(item: Item) -> bool:
    namespace_off = item.namespace is not None and not item.namespace.dlq_config.enabled
    request_off = item.raw is not None and not _lifecycle(item).enable_dlq
    return namespace_off or request_off
