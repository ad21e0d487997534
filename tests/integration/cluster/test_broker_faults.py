"""Nodes of a three-node cluster (replication factor 3, ``min.insync.replicas`` 2) killed or
paused under a steady stream of writes, or down for a minute while transaction sagas run:
every write lands once, every transaction ends, the worker carries on by itself, and how
long the stream stood still is measured and printed. One module: one cluster start."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from dataclasses import dataclass

import pytest

from tests.integration.cluster.conftest import (
    Cluster,
    Rows,
    report,
    reported,
    requests,
    steady,
)
from tests.integration.harness import (
    Fleet,
    Worker,
    eventually,
    group_lag,
    insert_only,
    pg_count,
    pg_query,
)
from tests.integration.transactions.test_transfers import (
    all_final,
    bank,
    create_ledger,
    ledger_exact,
    plans,
)

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.slow]

TOTAL = 11250
RATE = 250.0  # writes a second: 45 s of traffic, across the fault, a restart 15 s in, and
# the setup around the kill (durability check, readiness report: up to ~30 s on a slow day)
PAUSE_S = 35.0


@dataclass
class Stream:
    """A worker delivering TOTAL writes, produced at RATE, into ``table``."""

    worker: Worker
    table: str
    rows: Rows
    sampling: asyncio.Task[None]
    producing: asyncio.Task[float]


async def stream(fleet: Fleet, cluster: Cluster) -> Stream:
    """The stream started, some 1 000 rows in (mid-stream: produces, fetches, commits in
    flight everywhere)."""
    table = f"cl_{uuid.uuid4().hex[:8]}"
    fleet.apply(insert_only(table))
    worker = await fleet.worker(WAL_BATCH_SIZE="200").ready(timeout=90)
    rows = Rows(table)
    sampling = asyncio.create_task(rows.run())
    values = requests(fleet.prefix, TOTAL)
    producing = asyncio.create_task(steady(fleet.topic("ingest"), values, RATE, cluster.bootstrap))

    async def some_rows() -> bool:
        return rows.now() >= 1000

    await eventually(some_rows, timeout=60, what="some rows")
    return Stream(worker, table, rows, sampling, producing)


async def every_write_once(fleet: Fleet, s: Stream) -> float:
    """Wait for every row and every record committed; assert none lost, none doubled, the
    worker never restarted. The longest a client's send waited for its ack."""
    try:
        worst_ack = await asyncio.wait_for(s.producing, 120)

        async def all_rows() -> bool:
            return pg_count(s.table) >= TOTAL

        await eventually(all_rows, timeout=180, what="every row")

        async def drained() -> bool:
            lag = await group_lag(fleet.prefix, [fleet.topic(r) for r in ("ingest", "deliver")])
            return not any(lag.values())

        await eventually(drained, timeout=60, what="every record committed")
    finally:
        s.sampling.cancel()
    count, distinct = pg_query(f'SELECT count(*), count(DISTINCT seq) FROM "{s.table}"')[0]
    assert (count, distinct) == (TOTAL, TOTAL), f"{count} rows, {distinct} distinct"
    s.worker.assert_alive()  # it recovered by itself
    return worst_ack


async def test_the_leader_of_most_ingest_partitions_killed_and_restarted(
    fleet: Fleet, cluster: Cluster
) -> None:
    s = await stream(fleet, cluster)
    # every topic the fleet and Faust created, changelogs included: 3 replicas, 2 in sync
    topics = await cluster.durability(f"{fleet.prefix}-")
    # 16 since the cancellations table (issue 21): a new topic must be counted here too
    changelogs = ("transactions", "cancellations")
    assert len(topics) == 16, topics
    assert all(f"{fleet.prefix}-{t}-changelog" in topics for t in changelogs), topics
    assert {t: d for t, d in topics.items() if d != ({3}, "2")} == {}
    leader = await cluster.busiest_leader(fleet.topic("ingest"))
    led = sum(1 for n in (await cluster.leaders(fleet.topic("ingest"))).values() if n == leader)
    killed = cluster.signal(leader, signal.SIGKILL)
    at_kill = s.rows.now()
    shown = await reported(s.worker, short=True, timeout=30)
    await asyncio.sleep(max(0.0, killed + 15 - time.monotonic()))  # past every session timeout
    assert s.rows.now() < TOTAL, "the stream was done before the node came back"
    took = await cluster.start_all()
    back = time.monotonic()
    worst_ack = await every_write_once(fleet, s)
    await reported(s.worker, short=False, timeout=90)
    in_sync = time.monotonic() - back
    recovery = s.rows.recovery(killed)
    report(
        f"leader SIGKILL: node {leader} (led {led} of {fleet.partitions} ingest partitions) "
        f"killed at {at_kill} of {TOTAL} rows; readiness showed "
        f"{shown['underReplicated']['count']} partitions under-replicated, "
        f"{shown['offline']['count']} offline; first row after the kill "
        f"{recovery['first_row_s']} s, longest pause {recovery['longest_pause_s']} s; node "
        f"restarted after 15 s (up in {took:.1f} s), all in sync {in_sync:.1f} s later; "
        f"slowest client ack {worst_ack:.1f} s; {TOTAL} rows, none doubled"
    )


async def test_the_group_coordinators_node_killed(fleet: Fleet, cluster: Cluster) -> None:
    """The coordinator moves with its ``__consumer_offsets`` partition: heartbeats, the
    group's membership and its commits go to the new one; the node stays down until every
    record is committed there."""
    s = await stream(fleet, cluster)
    node = await cluster.coordinator(fleet.prefix)
    killed = cluster.signal(node, signal.SIGKILL)
    at_kill = s.rows.now()
    worst_ack = await every_write_once(fleet, s)
    moved_to = await cluster.coordinator(fleet.prefix)
    assert moved_to != node
    recovery = s.rows.recovery(killed)
    await cluster.start_all()
    report(
        f"coordinator SIGKILL: node {node} killed at {at_kill} of {TOTAL} rows, the group "
        f"moved to node {moved_to}; first row after the kill {recovery['first_row_s']} s, "
        f"longest pause {recovery['longest_pause_s']} s; slowest client ack {worst_ack:.1f} s; "
        f"{TOTAL} rows, none doubled, every record committed with the node still down"
    )


async def test_a_node_paused_past_its_session_timeout_then_resumed(
    fleet: Fleet, cluster: Cluster
) -> None:
    """SIGSTOP: connections to the node stay open and nothing answers (a GC pause, a hung
    host), past the brokers' session (9 s) and the group's (10 s); then SIGCONT."""
    s = await stream(fleet, cluster)
    node = await cluster.busiest_leader(fleet.topic("ingest"))
    paused = cluster.signal(node, signal.SIGSTOP)
    at_pause = s.rows.now()
    try:
        await asyncio.sleep(PAUSE_S)
    finally:
        resumed = cluster.signal(node, signal.SIGCONT)
    during = s.rows.recovery(paused, until=resumed)
    worst_ack = await every_write_once(fleet, s)
    after = s.rows.recovery(resumed)

    async def in_sync() -> bool:
        return await cluster.fully_replicated(f"{fleet.prefix}-")

    await eventually(in_sync, timeout=90, interval=1.0, what="the paused node in sync again")
    report(
        f"node SIGSTOP: node {node} paused {PAUSE_S:.0f} s at {at_pause} of {TOTAL} rows; "
        f"first row {during['first_row_s']} s after the pause (longest pause while it was "
        f"paused {during['longest_pause_s']} s); after SIGCONT longest pause "
        f"{after['longest_pause_s']} s; slowest client ack {worst_ack:.1f} s; {TOTAL} rows, "
        "none doubled"
    )
    assert during["first_row_s"] < PAUSE_S - 5, "the stream waited for the paused node"


# -- transactions ------------------------------------------------------------------------

TRANSFERS = 200
DOWN_S = 60.0


@pytest.mark.timeout(420)
async def test_transfers_all_end_with_a_node_down_for_a_minute(
    fleet: Fleet, cluster: Cluster
) -> None:
    table = f"l_{fleet.prefix}"
    create_ledger(table)
    fleet.apply(bank(table))
    worker = await fleet.worker().ready(timeout=90)
    transfers = plans(fleet.prefix, TRANSFERS)
    ingest = fleet.topic("ingest")
    await steady(ingest, transfers[: TRANSFERS // 2], 50.0, cluster.bootstrap)

    async def some_done() -> bool:
        return pg_count(table) >= 50

    await eventually(some_done, timeout=60, what="first entries")
    # the node leading most of the transactions' events: sagas mid-way lose their leader
    node = await cluster.busiest_leader(fleet.topic("txn-events"))
    killed = cluster.signal(node, signal.SIGKILL)
    at_kill = pg_count(table)
    # the second half begins while the node is down
    worst_ack = await steady(ingest, transfers[TRANSFERS // 2 :], 50.0, cluster.bootstrap)
    entries_down = pg_count(table)
    # with two nodes of three every partition takes writes: the sagas end without the third
    counts = await all_final(
        worker, fleet.prefix, TRANSFERS, timeout=killed + DOWN_S - time.monotonic()
    )
    ended = time.monotonic() - killed
    assert counts == {"completed": TRANSFERS - TRANSFERS // 10, "compensated": TRANSFERS // 10}, (
        counts
    )
    await asyncio.sleep(max(0.0, killed + DOWN_S - time.monotonic()))
    await cluster.start_all()
    assert await all_final(worker, fleet.prefix, TRANSFERS, timeout=60) == counts

    async def drained() -> bool:
        topics = [fleet.topic(t) for t in ("ingest", "deliver", "txn-events")]
        return not any((await group_lag(fleet.prefix, topics)).values())

    await eventually(drained, timeout=60, what="every topic committed to its end")
    entries = ledger_exact(table, TRANSFERS)
    worker.assert_alive()
    report(
        f"transactions, node {node} (leading most txn-events partitions) down {DOWN_S:.0f} s: "
        f"{at_kill} ledger entries at the kill, {entries_down} once all {TRANSFERS} transfers were "
        f"sent (slowest client ack {worst_ack:.1f} s); every transaction ended {ended:.1f} s "
        f"after the kill, the node still down: {counts}, and stayed so once it was back; "
        f"{len(entries)} entries, each once, money balanced"
    )
