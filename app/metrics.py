"""Prometheus metrics of a worker, served at ``/metrics`` with Faust's own sensors.

Label sets are bounded: ``namespace`` is a configured namespace name (or
``(unknown)`` for requests naming none that exists), ``target`` a configured
target identifier, ``code`` one of :data:`app.errors.CODES`, ``stage`` and
``outcome`` the fixed words below.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter as Tally
from collections.abc import Sequence
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

UNKNOWN = "(unknown)"

#: stage: ingest | deliver; outcome: accepted | rejected | delivered | retried |
#: dead_lettered | dropped
MESSAGES = Counter(
    "wal_messages",
    "Messages by namespace, pipeline stage and outcome.",
    ["namespace", "stage", "outcome"],
)
PARTITION_STALLED = Gauge(
    "wal_partition_stalled_seconds",
    "How long a partition's commit has not moved while records wait (only past the limit).",
    ["topic", "partition"],
)
COMMITS_REFUSED = Counter(
    "wal_commits_refused",
    "Commits the guard refused: the offset passed records not proven done (app.engine.guard).",
    ["topic"],
)
DEAD_LETTERS = Counter(
    "wal_dead_letters", "Dead letters by namespace and error code.", ["namespace", "code"]
)
DELIVERY_SECONDS = Histogram(
    "wal_delivery_seconds",
    "Time of one target.deliver() call (a batch).",
    ["namespace", "target"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
END_TO_END_SECONDS = Histogram(
    "wal_end_to_end_seconds",
    "From ingest to delivered at the target, per namespace.",
    ["namespace"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600),
)
BATCH_SIZE = Histogram(
    "wal_batch_size",
    "Events per batch taken by an agent.",
    ["agent"],
    buckets=(1, 5, 10, 50, 100, 250, 500, 1000, 2000, 5000),
)
CIRCUIT_STATE = Gauge(
    "wal_circuit_state",
    "Circuit breaker per target: 0 closed, 1 half-open, 2 open.",
    ["namespace", "target"],
)
SLOW_CALLS = Gauge(
    "wal_target_slow_calls",
    "Target calls past WAL_TARGET_SLOW_MS whose batch went on without them.",
    ["namespace", "target"],
)
TARGET_DEADLINES = Counter(
    "wal_target_deadlines",
    "Target calls abandoned at WAL_TARGET_DEADLINE_S (their writes went to the retry path).",
    ["namespace", "target"],
)
TARGET_PACE = Gauge(
    "wal_target_pace",
    "Writes a second this worker lets through to a paced target now (its share, "
    "lowered after TARGET_THROTTLED).",
    ["namespace", "target"],
)
TARGET_PACE_LIMIT = Gauge(
    "wal_target_pace_limit",
    "The target's limits.maxPerSecond (the fleet's), or the pace learned from throttling.",
    ["namespace", "target"],
)
TARGET_WAITING = Gauge(
    "wal_target_waiting",
    "Writes this worker parked to wait their turn at a paced target, not back yet.",
    ["namespace", "target"],
)
CANCELLATIONS = Gauge(
    "wal_cancellations",
    "Cancellation marks this worker holds (kept 7 days, at most 100 000).",
)
ADMIN_ACTIONS = Counter(
    "wal_admin_actions",
    "Admin actions (app.audit) by action and outcome (ok, refused, failed).",
    ["action", "outcome"],
)
CONSUMER_LAG = Gauge(
    "wal_consumer_lag",
    "Records not yet processed, per assigned partition.",
    ["topic", "partition"],
)
PARTITIONS_AT_RISK = Gauge(
    "wal_kafka_partitions",
    "Partitions of the fleet's topics (changelogs included) the brokers report short of "
    "replicas: under_replicated (fewer in sync than assigned), under_min_isr (fewer in sync "
    "than a write needs: acks=all writes fail), offline (no leader).",
    ["state"],
)


def observe_many(histogram: Any, amounts: Sequence[float]) -> None:
    """``histogram.observe(a)`` for every amount of ``amounts``, of one labelled child.

    One increment per bucket touched and one of the sum, rather than two locked
    increments per amount: observing each delivered write's latency apiece cost 1.4 µs a
    write. It reads the child's ``_upper_bounds``, ``_buckets`` and ``_sum`` (private
    to prometheus-client); without them it observes one by one, and
    ``test_observe_many_exposes_what_observing_each_does`` fails so that an upgrade
    that moved them is noticed.
    """
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
        for amount in amounts:
            histogram.observe(amount)
        return
    if not amounts:
        return
    # observe() counts an amount in the first bucket whose bound is >= it
    for index, n in Tally([bisect_left(bounds, amount) for amount in amounts]).items():
        buckets[index].inc(n)
    total.inc(sum(amounts))
