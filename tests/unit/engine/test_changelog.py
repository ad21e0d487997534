"""Table state written with the batch (``changelog_record``) leaves this worker with its
partition, as a write through Faust would."""

from __future__ import annotations

from faust.types import TP

from app.engine.changelog import changelog_record
from app.engine.partitioner import partition_of
from app.fleet import settings
from tables.ordering import ordering


async def test_a_key_written_with_the_batch_is_dropped_when_its_partition_leaves() -> None:
    """Faust's memory store forgets, after a rebalance, the keys of partitions this worker
    no longer has - those it knows the partition of. A key written directly and never
    dropped would stay stale, and come back if its tombstone were compacted away."""
    store = ordering.data
    key, other = b"key-that-moves", b"key-that-stays"
    changelog_record(ordering, key, b'{"t": 1}')
    changelog_record(ordering, other, b'{"t": 2}')
    moved = partition_of(key, settings.partitions)
    stays = partition_of(other, settings.partitions)
    assert moved != stays, "pick two keys of different partitions"
    topic = ordering.changelog_topic.get_topic_name()
    kept = {TP(topic, p) for p in range(settings.partitions) if p != moved}
    try:
        await store.on_recovery_completed(kept, set())
        assert key not in store
        assert store[other] == b'{"t": 2}'
        changelog_record(ordering, other, None)  # deleted: forgotten too
        assert other not in store
    finally:
        store.data.pop(key, None)
        store.data.pop(other, None)


def test_a_store_without_that_map_is_written_as_before() -> None:
    """The rocksdb store knows a key's partition by a method of the same name: writing
    through it must not treat that method as the memory store's map."""

    class RocksLike(dict[bytes, bytes]):
        def _key_partition(self, key: bytes) -> int:
            return 0

    class Table:
        data = RocksLike()
        partitions = settings.partitions

        class changelog_topic:
            @staticmethod
            def get_topic_name() -> str:
                return "t-changelog"

    record = changelog_record(Table, b"k", b"v")
    assert Table.data == {b"k": b"v"} and record.topic == "t-changelog"
    changelog_record(Table, b"k", None)
    assert Table.data == {}
