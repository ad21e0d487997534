"""Stats folding: deltas in, totals, minute buckets, rates and percentiles out, memory bounded."""

from __future__ import annotations

import orjson
import pytest

from app.sketch import LATENCY_BUCKETS, bucket_of, percentiles, sketch
from app.topics import NAMES
from tables.stats import (
    MAX_RANGES,
    MAX_TARGETS,
    MINUTES,
    Delta,
    NamespaceStats,
    delta,
    fold,
    parse,
    rates,
    summary,
)

T0 = 1_700_000_040_000  # a minute boundary (epoch ms)


def folded(*deltas: Delta, now_ms: int = T0 + 30_000) -> NamespaceStats:
    value = NamespaceStats()
    for offset, d in enumerate(deltas):
        assert fold(value, d, partition=0, offset=offset, now_ms=now_ms)
    return value


def test_delta_is_a_compact_record_keyed_by_namespace() -> None:
    record = delta("orders", delivered=3, retried=1, target="pg", latency_ms=[5, 5, 900], at_ms=T0)
    assert record.topic == NAMES["stats"]
    assert record.key == b"orders"
    assert b" " not in (record.value or b"")
    body = orjson.loads(record.value or b"")
    assert body["c"] == {"delivered": 3, "retried": 1}  # zero counts are left out
    assert sum(body["l"].values()) == 3  # latencies travel as a sketch
    d = parse(record.value)
    assert (d.namespace, d.at_ms, d.target) == ("orders", T0, "pg")
    assert d.latency == sketch([5, 5, 900])


@pytest.mark.parametrize(
    "raw",
    [
        b"{not json",
        b"[]",
        b'{"at": 1, "c": {}}',
        b'{"ns": "a", "at": 1, "c": {"delivered": -1}}',
        b'{"ns": "a", "at": 1, "c": {"delivered": "3"}}',
        b'{"ns": "a", "at": 1, "c": {}, "l": {"999": 1}}',
        b'{"ns": "a", "at": "later", "c": {}}',
        b'{"ns": "a", "at": 1, "c": {}, "t": 7}',
        b'{"ns": "a", "at": 1, "c": {}, "o": []}',
        b'{"ns": "a", "at": 1, "c": {}, "o": {"accepted": {"wal-ingest/0": [1]}}}',
        b'{"ns": "a", "at": 1, "c": {}, "o": {"accepted": {"wal-ingest/0": [5, 1]}}}',
        None,
    ],
)
def test_anything_that_is_not_a_delta_is_refused(raw: bytes | None) -> None:
    with pytest.raises(ValueError):
        parse(raw)


def test_unknown_outcomes_are_ignored_not_counted() -> None:
    d = parse(b'{"ns": "a", "at": 1, "c": {"delivered": 2, "teleported": 5}}')
    assert d.counts == {"delivered": 2}


def test_folding_sums_totals_per_outcome_and_per_target() -> None:
    value = folded(
        parse(delta("orders", accepted=10, at_ms=T0).value),
        parse(delta("orders", delivered=7, retried=2, target="pg", at_ms=T0 + 1000).value),
        parse(delta("orders", delivered=3, target="cache", at_ms=T0 + 2000).value),
        parse(delta("orders", dead_lettered=1, target="pg", at_ms=T0 + 3000).value),
    )
    assert value.totals == {"accepted": 10, "delivered": 10, "retried": 2, "dead_lettered": 1}
    assert value.targets == {
        "pg": {"delivered": 7, "retried": 2, "dead_lettered": 1},
        "cache": {"delivered": 3},
    }
    assert list(value.minutes) == [T0 // 60_000]


def test_a_replayed_offset_is_not_counted_twice() -> None:
    value = NamespaceStats()
    d = parse(delta("orders", delivered=5, at_ms=T0).value)
    assert fold(value, d, partition=1, offset=41, now_ms=T0)
    assert not fold(value, d, partition=1, offset=41, now_ms=T0)
    assert not fold(value, d, partition=1, offset=40, now_ms=T0)
    assert fold(value, d, partition=2, offset=0, now_ms=T0)  # other partitions keep their own
    assert value.totals == {"delivered": 10}
    again = NamespaceStats.loads(value.dumps())  # the guard survives the changelog
    assert not fold(again, d, partition=1, offset=41, now_ms=T0)


def sources(topic_partition: str, offsets: range | list[int]) -> list[str]:
    return [f"{topic_partition}/{o}" for o in offsets]


def test_a_source_record_re_read_after_a_crash_counts_once_and_as_replayed() -> None:
    value = NamespaceStats()
    first = delta("orders", sources={"accepted": sources("wal-ingest/3", range(100, 150))})
    assert parse(first.value).counts == {"accepted": 50}
    fold(value, parse(first.value), partition=0, offset=1, now_ms=T0)
    # the worker died before its commit: another re-reads 100.. in a larger batch, with
    # a rejected record among them
    again = delta(
        "orders",
        sources={
            "accepted": sources("wal-ingest/3", [*range(100, 120), *range(121, 200)]),
            "rejected": sources("wal-ingest/3", [120]),
        },
    )
    fold(value, parse(again.value), partition=0, offset=2, now_ms=T0)
    assert value.totals == {"accepted": 100, "replayed": 50}  # 120 was counted as accepted
    assert value.seen == {"|wal-ingest/3": [[100, 199]]}
    kept = NamespaceStats.loads(value.dumps())  # what is counted survives the changelog
    fold(kept, parse(again.value), partition=0, offset=3, now_ms=T0)
    assert kept.totals == {"accepted": 100, "replayed": 150}


def test_each_target_counts_the_same_record_once_and_late_deltas_still_count() -> None:
    value = NamespaceStats()
    for offset, (target, listed) in enumerate(
        [
            ("pg", range(0, 10)),
            ("cache", range(0, 10)),  # the same records, another target
            ("pg", range(20, 30)),
            ("pg", range(10, 20)),  # a slow call's outcomes, after the next batch's
            ("pg", range(5, 25)),  # all seen
        ]
    ):
        d = delta("orders", target=target, sources={"delivered": sources("wal-deliver/0", listed)})
        fold(value, parse(d.value), partition=0, offset=offset, now_ms=T0)
    assert value.totals == {"delivered": 40, "replayed": 20}
    assert value.targets["pg"] == {"delivered": 30, "replayed": 20}


def test_latencies_of_replayed_deliveries_are_not_counted_again() -> None:
    value = NamespaceStats()
    listed = sources("wal-deliver/1", range(5))
    d = delta("orders", target="pg", sources={"delivered": listed}, latency_ms=[10] * 5)
    fold(value, parse(d.value), partition=0, offset=0, now_ms=T0)
    fold(value, parse(d.value), partition=0, offset=1, now_ms=T0)
    assert sum(value.latency.values()) == 5


def test_counted_offsets_stay_bounded_when_namespaces_interleave() -> None:
    value = NamespaceStats()
    for batch in range(200):  # every other offset is another namespace's
        listed = sources("wal-deliver/0", range(batch * 20, batch * 20 + 10, 2))
        d = delta("orders", target="pg", sources={"delivered": listed})
        fold(value, parse(d.value), partition=0, offset=batch, now_ms=T0)
    assert value.totals == {"delivered": 1000}
    assert len(value.seen["pg|wal-deliver/0"]) <= MAX_RANGES
    d = delta("orders", target="pg", sources={"delivered": sources("wal-deliver/0", [3980, 3982])})
    fold(value, parse(d.value), partition=0, offset=999, now_ms=T0)
    assert value.totals == {"delivered": 1000, "replayed": 2}


def test_rates_over_one_five_and_sixty_minutes() -> None:
    now = T0 + 10 * 60_000  # at a minute boundary: whole buckets only
    deltas = [
        parse(delta("a", delivered=600, at_ms=now - 30_000).value),  # the last minute
        parse(delta("a", delivered=1200, at_ms=now - 4 * 60_000 + 1).value),  # within 5 min
        parse(delta("a", delivered=6000, at_ms=now - 9 * 60_000).value),  # within the hour
    ]
    value = folded(*deltas, now_ms=now)
    r = rates(value, now)
    assert r["1m"] == {"delivered": 10.0}  # 600 in 60 s
    assert r["5m"] == {"delivered": 6.0}  # 1800 in 300 s
    assert r["1h"] == {"delivered": pytest.approx(7800 / 3600, abs=0.001)}


def test_the_current_minute_counts_whole_and_a_straddling_one_in_part() -> None:
    now = T0 + 15_000  # 15 s into the current minute
    value = folded(
        parse(delta("a", delivered=30, at_ms=T0 + 5_000).value),  # current minute
        parse(delta("a", delivered=60, at_ms=T0 - 30_000).value),  # previous minute
        now_ms=now,
    )
    # 1 min window: all 30 of this minute + the last 45 s of the previous one (45 of 60).
    assert rates(value, now)["1m"]["delivered"] == pytest.approx((30 + 45) / 60, abs=0.001)


def test_percentiles_are_within_the_sketch_error() -> None:
    latencies = [10] * 500 + [100] * 450 + [2000] * 50
    p = percentiles(sketch(latencies))
    assert p["count"] == 1000
    assert p["p50"] == pytest.approx(10, rel=0.1)
    assert p["p95"] == pytest.approx(100, rel=0.1)
    assert p["p99"] == pytest.approx(2000, rel=0.1)
    assert percentiles({}) == {"count": 0, "p50": None, "p95": None, "p99": None}


def test_latency_windows_use_minute_buckets_and_lifetime_keeps_everything() -> None:
    now = T0 + 30_000
    old = parse(delta("a", delivered=1, latency_ms=[5000], at_ms=now - 20 * 60_000).value)
    new = parse(delta("a", delivered=1, latency_ms=[20], at_ms=now).value)
    out = summary("a", folded(old, new, now_ms=now), now)["latencyMs"]
    assert out["1m"]["count"] == out["5m"]["count"] == 1
    assert out["1h"]["count"] == out["total"]["count"] == 2
    assert out["5m"]["p99"] == pytest.approx(20, rel=0.1)
    assert out["1h"]["p99"] == pytest.approx(5000, rel=0.1)


def test_memory_is_bounded_whatever_arrives() -> None:
    value = NamespaceStats()
    start = T0 - 3 * 3600_000
    for minute in range(3 * 60):  # three hours of deltas, one per minute
        at = start + minute * 60_000
        d = parse(delta("a", delivered=1, target=f"t{minute}", latency_ms=[minute], at_ms=at).value)
        fold(value, d, partition=0, offset=minute, now_ms=at)
    assert len(value.minutes) == MINUTES
    assert len(value.targets) == MAX_TARGETS
    assert value.totals == {"delivered": 180}  # totals still count everything
    huge = parse(delta("a", delivered=1, latency_ms=[10**15, 0, 0.2], at_ms=T0).value)
    fold(value, huge, partition=0, offset=10_000, now_ms=T0)
    assert max(value.latency) == LATENCY_BUCKETS - 1 and min(value.latency) == 0
    assert len(value.dumps()) < 64 * 1024


def test_a_wrong_clock_counts_in_totals_but_not_in_the_last_hour() -> None:
    now = T0
    value = folded(
        parse(delta("a", delivered=1, at_ms=now).value),
        parse(delta("a", delivered=5, at_ms=now + 365 * 24 * 3600_000).value),  # a year ahead
        parse(delta("a", delivered=7, at_ms=now - 365 * 24 * 3600_000).value),  # a year behind
        now_ms=now,
    )
    assert value.totals == {"delivered": 13}
    assert list(value.minutes) == [now // 60_000]


def test_buckets_are_log_spaced() -> None:
    assert bucket_of(0) == bucket_of(0.9) == 0
    assert bucket_of(1) == 1
    assert bucket_of(2) == 5  # four buckets per doubling
    assert bucket_of(1000) < bucket_of(1200) < bucket_of(2000)


def test_a_namespace_value_stays_small_however_many_partitions_and_targets() -> None:
    """Every target and source partition remembered, each with its ranges full: the value
    is rewritten with every batch of deltas, so it must stay far below a record's limit."""
    value = NamespaceStats()
    for t in range(MAX_TARGETS):
        for p in range(64):
            offsets = range(0, 4 * MAX_RANGES * 3, 3)  # never adjacent: a range each
            listed = sources(f"wal-ingest/{p}:{p % 8}", list(offsets))
            d = delta("orders", target=f"t{t}", sources={"delivered": listed})
            fold(value, parse(d.value), partition=0, offset=t * 64 + p, now_ms=T0)
    assert len(value.seen) <= 1024
    assert all(len(r) <= MAX_RANGES for r in value.seen.values())
    assert len(value.dumps()) < 128 * 1024


def test_outcomes_interleaved_within_a_partition_all_count() -> None:
    """One delivered, two dead-lettered, over and over (version-checked writes): each
    outcome's offsets are many runs, and none may be taken for another's as counted."""
    value = NamespaceStats()
    for batch in range(3):
        base = batch * 30
        won = [base + i for i in range(0, 30, 3)]
        lost = [base + i for i in range(30) if i % 3]
        d = delta(
            "orders",
            target="pg",
            sources={
                "delivered": sources("wal-ingest/0:1", won),
                "dead_lettered": sources("wal-ingest/0:1", lost),
            },
        )
        fold(value, parse(d.value), partition=0, offset=batch, now_ms=T0)
    assert value.totals == {"delivered": 30, "dead_lettered": 60}
    fold(value, parse(d.value), partition=0, offset=9, now_ms=T0)  # the last batch re-read
    assert value.totals == {"delivered": 30, "dead_lettered": 60, "replayed": 30}


def test_a_batch_counted_after_a_later_one_still_counts() -> None:
    """Two batches in flight at once (WAL_AGENT_CONCURRENCY): the later one's delta comes
    first, its offsets in many runs (the partition's other records counted elsewhere);
    the earlier batch's wide gap must stay open until its own delta comes."""
    value = NamespaceStats()

    def batch(first: int) -> Delta:
        listed = sources("wal-deliver/0", range(first, first + 100, 3))
        return parse(delta("orders", target="pg", sources={"parked": listed}).value)

    fold(value, batch(0), partition=0, offset=0, now_ms=T0)
    fold(value, batch(200), partition=0, offset=1, now_ms=T0)  # before 100's
    fold(value, batch(100), partition=0, offset=2, now_ms=T0)
    assert value.totals == {"parked": 102}
    assert len(value.seen["pg|wal-deliver/0"]) <= MAX_RANGES
    fold(value, batch(200), partition=0, offset=3, now_ms=T0)  # re-read: counted apart
    assert value.totals == {"parked": 102, "replayed": 34}
