"""The fleet's Kafka consumer: Faust's, made strict about what it commits.

Faust commits the highest run of consecutive acked offsets of a partition. When
the offset right after the last commit was never acked (the record was not
delivered to the stream, or is still being worked on) and later ones were,
``Consumer._new_offset`` commits past it anyway - it only refuses gaps wider
than one offset (faust-streaming #312 and its fix). A record lost that way is
never processed: exactly the loss a write-ahead log must not allow.

:class:`StrictConsumer` refuses to commit while the head of a partition's acked
offsets does not follow the committed offset, unless Faust knows of a real gap
there (compaction, transaction markers: ``_gap``). The partition's commits then
wait for that record, and :meth:`StrictConsumer.heal` (run by a timer) seeks a
partition held that way for too long back to its committed offset, so the
record is fetched and processed again - late, never lost. Records after it are
delivered again too; the targets' idempotency absorbs that. A partition whose
handed-over records were neither acked nor are still in flight (and nothing
after them arrives to be acked) is *stranded*, and healed the same way.

While the group has no committed offset for a partition, the start of its log
stands in for it (``auto_offset_reset`` is earliest): Faust would commit any
first run of acks, and a rebalance (which cannot seek back to a commit that does
not exist) would skip what was fetched and dropped before it.
:meth:`StrictConsumer.perform_seek` re-reads such a partition from its start.

Where each partition's reading stands is kept here, and nowhere else: the next
offset expected (``_next``), and when the partition was last sought. Records
reach the agents only through :meth:`StrictConsumer._admit`, which refuses a
partition's records fetched before its latest seek (they are read again from
the seek's position) and records an offset gap only where the fetch itself
proves one. That is the fix of issue 15: a seek (after the tables' recovery, a
heal, a parked delay tier) reset Faust's read offset while records fetched from
the old position were on their way from the consumer thread; when they arrived,
the distance between the two was taken for a gap (transaction markers,
compaction), a gap counts as acked, and the commit passed records that no
agent had finished - lost, once a worker that was stopping or whose lanes were
cleared had handed them over and dropped them.

Every commit passes :class:`app.guard.CommitGuard` last: an offset whose
records this worker has not proven done since it began reading the partition is
refused, logged and counted (``wal_commits_refused_total``), never sent.

It also hands the busiest topics' records to their agents in bulk (lanes,
:mod:`app.lanes`) and paces its fetches to the traffic (:class:`FetchPace`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping, Sequence
from time import monotonic
from typing import Any

from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.drivers import aiokafka as driver
from faust.types import TP
from faust.types.tuples import ack_lock
from mode.utils.futures import notify
from mode.utils.queues import FlowControlEvent

from app import metrics
from app.guard import CommitGuard
from app.lanes import Chunk, Lane, lanes_of

log = logging.getLogger("wal.consumer")


class StrictConsumer(driver.Consumer):
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
    def held(self) -> dict[TP, float]:
        """Partitions whose commits wait for a record, and since when (monotonic)."""
        return self.__dict__.setdefault("_held_since", {})

    @property
    def log_start(self) -> dict[TP, int]:
        """Where the log of a partition the group has no committed offset for began."""
        return self.__dict__.setdefault("_log_start", {})

    def _base(self, tp: TP) -> int | None:
        """The first offset a partition's commit must not pass unacked: the committed offset
        or - the group having none yet - the start of the log (``auto_offset_reset`` is
        earliest: that is where reading began). None while that start is not known."""
        committed = self._committed_offset.get(tp)
        return committed if committed is not None else self.log_start.get(tp)

    def _new_offset(self, tp: TP) -> int | None:
        """The offset to commit for ``tp``: the end of the run of done offsets that begins
        at its base (see :meth:`_base`), or None while the record at the base is not done.

        Done is acked by an agent, or proven absent by a fetch (``_gap``, recorded only
        by :meth:`_admit`). Faust's own rule commits the first run of consecutive acked
        offsets even when the offset right after the last commit is missing from it, and
        counts any gap it inferred as done (faust-streaming #312): neither is done here.
        """
        acked = self._acked[tp]
        if not acked:
            return None
        base = self._base(tp)
        if base is None:
            return None  # no commit yet and the log's start not known: commit() learns it
        # A record read twice (re-read after a seek) is acked twice, and offsets below the
        # base are committed already: neither says anything new.
        fresh = sorted({o for o in acked if o >= base})
        gaps = self._gap[tp]
        end, i = base, 0
        while True:
            if i < len(fresh) and fresh[i] == end:
                while i < len(fresh) and fresh[i] == end:
                    end += 1
                    i += 1
                continue
            absent = gaps.at(end) if gaps else ()
            if not absent:
                break
            end = max(interval.end for interval in absent)
            while i < len(fresh) and fresh[i] < end:
                i += 1
        acked[:] = fresh[i:]
        if end == base:
            self.held.setdefault(tp, monotonic())
            return None  # the record at `base` is not done: do not pass it
        self._acked_index[tp].difference_update(fresh[:i])
        if gaps:
            gaps.chop(0, end)
        self.held.pop(tp, None)
        return end

    async def _commit_offsets(self, offsets: Mapping[TP, int], *args: Any, **kwargs: Any) -> bool:
        """Faust's commit of ``offsets``, less any the :class:`~app.guard.CommitGuard` refuses."""
        allowed, refused = self.guard.check(offsets)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "commit (generation %s, member %s): %s",
                self.app.consumer_generation_id,
                self._member_id(),
                {
                    f"{tp.topic}/{tp.partition}": (o, self.guard.frontier(tp))
                    for tp, o in offsets.items()
                },
            )
        for tp, why in refused.items():
            metrics.COMMITS_REFUSED.labels(tp.topic).inc()
            log.error(
                "refused to commit %s/%s: %s (generation %s); its records are read again",
                tp.topic,
                tp.partition,
                why,
                self.app.consumer_generation_id,
            )
            self._acked.pop(tp, None)
            self._acked_index.pop(tp, None)
            self.held.setdefault(tp, monotonic())
        if not allowed:
            return False
        committed: bool = await super()._commit_offsets(allowed, *args, **kwargs)
        return committed

    def _member_id(self) -> str:
        """This worker's member id in the group (for the commit journal), if known."""
        consumer = getattr(self._thread, "_consumer", None)
        return str(getattr(getattr(consumer, "_coordinator", None), "member_id", "?"))

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

    async def verify_all_partitions_active(self) -> None:
        """Faust's check that every partition's events flow (it logs the ones that do not),
        every :data:`LIVELOCK_CHECK_S` rather than every 2.5 commit intervals: it visits every
        assigned partition with a yield to the loop each, about a tenth of an idle worker's
        CPU, and stuck partitions are the :meth:`heal` timer's business here."""
        now = monotonic()
        if now - self.__dict__.get("_livelock_checked", 0.0) < LIVELOCK_CHECK_S:
            return
        self.__dict__["_livelock_checked"] = now
        await super().verify_all_partitions_active()

    async def commit(self, *args: Any, **kwargs: Any) -> bool:
        """Faust's commit, once the start of every log without a committed offset is known."""
        await self._learn_log_starts()
        committed: bool = await super().commit(*args, **kwargs)
        return committed

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

    async def _drain_messages(self, fetcher: Any) -> None:
        """Faust's fetch loop, with lanes, and without two tasks per record.

        Records of a topic with a lane (:mod:`app.lanes`) are handed over a
        partition's fetch at a time, as one chunk. Every other record goes to
        the conductor as in Faust, which hands it over through
        ``wait_first(callback(record), suspend_flow.wait())``: two tasks, a
        future and an ``asyncio.wait`` per record, so that a rebalance can
        abandon a callback blocked on a full stream buffer. Here the callback
        is awaited directly when it cannot block - the app's and the
        consumer's flow both running (while the consumer's is suspended, Faust
        drops what it fetched: the seek after a rebalance reads it again) and
        no queue of the record's topic full - and through ``wait_first``
        otherwise.

        Every record passes :meth:`_admit` on its way, with the seek count and
        generation from before its fetch began. Records fetched and not handed
        over (their partition paused, the flow stopped meanwhile) have their
        partition sought back to the next record expected before the next
        fetch, so that nothing consumed from the fetcher is skipped unseen.
        ``broker_commit_every`` commits as in Faust, and the loop yields to the
        event loop every 100 records.
        """
        lanes = lanes_of(self.app)
        pace = self._pace
        stopped = self._stopped.is_set
        fetcher_stopped = fetcher._stopped.is_set
        try:
            while not (stopped() or fetcher_stopped()):
                self.diag.set_flag(CONSUMER_FETCHING)
                fetched_at, generation = self._seeks, self.app.consumer_generation_id
                fetched, active = await self._wait_next_records(1.0)
                if pace is not None:
                    count, nbytes = _volume(fetched)
                    pace.pace(self._aiokafka_fetcher(), count, monotonic(), nbytes)
                await self.sleep(0)
                if not fetched:
                    continue
                if self.should_stop:
                    self._dropped(fetched)
                    continue
                if not self.flow_active:
                    await self._seek_back()
                    continue
                current = self.app.consumer_generation_id
                rest = {}
                pending = list(fetched.items())
                for i, (tp, records) in enumerate(pending):
                    if not (active is None or tp in active or tp in self._buffered_partitions):
                        self._dropped([tp])  # paused since the fetch
                        continue
                    lane = lanes.get(tp.topic)
                    if lane is None:
                        rest[tp] = records
                    elif not await self._to_lane(lane, tp, records, generation, fetched_at):
                        self._dropped(tp for tp, _ in pending[i:])
                        break
                if rest:
                    await self._to_streams(rest, generation, fetched_at, current)
                if self._reseek:
                    await self._seek_dropped()
                self.diag.unset_flag(CONSUMER_FETCHING)
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                return
            raise
        except Exception as exc:
            self.log.exception("Drain messages raised: %r", exc)
            raise
        finally:
            self.diag.unset_flag(CONSUMER_FETCHING)

    def _admit(
        self, tp: TP, records: Sequence[Any], generation: int, fetched_at: int
    ) -> Sequence[Any]:
        """What of ``tp``'s fetched ``records`` to hand to an agent now, and where its reading
        then stands. Called right before the hand-over, with no await between the two.

        A partition sought since the fetch began (``fetched_at`` seeks), or of another
        generation, gets nothing: the fetcher reads it again from the seek's position.
        Records before the next one expected were handed over already (or lie before a
        seek's position) and are left out. A partition not being read yet (assigned, not
        sought) gets nothing: its seek is coming. Only then, with the fetch known to
        have begun where the last one handed over ended, is an offset missing before or
        between the records absent from the log (transaction markers, compaction), and
        recorded as such (:meth:`_absent`).
        """
        if not self.app.topics.acks_enabled_for(tp.topic):  # table changelogs: as Faust
            read = self._read_offset[tp]
            if read is not None and records[0].offset < read:
                records = [r for r in records if r.offset >= read]
            if records:
                self._read_offset[tp] = records[-1].offset
            return records
        if (
            generation != self.app.consumer_generation_id
            or self._sought_at.get(tp, 0) > fetched_at
            or tp in self._reseek
        ):
            self._dropped([tp])
            return ()
        expected = self._next.get(tp)
        if expected is None:  # a seek under way, or the rebalance's not done yet
            self._dropped([tp])
            return ()
        if records[0].offset < expected:
            records = [r for r in records if r.offset >= expected]
            if not records:
                return records
        last = records[-1].offset
        if records[0].offset != expected or last - expected + 1 != len(records):
            self._absent(tp, expected, records)
        self._next[tp] = last + 1
        self._read_offset[tp] = self.handed[tp] = last
        return records

    def _absent(self, tp: TP, expected: int, records: Sequence[Any]) -> None:
        """Record the offsets from ``expected`` on that ``records`` skip: not in the log."""
        gaps = self._gap[tp]
        for record in records:
            if record.offset > expected:
                gaps.addi(expected, record.offset)
                self.guard.cover(tp, expected, record.offset)
                log.debug("%s: offsets %d-%d are not in the log", tp, expected, record.offset - 1)
            expected = record.offset + 1
        gaps.merge_overlaps()

    def _dropped(self, tps: Iterable[TP]) -> None:
        """Records of ``tps`` left the fetcher and were not handed over: seek them back to
        the next record expected (:meth:`_seek_dropped`, before the next fetch; once it is
        known, if a seek is under way). Until then nothing of them is handed over."""
        acks_enabled_for = self.app.topics.acks_enabled_for
        self._reseek.update(tp for tp in tps if acks_enabled_for(tp.topic))

    async def _seek_dropped(self) -> None:
        assigned = self.assignment()
        offsets = {}
        for tp in list(self._reseek):
            if tp not in assigned:
                self._reseek.discard(tp)
            elif tp in self._next:  # else its seek is under way (or a rebalance's is coming)
                offsets[tp] = self._next[tp]
        if not offsets:
            return
        try:
            await self._seek_many(offsets)
        except Exception as exc:  # left in _reseek: nothing of them is handed over until then
            self._reseek.update(offsets)
            log.warning("seeking %d partitions back failed (%r); trying again", len(offsets), exc)

    @property
    def _pace(self) -> FetchPace | None:
        if "_fetch_pace" not in self.__dict__:
            busy_fetch = self.app.__dict__.get("_wal_busy_fetch")
            self.__dict__["_fetch_pace"] = FetchPace(*busy_fetch) if busy_fetch else None
        pace: FetchPace | None = self.__dict__["_fetch_pace"]
        return pace

    async def on_partitions_revoked(self, revoked: set[TP]) -> None:
        """Faust's, with fetches paced for the rebalance (:meth:`FetchPace.settle`), and the
        revoked partitions' readings ended: nothing fetched or acked for them counts now."""
        self._seeking(revoked)
        self.guard.forget(revoked)
        if self._pace is not None:
            self._pace.settle(self._aiokafka_fetcher(), monotonic())
        await super().on_partitions_revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TP], generation_id: int = 0) -> None:
        if self._pace is not None:
            self._pace.settle(self._aiokafka_fetcher(), monotonic())
        await super().on_partitions_assigned(assigned, generation_id)

    def _aiokafka_fetcher(self) -> Any:
        """aiokafka's fetcher in Faust's consumer thread, once it is started (else None)."""
        consumer = getattr(self._thread, "_consumer", None)
        return getattr(consumer, "_fetcher", None)

    async def _seek_back(self) -> None:
        self.log.dev("fetched while flow not active: seek back to committed offsets")
        try:
            await self.perform_seek()
        except Exception as exc:
            self.log.warning("exception performing seek when flow not active %r", exc)

    async def _to_lane(
        self, lane: Lane, tp: TP, records: list[Any], generation: int, fetched_at: int
    ) -> bool:
        """Hand one partition's fetched records to its lane; False if the flow stopped."""
        if self._commit_every is not None and self._n_acked >= self._commit_every:
            self._n_acked = 0
            await self.commit()
        if lane.full():
            await self.wait_first(lane.wait_room(), self.suspend_flow.wait())
        if not self.flow_active or self.suspend_flow.is_set():
            return False  # a rebalance began: the seek after it reads these again
        admitted = self._admit(tp, records, generation, fetched_at)
        if not admitted:
            return True
        self.app.monitor.track_tp_end_offset(tp, self.highwater(tp))
        lane.put(Chunk(tp, admitted, generation))
        on_records_in = getattr(self.app.monitor, "on_records_in", None)
        if on_records_in is not None:
            on_records_in(tp, len(admitted), admitted[-1].offset)
        return True

    async def _to_streams(
        self, fetched: dict[TP, list[Any]], generation: int, fetched_at: int, current: int
    ) -> None:
        """Records of topics without a lane, one by one to the conductor, as Faust does.

        A rebalance while they are handed over (the generation no longer ``current``, as it
        was when the fetch returned) ends the hand-over, as in Faust: the assignment's
        seeks read the rest again (the tables' recovery, for changelogs)."""
        callback = self.callback
        flow = self.app.flow_control
        channels_of = self.app.topics._topic_name_index  # type: ignore[attr-defined]
        commit_every = self._commit_every
        suspended = self.suspend_flow.is_set
        to_message = self._to_message
        admit = self._admit
        since_yield = 0
        for tp, record in self.scheduler.iterate(fetched):
            if not self.flow_active or self.app.consumer_generation_id != current:
                self._dropped(fetched)
                break
            since_yield += 1
            if since_yield > 100:
                await asyncio.sleep(0)
                since_yield = 0
            if commit_every is not None and self._n_acked >= commit_every:
                self._n_acked = 0
                await self.commit()
            if not admit(tp, (record,), generation, fetched_at):
                continue
            self.app.monitor.track_tp_end_offset(tp, self.highwater(tp))
            message = to_message(tp, record)
            if (
                flow.is_active()
                and not suspended()
                and not any(channel.queue.full() for channel in channels_of.get(tp.topic, ()))
            ):
                await callback(message)
            else:
                await self.wait_first(callback(message), self.suspend_flow.wait())

    def _reading(self, tp: TP, generation: int) -> bool:
        """Whether an ack from ``generation`` counts: ``tp``'s reading is this one's."""
        return generation == self.app.consumer_generation_id and self.guard.reading(tp)

    def ack(self, message: Any) -> bool:
        """Faust's ack of a stream's message - unless it was handed over before the partition's
        current reading began (a rebalance since): then it is only marked done, not counted.
        Faust's revoke forgets a partition's acks, and an ack arriving after that (the agent
        finished meanwhile) would count it again for the next assignment."""
        tp = message.tp
        if not self._reading(tp, message.generation_id):
            with ack_lock:
                message.acked = True
                self._unacked_messages.discard(message)
                notify(self._waiting_for_ack)
            return False
        counted: bool = super().ack(message)
        if counted:
            self.guard.cover(tp, message.offset, message.offset + 1)
        return counted

    def ack_chunk(self, chunk: Chunk) -> None:
        """Ack a lane chunk's records, unless a rebalance came between fetch and ack."""
        tp = chunk.tp
        if not (self.app.topics.acks_enabled_for(tp.topic) and self._reading(tp, chunk.generation)):
            return  # read again from the committed offset after the rebalance's seek
        with ack_lock:
            committed = self._committed_offset[tp]
            index = self._acked_index[tp]
            fresh = [
                r.offset
                for r in chunk.records
                if (committed is None or r.offset >= committed) and r.offset not in index
            ]
            if fresh:
                index.update(fresh)
                self._acked[tp].extend(fresh)
                self._n_acked += len(fresh)
                self.guard.cover_offsets(tp, fresh)
            notify(self._waiting_for_ack)

    async def wait_empty(self) -> None:
        """Faust's wait for events being worked on, and for batches taken from lanes."""
        for lane in lanes_of(self.app).values():
            while lane.taken and not self.should_stop:
                try:
                    await asyncio.wait_for(lane.wait_idle(), 10)
                except TimeoutError:
                    self.log.warning("wait_empty: still waiting for %r", lane)
        await super().wait_empty()

    def paused(self) -> frozenset[TP]:
        """Partitions whose fetching is paused (delay tiers parked, a rebalance's recovery)."""
        return frozenset(self._paused_partitions)

    def release(self, message: Any) -> None:
        """Give ``message`` back to Kafka unprocessed: it will be read again, after a seek.

        Faust waits for every message it delivered to a stream to be acked before
        a rebalance goes on (``wait_empty``); a message released is no longer
        waited for, and is never acked, so the commit cannot pass it.
        """
        self._unacked_messages.discard(message)

    @property
    def handed(self) -> dict[TP, int]:
        """The offset of the last record handed to the streams, per partition."""
        return self.__dict__.setdefault("_handed", {})

    def stranded(self, now: float) -> None:
        """Note partitions whose records were handed over, never acked, and are gone.

        A record Faust handed to a stream (``_read_offset`` at or past the
        committed offset) that is neither acked nor still tracked as unacked
        was lost in flight - dropped by a flow-control clear, or fetched while
        its partition was inactive - and nothing later will be acked to make
        :meth:`_new_offset` notice: the partition's commits would wait for it
        for good. Partitions paused on purpose (delay tiers park theirs) are
        not counted.
        """
        in_flight = {m.tp for m in list(self._unacked_messages)}
        for lane in lanes_of(self.app).values():
            in_flight |= lane.pending()
        for tp in self.assignment():
            committed = self._base(tp)
            last = self.handed.get(tp)
            if (
                committed is None
                or last is None
                or last < committed
                or self._read_offset.get(tp) != last  # sought since: not read yet
                or self._acked.get(tp)
                or tp in in_flight
                or tp in self._paused_partitions
                or not self.app.topics.acks_enabled_for(tp.topic)
            ):
                continue
            self.held.setdefault(tp, now)

    def unsought(self, now: float) -> list[TP]:
        """Partitions assigned and not sought (or waiting to be sought back), noting since
        when (``_unsought_since``).

        After an assignment the rebalance's :meth:`perform_seek` begins each
        partition's reading; until then its records are not handed over. Should
        that seek fail (the broker away), nothing would seek it again: the
        partition is returned here once it has waited, for :meth:`heal`.
        """
        waiting = self.__dict__.setdefault("_unsought_since", {})
        if not self.flow_active:
            waiting.clear()
            return []
        current = {
            tp
            for tp in self.assignment()
            if self.app.topics.acks_enabled_for(tp.topic)
            and tp not in self._paused_partitions
            and (tp not in self._next or tp in self._reseek)
        }
        for tp in list(waiting):
            if tp not in current:
                del waiting[tp]
        for tp in current:
            waiting.setdefault(tp, now)
        return sorted(current)

    async def heal(self, after: float) -> list[TP]:
        """Re-read partitions held for ``after`` seconds or more from their base offset."""
        now = monotonic()
        # partitions handed records with no committed offset: know where their logs begin
        await self._learn_log_starts(list(self.handed))
        self.stranded(now)
        waiting = self.__dict__.setdefault("_unsought_since", {})
        for tp in self.unsought(now):
            if now - waiting[tp] >= after:
                self.held.setdefault(tp, waiting.pop(tp))
        due = [tp for tp, since in self.held.items() if now - since >= after]
        # a log's start moves with retention: the re-read starts from where it is now
        await self._learn_log_starts(due, again=True)
        healed = []
        assigned = self.assignment()
        for tp in due:
            del self.held[tp]
            base = self._base(tp)
            if base is not None and tp in assigned:
                self.log.warning(
                    "%s: record at offset %s never reached its stream; re-reading from there",
                    tp,
                    base,
                )
                await self.seek(tp, base)
                if not self.guard.reading(tp):  # its rebalance's seek never happened
                    self.guard.start(tp, base)
                healed.append(tp)
        return healed


class FetchPace:
    """How the worker fetches: at once when traffic is light, patiently when it is busy.

    Faust fetches with ``fetch.min.bytes`` 1 (and ``fetch.max.wait.ms`` 1 500): every
    fetch is answered as soon as one record is there. A worker reads about a hundred
    partitions (ingest, deliver, delay tiers, status, changelogs), and aiokafka
    decodes every partition's entry of every fetch response in Python, so under a
    steady stream the consumer thread answered a fetch every few milliseconds: half of
    a worker's CPU at 1 000 msgs/s (py-spy). While the worker reads more than
    ``busy_rate`` records a second, its fetches ask the broker to gather ``min_bytes``
    for up to ``max_wait_ms`` first (fewer, fuller fetches); below that, Faust's
    fetch, so a trickle is not delayed and an idle worker polls every 1.5 s. The bytes
    gathered grow with the traffic - what arrives in :data:`BUSY_FETCH_S`, at least
    ``min_bytes``, at most :data:`MAX_BUSY_FETCH_BYTES` - so a fetch costs the same
    share of the worker whatever the rate: with a fixed 64 KiB, one worker reading
    5 000 msgs/s answered about a hundred fetches a second and fell behind (``make
    bench``'s latency part).

    A rebalance is paced as busy for :data:`SETTLE_S` (:meth:`settle`): aiokafka keeps
    one fetch in flight per broker, so a partition resumed after the tables' recovery
    waited for the fetch sent at the assignment - up to Faust's 1.5 s, twice at every
    rebalance (join, then resume) while the backlog waited (``make bench``).
    """

    def __init__(self, min_bytes: int, max_wait_ms: int, busy_rate: float = 500.0) -> None:
        self.busy = (min_bytes, max_wait_ms)
        self.busy_rate = busy_rate
        self.is_busy = False
        self.min_bytes = min_bytes  # of a busy fetch, for the current traffic
        self._count = 0
        self._bytes = 0
        self._since = monotonic()
        self._settling_until = 0.0

    def settle(self, fetcher: Any, now: float) -> None:
        """A rebalance is under way: fetch as when busy for the next :data:`SETTLE_S`."""
        self._settling_until = now + SETTLE_S
        self._set(fetcher, busy=True)

    def pace(self, fetcher: Any, records: int, now: float, nbytes: int = 0) -> None:
        """Count ``records`` (``nbytes``) fetched; once a second, set ``fetcher``'s fetch
        to suit."""
        self._count += records
        self._bytes += nbytes
        elapsed = now - self._since
        if elapsed < 1.0:
            return
        busy = self._count / elapsed >= self.busy_rate or now < self._settling_until
        wanted = int(self._bytes / elapsed * BUSY_FETCH_S)
        self.min_bytes = max(self.busy[0], min(wanted, MAX_BUSY_FETCH_BYTES))
        self._count, self._bytes, self._since = 0, 0, now
        self._set(fetcher, busy=busy)

    def _set(self, fetcher: Any, *, busy: bool) -> None:
        if fetcher is None:
            return
        # read by aiokafka's fetcher for each request it builds (its own thread)
        if busy:
            fetcher._fetch_min_bytes, fetcher._fetch_max_wait_ms = self.min_bytes, self.busy[1]
        elif self.is_busy:
            fetcher._fetch_min_bytes, fetcher._fetch_max_wait_ms = IDLE_FETCH
        if busy != self.is_busy:
            self.is_busy = busy
            fetcher._fetcher_timeout = BUSY_ROUTINE_S if busy else IDLE_ROUTINE_S


def _volume(fetched: Mapping[TP, Sequence[Any]] | None) -> tuple[int, int]:
    """Records in a fetch, and about how many bytes (each chunk's count times the size
    of its last value: a partition's records are mostly alike, and this is a pace)."""
    records = nbytes = 0
    for chunk in (fetched or {}).values():
        records += len(chunk)
        if chunk:
            nbytes += len(chunk) * max(chunk[-1].serialized_value_size, 0)
    return records, nbytes


#: Faust's fetch: min bytes, max wait (ms).
IDLE_FETCH = (1, 1500)
#: A busy fetch gathers what arrives in this long (s), within ``WAL_FETCH_MIN_BYTES``
#: and :data:`MAX_BUSY_FETCH_BYTES` (values only: keys, headers and framing are not
#: counted): about forty fetches a second while the traffic fills them, each waiting
#: ~20 ms more than a 64 KiB one would at 5 000 msgs/s of 1 KB on one worker.
BUSY_FETCH_S = 0.025
MAX_BUSY_FETCH_BYTES = 1024 * 1024
#: Longest aiokafka's fetch routine sleeps when nothing wakes it, s: its default while
#: busy; while idle, the fetch's long poll. Every event the routine acts on (a fetch
#: answered, records consumed, a seek, a resume, a new assignment) wakes it, so the
#: timeout only bounds how often it rebuilds its view of every partition for nothing:
#: five times a second was about a quarter of an idle worker's CPU (README, throughput).
BUSY_ROUTINE_S = 0.2
IDLE_ROUTINE_S = IDLE_FETCH[1] / 1000
#: How long a rebalance is paced as busy: its join, the tables' recovery, the resume.
SETTLE_S = 5.0
#: How often Faust's livelock scan of every partition runs (its own: 2.5 s).
LIVELOCK_CHECK_S = 30.0


class KeepingFlowControl(FlowControlEvent):
    """Flow control that empties stream queues only when it resumes a suspended flow.

    mode's ``FlowControlEvent.resume()`` clears every stream queue even when the
    flow is already running. During a rebalance Faust resumes the flow early (a
    GlobalTable with ``recovery_buffer_size=1`` does) and then once more after
    seeking to the committed offsets, so the second resume throws away records
    already queued for the agents: never acked, and then committed past as a
    "gap". Clearing belongs to a resume that ends a suspension, when the
    consumer is about to seek back over what the queues held.
    """

    def resume(self) -> None:
        was_suspended = self._suspend.is_set()
        self._suspend.clear()
        self._resume.set()
        if was_suspended:
            self.clear()


def _seek_all(consumer: Any, offsets: dict[TP, int]) -> None:
    """Seek aiokafka's ``consumer`` (run in its thread: :meth:`StrictConsumer._seek`)."""
    for tp, offset in offsets.items():
        consumer.seek(tp, offset)


class StrictTransport(driver.Transport):
    Consumer = StrictConsumer


def install(app: Any, *, busy_fetch: tuple[int, int] | None = None) -> None:
    """Give ``app`` the strict transport and flow control (before it creates streams), and
    the fetch it asks for while busy: (min bytes, max wait ms) - see :class:`FetchPace`."""
    app.__dict__["_wal_busy_fetch"] = busy_fetch
    app.transport = StrictTransport(app.conf.broker_consumer, app)
    assert "flow_control" not in app.__dict__, "install() must run before streams exist"
    app.__dict__["flow_control"] = KeepingFlowControl(loop=app.loop)
