"""Deliver: apply each admitted request to its namespace's targets.

A batch taken from ``wal-deliver`` is split by (namespace, target); each
target gets its share as one ``deliver()`` call, all targets concurrently.
Outcomes steer what happens next:

* delivered - done (a replay is delivered too: targets are idempotent);
* retryable - tried again after a backoff, for that target only, so a
  request with several targets is never re-applied where it succeeded;
* permanent - dead-lettered with the code, message and target in headers.

The batch's events are acked only once every item is delivered or durably
dead-lettered: a crash replays the batch, and the targets' ledgers make the
replay change nothing.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import orjson

from app import topics
from app.errors import ConfigError
from app.fleet import fleet, settings
from app.models import Namespace, TargetDef, TargetRef, WriteRequest
from app.topics import Record, deliver_topic
from tables.namespaces import lookup
from targets import create as create_target
from targets.base import Outcome, Target, Write

#: The target a namespace without targets delivers to: the default database's journal.
JOURNAL = TargetDef(identifier="journal", type="sql", config={})


@dataclass(slots=True)
class Item:
    """One event of a batch on its way to its targets."""

    event: Any
    raw: bytes | None
    headers: dict[str, str]
    key: bytes | None
    source: str
    namespace: Namespace | None = None
    writes: dict[str, Write] = field(default_factory=dict)  # target identifier -> write


@dataclass(slots=True)
class _Open:
    fingerprint: bytes
    target: Target


_targets: dict[tuple[str, str], _Open] = {}


async def target_for(namespace: str, definition: TargetDef) -> Target:
    """The open target for a namespace's target definition; reopened when it changes."""
    fingerprint = orjson.dumps(definition.model_dump(), option=orjson.OPT_SORT_KEYS)
    slot = _targets.get((namespace, definition.identifier))
    if slot is not None and slot.fingerprint == fingerprint:
        return slot.target
    target = create_target(definition.type, definition.identifier, definition.config, settings)
    await target.open()
    _targets[(namespace, definition.identifier)] = _Open(fingerprint, target)
    if slot is not None:
        await slot.target.close()
    return target


@fleet.agent(deliver_topic, concurrency=1)
async def deliver(stream: Any) -> None:
    """Deliver every record on ``wal-deliver``; never raises (faust #175)."""
    async for events in stream.noack_take(settings.batch_size, settings.batch_within_ms / 1000):
        items = [_item(event) for event in events]
        dead = [r for item in items if (r := _plan(item)) is not None]
        dead += await _deliver_all(items)
        if dead:
            await topics.emit_until_durable(dead, what=f"{len(dead)} dead letters")
        for event in events:
            await stream.ack(event)
        fleet.log.debug("delivered batch of %d (%d dead-lettered)", len(events), len(dead))


def _item(event: Any) -> Item:
    message = event.message
    return Item(
        event=event,
        raw=message.value,
        headers=topics.decode_headers(message.headers),
        key=message.key,
        source=f"{message.topic}/{message.partition}/{message.offset}",
    )


def _plan(item: Item) -> Record | None:
    """Work out the item's writes, one per target; a dead letter if it has none to make."""
    try:
        request = WriteRequest.model_validate(orjson.loads(item.raw or b"null"))
    except (orjson.JSONDecodeError, ValueError) as exc:
        return _dead_letter(item, "VALIDATION_ERROR", f"not a write request: {exc}"[:500])
    namespace = lookup(request.namespace)
    if namespace is None:
        return _dead_letter(
            item, "NAMESPACE_NOT_FOUND", f"namespace '{request.namespace}' was deleted"
        )
    item.namespace = namespace
    message_id = item.headers.get(topics.MESSAGE_ID) or request.message_id
    if not message_id:
        return _dead_letter(item, "VALIDATION_ERROR", "record has no wal-message-id header")
    only = item.headers.get(topics.TARGET)  # a retry is for one target only
    for definition, ref in _targets_of(namespace, request):
        if only and definition.identifier != only:
            continue
        options = ref.config.model_dump(exclude_none=True) if ref else {}
        item.writes[definition.identifier] = Write(
            id=message_id,
            namespace=namespace.name,
            payload=request.payload,
            operation=options.get("operation"),
            options=options,
            received_at_ms=int(item.headers.get(topics.RECEIVED_AT) or 0),
            headers={h: v for h in topics.PASSTHROUGH if (v := item.headers.get(h))},
        )
    return None


def _targets_of(
    namespace: Namespace, request: WriteRequest
) -> list[tuple[TargetDef, TargetRef | None]]:
    if not namespace.targets:
        return [(JOURNAL, None)]
    if not request.targets:
        return [(t, None) for t in namespace.targets if t.enabled]
    found = [(namespace.target(ref.identifier), ref) for ref in request.targets if ref.enabled]
    return [(d, ref) for d, ref in found if d is not None and d.enabled]


async def _deliver_all(items: list[Item]) -> list[Record]:
    """Deliver every planned write; return the dead letters of those that can never succeed."""
    groups: dict[tuple[str, str], list[Item]] = defaultdict(list)
    for item in items:
        for identifier in item.writes:
            assert item.namespace is not None
            groups[(item.namespace.name, identifier)].append(item)
    results = await asyncio.gather(
        *(_deliver_group(ns, identifier, members) for (ns, identifier), members in groups.items())
    )
    return [record for dead in results for record in dead]


async def _deliver_group(namespace_name: str, identifier: str, members: list[Item]) -> list[Record]:
    """One target's share of a batch; retryable failures are retried until they resolve."""
    namespace = members[0].namespace
    assert namespace is not None
    definition = namespace.target(identifier) or JOURNAL
    try:
        target = await target_for(namespace_name, definition)
    except ConfigError as exc:
        return [_dead_letter(m, "TARGET_REJECTED", exc.message, identifier) for m in members]
    pending = members
    dead: list[Record] = []
    backoff = 0.2
    while pending:
        outcomes = await target.deliver([m.writes[identifier] for m in pending])
        retry: list[Item] = []
        for member, outcome in zip(pending, outcomes, strict=True):
            if outcome.status == "permanent":
                dead.append(
                    _dead_letter(
                        member, outcome.code or "TARGET_REJECTED", outcome.message, identifier
                    )
                )
            elif outcome.status == "retryable":
                retry.append(member)
        if retry:
            wait = max(backoff, _hint(outcomes))
            fleet.log.warning(
                "target %s/%s: %d writes failed (%s); retrying in %.1fs",
                namespace_name,
                identifier,
                len(retry),
                _first_failure(outcomes),
                wait,
            )
            await asyncio.sleep(wait)
            backoff = min(backoff * 2, 10.0)
        pending = retry
    return dead


def _hint(outcomes: list[Outcome]) -> float:
    return max((o.retry_after or 0.0 for o in outcomes), default=0.0)


def _first_failure(outcomes: list[Outcome]) -> str:
    return next((f"{o.code}: {o.message}" for o in outcomes if not o.ok), "")


def _dead_letter(item: Item, code: str, message: str, target: str | None = None) -> Record:
    now = str(int(time.time() * 1000))
    headers: dict[str, str | None] = dict(item.headers)
    headers.update(
        {
            topics.ERROR_CODE: code,
            topics.ERROR_MESSAGE: message[:1000],
            topics.TARGET: target,
            topics.SOURCE: item.headers.get(topics.SOURCE) or item.source,
            topics.FIRST_FAILED_AT: item.headers.get(topics.FIRST_FAILED_AT) or now,
            topics.LAST_FAILED_AT: now,
        }
    )
    key = item.headers.get(topics.ORIGINAL_KEY)
    dlq = (item.namespace.dlq_config.topic_name if item.namespace else None) or topics.NAMES["dlq"]
    return Record(dlq, key.encode() if key else None, item.raw, headers)
