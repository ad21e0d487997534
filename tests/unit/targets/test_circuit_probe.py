"""Probing an open circuit: the breaker's schedule on a fake clock, the guard's probe task
on a real one, and each target's ``probe()`` against what needs no service."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Sequence
from typing import Any

import httpx
import pytest

from app.errors import ConfigError
from app.settings import Settings
from targets.base import DELIVERED, Outcome, Target, Write, retryable
from targets.circuit import BREAKERS, CircuitBreaker, GuardedTarget, guard
from targets.http import HttpTarget
from targets.redis import RedisTarget
from targets.sql import SqlTarget

DOWN = retryable("TARGET_UNAVAILABLE", "connection refused")


def free_port() -> int:
    """A loopback port nothing listens on (connections to it are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def opened(clock: Clock, **options: Any) -> CircuitBreaker:
    cb = CircuitBreaker(clock=clock, **{"threshold": 1, "cooldown": 30, **options})
    for _ in range(cb.threshold):
        cb.record([DOWN])
    assert cb.state == "open"
    return cb


def test_probes_are_due_every_interval_and_a_failed_one_doubles_it_up_to_twice() -> None:
    clock = Clock()
    cb = opened(clock, probe_interval=2)
    waits = []
    for _ in range(4):
        waits.append(cb.check_in())
        clock.now += cb.check_in() or 0
        assert cb.check_in() == 0
        cb.probed(DOWN)
        assert cb.state == "open"
    assert waits == [2, 4, 4, 4]
    assert cb.retry_in() == 30 - 14  # turned-away writes still come back after the cooldown


def test_a_probe_that_finds_the_target_up_closes_the_circuit_at_once() -> None:
    clock = Clock()
    cb = opened(clock, threshold=3, probe_interval=2)
    clock.now += 2
    cb.probed(DELIVERED)
    assert cb.state == "closed" and cb.allow()
    assert cb.check_in() is None and cb.retry_in() == 0
    assert cb.snapshot()["opened_at"] is None


def test_an_answer_that_refuses_counts_as_up_like_a_permanent_outcome() -> None:
    clock = Clock()
    cb = opened(clock)
    cb.probed(Outcome("permanent", "TARGET_REJECTED", "HTTP 405"))
    assert cb.state == "closed"


def test_after_a_probe_one_failed_call_reopens_and_probes_back_off_to_max_cooldown() -> None:
    clock = Clock()
    cb = opened(clock, threshold=3, cooldown=5, probe_interval=2, max_cooldown=10)
    waits = []
    for _ in range(4):
        clock.now += cb.check_in() or 0
        cb.probed(DELIVERED)  # it answers probes...
        assert cb.state == "closed"
        cb.record([DOWN])  # ...but fails real writes: reopened by one failure, not three
        assert cb.state == "open"
        waits.append(cb.check_in())
    assert waits == [4, 8, 10, 10]
    clock.now += 10
    cb.probed(DELIVERED)
    cb.record([DELIVERED])  # a real success ends the probation and resets the waits
    for _ in range(2):
        cb.record([DOWN])
        assert cb.state == "closed"
    cb.record([DOWN])
    assert cb.state == "open" and cb.check_in() == 2 and cb.retry_in() == 5


def test_a_trial_call_that_succeeds_stops_the_probes() -> None:
    clock = Clock()
    cb = opened(clock, cooldown=5)
    clock.now += 5
    assert cb.allow()
    cb.record([DELIVERED])
    assert cb.check_in() is None
    cb.probed(DOWN)  # a probe that was in flight changes nothing
    assert cb.state == "closed"


def test_snapshot_shows_the_next_probe_once_the_target_probes() -> None:
    clock = Clock()
    cb = opened(clock, probe_interval=2)
    assert "probe_wait_s" not in cb.snapshot()
    clock.now += 2
    cb.probed(DOWN)
    snapshot = cb.snapshot()
    assert snapshot["next_probe_at"] == 1_006.0 and snapshot["probe_wait_s"] == 4
    assert snapshot["state"] == "open" and snapshot["cooldown_s"] == 30


class Probed(Target):
    """A target whose deliveries and probes answer what the test scripts."""

    kind = "probed"

    def __init__(self, probes: list[Outcome | None] | None = None) -> None:
        super().__init__("db", {}, Settings())
        self.up = False
        self.probes = probes  # None: no probe
        self.probed = 0
        self.calls = 0
        self.hang = asyncio.Event()
        self.closed = False

    async def deliver(self, batch: Sequence[Write]) -> list[Outcome]:
        self.calls += 1
        return [DELIVERED if self.up else DOWN] * len(batch)

    async def probe(self) -> Outcome | None:
        self.probed += 1
        if self.probes is None:
            return None
        if not self.probes:
            await self.hang.wait()
        outcome = self.probes.pop(0)
        if isinstance(outcome, Outcome) and outcome.message == "raise":
            raise RuntimeError("a broken probe")
        return outcome

    async def close(self) -> None:
        self.closed = True


BATCH = [Write(id="1", namespace="orders", payload={})]


def probe_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("probe ") and not t.done()]


async def until(check: Any, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


async def test_an_open_circuit_is_probed_and_closes_when_the_target_answers() -> None:
    inner = Probed([DOWN, retryable("TARGET_ERROR", "raise"), DOWN, DELIVERED])
    guarded = guard("orders", inner, threshold=1, cooldown=60, probe_interval=0.01)
    assert (await guarded.deliver(BATCH))[0] == DOWN
    assert guarded.breaker.state == "open" and len(probe_tasks()) == 1
    circuit_open = await guarded.deliver(BATCH)
    assert circuit_open[0].message == "circuit open" and inner.calls == 1
    await until(lambda: guarded.breaker.state == "closed")
    assert inner.probed == 4  # a probe that raised was a failed probe, not the end
    inner.up = True
    assert await guarded.deliver(BATCH) == [DELIVERED] and inner.calls == 2
    await until(lambda: not probe_tasks())
    await guarded.close()


async def test_a_target_without_a_probe_waits_for_its_trial_call() -> None:
    inner = Probed(None)
    guarded = guard("orders", inner, threshold=1, cooldown=0.2, probe_interval=0.01)
    await guarded.deliver(BATCH)
    await until(lambda: inner.probed == 1 and not probe_tasks())
    assert guarded.breaker.state == "open"
    await guarded.deliver(BATCH)  # turned away; asks for no probe again
    assert inner.probed == 1 and not probe_tasks()
    inner.up = True
    await until(lambda: guarded.breaker.state == "half_open")
    assert await guarded.deliver(BATCH) == [DELIVERED]
    assert guarded.breaker.state == "closed"
    await guarded.close()


async def test_close_ends_a_probe_in_flight() -> None:
    inner = Probed([])  # the probe hangs
    guarded = guard("orders", inner, threshold=1, probe_interval=0.01)
    await guarded.deliver(BATCH)
    await until(lambda: inner.probed == 1)
    assert len(probe_tasks()) == 1
    await guarded.close()
    assert not probe_tasks() and inner.closed and "orders/db" not in BREAKERS
    guarded.breaker.record([DOWN])  # a late failure after close starts nothing
    assert not probe_tasks()


async def test_a_circuit_opened_by_the_caller_is_probed_too() -> None:
    """agents/deliver records a call it abandoned at its deadline itself."""
    inner = Probed([DELIVERED])
    guarded = GuardedTarget("orders/db", inner, CircuitBreaker(threshold=1, probe_interval=0.01))
    guarded.breaker.record([DOWN])
    await until(lambda: guarded.breaker.state == "closed")
    assert inner.probed == 1
    await guarded.close()


def test_guard_spaces_probes_by_the_setting() -> None:
    inner = Probed()
    inner.settings = Settings(circuit_probe_ms=500)
    assert guard("orders", inner).breaker.probe_interval == 0.5
    assert guard("orders", inner, probe_interval=3).breaker.probe_interval == 3
    BREAKERS.clear()


# -- each target's probe, against what needs no service --------------------------


async def test_sql_probe_answers_up_on_sqlite_and_down_on_a_refused_port(tmp_path: Any) -> None:
    up = SqlTarget("db", {"url": f"sqlite+aiosqlite:///{tmp_path / 'p.db'}"}, Settings())
    down = SqlTarget(
        "db", {"url": f"postgresql+psycopg://wal:secret@127.0.0.1:{free_port()}/wal"}, Settings()
    )
    for target in (up, down):
        await target.open()
    try:
        assert await up.probe() == DELIVERED
        started = time.monotonic()
        outcome = await down.probe()
        assert time.monotonic() - started < 5
        assert outcome.status == "retryable" and outcome.code == "TARGET_UNAVAILABLE"
        assert "secret" not in outcome.message
    finally:
        for target in (up, down):
            await target.close()


async def test_redis_probe_is_down_on_a_refused_port() -> None:
    target = RedisTarget("cache", {"url": f"redis://127.0.0.1:{free_port()}/0"}, Settings())
    await target.open()
    try:
        outcome = await target.probe()
        assert outcome.status == "retryable" and outcome.code == "TARGET_UNAVAILABLE"
    finally:
        await target.close()


async def http_probe(probe: Any, answer: int) -> tuple[Outcome | None, list[httpx.Request]]:
    config = {"url": "https://hooks.example/in/x?token=1", "headers": {"Authorization": "k"}}
    target = HttpTarget(
        "hook", {**config, **({"probe": probe} if probe is not None else {})}, Settings()
    )
    await target.open()
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(answer)

    assert target._client is not None
    await target._client.aclose()
    target._client = httpx.AsyncClient(
        transport=httpx.MockTransport(handler), headers={"Authorization": "k"}
    )
    try:
        return await target.probe(), seen
    finally:
        await target.close()


async def test_http_probe_only_where_configured() -> None:
    assert await http_probe(None, 200) == (None, [])
    outcome, seen = await http_probe({"path": "/health?deep=0"}, 204)
    assert outcome == DELIVERED
    assert [(r.method, str(r.url)) for r in seen] == [
        ("HEAD", "https://hooks.example/health?deep=0")
    ]
    assert seen[0].headers["Authorization"] == "k"
    outcome, seen = await http_probe({"method": "get"}, 405)  # it answered: it is up
    assert outcome == DELIVERED and seen[0].method == "GET"
    assert str(seen[0].url) == "https://hooks.example/in/x?token=1"
    outcome, _ = await http_probe({"url": "https://hooks.example/ping"}, 503)
    assert outcome is not None and outcome.status == "retryable"


@pytest.mark.parametrize(
    "probe",
    [
        {"method": "POST"},
        {"path": "health"},
        {"url": "https://elsewhere.example/"},
        {"url": "https://hooks.example/", "path": "/x"},
        {"timeoutMs": 0},
        "yes",
    ],
)
async def test_http_probe_config_that_can_never_work_fails_open(probe: Any) -> None:
    config = {"url": "https://hooks.example/in", "allowedHosts": ["hooks.example"], "probe": probe}
    with pytest.raises(ConfigError):
        await HttpTarget("hook", config, Settings()).open()


def test_a_circuit_opened_outside_a_loop_is_probed_from_the_next_turned_away_call() -> None:
    inner = Probed([DELIVERED])
    guarded = guard("orders", inner, threshold=1, probe_interval=0.01)
    guarded.breaker.record([DOWN])  # no running loop: no task can start here

    async def turned_away_then_probed() -> None:
        assert not probe_tasks()
        assert (await guarded.deliver(BATCH))[0].message == "circuit open"
        await until(lambda: guarded.breaker.state == "closed")
        await guarded.close()

    asyncio.run(turned_away_then_probed())
    assert inner.probed == 1


async def test_probes_give_up_on_a_server_that_never_answers() -> None:
    held: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    sql = SqlTarget("db", {"url": f"postgresql+psycopg://wal:wal@127.0.0.1:{port}/wal"}, Settings())
    cache = RedisTarget("cache", {"url": f"redis://127.0.0.1:{port}/0"}, Settings())
    try:
        for target in (sql, cache):
            await target.open()
            started = time.monotonic()
            outcome = await target.probe()
            assert time.monotonic() - started < 4
            assert outcome.status == "retryable" and "within 2 s" in outcome.message
        assert sql.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    finally:
        for target in (sql, cache):
            await target.close()
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()
