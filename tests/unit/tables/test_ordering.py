"""Per-key sequencing: pure transitions, including replays after a crash."""

from __future__ import annotations

from tables.ordering import KeyState, block, gate, release


def test_a_failed_write_blocks_its_key_and_later_writes_queue_in_order() -> None:
    action, state, seq = gate(None, "m1", None)
    assert (action, state, seq) == ("deliver", None, None)
    state, seq = block(None, "m1", None)  # m1 goes to retry
    assert (state.next, state.last, seq) == (1, 1, 1)
    assert gate(state, "m2", None)[0::2] == ("park", 2)
    assert gate(state, "m3", None)[0::2] == ("park", 3)
    assert gate(state, "m3", 3)[0] == "park"  # not its turn
    assert gate(state, "m1", 1)[0] == "deliver"  # the head's retry
    state = release(state, "m1", 1)
    assert state is not None and state.next == 2
    assert gate(state, "m3", 3)[0] == "park"
    assert gate(state, "m2", 2)[0] == "deliver"
    state = release(state, "m2", 2)
    assert gate(state, "m3", 3)[0] == "deliver"
    assert release(state, "m3", 3) is None  # the key is free again


def test_replays_make_the_same_decisions() -> None:
    state = KeyState(next=1, last=2, ids={"m1": 1, "m2": 2})
    # m2 replayed without its header (the park record was lost in a crash): same number.
    assert gate(state, "m2", None)[0::2] == ("park", 2)
    assert state.last == 2
    # m1 replayed after it was released: stale, delivered again (targets dedupe), no change.
    state = release(state, "m1", 1)
    assert state is not None
    assert gate(state, "m1", 1) == ("deliver", state, None)  # holding no number now
    assert release(state, "m1", 1) is state and state.next == 2


def test_a_stale_copy_from_an_earlier_state_of_the_key_releases_nothing() -> None:
    """m1 held number 1 of a state that was dropped once m1 was done; a new state numbers
    from 1 again (m2 at 1, m3 at 2). A stale copy of m1 still carrying 1 comes round: it
    must not let m3 overtake m2, which holds 1 now."""
    state, _ = block(None, "m1", None)
    assert release(state, "m1", 1) is None  # the key is free, its state dropped
    state, seq = block(None, "m2", None)  # m2 fails: a new state, numbered from 1
    assert seq == 1
    assert gate(state, "m3", None)[0::2] == ("park", 2)
    action, state, held = gate(state, "m1", 1)  # the stale copy
    assert (action, held) == ("deliver", None)
    assert state is not None
    state = release(state, "m1", held)
    assert state is not None and state.next == 1
    assert gate(state, "m3", 2)[0] == "park"  # still behind m2
    assert gate(state, "m2", 1)[0] == "deliver"


def test_a_blocked_write_that_fails_again_keeps_its_number() -> None:
    state, seq = block(None, "m1", None)
    gate(state, "m2", None)
    state, again = block(state, "m1", seq)
    assert again == 1 and state.last == 2
