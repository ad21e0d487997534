"""Fixtures of the target tests: the real services, proxies to cut them off, a webhook.

PostgreSQL and Redis are the local stack's (``make stack-up``); when they cannot
be reached the tests fail with that hint, they are not skipped.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from urllib.parse import urlsplit

import pytest

from tests.integration.targets.target_services import (
    PG_URL,
    REDIS_URL,
    STACK_HINT,
    TcpProxy,
    free_port,
    reachable,
)


def _require(url: str, what: str) -> str:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 0
    if not reachable(host, port):
        pytest.fail(f"{what} is not reachable on {host}:{port}: {STACK_HINT}")
    return url


@pytest.fixture(scope="session")
def pg_url() -> str:
    return _require(PG_URL, "PostgreSQL")


@pytest.fixture(scope="session")
def redis_url() -> str:
    return _require(REDIS_URL, "Redis")


@pytest.fixture
async def pg_proxy(pg_url: str) -> AsyncIterator[TcpProxy]:
    proxy = TcpProxy(urlsplit(pg_url).port or 5432)
    await proxy.start()
    yield proxy
    await proxy.stop()


@pytest.fixture
async def redis_proxy(redis_url: str) -> AsyncIterator[TcpProxy]:
    proxy = TcpProxy(urlsplit(redis_url).port or 6379)
    await proxy.start()
    yield proxy
    await proxy.stop()


@pytest.fixture
def throwaway_redis() -> Iterator[int]:
    """A private redis-server on a free port, for tests that upset the server (BUSY, READONLY)."""
    port = free_port()
    argv = f"redis-server --port {port} --bind 127.0.0.1 --appendonly no".split()
    process = subprocess.Popen(
        [*argv, "--save", ""],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not reachable("127.0.0.1", port):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"redis-server on port {port} did not start")
            time.sleep(0.05)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=10)
