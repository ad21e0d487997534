"""The RocksDB table store (``WAL_STORE=rocksdb://``), corrected where Faust's falls short.

Faust's ``faust.stores.rocksdb:Store`` keeps one RocksDB database per changelog
partition under ``WAL_DATA_DIR/faust``, with the changelog offset it holds, so a
restart reads only the changelog's tail. :func:`install` makes ``rocksdb://``
mean :class:`RocksStore` instead, which corrects four things:

* **Where a write goes.** Faust's store files a write under the partition of the
  *current Faust event* and fails an assertion without one. Our agents write
  state outside Faust events (lanes, batches: :func:`app.engine.changelog.changelog_record`),
  and the tables use the producer's partitioner, so a key's partition is its
  changelog record's: murmur2 of the key (:func:`app.engine.partitioner.partition_of`).
* **How far the store is known to be.** Faust records a partition's offset only
  for changelog records it sends itself; ours go out through
  :func:`app.topics.emit`, which hands the offsets Kafka acknowledged to
  :func:`note_durable`. Without it a restart re-read everything written since
  the previous start.
* **A database ahead of its changelog.** State is stored before its changelog
  record is emitted (:func:`app.engine.changelog.changelog_record`); a worker killed between the
  two leaves a database holding what the changelog never got, and on restart the
  replayed batch would find it applied already. A partition's first direct write
  leaves an ``UNCLEAN`` file in its database until a clean stop; a database found
  with one is rebuilt from the changelog (as ``memory://`` always is). Standby
  copies are written only from the changelog and survive a crash.
* **A database that does not open.** Faust retries a locked database and lets
  any other error (``Corruption: …`` - truncated or overwritten files) crash the
  worker, at every start; damage inside a data block shows only when a batch reads
  it. Here a database is read through once when it opens (:func:`read_through`),
  and one that fails is moved aside, with an error log line naming both paths, and
  an empty database rebuilds from the changelog.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from aiokafka.structs import RecordMetadata
from faust.stores import STORES
from faust.stores.rocksdb import Store
from faust.streams import current_event

from app.engine.partitioner import partition_of

log = logging.getLogger("wal.store")

#: What ``WAL_STORE=rocksdb://`` resolves to once :func:`install` ran.
ROCKSDB = "app.engine.store:RocksStore"
#: A file in a partition's database while this process's writes may be ahead of its changelog.
UNCLEAN = "WAL-UNCLEAN"


class RocksStore(Store):
    """Faust's RocksDB store with key-partitioned writes, acknowledged offsets, and a
    database that fails to open moved aside and rebuilt (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: partition -> the highest changelog offset recorded as durable in its database
        self._durable: dict[int, int] = {}
        #: partitions written directly by this process (their databases carry UNCLEAN)
        self._written: set[int] = set()

    def _key_partition(self, key: bytes) -> int:
        """The changelog partition the producer's partitioner gives ``key``."""
        return partition_of(key, self.table.partitions or self.app.conf.topic_partitions)

    def _partition_of(self, key: bytes) -> int | None:
        """The changelog partition of ``key``: its own for a table that uses the producer's
        partitioner, else the current event's (Faust's rule), or None without one."""
        if self.table.use_partitioner:
            return self._key_partition(key)
        event = current_event()
        return None if event is None else event.message.partition

    def _set(self, key: bytes, value: bytes | None) -> None:
        partition = self._partition_of(key)
        if partition is None:
            raise RuntimeError(f"table {self.table.name}: a write outside an event, no partition")
        self._key_index[key] = partition
        db = self._db_for_partition(partition)
        self._mark_written(partition)
        db.put(key, value)

    def _del(self, key: bytes) -> None:
        if self.table.use_partitioner:
            self._mark_written(self._key_partition(key))
        super()._del(key)

    def _mark_written(self, partition: int) -> None:
        """A write ahead of its changelog record: until this process closes the database in
        a clean stop, it may hold what the changelog never got (a SIGKILL between the two)."""
        if partition not in self._written and partition in self._dbs:
            self._written.add(partition)
            (self.partition_path(partition) / UNCLEAN).touch()

    async def stop(self) -> None:
        """A clean stop: every direct write had its changelog record acknowledged (agents
        drained before the stores stop; a shutdown past its deadline exits before this)."""
        for partition in self._written:
            (self.partition_path(partition) / UNCLEAN).unlink(missing_ok=True)
        self._written.clear()
        await super().stop()

    def _get(self, key: bytes) -> bytes | None:
        if not self.table.use_partitioner:
            value: bytes | None = super()._get(key)
            return value
        db = self._dbs.get(
            self._key_partition(key)
        )  # not held here (not assigned): no value, no new database
        return None if db is None else db.get(key)

    def note_durable(self, partition: int, offset: int) -> None:
        """Kafka has this partition's changelog up to ``offset``; the database has it too
        (state is stored before its record is emitted). Never moves backwards, and never
        opens a database this worker does not hold."""
        db = self._dbs.get(partition)
        if db is None or offset <= self._durable.get(partition, -1):
            return
        self._durable[partition] = offset
        db.put(self.offset_key, str(offset).encode())

    def revoke_partitions(self, table: Any, tps: Any) -> None:
        for tp in tps:
            if tp.topic in table.changelog_topic.topics:
                self._durable.pop(tp.partition, None)
        super().revoke_partitions(table, tps)

    def _open_for_partition(self, partition: int) -> Any:
        path = self.partition_path(partition)
        if (path / UNCLEAN).exists():
            # the process that wrote it died: it may be ahead of its changelog
            shutil.rmtree(path)
            log.warning(
                "table %s partition %d: %s was not closed cleanly (a worker killed or"
                " crashed while writing it); rebuilding the partition from its changelog",
                self.table.name,
                partition,
                path,
            )
        db = None
        try:
            db = super()._open_for_partition(partition)
            read_through(db)
            return db
        except Exception as exc:
            if locked(exc):  # another handle has it: Faust retries (the database is fine)
                raise
            if db is not None:
                db.close()
            aside = self.move_aside(path)
            log.error(
                "table %s partition %d: its RocksDB database %s does not open (%s); moved to"
                " %s, rebuilding the partition from its changelog",
                self.table.name,
                partition,
                path,
                exc,
                aside,
            )
        self._durable.pop(partition, None)
        return super()._open_for_partition(partition)

    @staticmethod
    def move_aside(path: Path) -> Path:
        """Rename a broken database directory out of the way (kept for a post-mortem)."""
        aside = path.with_name(f"{path.name}.broken-{time.strftime('%Y%m%dT%H%M%S')}")
        n = 1
        while aside.exists():
            aside = aside.with_name(f"{aside.name.split('~')[0]}~{n}")
            n += 1
        path.rename(aside)
        return aside


def locked(exc: Exception) -> bool:
    """Whether opening failed on the database's LOCK file (held by another handle), which
    RocksDB reports as an IO error naming the file; not a substring "lock" test, which
    Faust uses and which "block checksum mismatch" passes."""
    text = str(exc)
    return text.startswith("IO error") and "/LOCK" in text


def read_through(db: Any) -> None:
    """Read every block of ``db`` once, checking its checksums (RocksDB checks a block only
    when it reads it): damage inside a file that opened shows now, not in a later batch.
    About 0.4 s a million keys."""
    it = db.iter()
    try:
        it.seek_to_first()
        while it.valid():
            it.next()
        it.status()  # raises what stopped the iteration early, e.g. "Corruption: block checksum"
    finally:
        del it  # it holds the database open (and its LOCK), even from a traceback


def note_durable(
    tables: Mapping[str, Any], acknowledged: Iterable[tuple[RecordMetadata, int]]
) -> None:
    """Record, in the RocksDB stores, the changelog offsets Kafka acknowledged.

    ``tables`` is ``fleet.tables`` (name -> table); ``acknowledged`` what the
    producer's futures returned (a batch's future: its first offset), each with the
    number of records behind it.
    """
    stores = _changelog_stores(tables)
    if not stores:
        return
    for meta, size in acknowledged:
        store = stores.get(meta.topic)
        if store is not None:
            store.note_durable(meta.partition, meta.offset + size - 1)


#: id(fleet.tables) -> (how many tables it had, changelog topic -> RocksDB store)
_stores_by_changelog: dict[int, tuple[int, dict[str, RocksStore]]] = {}


def _changelog_stores(tables: Mapping[str, Any]) -> dict[str, RocksStore]:
    """Changelog topic -> its table's RocksDB store (none with ``memory://``); built again
    only when a table was added."""
    cached = _stores_by_changelog.get(id(tables))
    if cached is not None and cached[0] == len(tables):
        return cached[1]
    stores = {
        table.changelog_topic.get_topic_name(): table.data
        for table in tables.values()
        if isinstance(table.data, RocksStore)
    }
    _stores_by_changelog[id(tables)] = (len(tables), stores)
    return stores


def install() -> None:
    """Make ``rocksdb://`` resolve to :class:`RocksStore` (Faust's store registry)."""
    STORES.aliases["rocksdb"] = ROCKSDB
