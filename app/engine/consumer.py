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

Every commit passes :class:`app.engine.guard.CommitGuard` last: an offset whose
records this worker has not proven done since it began reading the partition is
refused, logged and counted (``wal_commits_refused_total``), never sent.

The layers below: :mod:`app.engine.seeking` (where reading stands, seeks) and
:mod:`app.engine.fetching` (records handed to the agents, fetch pace).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from time import monotonic
from typing import Any

from faust.transport.drivers import aiokafka as driver
from faust.types import TP
from faust.types.tuples import ack_lock
from mode.utils.futures import notify

from app import metrics
from app.engine.admin import durability
from app.engine.fetching import IDLE_FETCH, FetchingConsumer, KeepingFlowControl
from app.engine.lanes import Chunk, lanes_of
from app.engine.nodes import bound_requests, shun_hung_nodes

log = logging.getLogger("wal.consumer")


class StrictConsumer(FetchingConsumer):
    def _new_consumer_thread(self) -> driver.AIOKafkaConsumerThread:
        return ShunningConsumerThread(self, loop=self.loop, beacon=self.beacon)

    @property
    def held(self) -> dict[TP, float]:
        """Partitions whose commits wait for a record, and since when (monotonic)."""
        return self.__dict__.setdefault("_held_since", {})

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
        """Faust's commit of ``offsets``, less what the :class:`CommitGuard` refuses."""
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


#: How often Faust's livelock scan of every partition runs (its own: 2.5 s).
LIVELOCK_CHECK_S = 30.0


class ShunningConsumerThread(driver.AIOKafkaConsumerThread):
    """Faust's consumer thread: its client leaves hung brokers alone and bounds its requests
    in time (:mod:`.nodes`), its fetches in size (:func:`bound_fetches`)."""

    def _create_consumer(self, loop: asyncio.AbstractEventLoop) -> Any:
        consumer = super()._create_consumer(loop)
        shun_hung_nodes(consumer._client)
        # as long as the fleet's producer waits for an answer, and past a fetch's long poll
        fetch_wait_s = max(consumer._fetch_max_wait_ms, IDLE_FETCH[1]) / 1000
        bound = max(float(self.app.conf.producer_request_timeout), fetch_wait_s + 5.0)
        bound_requests(consumer._client, bound)
        bound_fetches(consumer, self.app.__dict__.get("_wal_fetch_max_bytes"))
        return consumer


def bound_fetches(consumer: Any, max_bytes: int | None) -> None:
    """At most ``max_bytes`` in one fetch response (all partitions of a broker), before
    ``consumer`` starts. Faust passes aiokafka no ``fetch_max_bytes``, so every fetch may
    bring back 50 MiB: a worker reading a backlog holds that, and glibc keeps much of it
    after (issue 19). aiokafka's ``start`` hands this attribute to the fetcher it makes."""
    if max_bytes is not None:
        consumer._fetch_max_bytes = max_bytes


class ShunningProducer(driver.Producer):
    """Faust's producer, its client leaving hung brokers alone (:mod:`.nodes`)."""

    def _new_producer(self, transactional_id: str | None = None) -> Any:
        producer = super()._new_producer(transactional_id)
        shun_hung_nodes(producer.client)
        return producer


class StrictTransport(driver.Transport):
    Consumer = StrictConsumer
    Producer = ShunningProducer

    async def _create_topic(
        self, owner: Any, client: Any, topic: str, partitions: int, replication: int, **kw: Any
    ) -> None:
        """Every topic Faust declares (changelogs, repartition topics) with the fleet's
        durability configs: one place, so a table added later cannot forget them."""
        kw["config"] = {**durability(replication), **(kw.get("config") or {})}
        await super()._create_topic(owner, client, topic, partitions, replication, **kw)


def install(
    app: Any, *, busy_fetch: tuple[int, int] | None = None, fetch_max_bytes: int | None = None
) -> None:
    """Give ``app`` the strict transport and flow control (before it creates streams), the
    fetch it asks for while busy: (min bytes, max wait ms) - see :class:`FetchPace` - and
    the most one fetch may bring back (:func:`bound_fetches`)."""
    app.__dict__["_wal_busy_fetch"] = busy_fetch
    app.__dict__["_wal_fetch_max_bytes"] = fetch_max_bytes
    app.transport = StrictTransport(app.conf.broker_consumer, app)
    assert "flow_control" not in app.__dict__, "install() must run before streams exist"
    app.__dict__["flow_control"] = KeepingFlowControl(loop=app.loop)
