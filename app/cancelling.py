"""Cancelling a message before it is delivered (``DELETE /wal/messages/{id}``,
``wal messages cancel``), on the worker that owns the message's status.

1. Who: an admin key, or one of the message's namespace's own keys
   (:func:`canceller`); a namespace without keys: admins only.
2. A message whose status is final already (delivered, dead-lettered, rejected…) is
   not cancelled: the answer says what became of it.
3. Otherwise a cancel record goes to every ``wal-deliver`` partition
   (:mod:`tables.cancellations`: the partition's order decides what was before it).
4. The answer waits until the group has committed past every cancel record - so every
   record of the message read before them is done, delivered or not - and for the
   status to show the cancellation, within :data:`ANSWER_WITHIN_S`; it says
   ``cancelled``, ``delivered`` (cancellation lost the race), ``partially cancelled``
   (some targets had it) or ``pending`` (not settled within the deadline: ask the
   status again). Cancelling twice is harmless: the marks stay as they were.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from app import names, topics
from app.engine import offsets, producing
from app.errors import Rejected
from app.models import Namespace
from app.names import Record
from app.web import access
from tables import cancellations
from tables.status import status_partition

#: How long the answer waits for the cancellation to settle.
ANSWER_WITHIN_S = 20.0
#: Final statuses: nothing is cancelled any more.
SETTLED = {
    "completed": "delivered",
    "dlq": "dead-lettered",
    "dropped": "dropped",
    "failed": "failed",
    "rejected": "rejected",
}


def canceller(
    key: str | None, admin_digests: frozenset[str], ns: Namespace | None
) -> access.Caller:
    """The caller ``key`` makes for a cancellation; :class:`Rejected` (401/403) otherwise."""
    if not key:
        raise Rejected(
            "an API key is required (X-API-Key or Authorization: Bearer)",
            code="UNAUTHORIZED",
            http_status=401,
        )
    digest = access.hash_key(key)
    if access.key_matches(digest, admin_digests):
        return access.Caller("admin", access.fingerprint(digest))
    allowed = ns.access_control.allowed_api_keys if ns is not None else []
    if allowed and access.key_matches(digest, allowed):
        return access.Caller("namespace", access.fingerprint(digest))
    raise Rejected(
        "cancelling needs an admin key or a key of the message's namespace",
        code="FORBIDDEN",
        http_status=403,
    )


async def _committed_past(topic: str, offsets_of: dict[int, int], deadline: float) -> bool:
    """Wait until the group has committed past ``offsets_of`` (partition: offset) of
    ``topic``; False at ``deadline``."""
    while time.monotonic() < deadline:
        committed = await offsets.probe.committed(topic)
        if all(committed.get(p, -1) > o for p, o in offsets_of.items()):
            return True
        await asyncio.sleep(0.25)
    return False


def outcome(doc: dict[str, Any] | None) -> str:
    """The answer's word for a message's status."""
    if doc is None:
        return "pending"
    status = str(doc.get("status"))
    if status in ("cancelled", "partially cancelled"):
        return status
    return SETTLED.get(status, "pending")


async def cancel(
    message_id: str,
    namespace: str,
    caller: access.Caller,
    status: Callable[[], dict[str, Any] | None],
    partitions: int,
) -> str:
    """Send the cancel records and wait for the outcome (see the module)."""
    if cancellations.full():
        raise Rejected(
            "too many cancellations held (100 000 a worker, kept 7 days)",
            code="CANCELLATIONS_FULL",
            http_status=503,
        )
    headers = {
        names.CANCEL: message_id,
        names.CANCELLED_BY: str(caller),
        names.NAMESPACE: namespace,
    }
    topic = topics.NAMES["deliver"]
    sent = await asyncio.gather(
        *(
            producing.emit_one(Record(topic, None, b"", headers, partition=p))
            for p in range(partitions)
        )
    )
    deadline = time.monotonic() + ANSWER_WITHIN_S
    # every record of the message before the marks is done (acked, its status emitted)
    if not await _committed_past(topic, {m.partition: m.offset for m in sent}, deadline):
        return "pending"
    # and every status entry emitted until then is folded (the status agent commits
    # what it folded): a delivery just before a mark shows, not only the mark
    where = status_partition(message_id, partitions)
    end = await offsets.probe.end(topics.NAMES["status"], where)
    if end and not await _committed_past(topics.NAMES["status"], {where: end - 1}, deadline):
        return "pending"
    while time.monotonic() < deadline:  # the status agent folds its entries in batches
        doc = status()
        if doc is None:  # its namespace keeps no statuses: from now on, never delivered
            return "cancelled"
        word = outcome(doc)
        if word != "pending":
            return word
        await asyncio.sleep(0.25)
    return "pending"
