"""Brokers that hang are left alone for a while, not reconnected to again and again.

A broker that hangs rather than dies (SIGSTOP, a long GC pause, a network partition
that leaves connections open) accepts TCP connections - the kernel completes them - and
then answers nothing. aiokafka closes a connection whose request timed out, and the next
request for that node opens a new one, which takes a whole request timeout more to fail
(the ApiVersions handshake never answers). Its client makes connections one at a time,
under one lock, and picks the node for a metadata request at random: one hung node costs
every request of the client that needs a new connection, and the metadata that would
route around the node, one timeout after another. In the SIGSTOP test that was 30 s of no
progress for a node the cluster had fenced, and moved every partition off, after 9 s.

A timed-out request alone does not tell a hung broker from a busy one: an ``acks=all``
produce waits on the broker while a dead follower is dropped from the in-sync replicas,
and can outlast the client's deadline on a broker that answers anything else at once.
So :func:`shun_hung_nodes` changes one client this way:

* a node whose request timed out is *suspect*: the next connection to it must be made
  within :data:`PROBE_S` (a broker that is alive answers the handshake in milliseconds);
* a node that fails that, or whose connection attempt took the whole request timeout,
  *hung*: no connection to it for :data:`COOL_OFF_S` (the client's request timeout, when
  that is shorter). Asked for one meanwhile, the client answers as for a node it cannot
  reach: metadata comes from another node, and a request to it fails with
  ``NodeNotReadyError`` at once, to be retried after a metadata refresh, by then routed
  to the partitions' new leaders.

With one broker known there is nothing to route to, and nothing is refused or cut short.
"""

from __future__ import annotations

import asyncio
import logging
from time import monotonic
from typing import Any

from aiokafka.conn import CloseReason
from aiokafka.errors import RequestTimedOutError
from aiokafka.protocol.group import JoinGroupRequest, SyncGroupRequest

log = logging.getLogger("wal.kafka")

#: How long a hung node is not connected to again (seconds): longer than brokers take to
#: fence a node that stopped heartbeating (9 s by default).
COOL_OFF_S = 15.0
#: How long a new connection to a suspect node may take before the node counts as hung.
PROBE_S = 3.0
#: A connection attempt that fails after this share of the request timeout hung.
HUNG_SHARE = 0.9


class HungNodes:
    """The nodes of one client that timed out (suspect) or hung lately, and until when."""

    def __init__(self, cool_off_s: float) -> None:
        self.cool_off_s = cool_off_s
        self.suspect: dict[Any, float] = {}
        self.until: dict[Any, float] = {}

    def timed_out(self, node_id: Any, now: float | None = None) -> None:
        """A request to ``node_id`` got no answer in time: its next connection is a probe."""
        self.suspect[node_id] = (monotonic() if now is None else now) + self.cool_off_s

    def is_suspect(self, node_id: Any, now: float | None = None) -> bool:
        return self.suspect.get(node_id, 0.0) > (monotonic() if now is None else now)

    def answered(self, node_id: Any) -> None:
        self.suspect.pop(node_id, None)

    def hung(self, node_id: Any, now: float | None = None) -> None:
        at = monotonic() if now is None else now
        self.suspect.pop(node_id, None)
        if node_id not in self.until or self.until[node_id] <= at:
            log.warning(
                "Kafka node %s does not answer: not connecting to it for %.0f s",
                node_id,
                self.cool_off_s,
            )
        self.until[node_id] = at + self.cool_off_s

    def shunned(self, node_id: Any, known: int, now: float | None = None) -> bool:
        """Whether to refuse a new connection to ``node_id`` (``known`` brokers in metadata)."""
        until = self.until.get(node_id)
        if until is None:
            return False
        if until <= (monotonic() if now is None else now):
            del self.until[node_id]
            return False
        return known > 1


def shun_hung_nodes(client: Any, cool_off_s: float = COOL_OFF_S) -> HungNodes:
    """Make ``client`` (an ``aiokafka.client.AIOKafkaClient``) leave hung nodes alone."""
    timeout_s = client._request_timeout_ms / 1000
    nodes = HungNodes(min(cool_off_s, timeout_s))
    get_conn = client._get_conn
    on_closed = client._on_connection_closed

    async def _get_conn(node_id: Any, **kw: Any) -> Any:
        known = len(client.cluster.brokers())
        if nodes.shunned(node_id, known):
            return None  # as for a node it cannot reach: NodeNotReadyError, metadata elsewhere
        if known > 1 and nodes.is_suspect(node_id):
            try:  # a connection it has is returned at once; a new one is the probe
                conn = await asyncio.wait_for(get_conn(node_id, **kw), PROBE_S)
            except TimeoutError:  # connect() closes what it opened when cancelled
                nodes.hung(node_id)
                return None
            if conn is not None:
                nodes.answered(node_id)
            return conn
        began = monotonic()
        conn = await get_conn(node_id, **kw)
        if conn is None and monotonic() - began >= HUNG_SHARE * timeout_s:
            nodes.hung(node_id)  # connected, then the handshake never answered
        return conn

    def _on_connection_closed(conn: Any, reason: Any) -> None:
        if reason == CloseReason.CONNECTION_TIMEOUT:
            for (node_id, _group), open_ in list(client._conns.items()):
                if open_ is conn:
                    nodes.timed_out(node_id)
        on_closed(conn, reason)

    client._get_conn = _get_conn
    client._on_connection_closed = _on_connection_closed
    return nodes


#: Requests a broker may rightly hold for as long as a rebalance takes.
REBALANCE_REQUESTS = (JoinGroupRequest, SyncGroupRequest)


def bound_requests(client: Any, timeout_s: float) -> None:
    """Make every request of ``client`` but a rebalance's own fail after ``timeout_s``.

    Faust's consumer client waits 90 s for any answer (``broker_request_timeout``:
    a JoinGroup may wait for the whole rebalance). Its other requests - heartbeats,
    offset commits, coordinator lookups, metadata, fetches - then waited as long on a
    hung broker: in the SIGSTOP cluster test a coordinator lookup sent to the paused
    node held Faust's consumer thread, whose calls run one at a time, and with it
    every fetch, for the whole 35 s pause. Bounded, a request that times out closes
    its connection as aiokafka's own timeout does (the node becomes suspect:
    :func:`shun_hung_nodes`) and fails with ``RequestTimedOutError``, which its
    caller retries, elsewhere once the node is left alone.
    """
    send = client.send

    async def bounded_send(node_id: Any, request: Any, **kw: Any) -> Any:
        if isinstance(request, REBALANCE_REQUESTS):
            return await send(node_id, request, **kw)
        try:
            return await asyncio.wait_for(send(node_id, request, **kw), timeout_s)
        except TimeoutError as exc:
            conn = client._conns.get((node_id, kw.get("group", 0)))
            if conn is not None:
                conn.close(reason=CloseReason.CONNECTION_TIMEOUT)
            raise RequestTimedOutError() from exc

    client.send = bounded_send
