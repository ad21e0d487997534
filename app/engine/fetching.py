"""The fleet's Kafka consumer, second layer: fetched records handed to the agents.

:class:`FetchingConsumer` replaces Faust's ``_drain_messages`` (a copy of it, changed):
records reach the agents only through :meth:`FetchingConsumer._admit`, the busiest
topics' records go to their agents in bulk (lanes, :mod:`app.engine.lanes`), and
fetches are paced to the traffic (:class:`FetchPace`). :class:`KeepingFlowControl`
keeps stream queues through a resume that suspended nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping, Sequence
from time import monotonic
from typing import Any

from faust.transport.consumer import CONSUMER_FETCHING
from faust.types import TP
from mode.utils.queues import FlowControlEvent

from app.engine.lanes import Chunk, Lane, lanes_of
from app.engine.seeking import SeekingConsumer

log = logging.getLogger("wal.consumer")


class FetchingConsumer(SeekingConsumer):
    async def _drain_messages(self, fetcher: Any) -> None:
        """Faust's fetch loop, with lanes, and without two tasks per record.

        Records of a topic with a lane (:mod:`app.engine.lanes`) are handed over a
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

    async def _seek_back(self) -> None:
        self.log.dev("fetched while flow not active: seek back to committed offsets")
        try:
            await self.perform_seek()
        except Exception as exc:
            self.log.warning("exception performing seek when flow not active %r", exc)

    @property
    def _pace(self) -> FetchPace | None:
        if "_fetch_pace" not in self.__dict__:
            busy_fetch = self.app.__dict__.get("_wal_busy_fetch")
            self.__dict__["_fetch_pace"] = FetchPace(*busy_fetch) if busy_fetch else None
        pace: FetchPace | None = self.__dict__["_fetch_pace"]
        return pace

    def _aiokafka_fetcher(self) -> Any:
        """aiokafka's fetcher in Faust's consumer thread, once it is started (else None)."""
        consumer = getattr(self._thread, "_consumer", None)
        return getattr(consumer, "_fetcher", None)

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
