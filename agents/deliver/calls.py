"""Deliver: each target's share of a wave as a call of its own, with a deadline.

A call still running after ``WAL_TARGET_SLOW_MS`` (or four times the target's usual
call time) stops holding its batch; later calls to the target queue behind it; a
call past ``WAL_TARGET_DEADLINE_S`` is abandoned (see :mod:`agents.deliver`). The
targets themselves come from the worker's :class:`~targets.pool.TargetPool`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import Counter
from dataclasses import dataclass

from agents.deliver import pace
from agents.deliver.items import JOURNAL, Item, ordered
from agents.deliver.outcomes import count_delivered
from app import metrics
from app.errors import ConfigError
from app.fleet import settings
from app.models import TargetDef
from targets.base import Outcome, Target, permanent, retryable
from targets.circuit import BREAKERS
from targets.pool import TargetPool

log = logging.getLogger("wal.deliver")


#: ``wal_circuit_state`` values.
CIRCUIT_LEVELS = {"closed": 0, "half_open": 1, "open": 2}


#: The usual call time of a target is at most counted up to this, for slowness.
MAX_USUAL_S = 5.0


#: After a call to a target passed its deadline, for this long its writes do not queue
#: behind a slow call to it: they wait in the delay tier.
MISSED_FOR_S = 60.0


#: Slow calls in flight per (namespace, target).
slow_calls: Counter[tuple[str, str]] = Counter()


#: The latest call started per (namespace, target): a later one waits for it while it is slow.
_latest: dict[tuple[str, str], asyncio.Task[list[Outcome]]] = {}


#: When a call per (namespace, target) last passed its deadline (loop time).
_missed: dict[tuple[str, str], float] = {}


#: Smoothed call time per (namespace, target), seconds.
_usual: dict[tuple[str, str], float] = {}


#: This worker's open targets, each behind its circuit breaker.
POOL = TargetPool(settings)


async def target_for(namespace: str, definition: TargetDef) -> Target:
    """The open target for a namespace's target definition (:class:`TargetPool`)."""
    return await POOL.get(namespace, definition)


@dataclass(slots=True, eq=False)
class Call:
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


def start_call(namespace: str, identifier: str, members: list[Item]) -> Call:
    """Start one target's share of a wave - after the target's slow call, if one runs."""
    key = (namespace, identifier)
    in_order = any(ordered(m) for m in members)
    usual = min(_usual.get(key, 0.0) * 4, MAX_USUAL_S)
    slow_after = max(settings.target_slow_ms / 1000, usual)
    previous = _latest.get(key)
    if previous is not None and not previous.done() and key in slow_calls and not in_order:
        task = asyncio.ensure_future(_after(previous, namespace, identifier, members))
    else:
        task = asyncio.ensure_future(deliver_group(namespace, identifier, members))
    _latest[key] = task
    task.add_done_callback(functools.partial(_forget, key))
    loop = asyncio.get_running_loop()
    return Call(
        namespace,
        identifier,
        members,
        in_order,
        task,
        float("inf") if in_order else loop.time() + slow_after,
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
    return await deliver_group(namespace, identifier, members)


def missed_lately(key: tuple[str, str]) -> bool:
    missed = _missed.get(key)
    return missed is not None and asyncio.get_running_loop().time() - missed < MISSED_FOR_S


async def settle(calls: list[Call]) -> list[Call]:
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


def slow_ended(key: tuple[str, str], _: object) -> None:
    slow_calls[key] -= 1
    if slow_calls[key] <= 0:
        del slow_calls[key]
    metrics.SLOW_CALLS.labels(*key).dec()


async def deliver_group(namespace_name: str, identifier: str, members: list[Item]) -> list[Outcome]:
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
    key = (namespace_name, identifier)
    pace.started(key, len(members))
    outcomes: list[Outcome] = []
    try:
        async with asyncio.timeout(deadline):
            outcomes = await target.deliver([m.writes[identifier] for m in members])
    except TimeoutError:
        outcomes = [
            retryable("TARGET_UNAVAILABLE", f"no answer within the {deadline:g} s deadline")
        ] * len(members)
        metrics.TARGET_DEADLINES.labels(namespace_name, identifier).inc()
        _missed[key] = asyncio.get_running_loop().time()
        if breaker is not None:  # abandoned, so the target's own accounting never ran
            breaker.record(outcomes)
    else:
        usual = _usual.get(key)
        took = time.monotonic() - started
        _usual[key] = took if usual is None else 0.8 * usual + 0.2 * took
    finally:  # in flight no more, even when cancelled; throttling lowers the pace
        pace.ended(key, len(members), outcomes, started)
    metrics.DELIVERY_SECONDS.labels(namespace_name, identifier).observe(time.monotonic() - started)
    count_delivered(namespace_name, identifier, members, outcomes)
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
