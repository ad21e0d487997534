"""Transactions: fold ``wal-txn-events`` into the transactions table and dispatch the work.

Ingest turns a multi-mutation request into a ``begin`` event; this agent
records the transaction and dispatches its mutations to ``wal-deliver`` (each
a write of its own, with the normal routing, batching, retries and
idempotency under its mutation id). The deliver agent reports each mutation's
final outcome back here; failures and timeouts start the compensations
(:mod:`tables.transactions` has the state machine).

The table is co-partitioned with ``wal-txn-events`` (keyed by transaction id),
so the worker that processes a transaction's events owns its state. Dispatched
records and the table's changelog are durable before the events are acked.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from app import metrics, names, topics
from app.engine import producing
from app.engine.batching import each_batch
from app.fleet import fleet, settings
from app.names import Record
from tables import transactions as txns

txn_events_topic = fleet.topic(topics.NAMES["txn-events"], partitions=settings.partitions)

#: Transaction ids for which a timeout or forget event is on its way (not sent twice).
_timeouts_sent: set[str] = set()
_forgets_sent: set[str] = set()


@fleet.agent(txn_events_topic, concurrency=1)
async def transactions(stream: Any) -> None:
    """Fold every transaction event and dispatch what it calls for; never raises."""
    within = settings.batch_within_ms / 1000
    await each_batch(stream, _transactions_batch, size=settings.batch_size, within=within)


async def _transactions_batch(events: list[Any]) -> None:
    metrics.BATCH_SIZE.labels("transactions").observe(len(events))
    states: dict[str, dict[str, Any] | None] = {}
    records: list[Record] = []
    for event in events:
        records += _fold_one(event, states)
    records += [txns.save(txn_id, state) for txn_id, state in states.items()]
    if records:  # dispatches and the table's changelog, durable before the acks
        await producing.emit_until_durable(records, what=f"{len(records)} transaction writes")


def _fold_one(event: Any, states: dict[str, dict[str, Any] | None]) -> list[Record]:
    try:
        body = orjson.loads(event.message.value)
        txn_id = str(body["txn"])
        state = states[txn_id] if txn_id in states else txns.load(txn_id)
        state, effects = txns.fold(state, body, int(time.time() * 1000))
        states[txn_id] = state
        if state is None:
            _forgets_sent.discard(txn_id)
            return []
        if state["status"] != txns.IN_PROGRESS:
            _timeouts_sent.discard(txn_id)
        return [dispatch(state, d) for d in effects]
    except Exception:  # a malformed event must not stop the stream: log it and move on
        fleet.log.exception(
            "transactions: skipping malformed event at %s/%s",
            event.message.partition,
            event.message.offset,
        )
        return []


def dispatch(state: dict[str, Any], effect: txns.Dispatch) -> Record:
    """The ``wal-deliver`` record of one mutation or compensation."""
    txn_id = state["transactionId"]
    mutation = state["mutations"][effect.index]
    spec = mutation["spec"]
    step = spec if effect.kind == "forward" else spec["compensation"]
    mid = txns.mutation_id(txn_id, effect.index, effect.kind)
    config = {"operation": step["operation"]}
    if step.get("conditions"):  # checked where the write happens; not met: compensated
        config["conditions"] = step["conditions"]
    value = orjson.dumps(
        {
            "namespace": state["namespace"],
            "payload": step.get("data") or {},
            "target": {"identifier": spec["target"], "config": config},
            "messageId": mid,
        }
    )
    headers = {
        names.MESSAGE_ID: mid,
        names.NAMESPACE: state["namespace"],
        names.RECEIVED_AT: str(int(time.time() * 1000)),
        names.ATTEMPT: "1",
        names.SOURCE: f"transaction/{txn_id}",
        names.TRANSACTION_ID: txn_id,
        names.MUTATION_INDEX: str(effect.index),
        names.MUTATION_KIND: effect.kind,
    }
    key = (spec.get("partitionKey") or txn_id).encode()
    return Record(topics.NAMES["deliver"], key, value, headers)


@fleet.timer(1.0)
async def expire_transactions() -> None:
    """Time out our transactions past their deadline; forget those ended long ago."""
    if not len(txns.transactions):  # the common case: no transaction on our partitions
        return
    now = int(time.time() * 1000)
    retention_ms = int(settings.transaction_retention_s * 1000)
    events: list[tuple[str, str]] = []
    try:
        for key, raw in list(txns.transactions.items()):
            state, txn_id = orjson.loads(raw), key.decode()
            if state["status"] == txns.IN_PROGRESS and state["timeoutAt"] <= now:
                if txn_id not in _timeouts_sent:
                    events.append((txn_id, "timeout"))
            elif (
                state["status"] in txns.FINAL
                and state["completedAt"] is not None
                and state["completedAt"] + retention_ms <= now
                and txn_id not in _forgets_sent
            ):
                events.append((txn_id, "forget"))
    except Exception:  # never let the timer die
        fleet.log.exception("transactions: expiry scan failed")
        return
    if events:
        records = [
            Record(
                topics.NAMES["txn-events"], t.encode(), orjson.dumps({"type": kind, "txn": t}), {}
            )
            for t, kind in events
        ]
        await producing.emit_until_durable(records, what=f"{len(events)} transaction expiries")
        _timeouts_sent.update(t for t, kind in events if kind == "timeout")
        _forgets_sent.update(t for t, kind in events if kind == "forget")
