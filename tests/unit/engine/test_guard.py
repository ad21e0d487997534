"""The commit guard refuses any offset past what the worker proved done since it began."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from app.engine.guard import CommitGuard, Coverage

TP = ("wal-ingest", 0)


def test_a_reading_allows_commits_up_to_its_first_offset_not_done() -> None:
    guard = CommitGuard()
    guard.start(TP, 100)
    guard.cover_offsets(TP, [100, 101, 102, 104, 105])
    assert guard.frontier(TP) == 103
    allowed, refused = guard.check({TP: 103})
    assert allowed == {TP: 103} and refused == {}
    allowed, refused = guard.check({TP: 106})  # 103 was never acked: 104, 105 must wait
    assert allowed == {} and "passes 103" in refused[TP]
    guard.cover(TP, 103, 104)
    assert guard.frontier(TP) == 106


def test_a_partition_not_being_read_commits_nothing() -> None:
    guard = CommitGuard()
    _, refused = guard.check({TP: 5})
    assert "not reading" in refused[TP]
    guard.start(TP, 0)
    guard.cover(TP, 0, 5)
    guard.forget([TP])  # revoked
    guard.cover(TP, 5, 10)  # an agent finishing after the revoke: not counted
    assert guard.check({TP: 5})[1] and guard.frontier(TP) is None


def test_a_seek_back_keeps_what_is_covered_and_a_start_past_it_begins_anew() -> None:
    guard = CommitGuard()
    guard.start(TP, 10)
    guard.cover(TP, 10, 20)
    guard.start(TP, 12)  # heal: read again from the committed offset
    assert guard.frontier(TP) == 20
    guard.start(TP, 50)  # the group committed further meanwhile
    assert guard.frontier(TP) == 50


@given(st.lists(st.tuples(st.integers(0, 60), st.integers(1, 8)), max_size=40))
def test_coverage_frontier_is_the_first_offset_not_covered(ranges: list[tuple[int, int]]) -> None:
    coverage = Coverage(start=5)
    covered: set[int] = set()
    for begin, length in ranges:
        coverage.cover(begin, begin + length)
        covered.update(range(begin, begin + length))
    expected = 5
    while expected in covered:
        expected += 1
    assert coverage.frontier == expected
    assert all(a < b for a, b in coverage.ahead)
    assert all(x[1] < y[0] for x, y in zip(coverage.ahead, coverage.ahead[1:], strict=False))
