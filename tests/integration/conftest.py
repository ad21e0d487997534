"""Fixtures for tests against the real stack (``make stack-up``: Kafka, PostgreSQL, Redis)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from app.ops import stack
from app.ops.services import StackError
from app.settings import Settings
from tests.integration.harness import Fleet, delete_topics
from tests.integration.targets.target_services import Webhook

SERVICES = {"kafka": 9092, "postgres": 5432, "redis": 6379}
#: Private brokers listen below Linux's ephemeral range (32768-60999), where no
#: outgoing connection is given a local port between our check and Kafka's bind.
PRIVATE_PORTS = range(20_000, 32_000, 2)
PRIVATE_TRIES = 3


def free_run(count: int = 2) -> int:
    """A port that is free, with the ``count - 1`` after it free too (each Kafka node
    listens on two: clients, and the next one for its controller)."""
    for port in random.sample(PRIVATE_PORTS, 50):
        try:
            with contextlib.ExitStack() as sockets:
                for p in range(port, port + count):
                    sockets.enter_context(socket.socket()).bind(("127.0.0.1", p))
                return port
        except OSError:
            continue
    raise RuntimeError(f"no {count} free ports next to each other in {PRIVATE_PORTS}")


def private_stack(root: Path, brokers: int = 1) -> Settings:
    """The local stack's Kafka (one node, or a cluster) of a test's own, under ``root``, on
    free ports (PostgreSQL and Redis: the shared ones, reused)."""
    for attempt in range(1, PRIVATE_TRIES + 1):
        port = free_run(2 * brokers)
        settings = Settings(
            stack_dir=root / "stack", broker=f"kafka://127.0.0.1:{port}", stack_brokers=brokers
        )
        try:
            stack.up(settings)
            return settings
        except StackError:  # a port taken between the check and the bind: fresh ports
            stack.down(settings)
            shutil.rmtree(root / "stack", ignore_errors=True)
            if attempt == PRIVATE_TRIES:
                raise
    raise AssertionError("unreachable")


def thaw_and_stop(settings: Settings) -> None:
    """SIGCONT every node a test may have paused, then stop the stack's Kafka."""
    for s in stack.status(settings):
        if s.name.startswith("kafka") and isinstance(s.pid, int):
            os.kill(s.pid, signal.SIGCONT)
    stack.down(settings)


@pytest.fixture(scope="session", autouse=True)
def stack_is_up() -> None:
    """Fail (never skip) when a service of the local stack is not there."""
    down = []
    for name, port in SERVICES.items():
        with socket.socket() as s:
            s.settimeout(1.0)
            if s.connect_ex(("127.0.0.1", port)) != 0:
                down.append(f"{name} (127.0.0.1:{port})")
    if down:
        pytest.fail(
            f"local stack not running: {', '.join(down)}; run `make stack-up`", pytrace=False
        )


@pytest.fixture
def fleet(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Fleet]:
    """A fleet of this test's own (topic prefix, group); its workers stop at the end, and its
    topics go (a suite left ~2 300 partitions on the local broker, slowing what ran next)."""
    f = Fleet(tmp_path)
    yield f
    f.stop_all()
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        for w in f.workers:
            print(f"--- {w.log} ---\n{w.tail()}")
    try:
        asyncio.run(delete_topics(f"{f.prefix}-"))
    except Exception as exc:  # the broker is the test's subject, not this cleanup's
        print(f"could not delete the topics of {f.prefix}: {exc!r}")


@pytest.fixture
def private_broker(tmp_path: Path) -> Iterator[Settings]:
    """A Kafka broker of this test's own, which it may freeze without harming the others."""
    settings = private_stack(tmp_path)
    try:
        yield settings
    finally:
        thaw_and_stop(settings)


@pytest.fixture
def own_broker(fleet: Fleet, private_broker: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """:func:`private_broker`, with this test's fleet and the harness's clients on it."""
    monkeypatch.setattr(
        "tests.integration.harness.BOOTSTRAP", private_broker.broker.removeprefix("kafka://")
    )
    fleet.extra_env["WAL_BROKER"] = private_broker.broker
    return private_broker


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture
async def webhook() -> AsyncIterator[Webhook]:
    hook = Webhook()
    await hook.start()
    yield hook
    await hook.stop()
