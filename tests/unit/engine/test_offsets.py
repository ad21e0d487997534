"""Readiness's commit check: acked offsets must be committed within a limit; idle is fine."""

from __future__ import annotations

from app.engine.offsets import CommitProgress


def test_idle_is_never_stalled() -> None:
    progress = CommitProgress(limit_s=30)
    for t in range(0, 600, 5):
        progress.observe({"tp0": 10}, pending=False, now=float(t))
        assert not progress.stalled(float(t))


def test_pending_acks_without_a_commit_stall_after_the_limit() -> None:
    progress = CommitProgress(limit_s=30)
    progress.observe({"tp0": 10}, pending=False, now=0.0)
    progress.observe({"tp0": 10}, pending=True, now=5.0)  # acked, not committed
    assert not progress.stalled(30.0)
    progress.observe({"tp0": 10}, pending=True, now=36.0)
    assert progress.stalled(36.0)
    progress.observe({"tp0": 11}, pending=True, now=37.0)  # a commit: moving again
    assert not progress.stalled(37.0)


def test_commits_that_keep_moving_are_fine_even_when_always_pending() -> None:
    progress = CommitProgress(limit_s=30)
    for t in range(0, 300, 5):
        progress.observe({"tp0": t}, pending=True, now=float(t))
        assert not progress.stalled(float(t))


def test_a_partition_whose_commit_does_not_move_while_records_wait_is_stalled() -> None:
    from app.engine.offsets import Stalls

    stalls = Stalls(limit_s=60)
    tp, other = ("wal-ingest", 0), ("wal-ingest", 1)
    stalls.observe({tp: 5, other: 5}, {tp: 100, other: 7}, now=0)
    stalls.observe({tp: 9, other: 4}, {tp: 100, other: 8}, now=50)  # other moved on
    assert stalls.stalled(now=55) == {}
    stalls.observe({tp: 12, other: 4}, {tp: 100, other: 9}, now=61)
    assert stalls.stalled(now=61) == {tp: 61}
    stalls.observe({tp: 0, other: 4}, {tp: 100, other: 9}, now=62)  # caught up: idle is fine
    assert tp not in stalls.stalled(now=200)
    assert stalls.due_for_a_log_line(tp, now=0) and not stalls.due_for_a_log_line(tp, now=59)
    assert stalls.due_for_a_log_line(tp, now=60)
