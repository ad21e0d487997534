"""``metrics.observe_many``: a batch of observations, exposed as observing each would."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from app import metrics

BUCKETS = (0.005, 0.01, 0.1, 1, 10)
#: On, below, between and past the bounds (observe() counts an amount in the first
#: bucket whose bound is >= it), and zero.
AMOUNTS = [0.0, 0.005, 0.0051, 0.01, 0.05, 0.1, 0.10001, 1, 3.5, 10, 11, 1e9, 0.002]


def _histogram() -> tuple[CollectorRegistry, Histogram]:
    registry = CollectorRegistry()
    histogram = Histogram("h", "h", ["ns"], buckets=BUCKETS, registry=registry)
    return registry, histogram


def _exposed(registry: CollectorRegistry) -> list[str]:
    lines = generate_latest(registry).decode().splitlines()
    return [line for line in lines if "created" not in line]


def test_observe_many_exposes_what_observing_each_does() -> None:
    each, one_by_one = _histogram()
    many, at_once = _histogram()
    for amount in AMOUNTS:
        one_by_one.labels("a").observe(amount)
    child = at_once.labels("a")
    # the fast path: prometheus-client's private buckets are where this code reads them
    assert len(child._upper_bounds) == len(child._buckets) == len(BUCKETS) + 1  # type: ignore[attr-defined]
    metrics.observe_many(child, AMOUNTS)
    metrics.observe_many(child, [])
    assert _exposed(each) == _exposed(many)
    assert 'h_count{ns="a"} 13.0' in _exposed(many)


def test_without_the_private_buckets_it_observes_each() -> None:
    seen: list[float] = []

    class Plain:
        def observe(self, amount: float) -> None:
            seen.append(amount)

    metrics.observe_many(Plain(), AMOUNTS)
    assert seen == AMOUNTS
