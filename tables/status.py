"""Message status: what became of each message, by id, for ``GET /wal/messages/{id}``.

The agents note each step of a message as a small *status entry* (:func:`note`):
accepted, delayed or rejected at ingest; delivered, retrying, dead-lettered or
dropped per target at delivery. A batch's entries go out with the records the
batch emits anyway (:func:`drain`), bundled one record per ``wal-status``
partition, the partition a message id hashes to with Kafka's default
partitioner - so one small record carries a whole batch, not one per message.
A bundle is grouped (``{"g": [[namespace, step, at, fields, [ids…]], …]}``):
the entries of a batch share their namespace, step, millisecond and fields, so
a message costs its id and no more (a list of one object per entry, the first
format - still read - was 220 bytes and 7 µs of CPU a message, py-spy).

The worker assigned a ``wal-status`` partition folds its bundles into an
in-memory :class:`StatusBook`, and Faust's topic routing sends a request for an
id to that worker. ``wal-status`` is its own changelog: it keeps
``WAL_STATUS_RETENTION_S`` of history, and a worker that gets a partition
(start, restart, rebalance) rebuilds its book from the start of it
(``agents/status.py``), so it knows what the previous owner knew. Memory is
bounded: at most ``WAL_STATUS_CAPACITY`` statuses per worker, the least
recently changed go first.

Folding is idempotent (an entry read twice changes nothing): per target, the
latest entry wins (then the highest attempt), and a later admission (a replay
from the DLQ keeps its id) supersedes an earlier one.
"""

from __future__ import annotations

import sys
import time
from collections import OrderedDict, defaultdict
from typing import Any

import orjson

from app.engine.partitioner import partition_of, partitions_of
from app.names import Record
from tables import compact

#: Per-target steps, and the message status they add up to (worst first).
TARGET_STEPS = ("dead_lettered", "dropped", "failed", "retrying", "delivered", "cancelled")
MESSAGE_STEPS = ("accepted", "delayed", "rejected")
#: A message cancelled (``DELETE /wal/messages/{id}``; a mark per ``wal-deliver`` partition).
CANCEL_STEP = "cancel"

#: The steps of a message that met a failure: all that ``statusTracking: failures`` notes
#: (with every later step of a write past its first attempt).
FAILURE_STEPS = frozenset(
    {"rejected", "retrying", "failed", "dead_lettered", "dropped", "cancel", "cancelled"}
)


def tracked(level: str, step: str, attempt: int = 1) -> bool:
    """Whether a namespace whose ``statusTracking`` is ``level`` notes ``step``."""
    if level == "all":
        return True
    return level == "failures" and (step in FAILURE_STEPS or attempt > 1)


#: A status entry's fields beyond id, namespace, step and time: (name, value) pairs.
Fields = tuple[tuple[str, Any], ...]


def status_partition(message_id: str, partitions: int) -> int:
    """The partition Kafka's default partitioner gives ``message_id`` as a key."""
    return partition_of(message_id.encode(), partitions)


class Collector:
    """Status entries noted while a batch is processed, until the batch emits them."""

    def __init__(self) -> None:
        # (namespace, step, at, fields or None) -> the ids that reached it
        self._groups: dict[tuple[str, str, int, Fields | None], list[str]] = {}

    def note(
        self, message_id: str | None, namespace: str, step: str, **fields: str | int | None
    ) -> None:
        """Record that ``message_id`` reached ``step`` (``target``, ``attempt``, ``code``…)."""
        if not message_id:
            return
        self._ids(namespace, step, fields).append(message_id)

    def note_many(
        self, message_ids: list[str], namespace: str, step: str, **fields: str | int | None
    ) -> None:
        """:meth:`note` for every id of ``message_ids`` (all with the same fields): what
        a batch notes for most of its messages, at the cost of one note."""
        if message_ids:
            self._ids(namespace, step, fields).extend(m for m in message_ids if m)

    def _ids(self, namespace: str, step: str, fields: dict[str, str | int | None]) -> list[str]:
        """The ids noted so far with this namespace, step, millisecond and fields."""
        rest = tuple([item for item in fields.items() if item[1] is not None]) or None
        key = (namespace, step, int(time.time() * 1000), rest)
        ids = self._groups.get(key)
        if ids is None:
            ids = self._groups[key] = []
        return ids

    def drain(self, topic: str, partitions: int) -> list[Record]:
        """The noted entries as one bundle per ``wal-status`` partition; forgets them."""
        bundles: dict[int, list[list[Any]]] = defaultdict(list)
        for (namespace, step, at, rest), ids in self._groups.items():
            by_partition: dict[int, list[str]] = defaultdict(list)
            for message_id, p in zip(ids, partitions_of(ids, partitions), strict=True):
                by_partition[p].append(message_id)
            fields = dict(rest) if rest else None
            for p, members in by_partition.items():
                bundles[p].append([namespace, step, at, fields, members])
        self._groups = {}
        return [
            Record(topic, None, orjson.dumps({"g": groups}), {}, partition=p)
            for p, groups in sorted(bundles.items())
        ]


def entries_of(bundle: Any) -> list[dict[str, Any]]:
    """A decoded bundle, of either format, as one entry per message and step."""
    if isinstance(bundle, list):
        return bundle
    return [
        {"id": message_id, "ns": ns, "st": step, "at": at, **(fields or {})}
        for ns, step, at, fields, ids in bundle["g"]
        for message_id in ids
    ]


def fold(doc: dict[str, Any] | None, entry: dict[str, Any]) -> dict[str, Any]:
    """``doc`` (a message's status so far, or None) with ``entry`` applied."""
    doc = doc or {"messageId": entry["id"], "namespace": entry["ns"], "targets": {}}
    at = entry["at"]
    step = entry["st"]
    doc["updatedAt"] = max(doc.get("updatedAt", at), at)
    for field in ("transactionId", "dueAt"):
        if field in entry:
            doc[field] = entry[field]
    if step == CANCEL_STEP:
        doc["cancelledAt"] = min(doc.get("cancelledAt", at), at)
        if "by" in entry:
            doc["cancelledBy"] = entry["by"]
    elif step in MESSAGE_STEPS:
        doc["acceptedAt"] = min(doc.get("acceptedAt", at), at)
        if at >= doc.get("_admittedAt", 0):  # a replay re-admits a message
            doc["admission"] = step
            doc["_admittedAt"] = at
            doc.pop("error", None)
            if "code" in entry:
                doc["error"] = {"code": entry["code"], "message": entry.get("message", "")}
    else:
        target = entry.get("target") or "-"
        was = doc["targets"].get(target)
        now = {"status": step, "attempts": entry.get("attempt", 1), "at": at}
        if "next" in entry:
            now["nextAttemptAt"] = entry["next"]
        if "code" in entry:
            now["lastError"] = {"code": entry["code"], "message": entry.get("message", "")}
        elif was and "lastError" in was:
            now["lastError"] = was["lastError"]
        if was is None or (at, now["attempts"]) >= (was["at"], was["attempts"]):
            doc["targets"][target] = now
    doc["status"] = overall(doc)
    return doc


def overall(doc: dict[str, Any]) -> str:
    """One word for a message.

    rejected, delayed, pending, retrying, completed, dlq, dropped, failed or cancelled
    (cancelled before any target had it: ``partially cancelled`` when some had).
    """
    if doc.get("admission") == "rejected":
        return "rejected"
    steps = {t["status"] for t in doc["targets"].values()}
    if "cancelledAt" in doc and steps != {"delivered"}:
        return "partially cancelled" if "delivered" in steps else "cancelled"
    if "dead_lettered" in steps:
        return "dlq"
    if "dropped" in steps:
        return "dropped"
    if "failed" in steps:  # a transaction's mutation: its transaction compensates
        return "failed"
    if "retrying" in steps:
        return "retrying"
    if steps and steps == {"delivered"}:
        return "completed"
    return "delayed" if doc.get("admission") == "delayed" else "pending"


#: Entries an id keeps unfolded; one more folds them into its stored status.
UNFOLDED = 8
_FIELDS = ("id", "ns", "st", "at")


class StatusBook:
    """The statuses of the ids in this worker's ``wal-status`` partitions, bounded.

    An id's entries are kept as they come (slim tuples) and folded when its status is
    asked for - or, past :data:`UNFOLDED` entries, into a stored status (compact JSON):
    folding every entry as it arrived (JSON in and out) was a tenth of a busy worker's
    CPU (py-spy), and most statuses are never asked for.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        # id -> (partition, folded status as JSON or None, entries not folded into it yet)
        self._docs: OrderedDict[str, tuple[int, bytes | None, tuple[Any, ...]]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._docs)

    def fold(self, partition: int, entries: list[dict[str, Any]]) -> None:
        """Fold a bundle of the first format: one object per entry."""
        for entry in entries:
            self._add(partition, entry["id"], _slim(entry))
        self._trim()

    def fold_groups(self, partition: int, groups: list[list[Any]]) -> None:
        """Fold a grouped bundle: ``[namespace, step, at, fields or None, ids]`` each."""
        add = self._add
        for ns, step, at, fields, ids in groups:
            rest = tuple(fields.items()) if fields else None
            slim = (sys.intern(ns), sys.intern(step), at, rest)
            for message_id in ids:
                add(partition, message_id, slim)
        self._trim()

    def _add(self, partition: int, message_id: str, slim: tuple[Any, ...]) -> None:
        docs = self._docs
        held = docs.pop(message_id, None)
        if held is None:
            docs[message_id] = (partition, None, (slim,))
        elif len(held[2]) < UNFOLDED:
            docs[message_id] = (partition, held[1], (*held[2], slim))
        else:
            doc = self._folded(message_id, held[1], (*held[2], slim))
            docs[message_id] = (partition, compact(orjson.dumps(doc)), ())

    def _trim(self) -> None:
        docs = self._docs
        while len(docs) > self.capacity:
            docs.popitem(last=False)

    def get(self, message_id: str) -> dict[str, Any] | None:
        held = self._docs.get(message_id)
        if held is None:
            return None
        doc = self._folded(message_id, held[1], held[2])
        doc.pop("_admittedAt", None)
        return doc

    @staticmethod
    def _folded(message_id: str, stored: bytes | None, slims: tuple[Any, ...]) -> dict[str, Any]:
        doc: dict[str, Any] | None = orjson.loads(stored) if stored else None
        for slim in slims:
            doc = fold(doc, _entry(message_id, slim))
        assert doc is not None, "an id is held with at least one entry"
        return doc

    def forget(self, partitions: set[int] | None = None) -> None:
        """Drop the statuses of ``partitions`` (all by default): they are read again."""
        if partitions is None:
            self._docs.clear()
            return
        for message_id in [i for i, (p, _, _) in self._docs.items() if p in partitions]:
            del self._docs[message_id]


def _slim(entry: dict[str, Any]) -> tuple[Any, ...]:
    """An entry without its id, in little memory: (ns, step, at, other fields or None)."""
    rest = None
    if len(entry) > len(_FIELDS):
        rest = tuple([item for item in entry.items() if item[0] not in _FIELDS])
    return (sys.intern(entry["ns"]), sys.intern(entry["st"]), entry["at"], rest)


def _entry(message_id: str, slim: tuple[Any, ...]) -> dict[str, Any]:
    ns, step, at, rest = slim
    entry = {"id": message_id, "ns": ns, "st": step, "at": at}
    if rest:
        entry.update(rest)
    return entry
