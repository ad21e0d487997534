"""Offsets: what this worker is assigned, how far behind it is, and what waits in Kafka.

* :func:`assignment` and :func:`consumer_lag` read this worker's Faust consumer
  (cheap: no broker round trip); a timer keeps ``wal_consumer_lag`` current.
* :func:`members` is the group as Faust's partition assignor last saw it: each
  worker's web URL with the partitions it was given.
* :class:`Probe` asks the brokers for what is in Kafka for the whole fleet -
  records in the delay tiers the group has not committed yet, records in a
  dead-letter topic - with its own clients, cached for a moment.
* :class:`CommitProgress` tells readiness whether commits keep up with acks.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping
from typing import Any, cast

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from app import metrics, names, topics
from app.engine.clients import security
from app.engine.reading import partitions_of
from app.fleet import fleet, settings
from app.settings import Settings

#: How often ``wal_consumer_lag`` is refreshed.
LAG_INTERVAL_S = 5.0


def _consumer() -> Any:
    return cast(Any, fleet.consumer)


def _source_tps() -> list[Any]:
    """This worker's assigned partitions of the topics its agents read (not changelogs)."""
    changelogs = fleet.tables.changelog_topics
    return sorted(tp for tp in _consumer().assignment() if tp.topic not in changelogs)


def assignment() -> dict[str, list[int]]:
    """Topic → partitions this worker consumes (agents' topics, not table changelogs)."""
    out: dict[str, list[int]] = {}
    for tp in _source_tps():
        out.setdefault(tp.topic, []).append(tp.partition)
    return out


def table_partitions() -> dict[str, list[int]]:
    """Changelog topic → partitions whose table state is active on this worker."""
    assignor: Any = fleet.assignor
    out: dict[str, list[int]] = {}
    for tp in sorted(assignor.assigned_actives()):
        if tp.topic in fleet.tables.changelog_topics:
            out.setdefault(tp.topic, []).append(tp.partition)
    return out


def consumer_lag() -> dict[str, dict[int, int]]:
    """Topic → partition → records behind: high watermark minus the committed offset.

    Before the group's first commit of a partition, its log start offset (as the
    consumer last learned it) stands in for the committed offset. Partitions not
    fetched from yet (no high watermark) and those without either are left out.
    """
    consumer = _consumer()
    out: dict[str, dict[int, int]] = {}
    for tp in _source_tps():
        high = consumer.highwater(tp)
        committed = consumer._committed_offset.get(tp)  # Faust's own bookkeeping
        done = consumer.log_start.get(tp) if committed is None else committed
        if high is None or done is None:
            continue
        out.setdefault(tp.topic, {})[tp.partition] = max(0, high - done)
    return out


#: When the log starts of never-committed partitions were last asked for again
#: (monotonic): retention moves them slowly, and asking for every one (most of an idle
#: worker's partitions: delay tiers, transactions, stats) each lag refresh was a fifth of
#: its idle CPU. New partitions are learned at once (the consumer does, at a rebalance).
_log_start_asked = [0.0]
LOG_START_EVERY_S = 60.0


async def _learn_log_starts() -> None:
    """Keep the consumer's log starts (the base of its commit rule) current for the lag."""
    now = time.monotonic()
    stale = now - _log_start_asked[0] >= LOG_START_EVERY_S
    await _consumer()._learn_log_starts(_source_tps(), again=stale)
    if stale:
        _log_start_asked[0] = now


def members() -> list[dict[str, Any]]:
    """Every member of the group, by web URL, with the partitions the assignor gave it."""
    router: Any = fleet.router
    sources = router.external_topics_metadata()
    tables = router.tables_metadata()
    return [
        {
            "url": url,
            "partitions": _sorted(sources.get(url, {})),
            "tables": _sorted(tables.get(url, {})),
        }
        for url in sorted(set(sources) | set(tables))
    ]


def _sorted(by_topic: Mapping[str, Any]) -> dict[str, list[int]]:
    return {t: sorted(ps) for t, ps in sorted(by_topic.items()) if ps}


@fleet.timer(LAG_INTERVAL_S)
async def refresh_lag() -> None:
    """Keep ``wal_consumer_lag``, commit progress and stalls current; never raises. What
    needs no broker comes first: with the broker away, learning log starts waits."""
    try:
        lag = consumer_lag()
        _publish_lag(lag)
        progress.observe(_committed(), _pending_acks(), time.monotonic())
        observe_stalls(lag, time.monotonic())
        await _learn_log_starts()
    except Exception:
        fleet.log.exception("refreshing consumer lag failed")


_published: set[tuple[str, str]] = set()


def _publish_lag(lag: Mapping[str, Mapping[int, int]]) -> None:
    current = set()
    for topic, parts in lag.items():
        for partition, n in parts.items():
            labels = (topic, str(partition))
            metrics.CONSUMER_LAG.labels(*labels).set(n)
            current.add(labels)
    for labels in _published - current:  # revoked partitions leave the gauge
        with contextlib.suppress(KeyError):
            metrics.CONSUMER_LAG.remove(*labels)
    _published.clear()
    _published.update(current)


# -- commit progress (readiness) -------------------------------------------------------------


class CommitProgress:
    """Whether commits keep up: acked offsets never wait longer than ``limit_s`` to commit.

    ``observe`` is called every few seconds (the lag timer) and on each readiness
    check. Progress is any change of the committed offsets, or having nothing
    acked that waits for a commit (idle is fine).
    """

    def __init__(self, limit_s: float) -> None:
        self.limit_s = limit_s
        self._committed: dict[Any, int] = {}
        self._since = time.monotonic()

    def observe(self, committed: Mapping[Any, int], pending: bool, now: float) -> None:
        if not pending or dict(committed) != self._committed:
            self._committed = dict(committed)
            self._since = now

    def stalled(self, now: float) -> bool:
        return now - self._since > self.limit_s

    def stalled_for(self, now: float) -> float:
        return max(0.0, now - self._since)


progress = CommitProgress(limit_s=max(30.0, 10 * settings.commit_interval_s))


def _committed() -> dict[Any, int]:
    return {tp: o for tp, o in _consumer()._committed_offset.items() if o is not None}


def _pending_acks() -> bool:
    """Are there acked offsets of assigned partitions that are not committed yet?"""
    acked = _consumer()._acked  # Faust's own bookkeeping: acked, not yet committed
    return any(acked.get(tp) for tp in _source_tps())


def commits_advancing() -> bool:
    now = time.monotonic()
    progress.observe(_committed(), _pending_acks(), now)
    return not progress.stalled(now)


# -- stalled partitions (readiness, metric, log) ----------------------------------------------


class Stalls:
    """Partitions whose committed offset has not moved for ``limit_s`` while records wait.

    A record that can never be made durable and is retried, a target that hangs, a
    broker away: nothing is acked, so nothing looks pending and the worker looked idle
    (issue 16). Here a partition with records waiting (high watermark past its
    committed offset) whose commit does not move is *stalled* once ``limit_s`` has
    passed: the worker is not ready, and says which partition and for how long.
    Paused partitions (delay tiers waiting for their records' time) do not count.
    """

    def __init__(self, limit_s: float) -> None:
        self.limit_s = limit_s
        self._since: dict[tuple[str, int], tuple[int | None, float]] = {}
        self._logged: dict[tuple[str, int], float] = {}

    def observe(
        self,
        waiting: Mapping[tuple[str, int], int],
        committed: Mapping[tuple[str, int], int | None],
        now: float,
    ) -> None:
        """``waiting``: records behind per (topic, partition) of the partitions that count."""
        for key in list(self._since):
            if not waiting.get(key):
                del self._since[key]
        for key, behind in waiting.items():
            if not behind:
                continue
            offset = committed.get(key)
            seen = self._since.get(key)
            if seen is None or seen[0] != offset:
                self._since[key] = (offset, now)

    def stalled(self, now: float) -> dict[tuple[str, int], float]:
        """(topic, partition) → seconds its commit has not moved, for those past the limit."""
        return {
            key: now - since
            for key, (_, since) in self._since.items()
            if now - since > self.limit_s
        }

    def due_for_a_log_line(self, key: tuple[str, int], now: float) -> bool:
        """One line a minute a partition, not one per check."""
        if now - self._logged.get(key, float("-inf")) < 60.0:
            return False
        self._logged[key] = now
        return True


stalls = Stalls(limit_s=settings.stall_after_s)


def observe_stalls(lag: Mapping[str, Mapping[int, int]], now: float) -> None:
    consumer = _consumer()
    paused = {(tp.topic, tp.partition) for tp in consumer.paused()}
    waiting = {
        (topic, p): n
        for topic, parts in lag.items()
        for p, n in parts.items()
        if (topic, p) not in paused
    }
    committed = {(tp.topic, tp.partition): o for tp, o in _committed().items()}
    stalls.observe(waiting, committed, now)
    current = stalls.stalled(now)
    for (topic, partition), seconds in current.items():
        metrics.PARTITION_STALLED.labels(topic, str(partition)).set(seconds)
        if stalls.due_for_a_log_line((topic, partition), now):
            fleet.log.warning(
                "%s/%s has not committed for %.0f s with %d records waiting",
                topic,
                partition,
                seconds,
                waiting.get((topic, partition), 0),
            )
    for labels in _stalled_published - {(t, str(p)) for t, p in current}:
        with contextlib.suppress(KeyError):
            metrics.PARTITION_STALLED.remove(*labels)
    _stalled_published.clear()
    _stalled_published.update((t, str(p)) for t, p in current)


_stalled_published: set[tuple[str, str]] = set()


def stalled_partitions() -> list[dict[str, Any]]:
    """For /health/ready and the views: each stalled partition, for how long."""
    now = time.monotonic()
    return [
        {"topic": topic, "partition": partition, "seconds": round(seconds, 1)}
        for (topic, partition), seconds in sorted(stalls.stalled(now).items())
    ]


# -- what waits in Kafka ---------------------------------------------------------------------


class Probe:
    """Broker-side offsets with its own clients (started on first use), cached briefly."""

    def __init__(self, s: Settings, ttl_s: float = 2.0, timeout_s: float = 3.0) -> None:
        self.settings = s
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self._admin: AIOKafkaAdminClient | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._lock = asyncio.Lock()
        self._cache: dict[str, tuple[float, Any]] = {}

    async def delay_backlog(self) -> dict[str, Any]:
        """Records in the delay tiers (delays and retries) the group has not committed."""
        tiers = [topics.NAMES[f"delay-{names.tier_name(t)}"] for t in topics.DELAY_TIERS]
        by_topic = await self._cached("backlog", lambda: self._uncommitted(tiers))
        return {"total": sum(by_topic.values()), "byTopic": by_topic}

    async def depth(self, topic: str) -> int | None:
        """Records in ``topic`` (end minus beginning offsets); None if it does not exist."""
        return cast(int | None, await self._cached(f"depth:{topic}", lambda: self._depth(topic)))

    async def _cached(self, key: str, compute: Any) -> Any:
        hit = self._cache.get(key)
        if hit is not None and time.monotonic() - hit[0] < self.ttl_s:
            return hit[1]
        async with self._lock:
            await self._start()
            value = await asyncio.wait_for(compute(), self.timeout_s)
        self._cache[key] = (time.monotonic(), value)
        return value

    async def _start(self) -> None:
        if self._admin is not None and self._consumer is not None:
            return
        security_kwargs = security(self.settings)
        servers = self.settings.bootstrap_servers
        admin = AIOKafkaAdminClient(bootstrap_servers=servers, **security_kwargs)
        consumer = AIOKafkaConsumer(
            bootstrap_servers=servers, enable_auto_commit=False, **security_kwargs
        )
        await admin.start()
        try:
            await consumer.start()
        except BaseException:
            await admin.close()
            raise
        self._admin, self._consumer = admin, consumer

    async def _partitions(self, topic: str) -> list[TopicPartition]:
        assert self._consumer is not None
        return await partitions_of(self._consumer, topic)

    async def _uncommitted(self, names: list[str]) -> dict[str, int]:
        assert self._admin is not None and self._consumer is not None
        committed = await self._admin.list_consumer_group_offsets(self.settings.app_id)
        out = {}
        for topic in names:
            tps = await self._partitions(topic)
            ends = await self._consumer.end_offsets(tps) if tps else {}
            out[topic] = sum(
                max(0, ends[tp] - max(0, committed[tp].offset if tp in committed else 0))
                for tp in tps
            )
        return out

    async def committed(self, topic: str) -> dict[int, int]:
        """The group's committed offset of each partition of ``topic`` (not cached)."""
        async with self._lock:
            await self._start()
            assert self._admin is not None
            found = await asyncio.wait_for(
                self._admin.list_consumer_group_offsets(self.settings.app_id), self.timeout_s
            )
        return {tp.partition: meta.offset for tp, meta in found.items() if tp.topic == topic}

    async def end(self, topic: str, partition: int) -> int:
        """The end offset of one partition of ``topic`` now (not cached)."""
        async with self._lock:
            await self._start()
            assert self._consumer is not None
            tp = TopicPartition(topic, partition)
            ends = await asyncio.wait_for(self._consumer.end_offsets([tp]), self.timeout_s)
        return int(ends[tp])

    async def _depth(self, topic: str) -> int | None:
        assert self._consumer is not None
        tps = await self._partitions(topic)
        if not tps:
            return None
        ends = await self._consumer.end_offsets(tps)
        starts = await self._consumer.beginning_offsets(tps)
        return sum(ends[tp] - starts[tp] for tp in tps)

    async def close(self) -> None:
        admin, consumer, self._admin, self._consumer = self._admin, self._consumer, None, None
        if consumer is not None:
            await consumer.stop()
        if admin is not None:
            await admin.close()


probe = Probe(settings)


@fleet.on_before_shutdown.connect
async def _close_probe(app: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
    await probe.close()
