"""Stats: per-namespace counts, rates and end-to-end latency, folded from ``wal-stats``.

The agents report what each batch did as small *delta* records on ``wal-stats``
(:func:`delta`), keyed by namespace name and produced with the records the
batch emits anyway, so a delta is durable before the batch's source offsets
are committed. ``agents/stats.py`` folds them into the ``stats`` table:

* totals per outcome (:data:`OUTCOMES`), and per target;
* one bucket per minute for the last hour (at most :data:`MINUTES`), for rates
  over 1 min, 5 min and 1 h;
* a latency sketch: counts in fixed log-spaced buckets (:func:`bucket_of`),
  for p50/p95/p99 within about 9 %, lifetime and per minute.

Memory is bounded per namespace: 60 minute buckets, 128 latency buckets each,
:data:`MAX_TARGETS` targets.

Replays: each folded value remembers the last ``wal-stats`` offset it took per
partition, so refolding a batch after a crash (the table's changelog may be
ahead of the committed offsets) counts nothing twice. And a delta names the
source records it counts (``topic/partition`` → offset ranges, per outcome):
the value remembers which source records it has counted, per target and source
partition (:class:`Seen`), so an agent's batch re-read after a crash or a
rebalance counts its records once, not again. What it re-reads is counted
apart, as ``replayed``. The totals therefore count *source records*: each
request read from ``wal-ingest`` once (``accepted``/``rejected``), each
``wal-deliver`` record once per target (``delivered``, ``retried``, ...). A
client that sends the same write twice sends two records; the targets' ledgers
apply it once.

The table is keyed by namespace name and uses the producer's partitioner, so
its changelog partitions line up with ``wal-stats``'s: the worker that folds
a namespace's deltas owns its value and answers its metrics view.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from app.fleet import fleet, settings
from app.names import NAMESPACE, Record
from app.sketch import (
    LATENCY_BUCKETS,
    Sketch,
    cover,
    covered,
    merge,
    offset_ranges,
    percentiles,
    sketch,
)
from app.topics import NAMES

OUTCOMES = ("accepted", "rejected", "delivered", "retried", "dead_lettered", "dropped", "parked")
#: Source records re-read after a crash or a rebalance, not counted again (see the docstring).
REPLAYED = "replayed"
MINUTES = 60
MAX_TARGETS = 64
#: Counted offsets per (target, source partition) are kept as at most this many ranges,
#: one per batch at most (a batch's span: the offsets between its own are counted under
#: other keys); past it the oldest merge. So only a delta more than this many batches
#: late (a slow call's, or a concurrent batch's) would find its offsets taken as counted.
#: Small, because the value is rewritten with every batch of deltas: a namespace's is
#: ~80 KB at most (MAX_SEEN keys).
MAX_RANGES = 4
#: At most this many (target, source partition) pairs are remembered per namespace; past
#: it a new pair's records are counted without being remembered.
MAX_SEEN = 1024
#: A delta stamped further than this ahead of the folding worker's clock (or older than
#: the hour) counts in the totals only: a wrong clock must not push real minutes out.
_CLOCK_SKEW_MS = 5 * 60_000
#: Windows for rates and latency percentiles, in minutes.
WINDOWS = {"1m": 1, "5m": 5, "1h": 60}


stats = fleet.Table(
    "stats",
    key_type=bytes,
    value_type=bytes,
    partitions=settings.partitions,
    use_partitioner=True,
    help="Per-namespace totals, minute buckets and latency sketches (from wal-stats).",
)


# -- the delta record -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Delta:
    """What one batch did for one namespace (and, optionally, one of its targets)."""

    namespace: str
    at_ms: int
    counts: dict[str, int]
    target: str | None = None
    latency: Sketch = field(default_factory=dict)
    #: outcome -> source ``topic/partition`` -> offset ranges (inclusive) the count covers.
    sources: dict[str, dict[str, list[tuple[int, int]]]] = field(default_factory=dict)


def delta(
    namespace: str,
    *,
    accepted: int = 0,
    rejected: int = 0,
    delivered: int = 0,
    retried: int = 0,
    dead_lettered: int = 0,
    dropped: int = 0,
    parked: int = 0,
    target: str | None = None,
    latency_ms: list[int] | None = None,
    at_ms: int | None = None,
    sources: Mapping[str, Iterable[str]] | None = None,
) -> Record:
    """The ``wal-stats`` record reporting one batch's outcomes for ``namespace``.

    Append it to the records the batch emits (same acks). ``latency_ms`` are the
    end-to-end latencies of the writes delivered; they travel as a sketch, so the
    record stays small whatever the batch size. Zero counts are left out.
    ``sources`` names, per outcome, the records counted (``topic/partition/offset``,
    as :attr:`agents.deliver.items.Item.source`); their number is that outcome's count,
    and the fold counts each once however often it is re-read.
    """
    named = {outcome: offset_ranges(listed) for outcome, listed in (sources or {}).items()}
    given = dict(
        accepted=accepted,
        rejected=rejected,
        delivered=delivered,
        retried=retried,
        dead_lettered=dead_lettered,
        dropped=dropped,
        parked=parked,
    )
    for outcome, per_partition in named.items():
        given[outcome] = sum(hi - lo + 1 for r in per_partition.values() for lo, hi in r)
    value: dict[str, Any] = {
        "ns": namespace,
        "at": int(time.time() * 1000) if at_ms is None else at_ms,
        "c": {k: v for k, v in given.items() if v},
    }
    if target:
        value["t"] = target
    if latency_ms:
        value["l"] = {str(i): n for i, n in sketch(latency_ms).items()}
    if named:
        value["o"] = {
            outcome: {tp: [x for r in ranges for x in r] for tp, ranges in per_partition.items()}
            for outcome, per_partition in named.items()
            if per_partition
        }
    return Record(NAMES["stats"], namespace.encode(), orjson.dumps(value), {NAMESPACE: namespace})


def parse(raw: bytes | None) -> Delta:
    """A ``wal-stats`` value → :class:`Delta`; ValueError when it is not one."""
    try:
        data = orjson.loads(raw or b"")
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("ns"), str) or not data["ns"]:
        raise ValueError("not a stats delta (no namespace)")
    counts = data.get("c") or {}
    latency = data.get("l") or {}
    target = data.get("t")
    at = data.get("at")
    if not isinstance(counts, dict) or not isinstance(latency, dict) or not isinstance(at, int):
        raise ValueError("not a stats delta (bad counts, latency or time)")
    if target is not None and not isinstance(target, str):
        raise ValueError("not a stats delta (bad target)")
    return Delta(
        namespace=data["ns"],
        at_ms=at,
        counts={k: _count(v) for k, v in counts.items() if k in OUTCOMES},
        target=target or None,
        latency={_bucket_index(k): _count(v) for k, v in latency.items()},
        sources=_parse_sources(data.get("o", {})),
    )


def _parse_sources(raw: Any) -> dict[str, dict[str, list[tuple[int, int]]]]:
    if not isinstance(raw, dict):
        raise ValueError("not a stats delta (bad sources)")
    out: dict[str, dict[str, list[tuple[int, int]]]] = {}
    for outcome, per_partition in raw.items():
        if outcome not in OUTCOMES or not isinstance(per_partition, dict):
            continue
        parsed = out.setdefault(outcome, {})
        for where, flat in per_partition.items():
            if not isinstance(flat, list) or len(flat) % 2:
                raise ValueError(f"not a stats delta (bad ranges for {where!r})")
            pairs = [(_count(lo), _count(hi)) for lo, hi in zip(flat[::2], flat[1::2], strict=True)]
            if any(lo > hi for lo, hi in pairs):
                raise ValueError(f"not a stats delta (empty range for {where!r})")
            parsed[str(where)] = pairs
    return out


def _count(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"not a count: {value!r}")
    return value


def _bucket_index(key: Any) -> int:
    index = int(key)
    if not 0 <= index < LATENCY_BUCKETS:
        raise ValueError(f"latency bucket out of range: {key!r}")
    return index


# -- the latency sketch ---------------------------------------------------------------------


# -- the folded value -----------------------------------------------------------------------


@dataclass
class Minute:
    counts: dict[str, int] = field(default_factory=dict)
    latency: Sketch = field(default_factory=dict)


@dataclass
class NamespaceStats:
    """The ``stats`` table's value for one namespace."""

    totals: dict[str, int] = field(default_factory=dict)
    targets: dict[str, dict[str, int]] = field(default_factory=dict)
    minutes: dict[int, Minute] = field(default_factory=dict)  # minute (epoch s // 60) -> bucket
    latency: Sketch = field(default_factory=dict)
    offsets: dict[int, int] = field(default_factory=dict)  # wal-stats partition -> last folded
    #: "target|topic/partition" (target empty for ingest) -> source offset ranges counted.
    seen: dict[str, list[list[int]]] = field(default_factory=dict)
    updated_ms: int = 0

    def dumps(self) -> bytes:
        return orjson.dumps(
            {
                "totals": self.totals,
                "targets": self.targets,
                "minutes": {
                    str(m): {"c": b.counts, "l": _str_keys(b.latency)}
                    for m, b in self.minutes.items()
                },
                "latency": _str_keys(self.latency),
                "offsets": _str_keys(self.offsets),
                "seen": self.seen,
                "updated": self.updated_ms,
            }
        )

    @classmethod
    def loads(cls, raw: bytes | None) -> NamespaceStats:
        if not raw:
            return cls()
        data = orjson.loads(raw)
        return cls(
            totals=data["totals"],
            targets=data["targets"],
            minutes={int(m): Minute(b["c"], _int_keys(b["l"])) for m, b in data["minutes"].items()},
            latency=_int_keys(data["latency"]),
            offsets=_int_keys(data["offsets"]),
            seen=data.get("seen") or {},
            updated_ms=data["updated"],
        )


def _str_keys(d: Mapping[int, int]) -> dict[str, int]:
    return {str(k): v for k, v in d.items()}


def _int_keys(d: Mapping[str, int]) -> dict[int, int]:
    return {int(k): v for k, v in d.items()}


def fold(value: NamespaceStats, d: Delta, *, partition: int, offset: int, now_ms: int) -> bool:
    """Add one delta to ``value``; False (and no change) when this offset was folded before."""
    if offset <= value.offsets.get(partition, -1):
        return False
    value.offsets[partition] = offset
    counts, latency = _first_reads(value, d)
    _add(value.totals, counts)
    if d.target and (d.target in value.targets or len(value.targets) < MAX_TARGETS):
        _add(value.targets.setdefault(d.target, {}), counts)
    merge(value.latency, latency)
    minute = d.at_ms // 60_000
    if now_ms // 60_000 - MINUTES < minute and d.at_ms <= now_ms + _CLOCK_SKEW_MS:
        bucket = value.minutes.setdefault(minute, Minute())
        _add(bucket.counts, counts)
        merge(bucket.latency, latency)
    prune(value, now_ms)
    value.updated_ms = max(value.updated_ms, now_ms)
    return True


def _first_reads(value: NamespaceStats, d: Delta) -> tuple[dict[str, int], Sketch]:
    """The delta's counts without the source records counted before (those go to
    ``replayed``), and its latency sketch unless some of its deliveries were replays.

    Every outcome of the delta is checked against what was counted *before* it, then
    all of them are remembered together: the outcomes of one batch interleave within a
    source partition (a write delivered between two dead-lettered ones), and one
    outcome's ranges, merged to stay few, must not swallow another's still uncounted."""
    counts = dict(d.counts)
    replayed: dict[str, int] = {}
    counted: dict[str, list[tuple[int, int]]] = {}
    for outcome, per_partition in d.sources.items():
        fresh = 0
        for where, ranges in per_partition.items():
            key = f"{d.target or ''}|{where}"
            if key not in value.seen and len(value.seen) >= MAX_SEEN:
                fresh += sum(hi - lo + 1 for lo, hi in ranges)  # not remembered: counted
                continue
            seen = value.seen.get(key, [])
            for lo, hi in ranges:
                before = covered(seen, lo, hi)
                fresh += hi - lo + 1 - before
                replayed[outcome] = replayed.get(outcome, 0) + before
            counted.setdefault(key, []).extend(ranges)
        counts[outcome] = fresh
    for key, ranges in counted.items():
        seen = value.seen.setdefault(key, [])
        # The batch's span: its offsets for one key are consecutive in the source, and
        # the gaps between them are records counted under other keys, never this one.
        cover(seen, min(lo for lo, _ in ranges), max(hi for _, hi in ranges))
        if len(seen) > MAX_RANGES:  # the oldest merge: a late batch is a recent gap
            seen[: len(seen) - MAX_RANGES + 1] = [[seen[0][0], seen[-MAX_RANGES][1]]]
    if sum(replayed.values()):
        counts[REPLAYED] = counts.get(REPLAYED, 0) + sum(replayed.values())
    latency = {} if replayed.get("delivered") else d.latency
    return {k: n for k, n in counts.items() if n}, latency


def _add(into: dict[str, int], counts: Mapping[str, int]) -> None:
    for outcome, n in counts.items():
        into[outcome] = into.get(outcome, 0) + n


def prune(value: NamespaceStats, now_ms: int) -> None:
    """Drop minute buckets that left the hour before ``now_ms`` (keeps at most 60)."""
    oldest = now_ms // 60_000 - MINUTES + 1
    for minute in [m for m in value.minutes if m < oldest]:
        del value.minutes[minute]
    while len(value.minutes) > MINUTES:  # stamped ahead of the clock, within the skew
        del value.minutes[min(value.minutes)]


# -- reading ----------------------------------------------------------------------------------


def rates(value: NamespaceStats, now_ms: int) -> dict[str, dict[str, float]]:
    """Per-second rates of each outcome over the trailing 1 min, 5 min and 1 h.

    A minute bucket counts for the part of it inside the window, assuming its
    events were spread evenly over its elapsed time.
    """
    now = now_ms / 1000
    out: dict[str, dict[str, float]] = {}
    for name, minutes in WINDOWS.items():
        window = minutes * 60
        sums: dict[str, float] = {}
        for minute, bucket in value.minutes.items():
            start = minute * 60
            elapsed = min(60.0, now - start)
            overlap = min(start + 60, now) - max(start, now - window)
            if elapsed <= 0 or overlap <= 0:
                continue
            for outcome, n in bucket.counts.items():
                sums[outcome] = sums.get(outcome, 0.0) + n * overlap / elapsed
        out[name] = {k: round(v / window, 3) for k, v in sorted(sums.items())}
    return out


def latency_summary(value: NamespaceStats, now_ms: int) -> dict[str, dict[str, Any]]:
    """End-to-end latency percentiles (ms) over the last 1, 5 and 60 minute buckets, and ever."""
    current = now_ms // 60_000
    out = {}
    for name, minutes in WINDOWS.items():
        window: Sketch = {}
        for minute, bucket in value.minutes.items():
            if current - minutes < minute <= current:
                merge(window, bucket.latency)
        out[name] = percentiles(window)
    out["total"] = percentiles(value.latency)
    return out


def summary(namespace: str, value: NamespaceStats, now_ms: int) -> dict[str, Any]:
    """What ``GET /wal/namespaces/{name}/metrics`` answers."""
    return {
        "namespace": namespace,
        "totals": {o: value.totals.get(o, 0) for o in (*OUTCOMES, REPLAYED)},
        "targets": {t: dict(sorted(c.items())) for t, c in sorted(value.targets.items())},
        "rates": rates(value, now_ms),
        "latencyMs": latency_summary(value, now_ms),
        "updatedAt": value.updated_ms or None,
    }


def read(namespace: str) -> NamespaceStats:
    """This worker's folded value for ``namespace`` (empty unless it owns the partition)."""
    return NamespaceStats.loads(stats.get(namespace.encode()))
