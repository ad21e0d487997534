"""Fixtures for operating a fleet: waiting until its partition assignment has settled."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest

from tests.integration.harness import Fleet, Worker, eventually

#: Topics every worker consumes; each of their partitions must be held exactly once.
CORE_ROLES = ("ingest", "deliver", "stats", "delay-1s")

Settled = Callable[..., Awaitable[dict[str, Any]]]


def coverage_problems(data: dict[str, Any], partitions: int) -> list[str]:
    """Why ``GET /wal/fleet?all=1`` does not show every partition held by exactly one worker."""
    problems = []
    everything = {str(p) for p in range(partitions)}
    for topic, holders in data["assignment"].items():
        if set(holders) != everything:
            problems.append(f"{topic}: partitions {sorted(holders)} held, not all {partitions}")
        problems += [f"{topic}/{p} held by {urls}" for p, urls in holders.items() if len(urls) != 1]
    return problems


@pytest.fixture
def settled(fleet: Fleet) -> Settled:
    """``await settled(via, n)``: the fleet view once n ready workers hold each partition once."""

    async def wait(via: Worker, members: int, timeout: float = 120.0) -> dict[str, Any]:
        last: list[Any] = []

        async def check() -> dict[str, Any] | None:
            try:
                async with httpx.AsyncClient(timeout=5.0) as client:
                    data = (await client.get(f"{via.url}/wal/fleet", params={"all": "1"})).json()
            except (httpx.HTTPError, ValueError) as exc:
                last[:] = [repr(exc)]
                return None
            workers = data["workers"]
            problems = coverage_problems(data, fleet.partitions)
            problems += [
                f"{w['url']}: {w.get('error') or 'not ready'}"
                for w in workers
                if w.get("error") or not w.get("ready") or w.get("rebalancing")
            ]
            if len(workers) != members:
                problems.append(f"{len(workers)} workers, not {members}")
            if {m["url"] for m in data["members"]} != {w["url"] for w in workers}:
                problems.append("the assignor's members are not the workers that answered")
            missing = [r for r in CORE_ROLES if fleet.topic(r) not in data["assignment"]]
            problems += [f"nobody consumes {fleet.topic(r)}" for r in missing]
            last[:] = problems
            return None if problems else data

        try:
            return await eventually(check, timeout=timeout, interval=0.5, what="settled")
        except AssertionError:
            raise AssertionError(f"fleet of {members} never settled: {last}") from None

    return wait
