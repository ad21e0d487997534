"""Lanes hand fetched records to agents in batches; the consumer acks them as a whole."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from types import SimpleNamespace
from typing import Any

import pytest
from faust.types import TP
from intervaltree import IntervalTree

from app.engine.consumer import StrictConsumer
from app.engine.lanes import Batch, Chunk, Lane

TP0 = TP("wal-deliver", 0)
TP1 = TP("wal-deliver", 1)


def chunk(tp: TP, first: int, n: int, generation: int = 1) -> Chunk:
    records = [SimpleNamespace(offset=o, tp=tp) for o in range(first, first + n)]
    return Chunk(tp, records, generation)


def offsets(chunks: list[Chunk]) -> list[tuple[int, int]]:
    return [(c.tp.partition, r.offset) for c in chunks for r in c.records]


async def test_a_full_batch_is_taken_at_once_splitting_the_last_chunk() -> None:
    lane = Lane("wal-deliver", capacity=100)
    lane.put(chunk(TP0, 0, 3))
    lane.put(chunk(TP1, 10, 4))
    taken = await asyncio.wait_for(lane.take(5, within=60), 1)
    assert offsets(taken) == [(0, 0), (0, 1), (0, 2), (1, 10), (1, 11)]
    assert (lane.queued, lane.taken) == (2, 5)
    rest = await asyncio.wait_for(lane.take(5, within=0.01), 1)
    assert offsets(rest) == [(1, 12), (1, 13)]


async def test_a_partial_batch_waits_for_the_window_after_its_first_record() -> None:
    lane = Lane("wal-deliver", capacity=100)
    lane.put(chunk(TP0, 0, 2))
    loop = asyncio.get_running_loop()
    started = loop.time()
    taken = await lane.take(10, within=0.2)
    assert offsets(taken) == [(0, 0), (0, 1)]
    assert loop.time() - started >= 0.19


async def test_a_record_arriving_in_the_window_joins_the_batch() -> None:
    lane = Lane("wal-deliver", capacity=100)
    lane.put(chunk(TP0, 0, 2))
    asyncio.get_running_loop().call_later(0.05, lane.put, chunk(TP0, 2, 8))
    taken = await asyncio.wait_for(lane.take(10, within=5), 1)  # full before the window ends
    assert len(offsets(taken)) == 10


async def test_an_empty_lane_blocks_until_a_chunk_arrives() -> None:
    lane = Lane("wal-deliver", capacity=100)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(lane.take(10, within=0.01), 0.1)


async def test_room_and_clear() -> None:
    lane = Lane("wal-deliver", capacity=4)
    lane.put(chunk(TP0, 0, 4))
    assert lane.full()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(lane.wait_room(), 0.05)
    assert lane.pending() == {TP0}
    lane.clear()  # a rebalance: what was queued is read again after the seek
    assert not lane.full() and lane.queued == 0 and lane.pending() == set()
    await asyncio.wait_for(lane.wait_room(), 0.05)


async def test_slots_take_their_own_partitions_and_keep_them_until_idle() -> None:
    lane = Lane("wal-deliver", capacity=100, slots=2)
    lane.put(chunk(TP1, 0, 2))  # first seen: slot 0
    lane.put(chunk(TP0, 0, 2))  # slot 1
    lane.put(chunk(TP1, 2, 2))
    assert offsets(await lane.take(10, within=0, slot=0)) == [(1, 0), (1, 1), (1, 2), (1, 3)]
    assert offsets(await lane.take(10, within=0, slot=1)) == [(0, 0), (0, 1)]
    lane.done([chunk(TP0, 0, 2)])
    lane.clear()  # a rebalance: TP0 is dealt again, TP1 (still being worked on) keeps slot 0
    lane.put(chunk(TP0, 2, 1))
    lane.put(chunk(TP1, 4, 1))
    assert offsets(await lane.take(10, within=0, slot=1)) == [(0, 2)]
    assert offsets(await lane.take(10, within=0, slot=0)) == [(1, 4)]


class Consumer:
    def __init__(self) -> None:
        self.acked: list[Chunk] = []

    def ack_chunk(self, c: Chunk) -> None:
        self.acked.append(c)


async def test_a_batch_is_pending_until_acked_or_released() -> None:
    lane = Lane("wal-deliver", capacity=100)
    lane.put(chunk(TP0, 0, 3))
    lane.put(chunk(TP1, 0, 3))
    consumer = Consumer()
    batch = Batch(await lane.take(4, within=0), lane, consumer)
    assert [r.offset for r in batch.records] == [0, 1, 2, 0]
    assert lane.pending() == {TP0, TP1} and lane.taken == 4
    idle = asyncio.ensure_future(lane.wait_idle())
    await asyncio.sleep(0)
    assert not idle.done()
    batch.ack()
    batch.ack()  # once only
    assert [c.tp for c in consumer.acked] == [TP0, TP1]
    assert lane.taken == 0 and lane.pending() == {TP1}  # two records of TP1 still queued
    await asyncio.wait_for(idle, 1)
    released = Batch(await lane.take(10, within=0), lane, consumer)
    released.release()
    assert len(consumer.acked) == 2 and lane.taken == 0 and lane.pending() == set()


def strict(generation: int = 1, committed: int | None = 0) -> StrictConsumer:
    c = StrictConsumer.__new__(StrictConsumer)
    c._acked = defaultdict(list)
    c._acked_index = defaultdict(set)
    c._committed_offset = defaultdict(lambda: None, {TP0: committed})
    c._gap = defaultdict(IntervalTree)
    c._n_acked = 0
    c._waiting_for_ack = None
    topics: Any = SimpleNamespace(acks_enabled_for=lambda topic: True)
    c.app = SimpleNamespace(topics=topics, consumer_generation_id=generation)  # type: ignore[assignment]
    c._init_reading()
    c.guard.start(TP0, committed or 0)
    return c


def commit(c: StrictConsumer) -> int | None:
    """What a commit would write for TP0 (and the consumer then remembers)."""
    offset = c._new_offset(TP0)
    if offset is not None:
        c._committed_offset[TP0] = offset
    return offset


def test_acked_chunks_commit_up_to_the_first_one_not_acked() -> None:
    c = strict(committed=0)
    c.ack_chunk(chunk(TP0, 0, 5))
    c.ack_chunk(chunk(TP0, 10, 5))  # 5..9 taken by another batch, not acked yet
    assert commit(c) == 5
    assert commit(c) is None  # 5 is still not acked: nothing passes it
    c.ack_chunk(chunk(TP0, 5, 5))
    assert commit(c) == 15


def test_a_chunk_of_an_earlier_generation_is_never_acked() -> None:
    c = strict(generation=2, committed=0)
    c.ack_chunk(chunk(TP0, 0, 5, generation=1))  # fetched before the rebalance
    assert c._acked[TP0] == [] and c._n_acked == 0


def test_offsets_already_committed_or_acked_are_not_counted_again() -> None:
    c = strict(committed=3)
    c.ack_chunk(chunk(TP0, 0, 5))  # re-read after a seek: 0..2 are committed already
    c.ack_chunk(chunk(TP0, 3, 2))
    assert c._acked[TP0] == [3, 4] and c._n_acked == 2
    assert commit(c) == 5


def agent_parts(monkeypatch: pytest.MonkeyPatch) -> tuple[Lane, Consumer, Any, Any]:
    """A lane, a consumer, a stream and settings for running :func:`each_batch`."""
    import app.engine.lanes as lanes

    lane = Lane("wal-deliver", capacity=100)
    consumer = Consumer()
    app: Any = SimpleNamespace(consumer=consumer, _wal_lanes={"wal-deliver": lane})
    app.flow_control = SimpleNamespace(manage_queue=lambda queue: None)
    stream: Any = SimpleNamespace(app=app, channel=SimpleNamespace(topics=("wal-deliver",)))
    monkeypatch.setattr(lanes, "aiter", lambda channel: channel, raising=False)
    settings = SimpleNamespace(batch_size=10, batch_within_ms=1, agent_concurrency=1)
    return lane, consumer, stream, settings


async def test_a_batch_that_fails_unexpectedly_is_released_and_the_agent_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import app.engine.lanes as lanes

    monkeypatch.setattr(lanes, "RETRY_PAUSE_S", 0)
    lane, consumer, stream, settings = agent_parts(monkeypatch)
    handled: list[int] = []

    async def handle(batch: Batch) -> None:
        handled.append(batch.records[0].offset)
        if len(handled) == 1:
            raise KeyError("a bug")
        batch.ack()

    lane.put(chunk(TP0, 0, 3))
    task = asyncio.ensure_future(lanes.each_batch(stream, handle, settings))
    await asyncio.sleep(0.05)
    lane.put(chunk(TP0, 3, 2))
    await asyncio.sleep(0.05)
    task.cancel()
    assert handled == [0, 3]  # the agent lived on
    assert [c.records[0].offset for c in consumer.acked] == [3]  # the failed batch: not acked
    assert lane.taken == 0


async def test_a_batch_handed_over_stays_taken_until_its_own_task_acks_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Deliver finishes a batch behind a slow call in a task of its own and takes the next
    one meanwhile: the first must stay pending (not stranded for the heal timer) and its
    late ack must count."""
    import app.engine.lanes as lanes

    lane, consumer, stream, settings = agent_parts(monkeypatch)
    slow = asyncio.Event()
    late: list[asyncio.Future[None]] = []

    async def finish_later(batch: Batch) -> None:
        await slow.wait()
        batch.ack()

    async def handle(batch: Batch) -> None:
        if batch.records[0].tp == TP0:
            batch.hand_over()
            late.append(asyncio.ensure_future(finish_later(batch)))
        else:
            batch.ack()

    lane.put(chunk(TP0, 0, 3))
    task = asyncio.ensure_future(lanes.each_batch(stream, handle, settings))
    await asyncio.sleep(0.05)
    lane.put(chunk(TP1, 0, 2))  # the agent goes on while TP0's batch waits
    await asyncio.sleep(0.05)
    assert [c.tp for c in consumer.acked] == [TP1]
    assert lane.pending() == {TP0} and lane.taken == 3
    slow.set()
    await asyncio.wait_for(late[0], 1)
    task.cancel()
    assert [c.tp for c in consumer.acked] == [TP1, TP0]
    assert lane.taken == 0 and lane.pending() == set()
