"""The transaction state machine: pure folds, replays included."""

from __future__ import annotations

from typing import Any

from tables.transactions import Dispatch, fold


def begin(n: int = 3, compensable: bool = True) -> dict[str, Any]:
    step = {"operation": "insert", "target": "db", "data": {}}
    comp = {"compensation": {"operation": "delete", "data": {}}} if compensable else {}
    return {
        "type": "begin",
        "txn": "txn_1",
        "namespace": "ns",
        "messageId": "m",
        "timeoutAt": 10_000,
        "mutations": [{**step, **comp} for _ in range(n)],
    }


def outcome(i: int, ok: bool, kind: str = "forward") -> dict[str, Any]:
    return {
        "type": "outcome",
        "txn": "txn_1",
        "index": i,
        "kind": kind,
        "status": "completed" if ok else "failed",
        "error": None if ok else "boom",
    }


def run(events: list[dict[str, Any]]) -> tuple[dict[str, Any], list[list[Dispatch]]]:
    state, effects = None, []
    for e in events:
        state, fx = fold(state, e, 1)
        effects.append(fx)
    assert state is not None
    return state, effects


def test_all_mutations_complete() -> None:
    state, fx = run([begin(), outcome(0, True), outcome(1, True), outcome(2, True)])
    assert fx[0] == [Dispatch(i, "forward") for i in range(3)]
    assert state["status"] == "completed" and state["completedMutations"] == 3


def test_a_failure_compensates_completed_ones_in_reverse_order() -> None:
    state, fx = run([begin(), outcome(0, True), outcome(2, True), outcome(1, False)])
    assert fx[-1] == [Dispatch(2, "compensation")]
    state, more = fold(state, outcome(2, True, "compensation"), 2)
    assert more == [Dispatch(0, "compensation")]
    state, more = fold(state, outcome(0, True, "compensation"), 3)
    assert more == [] and state["status"] == "compensated"


def test_a_mutation_still_in_flight_is_waited_for_then_compensated() -> None:
    state, fx = run([begin(), outcome(1, False)])
    assert fx[-1] == [] and state["status"] == "compensating"
    state, more = fold(state, outcome(0, True), 2)
    assert more == [Dispatch(0, "compensation")]
    state, more = fold(state, outcome(2, False), 3)
    assert more == [Dispatch(0, "compensation")]  # still owed, re-derived
    state, more = fold(state, outcome(0, True, "compensation"), 4)
    assert state["status"] == "compensated"


def test_a_failed_compensation_ends_failed_with_details() -> None:
    state, _ = run([begin(2), outcome(0, True), outcome(1, False)])
    state, more = fold(state, outcome(0, False, "compensation"), 2)
    assert more == []
    assert state["status"] == "failed" and "compensation of mutation 0" in state["error"]


def test_no_compensation_spec_ends_failed() -> None:
    state, _ = run([begin(2, compensable=False), outcome(0, True), outcome(1, False)])
    assert state["status"] == "failed" and "no compensation" in state["error"]


def test_timeout_compensates() -> None:
    state, fx = run([begin(2), outcome(0, True), {"type": "timeout", "txn": "txn_1"}])
    assert fx[-1] == [Dispatch(0, "compensation")] and state["error"] == "transaction timed out"


def test_replays_change_nothing_and_re_derive_what_is_owed() -> None:
    state, _ = run([begin(), outcome(0, True)])
    again, fx = fold(state, begin(), 2)
    assert fx == [Dispatch(1, "forward"), Dispatch(2, "forward")]
    again, fx = fold(again, outcome(0, True), 3)
    assert fx == [] and again["completedMutations"] == 1


def test_forget_drops_only_ended_transactions() -> None:
    state, _ = run([begin(2), outcome(0, True)])
    kept, _ = fold(state, {"type": "forget", "txn": "txn_1"}, 2)
    assert kept is state
    done, _ = fold(state, outcome(1, True), 3)
    gone, _ = fold(done, {"type": "forget", "txn": "txn_1"}, 4)
    assert gone is None
