"""A target's pace: its share of the fleet's limit, turns booked in order, throttling
halving it and time growing it back (pure logic; the worker's share is given)."""

from __future__ import annotations

import pytest

from agents.deliver import pace
from agents.deliver.items import Item
from app import names
from app.models import Namespace, TargetDef
from targets.base import Outcome


@pytest.fixture(autouse=True)
def half_the_partitions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pace, "share", lambda: 0.5)
    pace._paces.clear()


def target(**limits: float) -> TargetDef:
    return TargetDef.model_validate(
        {"identifier": "hook", "type": "http", "config": {}, "limits": limits}
    )


def items(n: int, **headers: str) -> list[Item]:
    ns = Namespace.model_validate({"name": "ns"})
    return [Item(b"{}", dict(headers), None, f"t/0/{i}", namespace=ns) for i in range(n)]


def test_writes_over_this_workers_share_wait_their_turn_in_order() -> None:
    go, wait = pace.admit("ns", target(maxPerSecond=50), items(100))  # 25 a second here
    assert 1 <= len(go) <= 4  # the bucket's small burst
    booked = [seconds for _, seconds, is_booked in wait if is_booked]
    assert booked == sorted(booked) and booked[-1] <= pace.HORIZON_S
    assert len(go) + len(booked) == pytest.approx(25 * pace.HORIZON_S, abs=4)
    # the turns of the rest would be later than the horizon: they ask again then
    later = [(seconds, is_booked) for _, seconds, is_booked in wait[len(booked) :]]
    assert later == [(pace.HORIZON_S, False)] * (100 - len(go) - len(booked))
    assert pace._paces[("ns", "hook")].waiting == len(wait)


def test_a_write_asking_again_after_the_pace_grew_is_booked_at_the_new_pace() -> None:
    slow = target(maxPerSecond=2)  # 1 a second here: one write within the horizon
    _, wait = pace.admit("ns", slow, items(10))
    assert sum(is_booked for _, _, is_booked in wait) <= 2
    fast = target(maxPerSecond=1000)  # its limit raised meanwhile
    _, wait = pace.admit("ns", fast, [item for item, _, is_booked in wait if not is_booked])
    assert all(is_booked for _, _, is_booked in wait)  # all within the horizon now


def test_a_write_back_from_waiting_goes_without_waiting_again() -> None:
    hook = target(maxPerSecond=50)
    pace.admit("ns", hook, items(100))  # the bucket is in debt now
    back = items(3, **{names.PACED: "hook"})
    go, wait = pace.admit("ns", hook, back)
    assert (go, wait) == (back, [])
    other = items(1, **{names.PACED: "another-target"})  # paced for another: waits here
    assert pace.admit("ns", hook, other)[1]


def test_no_limit_no_pace() -> None:
    batch = items(1000)
    assert pace.admit("ns", target(), batch) == (batch, [])


def test_throttling_halves_the_pace_holds_off_and_it_grows_back() -> None:
    p = pace.Pace(("ns", "hook"), limit=100)
    throttled = Outcome("retryable", "TARGET_THROTTLED", "429", retry_after=2.0)
    p.throttled([throttled], share=0.5, now=10.0)
    assert p.current == 50 and p.hold_until == 12.0
    assert p.rate(0.5) == 25.0
    p.throttled([throttled], share=0.5, now=10.5, sent=9.9)  # sent before the decrease
    assert p.current == 50
    p.throttled([throttled], share=0.5, now=11.2, sent=10.1)
    assert p.current == 25 and p.hold_until == 13.2
    p.grow(now=12.5)  # held off until the Retry-After has passed
    assert p.current == 25
    p.grow(now=18.2)  # then five seconds at a twentieth of the limit a second
    assert p.current == pytest.approx(50)
    p.grow(now=100.0)
    assert p.current is None and p.rate(0.5) == 50.0  # back to the limit


def test_a_target_without_a_limit_is_paced_from_what_it_took_when_it_throttled() -> None:
    p = pace.Pace(("ns", "hook"))
    assert not p.active
    p.answered(40, now=8.5)  # over a second ago: not counted
    p.answered(30, now=9.2)
    p.answered(30, now=10.0)  # 60 answered in the last second: called at 60 a second
    throttled = [Outcome("retryable", "TARGET_THROTTLED", "429")]
    p.throttled(throttled, share=1.0, now=10.0)
    assert p.active and p.peak == 60.0 and p.rate(1.0) == 30.0
    p.grow(now=20.0)  # 3 a second: 60 again
    assert p.rate(1.0) == pytest.approx(60.0)
    p.throttled(throttled, share=1.0, now=20.0)  # the peak is where it throttled last
    assert p.peak == pytest.approx(60.0) and p.rate(1.0) == pytest.approx(30.0)
    p.grow(now=300.0)  # past ten times the peak: no pace
    assert p.current is None and not p.active


def test_max_in_flight_is_shared_too() -> None:
    hook = target(maxInFlight=8)  # 4 here
    go, wait = pace.admit("ns", hook, items(10))
    assert len(go) == 4 and [(s, b) for _, s, b in wait] == [(pace.IN_FLIGHT_WAIT_S, False)] * 6
    pace.started(("ns", "hook"), len(go))
    assert pace.admit("ns", hook, items(2))[0] == []
    pace.ended(("ns", "hook"), len(go), [], sent=0.0)
    assert len(pace.admit("ns", hook, items(2))[0]) == 2


def test_writes_back_from_their_turns_in_a_bunch_never_pass_the_pace_over_a_second() -> None:
    hook = target(maxPerSecond=20)  # 10 a second here
    bunch = items(25, **{names.PACED: "hook"})  # a delay tier released them together
    go, wait = pace.admit("ns", hook, bunch)
    assert len(go) == 10
    assert [(s, b) for _, s, b in wait] == [(pace.OVER_WAIT_S, False)] * 15
    assert pace.admit("ns", hook, items(1, **{names.PACED: "hook"}))[0] == []
