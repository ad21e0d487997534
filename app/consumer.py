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

It also hands the busiest topics' records to their agents in bulk (lanes,
:mod:`app.lanes`) and paces its fetches to the traffic (:class:`FetchPace`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from time import monotonic
from typing import Any

from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.drivers import aiokafka as driver
from faust.types import TP
from faust.types.tuples import ack_lock
from mode.utils.futures import notify
from mode.utils.queues import FlowControlEvent

from app.lanes import Chunk, Lane, lanes_of


class StrictConsumer(driver.Consumer):
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
        acked = self._acked[tp]
        committed = self._committed_offset[tp]
        if acked:
            # A record read twice (re-read after a seek) is acked twice; Faust's
            # run-of-consecutive-offsets then stops at every repeat and commits
            # crawl. Repeats and offsets already committed say nothing new.
            fresh = sorted({o for o in acked if committed is None or o >= committed})
            if fresh != acked:
                acked[:] = fresh
        if acked and not self._gap[tp]:
            base = self._base(tp)
            if base is None:
                return None  # no commit yet and the log's start not known: commit() learns it
            if min(acked) > base:
                self.held.setdefault(tp, monotonic())
                return None  # the record at `base` was not acked: do not pass it
        self.held.pop(tp, None)
        return super()._new_offset(tp)

    async def perform_seek(self) -> None:
        """Faust's seek to the committed offsets after a rebalance - and every partition the
        group has no committed offset for back to the start of its log.

        Faust seeks only partitions with a committed offset; the others read on from
        wherever the fetcher was. Records fetched and dropped - the flow suspended
        during a rebalance or the tables' recovery, a fetch of the previous
        generation, a cleared lane - are then never read again: a worker joining a
        fresh group on a backlog skipped ~4 000 records of four partitions (``make
        bench``; :meth:`heal` found them 15 s later). From the start of the log,
        whatever was fetched and not finished is read again now.
        """
        await super().perform_seek()
        uncommitted = [
            tp
            for tp in self.assignment()
            if self._committed_offset.get(tp) is None and self.app.topics.acks_enabled_for(tp.topic)
        ]
        if not uncommitted:
            return
        await self._learn_log_starts(uncommitted, again=True)
        starts = {tp: self.log_start[tp] for tp in uncommitted if tp in self.log_start}
        await self._in_consumer_thread(_seek_all, starts)
        for tp, start in starts.items():
            self._read_offset[tp] = start or None  # as Faust's seek
            self.handed.pop(tp, None)

    async def _seek(self, partition: TP, offset: int) -> None:
        """Faust's seek, in the consumer's thread.

        Faust calls aiokafka's ``seek`` from the main thread, while the consumer
        thread may be inside ``fetched_records`` between reading a partition's
        fetch result and deleting it: the seek deletes it first and the fetcher
        crashed with a ``KeyError`` (seen when every uncommitted partition was
        sought at a rebalance), stopping the worker.
        """
        await self._in_consumer_thread(_seek_all, {partition: offset})

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
        otherwise. Everything else is as in Faust: records below the read
        offset are dropped, offset gaps are recorded, ``broker_commit_every``
        commits, a fetch of another generation is abandoned, and the loop
        yields to the event loop every 100 records.
        """
        lanes = lanes_of(self.app)
        pace = self._pace
        stopped = self._stopped.is_set
        fetcher_stopped = fetcher._stopped.is_set
        try:
            while not (stopped() or fetcher_stopped()):
                self.diag.set_flag(CONSUMER_FETCHING)
                fetched, active = await self._wait_next_records(1.0)
                if pace is not None:
                    count, nbytes = _volume(fetched)
                    pace.pace(self._aiokafka_fetcher(), count, monotonic(), nbytes)
                await self.sleep(0)
                if not fetched or self.should_stop:
                    continue
                if not self.flow_active:
                    await self._seek_back()
                    continue
                generation = self.app.consumer_generation_id
                rest = {}
                for tp, records in fetched.items():
                    if not (active is None or tp in active or tp in self._buffered_partitions):
                        continue
                    lane = lanes.get(tp.topic)
                    if lane is None:
                        rest[tp] = records
                    elif not await self._to_lane(lane, tp, records, generation):
                        break
                if rest:
                    await self._to_streams(rest, generation)
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

    @property
    def _pace(self) -> FetchPace | None:
        if "_fetch_pace" not in self.__dict__:
            busy_fetch = self.app.__dict__.get("_wal_busy_fetch")
            self.__dict__["_fetch_pace"] = FetchPace(*busy_fetch) if busy_fetch else None
        pace: FetchPace | None = self.__dict__["_fetch_pace"]
        return pace

    async def on_partitions_revoked(self, revoked: set[TP]) -> None:
        """Faust's, with fetches paced for the rebalance: see :meth:`FetchPace.settle`."""
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

    async def _to_lane(self, lane: Lane, tp: TP, records: list[Any], generation: int) -> bool:
        """Hand one partition's fetched records to its lane; False if the flow stopped."""
        read = self._read_offset[tp]
        if read is not None and records[0].offset < read:
            records = [r for r in records if r.offset >= read]
            if not records:
                return True
        if read and self.app.topics.acks_enabled_for(tp.topic):
            await self._record_gaps(tp, read, records)
        if self._commit_every is not None and self._n_acked >= self._commit_every:
            self._n_acked = 0
            await self.commit()
        if lane.full():
            await self.wait_first(lane.wait_room(), self.suspend_flow.wait())
        if (
            not self.flow_active
            or self.suspend_flow.is_set()
            or self.app.consumer_generation_id != generation
        ):
            return False  # a rebalance began: the seek after it reads these again
        self.app.monitor.track_tp_end_offset(tp, self.highwater(tp))
        lane.put(Chunk(tp, records, generation))
        last = records[-1].offset
        self._read_offset[tp] = self.handed[tp] = last
        on_records_in = getattr(self.app.monitor, "on_records_in", None)
        if on_records_in is not None:
            on_records_in(tp, len(records), last)
        return True

    async def _record_gaps(self, tp: TP, read: int, records: list[Any]) -> None:
        """Note offsets missing before and between ``records`` (compaction, markers)."""
        if records[-1].offset - read == len(records):
            return  # the common case: consecutive from the read offset on
        previous = read
        for record in records:
            if record.offset - previous > 1:
                await self._add_gap(tp, previous + 1, record.offset)
            previous = record.offset

    async def _to_streams(self, fetched: dict[TP, list[Any]], generation: int) -> None:
        """Records of topics without a lane, one by one to the conductor, as Faust does."""
        callback = self.callback
        flow = self.app.flow_control
        channels_of = self.app.topics._topic_name_index  # type: ignore[attr-defined]
        read_offsets = self._read_offset
        handed = self.handed
        acks_enabled_for = self.app.topics.acks_enabled_for
        commit_every = self._commit_every
        suspended = self.suspend_flow.is_set
        to_message = self._to_message
        since_yield = 0
        for tp, record in self.scheduler.iterate(fetched):
            if not self.flow_active or self.app.consumer_generation_id != generation:
                break
            self.app.monitor.track_tp_end_offset(tp, self.highwater(tp))
            message = to_message(tp, record)
            since_yield += 1
            if since_yield > 100:
                await asyncio.sleep(0)
                since_yield = 0
            offset = message.offset
            read = read_offsets[tp]
            if read is not None and offset < read:
                continue  # before a seek's new position: read again after it
            if read and offset - read > 1 and acks_enabled_for(message.topic):
                await self._add_gap(tp, read + 1, offset)
            if commit_every is not None and self._n_acked >= commit_every:
                self._n_acked = 0
                await self.commit()
            if (
                flow.is_active()
                and not suspended()
                and not any(channel.queue.full() for channel in channels_of.get(tp.topic, ()))
            ):
                await callback(message)
            else:
                await self.wait_first(callback(message), self.suspend_flow.wait())
            read_offsets[tp] = handed[tp] = offset

    def ack_chunk(self, chunk: Chunk) -> None:
        """Ack a lane chunk's records, unless a rebalance came between fetch and ack."""
        tp = chunk.tp
        if chunk.generation != self.app.consumer_generation_id:
            return  # read again from the committed offset after the rebalance's seek
        if not self.app.topics.acks_enabled_for(tp.topic):
            return
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

    async def heal(self, after: float) -> list[TP]:
        """Re-read partitions held for ``after`` seconds or more from their base offset."""
        now = monotonic()
        # partitions handed records with no committed offset: know where their logs begin
        await self._learn_log_starts(list(self.handed))
        self.stranded(now)
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
