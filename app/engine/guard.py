"""The commit guard: a commit never passes an offset this worker has not proven done.

Kafka's committed offset of a partition says "everything before this is done".
For a write-ahead log, *done* means the record's effects are durable: produced
with acks=all, or written to its target. The consumer's commit rule
(:mod:`app.engine.consumer`) is meant to ensure that; this guard checks it once more,
independently, right before the offsets go to the broker.

For each partition it is reading, the guard knows where this reading began
(``start``: the committed offset - or the log's start - the consumer sought to
after the partition was assigned) and which offsets since then are *covered*:
acked by an agent after their effects were durable, or proven absent by a fetch
(transaction markers, compaction). A commit of offset ``n`` is allowed only if
every offset from the start up to ``n`` is covered. Anything else - a partition
it has no start for (not assigned, or assigned and not sought yet), an offset
past the first uncovered one - is refused: logged as an error, counted in
``wal_commits_refused_total``, and not sent. A refused partition is not lost:
its records are read again from the committed offset (the consumer's heal).

Pure bookkeeping: no Kafka, no Faust; the consumer feeds it.
"""

from __future__ import annotations

import bisect
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Coverage:
    """Offsets of one partition covered since a reading began at ``start``."""

    start: int
    #: the first offset not covered: everything in [start, frontier) is
    frontier: int = -1
    #: covered ranges past the frontier, [begin, end), sorted and disjoint
    ahead: list[tuple[int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.frontier < self.start:
            self.frontier = self.start

    def cover(self, begin: int, end: int) -> None:
        """Mark offsets [begin, end) covered."""
        if end <= self.frontier or end <= begin:
            return
        begin = max(begin, self.frontier)
        ahead = self.ahead
        i = bisect.bisect_left(ahead, (begin, begin))
        # merge with a range before that reaches begin
        if i and ahead[i - 1][1] >= begin:
            i -= 1
            begin = ahead[i][0]
        j = i
        while j < len(ahead) and ahead[j][0] <= end:
            end = max(end, ahead[j][1])
            j += 1
        ahead[i:j] = [(begin, end)]
        if ahead[0][0] <= self.frontier:
            self.frontier = max(self.frontier, ahead.pop(0)[1])


class CommitGuard:
    """Per partition, the reading in progress and what it has covered (see the module)."""

    def __init__(self) -> None:
        self._readings: dict[Hashable, Coverage] = {}

    def start(self, tp: Hashable, offset: int) -> None:
        """The consumer sought ``tp`` to ``offset`` (its committed offset or the log's start).

        A seek back within the same reading keeps what is covered: those records'
        effects are durable whatever is read again. A start past the frontier
        (the group committed further meanwhile) begins a new reading there.
        """
        reading = self._readings.get(tp)
        if reading is None or offset > reading.frontier:
            self._readings[tp] = Coverage(start=offset)

    def forget(self, tps: Iterable[Hashable]) -> None:
        """``tps`` are revoked: nothing about them can be proven any more."""
        for tp in tps:
            self._readings.pop(tp, None)

    def reading(self, tp: Hashable) -> bool:
        return tp in self._readings

    def cover(self, tp: Hashable, begin: int, end: int) -> None:
        """Offsets [begin, end) of ``tp`` are done (acked, or proven absent)."""
        reading = self._readings.get(tp)
        if reading is not None:
            reading.cover(begin, end)

    def cover_offsets(self, tp: Hashable, offsets: Iterable[int]) -> None:
        """Each of ``offsets`` (ascending) is done."""
        reading = self._readings.get(tp)
        if reading is None:
            return
        run_begin = run_end = None
        for offset in offsets:
            if run_end is not None and offset == run_end:
                run_end += 1
                continue
            if run_begin is not None and run_end is not None:
                reading.cover(run_begin, run_end)
            run_begin, run_end = offset, offset + 1
        if run_begin is not None and run_end is not None:
            reading.cover(run_begin, run_end)

    def frontier(self, tp: Hashable) -> int | None:
        """The first offset of ``tp`` not proven done; None if ``tp`` is not being read."""
        reading = self._readings.get(tp)
        return None if reading is None else reading.frontier

    def check(self, offsets: Mapping[Any, int]) -> tuple[dict[Any, int], dict[Any, str]]:
        """Split commit ``offsets`` into those allowed and those refused (with why)."""
        allowed: dict[Any, int] = {}
        refused: dict[Any, str] = {}
        for tp, offset in offsets.items():
            reading = self._readings.get(tp)
            if reading is None:
                refused[tp] = f"offset {offset}: this worker is not reading the partition"
            elif offset > reading.frontier:
                refused[tp] = (
                    f"offset {offset} passes {reading.frontier}, the first offset not proven "
                    f"done since this reading began at {reading.start}"
                )
            else:
                allowed[tp] = offset
        return allowed, refused
