"""Lanes: the busiest topics' records, handed to their agent a fetch at a time.

Faust turns every fetched record into a message, an event and a stream step
(conductor callback, channel queue, stream iteration, per-event ack and
sensors). Agents here take their input in batches of thousands and ack a batch
at once, so that per-record machinery was about a third of a busy worker's main
thread (py-spy, see the README's throughput notes). A topic given a *lane*
bypasses it: :class:`app.engine.consumer.StrictConsumer` hands each partition's fetched
records to the lane as one :class:`Chunk`, and the agent takes :class:`Batch`\\ es
of chunks with :func:`batches`.

The guarantees are Faust's, kept by the consumer:

* a batch's offsets are acked only when the agent calls :meth:`Batch.ack` (after
  its effects are durable), and the strict commit rule applies to them as to
  any acked offset - nothing is committed past a record not acked;
* a rebalance clears what the lane holds (like Faust's stream buffers: the
  consumer seeks back to the committed offsets) and waits for batches being
  worked on before it commits (``wait_empty``);
* a batch taken before a rebalance and finished after it is not acked: its
  records are read again from the committed offset, and the targets'
  idempotency absorbs the repeat.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from faust.types import TP

from app.engine.batching import RETRY_PAUSE_S

log = logging.getLogger("wal.lanes")


@dataclass(slots=True)
class Chunk:
    """Consecutive records of one partition from one fetch, in offset order."""

    tp: TP
    records: Sequence[Any]  # aiokafka ConsumerRecord: topic, partition, offset, timestamp (ms)…
    generation: int


class Lane:
    """A bounded queue of chunks for one topic, and the records taken from it.

    With ``slots`` > 1 the partitions are dealt out to slots in the order they first
    bring records (dealt again after a rebalance), and each slot is taken from by its
    own loop: batches of different partitions are worked on at once, while each
    partition's records - and so each routing key's - stay in order, one batch at a
    time. A partition with a batch still being worked on keeps its slot.
    """

    def __init__(self, topic: str, capacity: int, slots: int = 1) -> None:
        self.topic = topic
        self.capacity = capacity
        self.slots = slots
        self.queued = 0
        self.taken = 0
        self._queues: list[deque[Chunk]] = [deque() for _ in range(slots)]
        self._queued: list[int] = [0] * slots
        self._arrived = [asyncio.Event() for _ in range(slots)]
        self._taken_tps: dict[TP, int] = {}
        self._slot_of: dict[TP, int] = {}
        self._dealt = 0
        self._room = asyncio.Event()
        self._room.set()
        self._idle = asyncio.Event()
        self._idle.set()

    def __repr__(self) -> str:
        return f"<Lane {self.topic}: {self.queued} queued, {self.taken} taken>"

    # -- the consumer's side --------------------------------------------------------------

    def full(self) -> bool:
        return self.queued >= self.capacity

    async def wait_room(self) -> None:
        await self._room.wait()

    def _slot(self, tp: TP) -> int:
        slot = self._slot_of.get(tp)
        if slot is None:
            slot = self._slot_of[tp] = self._dealt % self.slots
            self._dealt += 1
        return slot

    def put(self, chunk: Chunk) -> None:
        slot = self._slot(chunk.tp)
        self._queues[slot].append(chunk)
        n = len(chunk.records)
        self._queued[slot] += n
        self.queued += n
        self._arrived[slot].set()
        if self.full():
            self._room.clear()

    def clear(self) -> None:
        """Forget every queued chunk (flow control, on a rebalance): a seek reads them again."""
        for queue in self._queues:
            queue.clear()
        self._queued = [0] * self.slots
        self.queued = 0
        self._room.set()
        self._slot_of = {tp: s for tp, s in self._slot_of.items() if self._taken_tps.get(tp)}
        self._dealt = len(self._slot_of)

    def pending(self) -> set[TP]:
        """Partitions with records queued here or taken and not yet done."""
        queued = {c.tp for queue in self._queues for c in queue}
        return queued | {tp for tp, n in self._taken_tps.items() if n}

    async def wait_idle(self) -> None:
        """Until no batch taken from this lane is still being worked on."""
        await self._idle.wait()

    # -- the agent's side -----------------------------------------------------------------

    async def take(self, size: int, within: float, slot: int = 0) -> list[Chunk]:
        """Chunks of ``slot`` holding up to ``size`` records: once there are that many, or
        ``within`` seconds after the first arrived. A chunk larger than what is left is
        split."""
        loop = asyncio.get_running_loop()
        queue, arrived = self._queues[slot], self._arrived[slot]
        while True:
            while not queue:
                arrived.clear()
                await arrived.wait()
            deadline = loop.time() + within
            while self._queued[slot] < size:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                arrived.clear()
                try:
                    await asyncio.wait_for(arrived.wait(), remaining)
                except TimeoutError:
                    break
            if queue:  # not cleared by a rebalance meanwhile
                return self._pop(slot, size)

    def _pop(self, slot: int, size: int) -> list[Chunk]:
        queue = self._queues[slot]
        out: list[Chunk] = []
        n = 0
        while queue and n < size:
            chunk = queue.popleft()
            room = size - n
            if len(chunk.records) > room:
                rest = Chunk(chunk.tp, chunk.records[room:], chunk.generation)
                queue.appendleft(rest)
                chunk = Chunk(chunk.tp, chunk.records[:room], chunk.generation)
            out.append(chunk)
            n += len(chunk.records)
            self._taken_tps[chunk.tp] = self._taken_tps.get(chunk.tp, 0) + len(chunk.records)
        self._queued[slot] -= n
        self.queued -= n
        self.taken += n
        self._idle.clear()
        if not self.full():
            self._room.set()
        return out

    def done(self, chunks: Sequence[Chunk]) -> None:
        """The agent is finished with ``chunks`` (acked, or given up)."""
        for chunk in chunks:
            self._taken_tps[chunk.tp] -= len(chunk.records)
            self.taken -= len(chunk.records)
        if not self.taken:
            self._idle.set()


class Batch:
    """Records taken from a lane; :meth:`ack` once their effects are durable."""

    __slots__ = ("_chunks", "_consumer", "_finished", "_lane", "handed_over", "records")

    def __init__(self, chunks: list[Chunk], lane: Lane, consumer: Any) -> None:
        self._chunks = chunks
        self._lane = lane
        self._consumer = consumer
        self._finished = False
        self.handed_over = False
        self.records: list[Any] = [r for chunk in chunks for r in chunk.records]

    def __len__(self) -> int:
        return len(self.records)

    def ack(self) -> None:
        """Ack every record of the batch (they may be committed) and release it."""
        if self._finished:
            return
        for chunk in self._chunks:
            self._consumer.ack_chunk(chunk)
        self.release()

    def release(self) -> None:
        """Give the batch up unacked: its records will be read again after a seek."""
        if not self._finished:
            self._finished = True
            self._lane.done(self._chunks)

    def hand_over(self) -> None:
        """The agent goes on to its next batch and finishes this one in a task of its own
        (behind a slow call): it stays taken - pending for the heal timer, waited for by a
        rebalance - until that task acks or releases it. Without this, the loop of
        :func:`batches` released it on taking the next batch, and :meth:`ack` did nothing
        after that: the heal timer found the partitions stranded and read them again."""
        self.handed_over = True


def lanes_of(app: Any) -> dict[str, Lane]:
    """The app's lanes by topic name (the consumer hands those topics' records over)."""
    lanes: dict[str, Lane] = app.__dict__.setdefault("_wal_lanes", {})
    return lanes


def open_lane(stream: Any, capacity: int, slots: int = 1) -> Lane:
    """The lane of ``stream``'s (single) topic, subscribed to as the stream would be."""
    app = stream.app
    channel = aiter(stream.channel)  # subscribes the topic (Faust's conductor)
    (topic,) = channel.topics
    lanes = lanes_of(app)
    lane = lanes.get(topic)
    if lane is None:
        lane = lanes[topic] = Lane(topic, capacity, slots)
        app.flow_control.manage_queue(lane)  # cleared with the stream buffers
    assert lane.slots == slots, f"{topic}: lane opened with {lane.slots} slots, not {slots}"
    return lane


async def batches(
    stream: Any, size: int, within: float, *, slot: int = 0, slots: int = 1
) -> AsyncIterator[Batch]:
    """Batches of up to ``size`` records of ``stream``'s topic (of the partitions of
    ``slot`` of ``slots``), ``within`` seconds after the first; unacked (call
    :meth:`Batch.ack`). A batch neither acked nor released nor handed over
    (:meth:`Batch.hand_over`) when the agent moves on is released: read again after the
    next seek, never committed."""
    lane = open_lane(stream, capacity=max(size * 4, 4096), slots=slots)
    consumer = stream.app.consumer
    while True:
        batch = Batch(await lane.take(size, within, slot), lane, consumer)
        try:
            yield batch
        finally:
            if not batch.handed_over:
                batch.release()


async def each_batch(
    stream: Any, handle: Callable[[Batch], Awaitable[None]], settings: Any
) -> None:
    """Run ``handle`` on every batch of ``stream``'s topic as the settings say:
    ``WAL_BATCH_SIZE``, ``WAL_BATCH_WITHIN_MS`` and ``WAL_AGENT_CONCURRENCY`` batches at
    once (each slot of partitions one batch at a time); returns only if every loop does.

    ``handle`` routes every failure it knows of; one it did not foresee (a bug) must not
    end the agent (faust #175: a dead agent stops reading and committing, silently). It
    is logged and its batch released unacked: the commit rule holds the batch's
    partitions and :meth:`app.engine.consumer.StrictConsumer.heal` has them read again."""
    size, within = settings.batch_size, settings.batch_within_ms / 1000
    slots = settings.agent_concurrency

    async def loop(slot: int) -> None:
        async for batch in batches(stream, size, within, slot=slot, slots=slots):
            try:
                await handle(batch)
            except Exception:
                log.exception(
                    "%s: a batch of %d failed unexpectedly; released, to be read again",
                    stream.channel,
                    len(batch),
                )
                batch.release()
                await asyncio.sleep(RETRY_PAUSE_S)

    await asyncio.gather(*(loop(slot) for slot in range(slots)))
