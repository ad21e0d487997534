"""Transactions: one record per transaction, folded from ``wal-txn-events``.

A request whose ``payload.transactions`` holds two or more mutations becomes a
transaction (reference 6.2/6.3). Its life, as events keyed by transaction id:

``begin``    ingest admitted it: the mutations, in order, with their compensations.
``outcome``  a mutation (or a compensation) reached a final result at its target:
             ``completed``, or ``failed`` after its retries.
``timeout``  it was still in progress at its deadline.
``forget``   it ended long enough ago (``WAL_TRANSACTION_RETENTION_S``): drop it.

:func:`fold` turns the current state and one event into the next state and
the *effects* - mutations or compensations to dispatch. Mutations run in
parallel; compensations run one at a time, in reverse order of the mutations,
each after the previous one completed. The end state is ``completed``,
``compensated``, or ``failed`` with details (a compensation that could not
succeed, or a completed mutation without one): never stuck.

Every transition is idempotent: a replayed event (the table's changelog may be
ahead of the committed offsets after a crash) changes nothing and re-derives
the effects still owed, and dispatched writes carry stable ids
(``<txn>:<i>`` and ``<txn>:<i>:undo``) that targets apply once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import orjson

from app.engine.changelog import changelog_record
from app.fleet import fleet, settings
from app.names import Record
from app.topics import NAMES

transactions = fleet.Table(
    "transactions",
    key_type=bytes,
    value_type=bytes,
    partitions=settings.partitions,
    use_partitioner=True,
    help="Transactions by id: status, mutations and their outcomes.",
)

# Reference 6.2 TransactionStatus and 6.3 MutationStatus.
INITIATED, IN_PROGRESS, COMPLETED, FAILED = "initiated", "in_progress", "completed", "failed"
COMPENSATION_REQUIRED, COMPENSATING, COMPENSATED = (
    "compensation_required",
    "compensating",
    "compensated",
)
PENDING = "pending"
FINAL = {COMPLETED, FAILED, COMPENSATED, "cancelled"}

Kind = Literal["forward", "compensation"]


@dataclass(frozen=True, slots=True)
class Dispatch:
    """An effect: send mutation ``index`` (or its compensation) to its target."""

    index: int
    kind: Kind


def mutation_id(txn_id: str, index: int, kind: Kind) -> str:
    return f"{txn_id}:{index}" + (":undo" if kind == "compensation" else "")


def begin_state(event: dict[str, Any], now_ms: int) -> dict[str, Any]:
    mutations = [
        {
            "index": i,
            "mutationId": mutation_id(event["txn"], i, "forward"),
            "operation": m["operation"],
            "target": m["target"],
            "partitionKey": m.get("partitionKey"),
            "hasCompensation": m.get("compensation") is not None,
            "spec": m,
            "status": PENDING,
            "error": None,
        }
        for i, m in enumerate(event["mutations"])
    ]
    return {
        "transactionId": event["txn"],
        "namespace": event["namespace"],
        "messageId": event["messageId"],
        "status": IN_PROGRESS,
        "totalMutations": len(mutations),
        "completedMutations": 0,
        "failedMutations": 0,
        "mutations": mutations,
        "error": None,
        "createdAt": now_ms,
        "updatedAt": now_ms,
        "timeoutAt": event["timeoutAt"],
        "completedAt": None,
    }


def fold(
    state: dict[str, Any] | None, event: dict[str, Any], now_ms: int
) -> tuple[dict[str, Any] | None, list[Dispatch]]:
    """The next state and what to dispatch, for one event."""
    kind = event.get("type")
    if kind == "begin":
        if state is None:
            state = begin_state(event, now_ms)
        return state, _owed_forwards(state)
    if state is None:
        return None, []  # an outcome or timeout for a transaction never begun: ignore
    if kind == "forget":
        return (None, []) if state["status"] in FINAL else (state, [])
    if kind == "outcome":
        effects = _on_outcome(state, event)
    elif kind == "timeout":
        effects = _on_timeout(state)
    else:
        return state, []
    state["updatedAt"] = now_ms
    if state["status"] in FINAL and state["completedAt"] is None:
        state["completedAt"] = now_ms
    return state, effects


def _on_outcome(state: dict[str, Any], event: dict[str, Any]) -> list[Dispatch]:
    m = state["mutations"][int(event["index"])]
    ok = event["status"] == "completed"
    if event["kind"] == "compensation":
        if m["status"] != COMPENSATING:
            return _owed_compensation(state)  # a replay
        if not ok:
            m["status"] = FAILED
            m["error"] = f"compensation failed: {event.get('error')}"
            _fail(state, f"compensation of mutation {m['index']} failed: {event.get('error')}")
            return []
        m["status"] = COMPENSATED
        return _next_compensation(state)
    if m["status"] != PENDING:
        return _owed_compensation(state) if state["status"] == COMPENSATING else []
    if ok:
        m["status"] = COMPLETED
        state["completedMutations"] += 1
        if (
            state["status"] == IN_PROGRESS
            and state["completedMutations"] == state["totalMutations"]
        ):
            state["status"] = COMPLETED
            return []
        return _next_compensation(state) if state["status"] == COMPENSATING else []
    m["status"] = FAILED
    m["error"] = event.get("error")
    state["failedMutations"] += 1
    if state["status"] == IN_PROGRESS:
        state["status"] = COMPENSATING
        state["error"] = f"mutation {m['index']} failed: {event.get('error')}"
        return _next_compensation(state)
    return _next_compensation(state) if state["status"] == COMPENSATING else []


def _on_timeout(state: dict[str, Any]) -> list[Dispatch]:
    if state["status"] != IN_PROGRESS:
        return []
    state["status"] = COMPENSATING
    state["error"] = "transaction timed out"
    return _next_compensation(state)


def _next_compensation(state: dict[str, Any]) -> list[Dispatch]:
    """Start undoing the latest completed mutation; finish when nothing is left to undo."""
    if any(m["status"] == COMPENSATING for m in state["mutations"]):
        return _owed_compensation(state)
    done = [m for m in state["mutations"] if m["status"] == COMPLETED]
    if done:
        last = max(done, key=lambda m: m["index"])
        if not last["hasCompensation"]:
            _fail(state, f"mutation {last['index']} completed and has no compensation")
            return []
        last["status"] = COMPENSATING
        return [Dispatch(last["index"], "compensation")]
    if any(m["status"] == PENDING for m in state["mutations"]):
        return []  # wait for the mutations still on their way
    state["status"] = COMPENSATED
    return []


def _owed_forwards(state: dict[str, Any]) -> list[Dispatch]:
    if state["status"] != IN_PROGRESS:
        return []
    return [Dispatch(m["index"], "forward") for m in state["mutations"] if m["status"] == PENDING]


def _owed_compensation(state: dict[str, Any]) -> list[Dispatch]:
    return [
        Dispatch(m["index"], "compensation")
        for m in state["mutations"]
        if m["status"] == COMPENSATING
    ]


def _fail(state: dict[str, Any], error: str) -> None:
    state["status"] = FAILED
    state["error"] = error


def outcome(txn_id: str, index: int, kind: str, ok: bool, error: str | None = None) -> Record:
    """The event a deliver agent sends when a mutation or compensation is final."""
    body = {
        "type": "outcome",
        "txn": txn_id,
        "index": index,
        "kind": kind,
        "status": "completed" if ok else "failed",
        "error": error,
    }
    return Record(NAMES["txn-events"], txn_id.encode(), orjson.dumps(body), {})


def load(txn_id: str) -> dict[str, Any] | None:
    raw = transactions.get(txn_id.encode())
    return orjson.loads(raw) if raw else None


def save(txn_id: str, state: dict[str, Any] | None) -> Record:
    """Store a transaction's state (None deletes it); return its changelog record.

    The caller emits that record with the rest of the batch's output and acks only
    after all of it is durable - see :func:`changelog_record`.
    """
    key = txn_id.encode()
    value = None if state is None else orjson.dumps(state)
    return changelog_record(transactions, key, value)
