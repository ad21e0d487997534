"""The fleet's Kafka consumer, first layer: where each partition's reading stands.

Where each partition's reading stands is kept here (:class:`SeekingConsumer`), and
nowhere else: the next offset expected (``_next``), and when the partition was last
sought. Records reach the agents only through
:meth:`app.engine.fetching.FetchingConsumer._admit`, which refuses a partition's records
fetched before its latest seek (they are read again from the seek's position) and
records an offset gap only where the fetch itself proves one. That is the fix of issue
15: a seek (after the tables' recovery, a heal, a parked delay tier) reset Faust's read
offset while records fetched from the old position were on their way from the consumer
thread; when they arrived, the distance between the two was taken for a gap (transaction
markers, compaction), a gap counts as acked, and the commit passed records that no agent
had finished - lost, once a worker that was stopping or whose lanes were cleared had
handed them over and dropped them.

While the group has no committed offset for a partition, the start of its log
stands in for it (``auto_offset_reset`` is earliest): Faust would commit any
first run of acks, and a rebalance (which cannot seek back to a commit that does
not exist) would skip what was fetched and dropped before it.
:meth:`SeekingConsumer.perform_seek` re-reads such a partition from its start.

Every seek goes through here, in the consumer's thread (:meth:`SeekingConsumer._seek`).
The layers above: :mod:`app.engine.fetching` (records handed to the agents) and
:mod:`app.engine.consumer` (what is committed).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from faust.transport.drivers import aiokafka as driver
from faust.types import TP

from app.engine.guard import CommitGuard

log = logging.getLogger("wal.consumer")


class SeekingConsumer(driver.Consumer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_reading()

    def _init_reading(self) -> None:
        #: per partition being read: the offset of the next record to hand to an agent
        self._next: dict[TP, int] = {}
        #: seeks so far, and per partition the count when it was last sought
        self._seeks = 0
        self._sought_at: dict[TP, int] = {}
        #: partitions whose fetched records were dropped: sought back to ``_next``
        self._reseek: set[TP] = set()
        self._seek_lock = asyncio.Lock()
        self.guard = CommitGuard()

    @property
    def log_start(self) -> dict[TP, int]:
        """Where the log of a partition the group has no committed offset for began."""
        return self.__dict__.setdefault("_log_start", {})

    @property
    def handed(self) -> dict[TP, int]:
        """The offset of the last record handed to the streams, per partition."""
        return self.__dict__.setdefault("_handed", {})

    async def perform_seek(self) -> None:
        """Faust's seek to the committed offsets after a rebalance - and every partition the
        group has no committed offset for back to the start of its log; then each
        partition's reading begins there (:meth:`_sought`, the guard's start).

        Faust seeks only partitions with a committed offset; the others read on from
        wherever the fetcher was. Records fetched and dropped - the flow suspended
        during a rebalance or the tables' recovery, a fetch of the previous
        generation, a cleared lane - are then never read again: a worker joining a
        fresh group on a backlog skipped ~4 000 records of four partitions (``make
        bench``; :meth:`heal` found them 15 s later). From the start of the log,
        whatever was fetched and not finished is read again now.
        """
        async with self._seek_lock:
            await self._perform_seek()

    async def _perform_seek(self) -> None:
        tps = [tp for tp in self.assignment() if self.app.topics.acks_enabled_for(tp.topic)]
        self._seeking(tps)
        await super().perform_seek()
        uncommitted = [tp for tp in tps if self._committed_offset.get(tp) is None]
        starts: dict[TP, int] = {}
        if uncommitted:
            await self._learn_log_starts(uncommitted, again=True)
            # a start not learned: 0, which the fetcher resets to the log's start
            starts = {tp: self.log_start.get(tp, 0) for tp in uncommitted}
            await self._in_consumer_thread(_seek_all, starts)
            for tp, start in starts.items():
                self._read_offset[tp] = start or None  # as Faust's seek
                self.handed.pop(tp, None)
        assigned = self.assignment()
        origins = {tp: starts.get(tp, self._committed_offset.get(tp)) for tp in tps}
        self._sought({tp: o for tp, o in origins.items() if o is not None and tp in assigned})
        for tp, origin in origins.items():
            if origin is not None and tp in assigned:
                self.guard.start(tp, origin)

    async def _seek(self, partition: TP, offset: int) -> None:
        """Faust's seek, in the consumer's thread, and the partition's reading moved there.

        Faust calls aiokafka's ``seek`` from the main thread, while the consumer
        thread may be inside ``fetched_records`` between reading a partition's
        fetch result and deleting it: the seek deletes it first and the fetcher
        crashed with a ``KeyError`` (seen when every uncommitted partition was
        sought at a rebalance), stopping the worker.
        """
        await self._seek_many({partition: offset})

    async def _seek_many(self, offsets: Mapping[TP, int]) -> None:
        """Seek each partition to its offset in one hop to the consumer thread."""
        async with self._seek_lock:
            self._seeking(offsets)
            await self._in_consumer_thread(_seek_all, offsets)
            self._sought(offsets)
        for tp, offset in offsets.items():
            self._read_offset[tp] = offset or None  # as Faust's seek

    def _seeking(self, tps: Iterable[TP]) -> None:
        """``tps`` are about to be sought: records fetched until then are not handed over.

        Every seek runs ``_seeking``, the seek in the consumer thread and :meth:`_sought`
        under ``_seek_lock``: two seeks of a partition interleaved could leave the next
        offset expected below the fetcher's position, and the records between would
        pass for a gap."""
        self._seeks += 1
        for tp in tps:
            self._sought_at[tp] = self._seeks
            self._next.pop(tp, None)
            self._reseek.discard(tp)

    def _sought(self, offsets: Mapping[TP, int]) -> None:
        """The fetcher now reads each partition from its offset: the next record expected."""
        self._seeks += 1
        for tp, offset in offsets.items():
            self._sought_at[tp] = self._seeks
            self._next[tp] = offset

    async def _in_consumer_thread(self, fn: Any, *args: Any) -> Any:
        thread = self._thread
        return await thread.call_thread(fn, thread._ensure_consumer(), *args)

    async def _learn_log_starts(self, tps: Any = None, *, again: bool = False) -> None:
        """Learn where the logs of partitions read with no committed offset begin.

        Faust commits the first run of acked offsets of such a partition whatever
        it starts with, so records handed over before a rebalance and dropped
        (a cleared buffer: the group had no offset to seek back to) were skipped
        for good - two workers starting on a backlog lost a few thousand that way
        (``make bench``). With the log's start as the base, the strict rule holds
        the partition instead, and :meth:`heal` re-reads it from there.
        """
        if tps is None:
            tps = [tp for tp, acked in self._acked.items() if acked]
        unknown = [
            tp
            for tp in tps
            if self._committed_offset.get(tp) is None and (again or tp not in self.log_start)
        ]
        if not unknown:
            return
        try:
            self.log_start.update(await self.earliest_offsets(*unknown))
        except Exception as exc:  # the next commit or heal asks again
            self.log.warning("could not learn where %d logs begin: %r", len(unknown), exc)


def _seek_all(consumer: Any, offsets: dict[TP, int]) -> None:
    """Seek aiokafka's ``consumer`` (run in its thread: :meth:`StrictConsumer._seek`)."""
    for tp, offset in offsets.items():
        consumer.seek(tp, offset)
