"""The strict consumer never commits past an offset that was not acked."""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
from faust.transport.drivers import aiokafka as driver
from faust.types import TP
from intervaltree import IntervalTree

from app.engine.consumer import StrictConsumer, StrictTransport

TP0 = TP("wal-ingest", 0)


@dataclass(frozen=True)
class InFlight:
    tp: TP


class Topics:
    def acks_enabled_for(self, topic: str) -> bool:
        return True


def consumer(acked: list[int], committed: int | None) -> StrictConsumer:
    c = StrictConsumer.__new__(StrictConsumer)
    c._acked = defaultdict(list, {TP0: sorted(acked)})
    c._acked_index = defaultdict(set, {TP0: set(acked)})
    c._committed_offset = defaultdict(lambda: None, {TP0: committed})
    c._gap = defaultdict(IntervalTree)
    c._read_offset = defaultdict(lambda: None)
    c._unacked_messages = set()  # type: ignore[assignment]
    c._paused_partitions = set()
    c.app = SimpleNamespace(topics=Topics())  # type: ignore[assignment]
    c.assignment = lambda: {TP0}  # type: ignore[method-assign]
    c._init_reading()
    return c


def test_commits_a_run_that_follows_the_committed_offset() -> None:
    assert consumer([10, 11, 12], committed=10)._new_offset(TP0) == 13


def test_never_passes_one_missing_offset_at_the_head() -> None:
    # Faust itself returns 13 here: 10 was never acked, and would be lost.
    assert consumer([11, 12], committed=10)._new_offset(TP0) is None


def test_stops_at_a_gap_in_the_middle() -> None:
    assert consumer([10, 11, 13, 14], committed=10)._new_offset(TP0) == 12


def test_records_acked_twice_do_not_slow_the_commit() -> None:
    # re-read after a seek: Faust's own run stops at the first repeat (12 here)
    assert consumer([9, 10, 11, 11, 12, 12, 13], committed=10)._new_offset(TP0) == 14


def test_a_known_gap_is_skipped() -> None:
    c = consumer([12, 13], committed=10)
    c._gap[TP0].addi(10, 12)  # offsets Faust knows are not there (markers, compaction)
    assert c._new_offset(TP0) == 14


async def test_a_held_partition_is_re_read_from_its_committed_offset() -> None:
    c = consumer([11, 12], committed=10)
    sought: list[tuple[TP, int]] = []

    async def seek(tp: TP, offset: int) -> None:
        sought.append((tp, offset))

    c.seek = seek  # type: ignore[method-assign,assignment]
    c.assignment = lambda: {TP0}  # type: ignore[method-assign]
    c.log = __import__("logging").getLogger("test")
    assert c._new_offset(TP0) is None and TP0 in c.held
    assert await c.heal(after=60) == []  # not held long enough yet
    c.held[TP0] -= 61
    assert await c.heal(after=60) == [TP0]
    assert sought == [(TP0, 10)] and TP0 not in c.held


def test_records_handed_over_and_gone_strand_their_partition() -> None:
    c = consumer([], committed=10)
    c.handed[TP0] = c._read_offset[TP0] = 14  # 10..14 handed to the streams
    c._unacked_messages = {InFlight(TP0)}  # type: ignore[arg-type]
    c.stranded(now=1.0)
    assert TP0 not in c.held  # still being worked on
    c._unacked_messages = set()  # type: ignore[assignment]
    c._paused_partitions = {TP0}
    c.stranded(now=2.0)
    assert TP0 not in c.held  # parked on purpose (a delay tier)
    c._paused_partitions = set()
    c.stranded(now=3.0)
    assert c.held[TP0] == 3.0  # neither acked nor in flight: lost on the way


def test_a_partition_sought_back_and_not_read_yet_is_not_stranded() -> None:
    c = consumer([], committed=10)
    c.handed[TP0] = 14
    c._read_offset[TP0] = 10  # a seek to the committed offset; 10.. not fetched yet
    c.stranded(now=1.0)
    assert TP0 not in c.held


async def test_flow_control_keeps_queued_records_on_a_redundant_resume() -> None:
    from mode.utils.queues import FlowControlQueue

    from app.engine.fetching import KeepingFlowControl

    flow = KeepingFlowControl()
    queue: FlowControlQueue[int] = FlowControlQueue(flow_control=flow, clear_on_resume=True)
    flow.resume()  # it starts suspended: this resume may clear
    await queue.put(1)
    flow.resume()  # already running: mode's own event would drop the 1 here
    assert queue.qsize() == 1
    flow.suspend()
    flow.resume()  # a real resume after a suspension clears, as before
    assert queue.qsize() == 0


def test_fetches_are_patient_only_while_the_worker_is_busy() -> None:
    from app.engine.fetching import BUSY_ROUTINE_S, IDLE_FETCH, IDLE_ROUTINE_S, FetchPace

    fetcher = SimpleNamespace(_fetch_min_bytes=1, _fetch_max_wait_ms=1500, _fetcher_timeout=0.2)
    pace = FetchPace(65536, 100, busy_rate=500)
    pace._since = 0.0
    pace.pace(fetcher, 400, now=0.5)  # counted, not judged before a second has passed
    assert (fetcher._fetch_min_bytes, fetcher._fetch_max_wait_ms) == IDLE_FETCH
    pace.pace(fetcher, 400, now=1.0)  # 800 records in a second: busy
    assert (fetcher._fetch_min_bytes, fetcher._fetch_max_wait_ms) == (65536, 100)
    assert fetcher._fetcher_timeout == BUSY_ROUTINE_S
    pace.pace(fetcher, 100, now=2.0)  # a trickle again: answered at once
    assert (fetcher._fetch_min_bytes, fetcher._fetch_max_wait_ms) == IDLE_FETCH
    # and the fetch routine no longer wakes five times a second to find nothing to do
    assert fetcher._fetcher_timeout == IDLE_ROUTINE_S > BUSY_ROUTINE_S
    pace.pace(None, 5000, now=3.0)  # the consumer thread not started yet: nothing to set
    assert not pace.is_busy


def test_a_busy_fetch_gathers_what_arrives_in_a_fixed_time_within_bounds() -> None:
    """With a fixed 64 KiB one worker reading 5 000 msgs/s of 1 KB answered about a
    hundred fetches a second and fell behind."""
    from app.engine.fetching import BUSY_FETCH_S, MAX_BUSY_FETCH_BYTES, FetchPace

    fetcher = SimpleNamespace(_fetch_min_bytes=1, _fetch_max_wait_ms=1500, _fetcher_timeout=0.2)
    pace = FetchPace(65536, 100, busy_rate=500)
    pace._since = 0.0
    pace.pace(fetcher, 10_000, now=1.0, nbytes=10_000 * 1024)  # 10 MB/s
    assert fetcher._fetch_min_bytes == int(10_000 * 1024 * BUSY_FETCH_S) > 65536
    assert fetcher._fetch_max_wait_ms == 100  # what bounds the wait stays the setting
    pace.pace(fetcher, 1_000, now=2.0, nbytes=1_000 * 1024)  # busy, but slow: the floor
    assert fetcher._fetch_min_bytes == 65536
    pace.pace(fetcher, 1_000_000, now=3.0, nbytes=10**9)  # a flood: the ceiling
    assert fetcher._fetch_min_bytes == MAX_BUSY_FETCH_BYTES
    pace.pace(fetcher, 10, now=4.0, nbytes=10_240)  # a trickle: Faust's fetch again
    assert (fetcher._fetch_min_bytes, fetcher._fetch_max_wait_ms) == (1, 1500)


def test_a_fetch_volume_is_its_records_and_about_their_bytes() -> None:
    from app.engine.fetching import _volume

    def rec(size: int) -> SimpleNamespace:
        return SimpleNamespace(serialized_value_size=size)

    assert _volume(None) == (0, 0)
    assert _volume({TP0: [rec(1000), rec(1024)], TP("t", 1): [rec(-1)], TP("t", 2): []}) == (
        3,
        2 * 1024,  # a tombstone's size is -1: counted as nothing
    )


def test_a_rebalance_fetches_as_busy_for_a_while_whatever_the_rate() -> None:
    """The fetch sent at an assignment held back the partitions resumed after recovery
    for Faust's whole 1.5 s long-poll, twice a rebalance."""
    from app.engine.fetching import IDLE_FETCH, SETTLE_S, FetchPace

    fetcher = SimpleNamespace(_fetch_min_bytes=1, _fetch_max_wait_ms=1500)
    pace = FetchPace(65536, 100, busy_rate=500)
    pace._since = 0.0
    pace.settle(fetcher, now=10.0)  # at once: the next fetch request is built with it
    assert (fetcher._fetch_min_bytes, fetcher._fetch_max_wait_ms) == (65536, 100)
    pace.pace(fetcher, 0, now=10.0 + SETTLE_S / 2)  # nothing read yet: still settling
    assert pace.is_busy
    pace.pace(fetcher, 0, now=10.0 + SETTLE_S + 1)  # settled and idle
    assert (fetcher._fetch_min_bytes, fetcher._fetch_max_wait_ms) == IDLE_FETCH


def test_with_no_committed_offset_the_log_start_is_the_base() -> None:
    # A fresh group: Faust itself commits any first run of acks, here 2000..2002, and the
    # records 0..1999 - handed over before a rebalance and dropped - are skipped for good.
    c = consumer([2000, 2001, 2002], committed=None)
    assert c._new_offset(TP0) is None  # where the log begins is not known yet
    c.log_start[TP0] = 0
    assert c._new_offset(TP0) is None and TP0 in c.held
    c.log_start[TP0] = 2000  # retention removed the rest: nothing is missing
    assert c._new_offset(TP0) == 2003


async def test_commit_learns_log_starts_and_heal_re_reads_from_there() -> None:
    c = consumer([2000, 2001], committed=None)
    asked: list[tuple[TP, ...]] = []
    log_start = {TP0: 0}

    async def earliest_offsets(*tps: TP) -> dict[TP, int]:
        asked.append(tps)
        return {tp: log_start[tp] for tp in tps}

    sought: list[tuple[TP, int]] = []

    async def seek(tp: TP, offset: int) -> None:
        sought.append((tp, offset))

    c.earliest_offsets = earliest_offsets  # type: ignore[method-assign,assignment]
    c.seek = seek  # type: ignore[method-assign,assignment]
    c.log = __import__("logging").getLogger("test")
    await c._learn_log_starts()
    assert asked == [(TP0,)] and c.log_start == {TP0: 0}
    await c._learn_log_starts()  # known: not asked again
    assert len(asked) == 1
    assert c._new_offset(TP0) is None
    c.held[TP0] -= 61
    log_start[TP0] = 5  # retention moved the start meanwhile: heal asks again
    assert await c.heal(after=60) == [TP0]
    assert sought == [(TP0, 5)] and len(asked) == 2


async def test_after_a_rebalance_every_partition_without_commits_restarts_at_its_log_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from faust.transport.drivers import aiokafka as driver

    async def faust_seek(self: StrictConsumer) -> None:  # seek_to_committed: none for TP0
        return None

    monkeypatch.setattr(driver.Consumer, "perform_seek", faust_seek)
    tp1, tp2 = TP("wal-ingest", 1), TP("wal-ingest", 2)
    c = consumer([], committed=None)
    c._committed_offset[tp1] = 40
    c.assignment = lambda: [TP0, tp1, tp2]  # type: ignore[method-assign]
    c.handed[TP0] = 2500  # read before the rebalance, never committed
    c.handed[tp1] = 90
    # tp2: fetched and dropped before anything was handed (flow suspended for the
    # recovery): the fetcher's position is past records no one has seen
    sought: list[tuple[TP, int]] = []

    async def in_consumer_thread(fn: object, offsets: dict[TP, int]) -> None:
        sought.extend(offsets.items())  # one hop to the consumer thread for them all

    async def earliest_offsets(*tps: TP) -> dict[TP, int]:
        return {tp: 0 for tp in tps}

    c._in_consumer_thread = in_consumer_thread  # type: ignore[method-assign]
    c.earliest_offsets = earliest_offsets  # type: ignore[method-assign,assignment]
    await c.perform_seek()
    assert sought == [(TP0, 0), (tp2, 0)]  # tp1 has a committed offset: Faust's seek is right
    assert TP0 not in c.handed


async def test_a_seek_runs_in_the_consumer_thread() -> None:
    """Faust's seek called aiokafka's from the main thread, racing the consumer thread's
    ``fetched_records`` (a KeyError crashed the fetcher and stopped the worker)."""
    calls: list[tuple[str, object]] = []

    class AiokafkaConsumer:
        def seek(self, tp: TP, offset: int) -> None:
            calls.append(("seek", (tp, offset)))

    class Thread:
        def _ensure_consumer(self) -> AiokafkaConsumer:
            return AiokafkaConsumer()

        async def call_thread(self, fn: Callable[..., object], *args: object) -> object:
            calls.append(("call_thread", fn))
            return fn(*args)

    c = consumer([], committed=None)
    c._thread = Thread()  # type: ignore[assignment]
    c.log = SimpleNamespace(dev=lambda *a: None)  # type: ignore[assignment]
    await c.seek(TP0, 7)
    assert [name for name, _ in calls] == ["call_thread", "seek"]
    assert calls[1][1] == (TP0, 7) and c._read_offset[TP0] == 7


# -- the hand-over: a seek while a fetch is on its way (issue 15) ----------------------------


@dataclass(eq=False)
class Message:
    tp: TP
    offset: int
    generation_id: int
    acked: bool = False


@dataclass(frozen=True)
class Rec:
    offset: int


def recs(first: int, last: int) -> list[Rec]:
    return [Rec(o) for o in range(first, last + 1)]


def reading(committed: int, handed_to: int | None = None) -> StrictConsumer:
    """A consumer reading TP0 from ``committed`` (sought there), with records up to
    ``handed_to`` handed over, generation 1."""
    c = consumer([], committed=committed)
    c.app.consumer_generation_id = 1  # type: ignore[attr-defined]
    c._sought({TP0: committed})
    c.guard.start(TP0, committed)
    if handed_to is not None:
        assert c._admit(TP0, recs(committed, handed_to), 1, c._seeks)
    return c


def test_records_fetched_before_a_seek_are_not_handed_over_and_prove_no_gap() -> None:
    # The lost writes of issue 15: 11..20 were acked but 10 was not (held); heal seeks back
    # to 10 while a fetch of 21..30 from the old position is on its way to the main thread.
    # Faust's read offset said 10 when they came, and 11..20 was taken for a gap (markers)
    # that counts as acked: the commit passed 10 - and whatever else was never done there.
    c = reading(committed=10, handed_to=20)
    for offset in range(11, 21):
        c._acked[TP0].append(offset)
    fetched_at = c._seeks  # the fetch of 21..30 begins
    c._seeking([TP0])  # heal's seek to the committed offset
    c._sought({TP0: 10})
    assert c._admit(TP0, recs(21, 30), 1, fetched_at) == ()
    assert not c._gap[TP0] and c._reseek == {TP0}  # sought back again before the next fetch
    assert c._new_offset(TP0) is None  # 10 is still not done
    c._reseek.clear()
    assert [r.offset for r in c._admit(TP0, recs(10, 12), 1, c._seeks)] == [10, 11, 12]


def test_a_fetch_begun_after_the_seek_is_handed_over_from_the_seek_position() -> None:
    c = reading(committed=10, handed_to=20)
    c._seeking([TP0])
    c._sought({TP0: 10})
    fetched_at = c._seeks
    assert [r.offset for r in c._admit(TP0, recs(10, 12), 1, fetched_at)] == [10, 11, 12]
    assert c._next[TP0] == 13 and not c._gap[TP0]


def test_offsets_a_fetch_skips_are_absent_and_count_as_done() -> None:
    c = reading(committed=10)
    fetched = [Rec(10), Rec(11), Rec(14), Rec(15)]  # 12, 13: transaction markers
    assert c._admit(TP0, fetched, 1, c._seeks) == fetched
    c._acked[TP0].extend([10, 11, 14, 15])
    assert c._new_offset(TP0) == 16
    assert c.guard.frontier(TP0) == 10  # the markers are covered; 10, 11 are not acked yet
    c.guard.cover_offsets(TP0, [10, 11, 14, 15])
    assert c.guard.frontier(TP0) == 16


def test_a_fetch_that_starts_past_the_next_expected_proves_the_offsets_between() -> None:
    c = reading(committed=10, handed_to=11)
    assert [r.offset for r in c._admit(TP0, recs(14, 15), 1, c._seeks)] == [14, 15]
    assert [(i.begin, i.end) for i in c._gap[TP0]] == [(12, 14)]


def test_records_of_another_generation_or_before_the_partition_is_sought_wait() -> None:
    c = reading(committed=10)
    fetched_at = c._seeks
    c.app.consumer_generation_id = 2  # type: ignore[attr-defined]
    assert c._admit(TP0, recs(10, 12), 1, fetched_at) == ()
    assert c._reseek == {TP0}  # read again from where it stood, if it is still assigned
    c._reseek.clear()
    c._next.clear()  # assigned, its seek not done yet (or under way)
    assert c._admit(TP0, recs(10, 12), 2, c._seeks) == ()
    assert c._reseek == {TP0}  # sought back once the next record expected is known


async def test_dropped_records_are_read_again_once_their_partition_s_position_is_known() -> None:
    c = reading(committed=10, handed_to=14)
    sought: list[dict[TP, int]] = []

    async def in_consumer_thread(fn: object, offsets: dict[TP, int]) -> None:
        sought.append(dict(offsets))

    c._in_consumer_thread = in_consumer_thread  # type: ignore[method-assign]
    c._next.clear()  # a seek under way
    c._dropped([TP0])
    await c._seek_dropped()
    assert sought == [] and c._reseek == {TP0}
    c._sought({TP0: 15})
    await c._seek_dropped()
    assert sought == [{TP0: 15}] and c._reseek == set() and c._read_offset[TP0] == 15
    fetched_at = c._seeks
    assert [r.offset for r in c._admit(TP0, recs(15, 16), 1, fetched_at)] == [15, 16]


async def test_a_commit_the_guard_cannot_prove_is_refused_and_counted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from faust.transport.drivers import aiokafka as driver

    from app import metrics

    sent: list[dict[TP, int]] = []

    async def faust_commit_offsets(self: StrictConsumer, offsets: dict[TP, int]) -> bool:
        sent.append(dict(offsets))
        return True

    monkeypatch.setattr(driver.Consumer, "_commit_offsets", faust_commit_offsets)
    tp1 = TP("wal-ingest", 1)
    c = reading(committed=10)
    c.app.consumer_generation_id = 1  # type: ignore[attr-defined]
    c.guard.cover(TP0, 10, 15)
    c.guard.start(tp1, 0)
    before = metrics.COMMITS_REFUSED.labels("wal-ingest")._value.get()
    assert await c._commit_offsets({TP0: 15, tp1: 3}) is True
    assert sent == [{TP0: 15}]
    assert metrics.COMMITS_REFUSED.labels("wal-ingest")._value.get() == before + 1
    assert tp1 in c.held  # read again from its committed offset by heal


def test_an_ack_from_before_the_partitions_reading_began_is_not_counted() -> None:
    c = reading(committed=10)
    c._waiting_for_ack = None
    old = Message(tp=TP0, offset=10, generation_id=0)
    assert c.ack(old) is False
    assert old.acked and c._acked[TP0] == [] and c.guard.frontier(TP0) == 10


async def test_a_partition_whose_rebalance_seek_never_happened_is_sought_by_heal() -> None:
    c = consumer([], committed=10)
    c.flow_active = True
    c.log = __import__("logging").getLogger("test")
    sought: list[tuple[TP, int]] = []

    async def seek(tp: TP, offset: int) -> None:
        sought.append((tp, offset))
        c._sought({tp: offset})

    c.seek = seek  # type: ignore[method-assign,assignment]
    assert await c.heal(after=10) == []  # seen unsought: waits
    c.__dict__["_unsought_since"][TP0] -= 11
    assert await c.heal(after=10) == [TP0]
    assert sought == [(TP0, 10)] and c.guard.frontier(TP0) == 10 and c._next[TP0] == 10


async def test_every_topic_faust_declares_gets_the_fleets_durability(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Changelogs of any table (one added later included) and repartition topics: the
    transport adds ``min.insync.replicas`` to what Faust asks for, keeping Faust's own."""
    declared: list[tuple[str, int, dict[str, str]]] = []

    async def create(
        self: object, owner: object, client: object, topic: str, partitions: int, n: int, **kw
    ) -> None:
        declared.append((topic, n, kw["config"]))

    monkeypatch.setattr(driver.Transport, "_create_topic", create)
    transport = StrictTransport.__new__(StrictTransport)
    await transport._create_topic(None, None, "t-changelog", 8, 3, config={"cleanup.policy": "x"})
    await transport._create_topic(None, None, "t-repartition", 8, 1, config=None)
    assert declared == [
        ("t-changelog", 3, {"min.insync.replicas": "2", "cleanup.policy": "x"}),
        ("t-repartition", 1, {"min.insync.replicas": "1"}),
    ]


async def test_a_fetch_brings_back_at_most_the_configured_bytes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """WAL_FETCH_MAX_BYTES reaches the fetcher aiokafka builds when the consumer starts
    (its own default is 50 MiB a fetch); no broker needed: only start's bootstrap is
    skipped, everything after it (the fetcher) is aiokafka's own."""
    from aiokafka import AIOKafkaConsumer

    from app.engine.consumer import bound_fetches

    async def nothing(*_: object) -> None:
        return None

    consumer = AIOKafkaConsumer(bootstrap_servers="127.0.0.1:9")
    assert consumer._fetch_max_bytes == 50 * 1024 * 1024
    bound_fetches(consumer, None)  # not configured: aiokafka's own
    assert consumer._fetch_max_bytes == 50 * 1024 * 1024
    bound_fetches(consumer, 4 * 1024 * 1024)
    monkeypatch.setattr(consumer._client, "bootstrap", nothing)
    monkeypatch.setattr(consumer, "_wait_topics", nothing)
    await consumer.start()
    try:
        assert consumer._fetcher._fetch_max_bytes == 4 * 1024 * 1024
    finally:
        # aiokafka's stop awaits its group-less coordinator's task after cancelling it
        with contextlib.suppress(asyncio.CancelledError):
            await consumer.stop()


def test_a_fetch_minimum_above_its_maximum_is_refused() -> None:
    from pydantic import ValidationError

    from app.settings import Settings

    with pytest.raises(ValidationError, match="WAL_FETCH_MIN_BYTES"):
        Settings(fetch_min_bytes=8 * 1024 * 1024, fetch_max_bytes=4 * 1024 * 1024)
    assert Settings().fetch_max_bytes == 4 * 1024 * 1024
