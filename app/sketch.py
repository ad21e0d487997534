"""Latency sketches (counts in fixed log-spaced buckets, percentiles within about 9 %) and
sets of counted offsets kept as ranges: the arithmetic of the stats, with no table."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

#: Latency buckets: 0 holds < 1 ms; i >= 1 holds [2**((i-1)/4), 2**(i/4)) ms; the last
#: one everything longer (2**(127/4) ms is about 41 days: delays last at most 7).
LATENCY_BUCKETS = 128
_STEPS_PER_OCTAVE = 4

Sketch = dict[int, int]


def bucket_of(ms: float) -> int:
    """The latency bucket of ``ms`` milliseconds."""
    if ms < 1:
        return 0
    return min(LATENCY_BUCKETS - 1, math.floor(math.log2(ms) * _STEPS_PER_OCTAVE) + 1)


def bucket_value(index: int) -> float:
    """A bucket's representative latency: the geometric middle of its bounds (ms)."""
    if index == 0:
        return 0.5
    return float(2 ** ((index - 0.5) / _STEPS_PER_OCTAVE))


def sketch(latencies_ms: Iterable[float]) -> Sketch:
    out: Sketch = {}
    for ms in latencies_ms:
        index = bucket_of(ms)
        out[index] = out.get(index, 0) + 1
    return out


def merge(into: Sketch, other: Mapping[int, int]) -> Sketch:
    for index, n in other.items():
        into[index] = into.get(index, 0) + n
    return into


def percentiles(counts: Mapping[int, int], qs: Iterable[float] = (0.5, 0.95, 0.99)) -> dict:
    """``{"count": n, "p50": ms, ...}`` from a sketch; percentiles are None when it is empty."""
    total = sum(counts.values())
    out: dict[str, Any] = {"count": total}
    ordered = sorted(counts.items())
    for q in qs:
        name = f"p{round(q * 100):d}"
        out[name] = None
        rank, seen = max(1, math.ceil(q * total)), 0
        for index, n in ordered:
            seen += n
            if total and seen >= rank:
                out[name] = round(bucket_value(index), 1)
                break
    return out


def covered(ranges: list[list[int]], lo: int, hi: int) -> int:
    """How many offsets of ``lo..hi`` the sorted, disjoint ``ranges`` hold."""
    return sum(max(0, min(hi, b) - max(lo, a) + 1) for a, b in ranges if a <= hi and b >= lo)


def cover(ranges: list[list[int]], lo: int, hi: int) -> None:
    """Add ``lo..hi`` to the sorted, disjoint ``ranges``, merging what touches it."""
    keep = [r for r in ranges if r[1] < lo - 1 or r[0] > hi + 1]
    touching = [r for r in ranges if not (r[1] < lo - 1 or r[0] > hi + 1)]
    merged = [min([lo, *(r[0] for r in touching)]), max([hi, *(r[1] for r in touching)])]
    ranges[:] = sorted([*keep, merged])


def offset_ranges(listed: Iterable[str]) -> dict[str, list[tuple[int, int]]]:
    """``topic/partition/offset`` strings → ``topic/partition`` → sorted inclusive ranges."""
    offsets: dict[str, set[int]] = {}
    for source in listed:
        where, _, offset = source.rpartition("/")
        offsets.setdefault(where, set()).add(int(offset))
    out: dict[str, list[tuple[int, int]]] = {}
    for where, found in offsets.items():
        ranges: list[tuple[int, int]] = []
        for o in sorted(found):
            if ranges and ranges[-1][1] == o - 1:
                ranges[-1] = (ranges[-1][0], o)
            else:
                ranges.append((o, o))
        out[where] = ranges
    return out
