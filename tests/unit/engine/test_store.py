"""app/engine/store.py: Faust's RocksDB store, with key-partitioned writes, acknowledged offsets,
and a database that does not open moved aside. Each test also pins the upstream behaviour
the override corrects, so that it fails when Faust changes it."""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import Any

import faust
import pytest
from faust.stores import by_url
from faust.stores.rocksdb import Store
from faust.types import TP
from rocksdict import Options, Rdict

from app.engine import store as rocks
from app.engine.partitioner import partition_of

PARTITIONS = 4


@pytest.fixture
def table(tmp_path: Path) -> Any:
    rocks.install()
    app = faust.App(f"unit-store-{tmp_path.name}", datadir=str(tmp_path), store="rocksdb://")
    return app.Table(
        "t", key_type=bytes, value_type=bytes, partitions=PARTITIONS, use_partitioner=True
    )


def test_rocksdb_urls_resolve_to_the_corrected_store() -> None:
    rocks.install()
    assert by_url("rocksdb://") is rocks.RocksStore
    assert issubclass(rocks.RocksStore, Store)


def test_a_write_outside_an_event_goes_to_its_keys_partition(table: Any) -> None:
    store = table.data
    assert isinstance(store, rocks.RocksStore)
    keys = [f"txn-{i}".encode() for i in range(20)]
    for key in keys:
        store[key] = key + b"!"
    assert set(store._dbs) == {partition_of(k, PARTITIONS) for k in keys}
    for key in keys:
        assert store[key] == key + b"!"
        assert store._dbs[partition_of(key, PARTITIONS)].get(key) == key + b"!"
    del store[keys[0]]
    assert keys[0] not in store
    # Upstream files a write under the current event's partition, and asserts there is one.
    with pytest.raises(AssertionError):
        Store._set(store, b"no-event", b"x")


def test_acknowledged_offsets_only_move_forward_and_open_nothing(table: Any) -> None:
    store = table.data
    key = b"k"
    p = partition_of(key, PARTITIONS)
    store[key] = b"v"
    changelog = TP(table.changelog_topic.get_topic_name(), p)
    assert store.persisted_offset(changelog) is None
    store.note_durable(p, 10)
    store.note_durable(p, 5)
    assert store.persisted_offset(changelog) == 10
    other = (p + 1) % PARTITIONS
    store.note_durable(other, 3)
    assert other not in store._dbs  # not held here: no database opened for it


def test_note_durable_takes_each_batch_last_offset_for_table_changelogs(table: Any) -> None:
    from aiokafka.structs import RecordMetadata

    store = table.data
    store[b"k"] = b"v"
    p = partition_of(b"k", PARTITIONS)
    topic = table.changelog_topic.get_topic_name()

    def meta(t: str, offset: int) -> RecordMetadata:
        return RecordMetadata(t, p, TP(t, p), offset, 0, 0, 0)

    rocks.note_durable({"t": table}, [(meta(topic, 40), 5), (meta("other-topic", 99), 1)])
    assert store.persisted_offset(TP(topic, p)) == 44


def _kill(store: Any) -> None:
    """Drop the databases as a SIGKILL would: no clean stop."""
    store._dbs.clear()
    gc.collect()


async def test_a_clean_stop_keeps_the_data_and_a_kill_rebuilds_it(
    table: Any, caplog: pytest.LogCaptureFixture
) -> None:
    store = table.data
    store[b"k"] = b"v"
    p = partition_of(b"k", PARTITIONS)
    assert (store.partition_path(p) / rocks.UNCLEAN).exists()
    await store.stop()
    assert not (store.partition_path(p) / rocks.UNCLEAN).exists()
    assert store._db_for_partition(p).get(b"k") == b"v"  # kept

    store._db_for_partition(p).put(b"seen", b"1")  # as recovery writes: no mark
    store[b"k2"] = b"v2"
    p2 = partition_of(b"k2", PARTITIONS)
    _kill(store)
    with caplog.at_level(logging.WARNING, logger="wal.store"):
        assert store._db_for_partition(p2).get(b"k2") is None  # may be ahead: rebuilt
    assert any("not closed cleanly" in r.getMessage() for r in caplog.records)


async def test_a_database_that_does_not_open_is_moved_aside_and_starts_empty(
    table: Any, caplog: pytest.LogCaptureFixture
) -> None:
    store = table.data
    store[b"k"] = b"v"
    p = partition_of(b"k", PARTITIONS)
    path = store.partition_path(p)
    await store.stop()
    (path / "CURRENT").write_bytes(b"\x00garbage")
    # Upstream: the open fails (Faust then stops the store and the worker crashes).
    with pytest.raises(Exception, match="Corruption"):
        Store._open_for_partition(store, p)

    with caplog.at_level(logging.ERROR, logger="wal.store"):
        assert store.get(b"k") is None and p not in store._dbs  # a read opens nothing
        db = store._db_for_partition(p)
    assert db.get(b"k") is None  # empty: the changelog rebuilds it
    aside = list(path.parent.glob(f"{path.name}.broken-*"))
    assert len(aside) == 1 and (aside[0] / "CURRENT").read_bytes() == b"\x00garbage"
    assert any(
        "does not open" in r.getMessage() and str(aside[0]) in r.getMessage()
        for r in caplog.records
    )


def test_a_locked_database_is_not_moved_aside(table: Any) -> None:
    store = table.data
    p = 0
    path = store.partition_path(p)
    path.parent.mkdir(parents=True, exist_ok=True)
    options = Options(raw_mode=True)
    options.create_if_missing(True)
    holder = Rdict(str(path), options)  # another handle holds its LOCK
    try:
        with pytest.raises(Exception, match=r"(?i)lock"):
            store._open_for_partition(p)
        assert not list(path.parent.glob(f"{path.name}.broken-*"))
    finally:
        holder.close()


async def test_damage_inside_a_data_block_is_found_when_the_database_opens(table: Any) -> None:
    store = table.data
    keys = [f"txn-{i}".encode() for i in range(2_000)]
    for key in keys:
        store[key] = b"v" * 200
    p = partition_of(keys[0], PARTITIONS)
    store._dbs[p].flush()
    path = store.partition_path(p)
    await store.stop()
    sst = max(path.glob("*.sst"), key=lambda f: f.stat().st_size)
    with sst.open("r+b") as handle:  # same size, garbage in the first data blocks
        handle.seek(100)
        handle.write(b"\x00" * 4_000)
    # Upstream opens it without complaint; reading the damaged block fails later.
    upstream = Store._open_for_partition(store, p)
    with pytest.raises(Exception, match="Corruption"):
        rocks.read_through(upstream)
    upstream.close()

    db = store._db_for_partition(p)
    assert db.get(keys[0]) is None  # moved aside, empty: the changelog rebuilds it
    assert len(list(path.parent.glob(f"{path.name}.broken-*"))) == 1
