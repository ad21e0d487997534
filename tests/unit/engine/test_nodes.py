"""Hung brokers left alone for a while (:mod:`app.engine.nodes`), on a stand-in client; the
SIGSTOP cluster test (``test_a_node_paused_past_its_session_timeout_then_resumed``) is
the proof on real brokers."""

from __future__ import annotations

import asyncio
from time import monotonic
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka.conn import CloseReason

import app.engine.nodes as nodes_module
from app.engine.nodes import HungNodes, bound_requests, shun_hung_nodes


class Client:
    """What :func:`shun_hung_nodes` uses of an ``AIOKafkaClient``."""

    def __init__(self, brokers: int = 3, timeout_s: float = 0.2) -> None:
        self._request_timeout_ms = int(timeout_s * 1000)
        self._conns: dict[tuple[Any, int], object] = {}
        self.cluster = SimpleNamespace(brokers=lambda: set(range(brokers)))
        self.asked: list[Any] = []
        self.closed: list[tuple[object, Any]] = []
        self.hanging: set[Any] = set()

    async def _get_conn(self, node_id: Any, *, group: int = 0) -> object | None:
        self.asked.append(node_id)
        if node_id in self.hanging:
            await asyncio.sleep(self._request_timeout_ms / 1000)
            return None
        conn = self._conns[(node_id, group)] = object()
        return conn

    def _on_connection_closed(self, conn: object, reason: Any) -> None:
        self.closed.append((conn, reason))


def test_a_node_is_left_alone_until_its_cool_off_ends() -> None:
    nodes = HungNodes(10.0)
    nodes.hung(2, now=100.0)
    assert nodes.shunned(2, known=3, now=105.0)
    assert not nodes.shunned(1, known=3, now=105.0)
    assert not nodes.shunned(2, known=3, now=110.0)
    assert 2 not in nodes.until  # forgotten: a later hang starts a new cool-off


def test_with_one_broker_known_nothing_is_refused() -> None:
    nodes = HungNodes(10.0)
    nodes.hung(0, now=100.0)
    assert not nodes.shunned(0, known=1, now=101.0)


async def test_a_node_whose_request_timed_out_and_that_does_not_answer_is_left_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(nodes_module, "PROBE_S", 0.05)
    client = Client(timeout_s=0.2)
    nodes = shun_hung_nodes(client, cool_off_s=30.0)
    assert nodes.cool_off_s == 0.2  # never longer than the client's own request timeout
    conn = await client._get_conn(1)
    assert conn is not None
    client._on_connection_closed(conn, CloseReason.CONNECTION_TIMEOUT)
    assert client.closed == [(conn, CloseReason.CONNECTION_TIMEOUT)]  # aiokafka's still runs
    client.hanging.add(1)
    began = monotonic()
    assert await client._get_conn(1) is None  # the probe: cut short, not the whole timeout
    assert monotonic() - began < 0.15
    assert await client._get_conn(1) is None  # refused at once
    assert await client._get_conn(2) is not None
    assert client.asked == [1, 1, 2]  # the first connection, the probe; then not again
    client.hanging.clear()
    await asyncio.sleep(0.25)
    assert await client._get_conn(1) is not None


async def test_a_node_whose_request_timed_out_but_that_answers_is_not_left_alone() -> None:
    """A broker holding an ``acks=all`` produce past the deadline (a follower died) is busy,
    not hung: its next connection is made, and it stays in use."""
    client = Client()
    nodes = shun_hung_nodes(client)
    conn = await client._get_conn(1)
    client._on_connection_closed(conn, CloseReason.CONNECTION_TIMEOUT)
    assert nodes.is_suspect(1)
    assert await client._get_conn(1) is not None
    assert not nodes.is_suspect(1)
    assert not nodes.until


async def test_a_connection_closed_for_another_reason_is_no_hang() -> None:
    client = Client()
    shun_hung_nodes(client)
    conn = await client._get_conn(1)
    client._on_connection_closed(conn, CloseReason.CONNECTION_BROKEN)
    assert await client._get_conn(1) is not None


async def test_a_connection_attempt_that_hung_to_its_deadline_counts() -> None:
    client = Client(timeout_s=0.05)
    shun_hung_nodes(client)
    client.hanging.add(1)
    assert await client._get_conn(1) is None  # took the whole timeout
    client.hanging.clear()
    assert await client._get_conn(1) is None  # refused at once
    assert client.asked == [1]


class Conn:
    def __init__(self) -> None:
        self.closed: list[Any] = []

    def close(self, reason: Any) -> None:
        self.closed.append(reason)


class Sending:
    """What :func:`bound_requests` uses of an ``AIOKafkaClient``: a node that never answers."""

    def __init__(self) -> None:
        self.conn = Conn()
        self._conns = {(2, 0): self.conn}

    async def send(self, node_id: Any, request: Any, *, group: int = 0) -> Any:
        await asyncio.sleep(3600)


async def test_a_request_to_a_node_that_never_answers_fails_within_the_bound() -> None:
    from aiokafka.errors import RequestTimedOutError
    from aiokafka.protocol.group import HeartbeatRequest

    client = Sending()
    bound_requests(client, 0.05)
    began = monotonic()
    with pytest.raises(RequestTimedOutError):
        await client.send(2, HeartbeatRequest("g", 1, "m"))
    assert monotonic() - began < 1.0
    assert client.conn.closed == [CloseReason.CONNECTION_TIMEOUT]  # the node becomes suspect


async def test_a_rebalance_request_may_wait_past_the_bound() -> None:
    from aiokafka.protocol.group import JoinGroupRequest

    client = Sending()
    bound_requests(client, 0.05)
    join = JoinGroupRequest("g", 10_000, 60_000, "", "", "consumer", [])
    task = asyncio.ensure_future(client.send(2, join))
    await asyncio.sleep(0.2)
    assert not task.done()  # still waiting, as long as the rebalance takes
    task.cancel()
    assert client.conn.closed == []
