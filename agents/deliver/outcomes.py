"""Deliver: what becomes of each write - delivered, retried, parked, dead-lettered or
dropped - with its status note and its count, decided here and nowhere else."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from agents.deliver import pace
from agents.deliver.items import Item, lifecycle, ordered
from app import backoff, metrics, names, topics
from app.names import Record
from tables import ordering, stats, transactions
from tables.status import Collector, tracked
from targets.base import Outcome

if TYPE_CHECKING:
    from agents.deliver.calls import Call

log = logging.getLogger("wal.deliver")


@dataclass(slots=True)
class Tally:
    r"""What one batch decided, to go out with its records: the sources each stats outcome
    counts ((namespace, target, outcome) -> ``Item.source``\ s), latencies per (namespace,
    target), and its status notes. One per batch (:func:`begin`), never shared: a
    batch's calls and its late finish see it through their context."""

    sources: defaultdict[tuple[str, str, str], list[str]] = field(
        default_factory=lambda: defaultdict(list)
    )
    latencies: defaultdict[tuple[str, str], list[int]] = field(
        default_factory=lambda: defaultdict(list)
    )
    status: Collector = field(default_factory=Collector)


_batch: ContextVar[Tally] = ContextVar("deliver_batch")


def begin() -> Tally:
    """A new batch: its own tally, for this task and the tasks it starts."""
    tally = Tally()
    _batch.set(tally)
    return tally


def current() -> Tally:
    """The tally of the batch being worked on (one of its own outside a batch)."""
    try:
        return _batch.get()
    except LookupError:
        return begin()


#: How long a write parked behind its key (or a slow target) waits before it asks again.
PARK_MS = 1000


def follow_ups_of(call: Call, states: dict[bytes, dict[str, ordering.KeyState]]) -> list[Record]:
    """The follow-up records of an ended call's outcomes.

    A write delivered with nothing to follow (no key sequencing, no transaction) - nearly
    every write - only notes its status: those notes are made once per attempt number,
    not once per write (the same entries :func:`finish` notes)."""
    records = []
    delivered: dict[int, list[str]] = {}  # attempt -> message ids
    status = current().status
    for item, outcome in zip(call.members, call.task.result(), strict=True):
        if outcome.ok and not ordered(item) and names.TRANSACTION_ID not in item.headers:
            level = item.namespace.status_tracking if item.namespace else "all"
            attempt = item.attempt
            if tracked(level, "delivered", attempt) and (mid := item.headers.get(names.MESSAGE_ID)):
                delivered.setdefault(attempt, []).append(mid)
            continue
        record = _next_step(item, call.identifier, outcome, states)
        if record is not None:
            records.append(record)
    for attempt, ids in delivered.items():
        status.note_many(ids, call.namespace, "delivered", target=call.identifier, attempt=attempt)
    return records


class Fate(StrEnum):
    """What becomes of one write at one target: the one vocabulary of deliver's decisions,
    of its status notes (``GET /wal/messages/{id}``) and of its counts (``wal-stats``,
    ``wal_messages_total``)."""

    DELIVERED = "delivered"
    RETRIED = "retried"  #: again later, from a delay tier (its status: retrying)
    PARKED = "parked"  #: waits in the shortest tier behind its key or a slow target
    DEAD_LETTERED = "dead_lettered"
    DROPPED = "dropped"  #: would be dead-lettered, but its DLQ is disabled
    FAILED = "failed"  #: a transaction's mutation: its transaction decides what follows
    CANCELLED = "cancelled"  #: cancelled before it was delivered (tables/cancellations)

    @property
    def final(self) -> bool:
        return self not in (Fate.RETRIED, Fate.PARKED)


#: The status step a fate notes (parking notes nothing: the write is still pending).
_STEPS = {Fate.RETRIED: "retrying", Fate.PARKED: None}


@dataclass(frozen=True, slots=True)
class Decision:
    """A fate, and why (``code``, ``message``) or when again (``wait_ms``)."""

    fate: Fate
    code: str | None = None
    message: str = ""
    wait_ms: int = 0


#: The decision for a write its target applied (one object, not one per write).
DELIVERED_DECISION = Decision(Fate.DELIVERED)


def decide(item: Item, outcome: Outcome, now_ms: int) -> Decision:
    """The fate of a write after its target's answer: the namespace's and the request's
    retry policy, its time to live, and whether a transaction owns it."""
    if outcome.ok:
        return DELIVERED_DECISION
    assert item.namespace is not None
    asked = lifecycle(item)
    policy = backoff.effective(item.namespace.retry_policy, asked.retry_policy)
    expires = _expires_at(item, now_ms)
    failure = f"{outcome.code}: {outcome.message}"
    if outcome.status == "retryable" and backoff.should_retry(policy, item.attempt, outcome.code):
        wait = backoff.delay_ms(policy, item.attempt, retry_after_s=outcome.retry_after)
        if now_ms + wait < expires:
            return Decision(Fate.RETRIED, outcome.code, outcome.message, wait)
        code, message = "MESSAGE_EXPIRED", f"ttl passed before a retry; last {failure}"
    elif outcome.status == "retryable" and item.attempt >= policy.max_attempts:
        code, message = "RETRIES_EXHAUSTED", f"{item.attempt} attempts failed; last {failure}"
    else:
        code, message = outcome.code or "TARGET_REJECTED", outcome.message
    if item.headers.get(names.TRANSACTION_ID):
        return Decision(Fate.FAILED, code, message)
    return Decision(Fate.DEAD_LETTERED, code, message)


def _expires_at(item: Item, now_ms: int) -> int:
    """When the write's time to live ends (the request's ``lifecycle.ttl``, else its
    namespace's ``messageTtlSeconds``, from when it was received)."""
    assert item.namespace is not None
    received = int(item.headers.get(names.RECEIVED_AT) or now_ms)
    return received + 1000 * (lifecycle(item).ttl or item.namespace.message_ttl_seconds)


def finish(
    item: Item, target: str | None, decision: Decision, seq: int | None = None
) -> Record | None:
    """Carry out a decision: note it, count it, and return the record it sends (a retry,
    a park, a dead letter, a transaction's outcome) or None. A delivered write is counted
    with its call (:func:`count_delivered`), with its latency."""
    if decision is DELIVERED_DECISION:  # nearly every write: the least work per write
        _note(item, "delivered", target)
        return _mutation_outcome(item, None) if item.headers.get(names.TRANSACTION_ID) else None
    fate, now = decision.fate, int(time.time() * 1000)
    if fate is Fate.DEAD_LETTERED and _dlq_disabled(item):
        fate = Fate.DROPPED
    if fate in (Fate.DEAD_LETTERED, Fate.DROPPED):
        metrics.DEAD_LETTERS.labels(_name(item), decision.code or "TARGET_REJECTED").inc()
    step = _STEPS.get(fate, fate.value)
    if step is not None:
        fields: dict[str, Any] = {}
        if decision.code:
            fields.update(code=decision.code, message=decision.message[:300])
        if fate is Fate.RETRIED:
            fields["next"] = now + decision.wait_ms
        _note(item, step, target, **fields)
    if fate not in (Fate.DELIVERED, Fate.FAILED):
        count(item, target, fate.value)
    if fate is Fate.DELIVERED:
        return _mutation_outcome(item, None) if item.headers.get(names.TRANSACTION_ID) else None
    if fate is Fate.FAILED:
        return _mutation_outcome(item, f"{decision.code}: {decision.message}")
    if fate is Fate.RETRIED:
        return _retry(item, target or "", decision, now)
    if fate is Fate.PARKED:
        return _park(item, target or "", seq, now, decision)
    if fate is Fate.CANCELLED:
        return None
    if fate is Fate.DROPPED:
        message_id = item.headers.get(names.MESSAGE_ID)
        log.warning(
            "dropped %s (DLQ disabled): %s: %s",
            message_id or item.source,
            decision.code,
            decision.message,
            extra={"message_id": message_id, "namespace": _name(item)},
        )
        return None
    return _dead_letter(item, target, decision)


def _next_step(
    item: Item,
    identifier: str,
    outcome: Outcome,
    states: dict[bytes, dict[str, ordering.KeyState]],
) -> Record | None:
    """After a write's outcome: its follow-up record, and its key's sequencing."""
    now = int(time.time() * 1000)
    if outcome.code == "TARGET_THROTTLED" and not ordered(item) and now < _expires_at(item, now):
        # Not a failure: it waits its turn at the pace the answer just lowered.
        wait_s, booked = pace.turn((_name(item), identifier), outcome.retry_after)
        return park(item, identifier, None, wait_ms=int(wait_s * 1000), paced=booked)
    return _settle(item, identifier, decide(item, outcome, now), states)


#: The decision for a write of a message cancelled before it was delivered.
CANCELLED_DECISION = Decision(Fate.CANCELLED, "CANCELLED", "cancelled before delivery")


def withdraw(
    item: Item, identifier: str, states: dict[bytes, dict[str, ordering.KeyState]]
) -> Record | None:
    """A cancelled message's write: never delivered, noted and counted ``cancelled``; an
    ``ordering: key`` write releases its key's turn, as any final outcome does."""
    return _settle(item, identifier, CANCELLED_DECISION, states)


def _settle(
    item: Item,
    identifier: str,
    decision: Decision,
    states: dict[bytes, dict[str, ordering.KeyState]],
) -> Record | None:
    """Carry out a write's decision, and its key's sequencing."""
    record = finish(item, identifier, decision)
    if not ordered(item):
        return record
    per_target = states.setdefault(item.key or b"", ordering.load(item.key or b""))
    message_id = item.writes[identifier].id
    seq = item.seqs.get(identifier)
    if not decision.fate.final:  # going round again: the key waits behind it
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


def park(
    item: Item, identifier: str, seq: int | None, *, wait_ms: int = PARK_MS, paced: bool = False
) -> Record:
    """Send a write round a delay tier until its key (or its slow target) lets it through,
    or (``paced``) until its turn at its target's pace comes; its attempt count unchanged."""
    decision = Decision(Fate.PARKED, PACED if paced else None, wait_ms=wait_ms)
    record = finish(item, identifier, decision, seq)
    assert record is not None
    return record


def hold(item: Item, identifier: str, states: dict[bytes, dict[str, ordering.KeyState]]) -> Record:
    """Park a write its namespace or target is paused for (:mod:`app.pausing`): it asks
    again every :data:`PAUSED_WAIT_MS`, its attempt count unchanged. An ``ordering: key``
    write blocks its key first, as a retry does: its key's later writes wait behind it,
    and after the resume they go in order."""
    if not ordered(item):
        return park(item, identifier, None, wait_ms=PAUSED_WAIT_MS)
    per_target = states.setdefault(item.key or b"", ordering.load(item.key or b""))
    state, seq = ordering.block(
        per_target.get(identifier), item.writes[identifier].id, item.seqs.get(identifier)
    )
    per_target[identifier] = state
    return park(item, identifier, seq, wait_ms=PAUSED_WAIT_MS)


#: How often a write held by a pause asks again (a resume reaches it within this long).
PAUSED_WAIT_MS = 5_000

#: The code of a park for a target's pace: the write goes when it is back.
PACED = "PACED"


def _park(item: Item, identifier: str, seq: int | None, now: int, decision: Decision) -> Record:
    wait = decision.wait_ms or PARK_MS
    headers: dict[str, str | None] = dict(item.headers)
    headers.update({names.TARGET: identifier, names.DUE_AT: str(now + wait)})
    headers[names.PACED] = identifier if decision.code == PACED else None
    if seq is not None:
        headers[names.ORDER_SEQ] = str(seq)
    return Record(topics.delay_topic_for(wait), item.key, item.raw, headers)


def _retry(item: Item, identifier: str, decision: Decision, now: int) -> Record:
    headers: dict[str, str | None] = dict(item.headers)
    headers.update(
        {
            names.ATTEMPT: str(item.attempt + 1),
            names.TARGET: identifier,
            names.DUE_AT: str(now + decision.wait_ms),
            names.ERROR_CODE: decision.code,
            names.ERROR_MESSAGE: decision.message[:1000],
            names.FIRST_FAILED_AT: item.headers.get(names.FIRST_FAILED_AT) or str(now),
            names.LAST_FAILED_AT: str(now),
            names.PACED: None,  # it waits for its retry; its next turn is booked anew
        }
    )
    return Record(topics.delay_topic_for(decision.wait_ms), item.key, item.raw, headers)


def _note(item: Item, step: str, target: str | None, **fields: Any) -> None:
    """Note a write's step for ``GET /wal/messages/{id}`` (emitted with the batch), as
    far as its namespace tracks statuses."""
    level = item.namespace.status_tracking if item.namespace else "all"
    if not tracked(level, step, item.attempt):
        return
    current().status.note(
        item.headers.get(names.MESSAGE_ID),
        _name(item),
        step,
        target=target,
        attempt=item.attempt,
        transactionId=item.headers.get(names.TRANSACTION_ID),
        **fields,
    )


def count(item: Item, target: str | None, outcome: str) -> None:
    """Count an outcome in Prometheus and in the next stats delta, naming its record."""
    namespace = _name(item)
    metrics.MESSAGES.labels(namespace, "deliver", outcome).inc()
    counted = item.source if outcome in ("retried", "parked") else origin(item)
    current().sources[(namespace, target or "", outcome)].append(counted)


def origin(item: Item) -> str:
    """The record a write's final outcome is counted against.

    On its first pass, its ingest record: ingest re-reading a request after a crash
    sends the write to ``wal-deliver`` again, and it must not count twice. Written as
    ``ingest-topic/partition:deliver-partition/offset``, so each run of counted offsets
    comes from one ingest partition through one deliver partition: in order (see
    :func:`tables.stats.delta`). A write back from a delay tier (a retry, a park) and
    a transaction's mutation count by their own ``wal-deliver`` record.
    """
    source = item.headers.get(names.SOURCE) or ""
    parts = source.rsplit("/", 2)
    if item.headers.get(names.TARGET) or len(parts) != 3:
        return item.source
    topic, partition, offset = parts
    if not (partition.isdigit() and offset.isdigit()):
        return item.source
    through = item.source.rsplit("/", 2)[1]
    return f"{topic}/{partition}:{through}/{offset}"


def count_delivered(
    namespace: str, identifier: str, members: list[Item], outcomes: list[Outcome]
) -> None:
    now = time.time()
    latency = metrics.END_TO_END_SECONDS.labels(namespace)
    tally = current()
    waits = tally.latencies[(namespace, identifier)]
    sources = tally.sources[(namespace, identifier, "delivered")]
    delivered = 0
    seen: list[float] = []
    for member, outcome in zip(members, outcomes, strict=True):
        if outcome.ok:
            received = member.headers.get(names.RECEIVED_AT)
            if received:
                seconds = max(0.0, now - int(received) / 1000)
                seen.append(seconds)
                waits.append(int(seconds * 1000))
            sources.append(origin(member))
            delivered += 1
    metrics.observe_many(latency, seen)
    metrics.MESSAGES.labels(namespace, "deliver", "delivered").inc(delivered)


def stats_deltas() -> list[Record]:
    """This batch's outcomes as ``wal-stats`` records (durable with the batch's output),
    one per (namespace, target), naming the records they count."""
    tally = current()
    per_call: dict[tuple[str, str], dict[str, list[str]]] = defaultdict(dict)
    for (ns, target, outcome), sources in tally.sources.items():
        per_call[(ns, target)][outcome] = sources
    records = [
        stats.delta(
            ns,
            target=target or None,
            sources=sources,
            latency_ms=tally.latencies.get((ns, target)),
        )
        for (ns, target), sources in per_call.items()
    ]
    tally.latencies.clear()
    tally.sources.clear()
    return records


def dead_letter_of(item: Item, code: str, message: str, target: str | None = None) -> Record | None:
    """The dead letter for an item, or None when its DLQ is disabled (then logged, dropped)."""
    return finish(item, target, Decision(Fate.DEAD_LETTERED, code, message))


def _dead_letter(item: Item, target: str | None, decision: Decision) -> Record:
    headers: dict[str, str | None] = dict(item.headers)
    headers.update(
        {names.TARGET: target, names.SOURCE: item.headers.get(names.SOURCE) or item.source}
    )
    key = item.headers.get(names.ORIGINAL_KEY)
    original = key.encode() if key else None
    code, message = decision.code or "TARGET_REJECTED", decision.message
    return names.dead_letter(
        _dlq_topic(item), original, item.raw, headers, code=code, message=message
    )


def _dlq_topic(item: Item) -> str:
    return (item.namespace.dlq_config.topic_name if item.namespace else None) or topics.NAMES["dlq"]


def _dlq_disabled(item: Item) -> bool:
    namespace_off = item.namespace is not None and not item.namespace.dlq_config.enabled
    request_off = item.raw is not None and not lifecycle(item).enable_dlq
    return namespace_off or request_off


def _name(item: Item) -> str:
    return item.namespace.name if item.namespace else metrics.UNKNOWN
