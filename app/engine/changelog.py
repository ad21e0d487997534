"""Table state written with the batch: the store set now, the changelog record emitted
(and awaited) with the batch's other records, before its source is acked."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

from app.engine.partitioner import partition_of
from app.names import Record
from tables import compact


def changelog_record(table: Any, key: bytes, value: bytes | None) -> Record:
    """Set ``key`` in ``table``'s store and return the changelog record to emit for it.

    Faust's own ``table[key] = value`` queues the changelog write in its producer
    buffer, and its ``producer.flush()`` may return before that buffer is empty:
    an agent that acks after it could lose the state change in a crash while its
    effects went out. So state is written to the store directly and its changelog
    record is emitted, and awaited, together with the effects.
    """
    store = table.data
    if value is None:
        store.pop(key, None)
    else:
        store[key] = compact(value)
    # Faust's memory store drops, after a rebalance, the keys of partitions this worker
    # no longer holds - those whose partition it learnt from a changelog record it read.
    # Tell it the partition of a key written here, or it would keep the key, stale.
    partitions = getattr(store, "_key_partition", None)  # rocksdb's is a method: not it
    if isinstance(partitions, MutableMapping):
        if value is None:
            partitions.pop(key, None)
        else:
            partitions[key] = partition_of(key, table.partitions or table.app.conf.topic_partitions)
    return Record(table.changelog_topic.get_topic_name(), key, value, {})
