"""Targets at their own pace: a target's ``limits`` (``maxPerSecond``, ``maxInFlight``),
honoured by the fleet without a coordinator, and its ``TARGET_THROTTLED`` answers.

Each worker takes the share of a limit that matches its share of ``wal-deliver``'s
partitions (looked at again at least once a second, so a rebalance moves the shares).
A write over the pace waits in Kafka, not here: it is parked in the delay tier that
fits the time its turn comes (its turn is booked in the target's token bucket, so
writes leave in the order they came), its attempt count unchanged, with ``wal-paced``
naming the target; back from the tier, it goes without waiting again. Turns are booked
at most :data:`HORIZON_S` ahead: a write whose turn would come later is parked that long
unbooked and asks again when it is back, so a pace that grows meanwhile is used (booked
at a low pace, a backlog kept its late turns however fast the target became). Waiting is not
a failure: the breaker never sees it and nothing counts as retried (it counts as
``parked``). Other targets, and other namespaces' writes on the same partitions, go
on at their own speed.

``TARGET_THROTTLED`` (HTTP 429, Redis busy) lowers the pace: it halves (to a twentieth
of the limit at least; once for all the calls sent before it) and holds off until
the answer's ``Retry-After``; it then grows back by a twentieth of the limit a second
(additive increase, multiplicative decrease). A target without a ``maxPerSecond`` that
throttles is paced from the rate it was being called at when it did, and grows by a
twentieth a second of the pace it last throttled at, until it throttles again, or until
ten times that (no pace then). The throttled
writes wait their turn at the lowered pace, as above: not a retry, and not a failure
for the target's breaker (the target answered).

``ordering: key`` namespaces are not paced: a write parked for its turn would have to
hold back its key's later writes (a known gap, see the README).
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from agents.deliver.items import Item, ordered
from app import metrics, names
from app.engine.offsets import assignment
from app.fleet import settings
from app.models import TargetDef
from app.rates import TokenBucket
from app.topics import NAMES
from targets.base import Outcome

#: A write whose turn comes within this long goes now.
NOW_SLACK_S = 0.05
#: The pace never drops below this fraction of the limit.
MIN_FACTOR = 0.05
#: What throttling multiplies the pace by; what it grows back by, a second.
DECREASE, INCREASE_PER_S = 0.5, 0.05
#: Without a limit, a pace grown to this many times what the target took when it
#: throttled is no pace any more.
ENDS_AT = 10
#: A write over ``maxInFlight`` waits this long before it asks again.
IN_FLIGHT_WAIT_S = 0.2
#: Turns are booked at most this far ahead; a write whose turn is later asks again then.
HORIZON_S = 2.0
#: Writes back from their turns can come in a bunch (delay tiers release them a batch at
#: a time): none goes past the pace over any second, and one over it waits this long.
OVER_WAIT_S = 0.5
#: How often a worker looks again at its share of ``wal-deliver``.
SHARE_EVERY_S = 1.0


@dataclass
class Pace:
    """One (namespace, target)'s pace; rates are the fleet's (a worker takes its share)."""

    key: tuple[str, str]
    limit: float | None = None  #: the target's maxPerSecond
    max_in_flight: int | None = None
    #: The pace since a throttling answer (None: the limit, or no pace without one).
    current: float | None = None
    #: The pace it last throttled at (at first: the rate it was being called at): without
    #: a limit, the scale of the increase, and ten times it ends the pace.
    peak: float = 0.0
    _decreased_at: float = float("-inf")
    hold_until: float = 0.0
    in_flight: int = 0
    bucket: TokenBucket | None = None
    _grown_at: float = field(default_factory=time.monotonic)
    _answered: list[tuple[float, int]] = field(default_factory=list)  # (when, writes) lately
    #: Paced writes sent in each tenth of a second of the last second: (tenth, count).
    _sent: list[tuple[int, int]] = field(default_factory=list)
    #: When each write parked for its turn is back (a heap): how many wait.
    _parked: list[float] = field(default_factory=list)

    @property
    def waiting(self) -> int:
        """Writes parked for their turn and not back yet (this worker's)."""
        now = time.monotonic()
        while self._parked and self._parked[0] <= now:
            heapq.heappop(self._parked)
        return len(self._parked)

    def parked(self, seconds: float) -> None:
        heapq.heappush(self._parked, time.monotonic() + seconds)

    @property
    def active(self) -> bool:
        return bool(self.limit or self.current or self.max_in_flight)

    def rate(self, share: float) -> float | None:
        """Writes a second this worker lets through now (None: no pace)."""
        fleet_rate = self.current if self.current is not None else self.limit
        return None if fleet_rate is None else fleet_rate * share

    def grow(self, now: float) -> None:
        """Additive increase: a twentieth of the limit (or of the peak) a second, back to
        the limit; without one, no pace again at ten times the peak."""
        since, self._grown_at = max(self._grown_at, self.hold_until), now
        if self.current is None or now <= since:
            return
        self.current += INCREASE_PER_S * (self.limit or self.peak) * (now - since)
        if self.current >= (self.limit or ENDS_AT * self.peak):
            self.current = None

    def throttled(
        self, outcomes: list[Outcome], share: float, now: float, sent: float | None = None
    ) -> None:
        """Multiplicative decrease after a ``TARGET_THROTTLED`` answer in a call sent at
        ``sent`` (default ``now``). A call sent before the last decrease was sent at the
        pace that decrease has already lowered: it holds off, it does not lower again."""
        hints = [o.retry_after or 0.0 for o in outcomes if o.code == "TARGET_THROTTLED"]
        if not hints:
            return
        self.hold_until = max(self.hold_until, now + max(hints))
        if (now if sent is None else sent) < self._decreased_at:
            return
        if self.current is None:
            called = self.answered_rate(now) / max(share, 1e-3)
            self.current = self.limit or max(1.0, called)
        if self.limit is None:
            self.peak = self.current
        floor = MIN_FACTOR * (self.limit or self.peak)
        self.current = max(floor, self.current * DECREASE)
        self._grown_at = self._decreased_at = now

    def sent_lately(self, now: float) -> int:
        """Paced writes sent in the last second (to the tenth)."""
        tenth = int(now * 10)
        self._sent = [(t, n) for t, n in self._sent if tenth - t < 10]
        return sum(n for _, n in self._sent)

    def send(self, writes: int, now: float) -> None:
        tenth = int(now * 10)
        if self._sent and self._sent[-1][0] == tenth:
            self._sent[-1] = (tenth, self._sent[-1][1] + writes)
        else:
            self._sent.append((tenth, writes))

    def answered(self, writes: int, now: float) -> None:
        self._answered.append((now, writes))
        while self._answered and now - self._answered[0][0] > 1.0:
            self._answered.pop(0)

    def answered_rate(self, now: float) -> float:
        """Writes a second the target answered lately, throttled or not (the last second,
        this worker): how fast it was being called."""
        return float(sum(n for at, n in self._answered if now - at <= 1.0))


_paces: dict[tuple[str, str], Pace] = {}
_share: tuple[float, float] = (0.0, 1.0)  # (when looked at, share)


def share() -> float:
    """This worker's share of ``wal-deliver``'s partitions (1.0 before any assignment)."""
    global _share
    now = time.monotonic()
    if now - _share[0] >= SHARE_EVERY_S:
        owned = len(assignment().get(NAMES["deliver"], []))
        _share = (now, owned / settings.partitions if owned else 1.0)
    return _share[1]


def pace_of(namespace: str, definition: TargetDef) -> Pace:
    """The target's pace, its limits as its definition gives them now."""
    key = (namespace, definition.identifier)
    pace = _paces.get(key)
    if pace is None:
        pace = _paces[key] = Pace(key)
    pace.limit = definition.limits.max_per_second
    pace.max_in_flight = definition.limits.max_in_flight
    return pace


def admit(
    namespace: str, definition: TargetDef, members: list[Item]
) -> tuple[list[Item], list[tuple[Item, float, bool]]]:
    """The members that go now, and those that wait: how long (seconds), and whether their
    turn is booked (they go when back) or they ask again."""
    pace = pace_of(namespace, definition)
    if not pace.active:  # the common case: no limit, never throttled
        return members, []
    now = time.monotonic()
    pace.grow(now)
    mine = share()
    rate = pace.rate(mine)
    identifier = definition.identifier
    go: list[Item] = []
    wait: list[tuple[Item, float, bool]] = []
    room = None if rate is None else max(1, math.ceil(rate)) - pace.sent_lately(now)
    for item in members:
        if rate is None or ordered(item):
            go.append(item)
            continue
        assert room is not None
        if item.headers.get(names.PACED) == identifier:  # back from waiting its booked turn
            delay, booked = 0.0, True
        else:
            delay, booked = _book(pace, rate, now)
        if delay > NOW_SLACK_S:
            wait.append((item, delay, booked))
        elif room <= 0:  # a bunch of turns at once: it asks again shortly
            wait.append((item, OVER_WAIT_S, False))
        else:
            go.append(item)
            room -= 1
    if pace.max_in_flight is not None:
        go, over = _in_flight(pace, go, mine)
        wait += [(item, IN_FLIGHT_WAIT_S, False) for item in over]
    for _, seconds, _ in wait:
        pace.parked(seconds)
    if rate is not None:
        pace.send(sum(not ordered(item) for item in go), now)
    _publish(pace, rate)
    return go, wait


def _book(pace: Pace, rate: float, now: float) -> tuple[float, bool]:
    """Book the next turn if it comes within :data:`HORIZON_S`: (seconds until it, True);
    else (:data:`HORIZON_S`, False) and nothing booked - the write asks again then."""
    bucket = _bucket(pace, rate)
    hold = pace.hold_until - now
    if max(bucket.due(), hold) > HORIZON_S:
        return HORIZON_S, False
    return max(bucket.owe(), hold), True


def turn(key: tuple[str, str], retry_after: float | None) -> tuple[float, bool]:
    """A turn for a write its target throttled, at the pace the answer lowered and not
    before the answer's ``Retry-After``: (seconds until it, whether it is booked)."""
    pace = _paces.get(key)
    now = time.monotonic()
    floor_s = max(retry_after or 0.0, NOW_SLACK_S)
    rate = pace.rate(share()) if pace is not None else None
    if pace is None or rate is None:
        return max(floor_s, 1.0), False
    seconds, booked = _book(pace, rate, now)
    seconds = max(floor_s, seconds)
    pace.parked(seconds)
    return seconds, booked


def _in_flight(pace: Pace, go: list[Item], mine: float) -> tuple[list[Item], list[Item]]:
    """Of ``go``, those within the share of ``maxInFlight`` left now, and the rest."""
    assert pace.max_in_flight is not None
    room = max(1, math.floor(pace.max_in_flight * mine)) - pace.in_flight
    within: list[Item] = []
    over: list[Item] = []
    for item in go:
        if ordered(item) or room > 0:
            within.append(item)
            room -= 0 if ordered(item) else 1
        else:
            over.append(item)
    return within, over


def started(key: tuple[str, str], writes: int) -> None:
    pace = _paces.get(key)
    if pace is not None:
        pace.in_flight += writes


def ended(key: tuple[str, str], writes: int, outcomes: Iterable[Outcome], sent: float) -> None:
    """A call sent at ``sent`` (monotonic) ended: its writes are no longer in flight;
    throttling lowers the pace."""
    pace = _paces.get(key)
    if pace is None:
        return
    now, answers = time.monotonic(), list(outcomes)
    pace.in_flight = max(0, pace.in_flight - writes)
    pace.answered(len(answers), now)
    if any(o.code == "TARGET_THROTTLED" for o in answers):
        pace.throttled(answers, share(), now, sent)
    if pace.active:
        _publish(pace, pace.rate(share()))


def _bucket(pace: Pace, rate: float) -> TokenBucket:
    """The pace's bucket at ``rate`` (a burst of a tenth of a second, one write at least)."""
    bucket = pace.bucket
    if bucket is None:
        bucket = pace.bucket = TokenBucket(rate, max(1.0, rate / 10))
    elif bucket.rate != rate:
        bucket.retune(rate, max(1.0, rate / 10))
    return bucket


def _publish(pace: Pace, rate: float | None) -> None:
    metrics.TARGET_PACE.labels(*pace.key).set(rate if rate is not None else -1)
    metrics.TARGET_PACE_LIMIT.labels(*pace.key).set(pace.limit or 0)
    metrics.TARGET_WAITING.labels(*pace.key).set(pace.waiting)


def view() -> list[dict[str, object]]:
    """Every pace of this worker, for the status view and the dashboard."""
    if not any(pace.active for pace in _paces.values()):
        return []
    mine = share()
    return [
        {
            "namespace": ns,
            "target": identifier,
            "limit": pace.limit,
            "fleetPace": pace.current if pace.current is not None else pace.limit,
            "pace": pace.rate(mine),
            "share": round(mine, 3),
            "inFlight": pace.in_flight,
            "maxInFlight": pace.max_in_flight,
            "waiting": pace.waiting,
        }
        for (ns, identifier), pace in sorted(_paces.items())
        if pace.active
    ]
