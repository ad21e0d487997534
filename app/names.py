"""The fleet's header and topic names, and the shape of a record it writes.

Every value on the fleet's topics is bytes: the ingest, deliver and delay topics
carry a client's original request bytes unchanged, with everything the fleet
adds (message id, namespace, attempt, due time, reasons) in ``wal-*``
headers. So a dead letter is always the original bytes and can be replayed
as it is (ARCHITECTURE.md §3).

Nothing here builds a Faust app: ``wal`` commands and tools import it freely.
The topics themselves are :mod:`app.topics`; writing to them, :mod:`app.engine.producing`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from app.settings import Settings

# -- headers -------------------------------------------------------------------------
MESSAGE_ID = "wal-message-id"
NAMESPACE = "wal-namespace"
ATTEMPT = "wal-attempt"
DUE_AT = "wal-due-at"
ERROR_CODE = "wal-error-code"
ERROR_MESSAGE = "wal-error-message"
TARGET = "wal-target"
SOURCE = "wal-source"
FIRST_FAILED_AT = "wal-first-failed-at"
LAST_FAILED_AT = "wal-last-failed-at"
REPLAYED_FROM = "wal-replayed-from"
RECEIVED_AT = "wal-received-at"
ORIGINAL_KEY = "wal-original-key"
ORDER_SEQ = "wal-order-seq"
TRANSACTION_ID = "wal-transaction-id"
MUTATION_INDEX = "wal-mutation-index"
MUTATION_KIND = "wal-mutation-kind"
#: The target a parked write waited its turn for (its pace); it goes when it is back.
PACED = "wal-paced"
#: A cancel record on ``wal-deliver``: the id of the message to cancel (tables/cancellations).
CANCEL = "wal-cancel"
#: Who cancelled (an admin key's or the namespace key's fingerprint).
CANCELLED_BY = "wal-cancelled-by"
TRACEPARENT = "traceparent"

#: Headers a client may set on an ingest record that the fleet carries along.
PASSTHROUGH = (TRACEPARENT, REPLAYED_FROM)


Headers = dict[str, str]


def tier_name(seconds: int) -> str:
    return f"{seconds // 60}m" if seconds >= 60 and seconds % 60 == 0 else f"{seconds}s"


def topic_names(s: Settings) -> dict[str, str]:
    """Role → full topic name, for every topic the fleet uses."""
    names = {
        "ingest": s.topic("ingest"),
        "deliver": s.topic("deliver"),
        "dlq": s.topic("dlq"),
        "namespaces": s.topic("namespaces"),
        "txn-events": s.topic("txn-events"),
        "stats": s.topic("stats"),
        "status": s.topic("status"),
    }
    for seconds in s.tiers:
        names[f"delay-{tier_name(seconds)}"] = s.topic(f"delay-{tier_name(seconds)}")
    return names


def decode_headers(raw: Iterable[tuple[str, bytes]] | Mapping[str, bytes] | None) -> Headers:
    """Kafka headers as a str → str dict (the last value wins for repeated keys)."""
    if not raw:
        return {}
    items = raw.items() if isinstance(raw, Mapping) else raw
    return {k: v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for k, v in items}


def encode_headers(headers: Mapping[str, str | None]) -> list[tuple[str, bytes]]:
    return [(k, v.encode()) for k, v in headers.items() if v is not None]


@dataclass(slots=True)  # not frozen: one per message, and frozen init costs 5x
class Record:
    """One record to produce."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: Mapping[str, str | None]
    partition: int | None = None


def dead_letter(
    topic: str,
    key: bytes | None,
    value: bytes | None,
    headers: Mapping[str, str | None],
    *,
    code: str,
    message: str,
) -> Record:
    """The one shape of a dead letter (ingest's, deliver's, Kafka's refusals): the original
    key and bytes, the headers given, the reason (``wal-error-code``, ``wal-error-message``)
    and when it first and last failed."""
    now = str(int(time.time() * 1000))
    out: dict[str, str | None] = dict(headers)
    out.update(
        {
            ERROR_CODE: code,
            ERROR_MESSAGE: message[:1000],
            FIRST_FAILED_AT: headers.get(FIRST_FAILED_AT) or now,
            LAST_FAILED_AT: now,
        }
    )
    return Record(topic, key, value, out)
