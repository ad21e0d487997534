"""A storm of workers coming and going under load: nothing acknowledged is lost.

A producer sends a steady few hundred requests a second for the whole storm.
Every few seconds one worker is stopped - SIGTERM and SIGKILL in turn, the
SIGTERMed one left to shut down on its own while the group rebalances around it
- and another is started, so two to four workers are always running and the
rebalances follow each other closely: graceful and hard stops mixed, workers
joining while others leave. Afterwards every request Kafka acknowledged must be
in the target exactly once, and the group's committed offsets must not stand
past a request that never arrived.

Rows-mode SQL *inserts* into a table without a unique key, so a replay that the
target's ledger did not absorb would show as a double.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import signal
import subprocess
import time

import orjson
import pytest

from tests.integration.harness import (
    Fleet,
    Worker,
    eventually,
    group_lag,
    insert_only,
    list_topics,
    pg_query,
    read_all,
)
from tests.integration.ops.test_scaling import Stream

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.slow]

#: How long the storm blows, and how often a worker is stopped (s).
STORM_S = 90.0
EVERY_S = (8.0, 12.0)
#: The workers' session timeout (s): a SIGKILLed worker's partitions move this long after
#: its death, and the SIGTERM that follows it lands around then - just before or just after
#: the rebalance that hands the dead worker's partitions, and their backlog, to another.
SESSION_S = 10.0
#: Workers running through the storm (a stop is followed by a start), of a fleet of SLOTS.
FEWEST, MOST, SLOTS = 2, 4, 5
#: How long a SIGTERMed worker may take to exit (Kubernetes' default grace is 30 s).
GRACE_S = 30.0


@pytest.mark.timeout(600)
async def test_workers_coming_and_going_lose_nothing_acknowledged(fleet: Fleet) -> None:
    seed = int(os.environ.get("WAL_STORM_SEED") or time.time())
    rng = random.Random(seed)
    fleet.partitions = 8
    fleet.extra_env["WAL_SESSION_TIMEOUT_S"] = str(SESSION_S)
    table = f"st_{fleet.prefix}"
    fleet.apply(insert_only(table))
    slots = [_slot(fleet) for _ in range(SLOTS)]  # each keeps its port and data dir
    for w in slots[:3]:
        w.start()
    for w in slots[:3]:
        await w.ready(timeout=90)

    stream = Stream(fleet.topic("ingest"))
    load = asyncio.create_task(stream.run())
    stopping: list[tuple[Worker, subprocess.Popen[bytes], float]] = []  # SIGTERMed, when
    events: list[str] = []
    started_at = time.monotonic()
    kill = False
    try:
        while time.monotonic() - started_at < STORM_S:
            # after a SIGKILL (kill is False again), the SIGTERM comes as the session ends
            pause = rng.uniform(SESSION_S - 1.5, SESSION_S + 1.5) if not kill else 0.0
            await asyncio.sleep(pause or rng.uniform(*EVERY_S))
            assert not load.done(), "the producer stopped"
            running = [w for w in slots if _alive(w)]
            victim = None
            if len(running) > FEWEST:
                victim = rng.choice(running)
                running.remove(victim)
                if kill:
                    victim.kill9()
                else:
                    assert victim.proc is not None
                    _sigterm(victim)
                    stopping.append((victim, victim.proc, time.monotonic()))
                events.append(f"{_t(started_at)} {'SIGKILL' if kill else 'SIGTERM'} {victim.port}")
                kill = not kill
            # a stopped worker starts again, as it was (once a SIGTERMed one has exited)
            stopped = [w for w in slots if not _alive(w) and w is not victim]
            rng.shuffle(stopped)
            for w in stopped[: rng.choice((1, 1, 2)) if len(running) < MOST else 0]:
                assert w.proc is None or w.proc.returncode in (0, -signal.SIGKILL), w.tail()
                w.start()
                running.append(w)
                events.append(f"{_t(started_at)} start {w.port}")
    finally:
        stream.stop.set()
        await load
    total = stream.sent
    print(f"storm seed {seed}: {total} requests; " + "; ".join(events))

    for w, proc, since in stopping:  # every SIGTERM ended its worker, in time and cleanly
        remaining = max(0.0, GRACE_S - (time.monotonic() - since))
        code = await asyncio.to_thread(_wait, proc, remaining)
        assert code == 0, f"worker {w.port} exited {code} after SIGTERM:\n{w.tail()}"
    for w in slots:
        if _alive(w):
            await w.ready(timeout=120)

    await eventually(lambda: _committed(fleet), timeout=180, what="every offset committed")
    dead = await read_all(fleet.topic("dlq"), timeout=30) if await _exists(fleet, "dlq") else []
    assert dead == [], f"{len(dead)} requests dead-lettered in the storm: {dead[:3]}"
    rows = dict(pg_query(f'SELECT seq, count(*) FROM "{table}" GROUP BY seq'))
    lost = sorted(set(range(total)) - set(rows))
    doubled = sorted(seq for seq, n in rows.items() if n > 1)
    generations = _generations(fleet)
    print(
        f"storm: sent {total}, delivered {len(rows)}, lost {len(lost)}, doubled {len(doubled)}; "
        f"{len(generations)} rebalances (generations {min(generations, default=0)}-"
        f"{max(generations, default=0)})"
    )
    if lost:
        where = await _where(fleet, set(lost))
    assert lost == [], (
        f"{len(lost)} of {total} acknowledged requests never reached the target while the "
        f"group committed past them (seed {seed}); by topic, partition: offsets - {where}"
    )
    assert doubled == [], f"{len(doubled)} requests applied twice (seed {seed}): {doubled[:20]}"
    assert set(rows) == set(range(total))


def _slot(fleet: Fleet) -> Worker:
    """A worker of the fleet, not started: its port and data directory stay its own."""
    w = Worker(fleet.env(), fleet.tmp / f"worker-{len(fleet.workers)}.log")
    fleet.workers.append(w)
    return w


def _alive(w: Worker) -> bool:
    return w.proc is not None and w.proc.poll() is None


def _sigterm(w: Worker) -> None:
    assert w.proc is not None
    with contextlib.suppress(ProcessLookupError):
        os.killpg(w.proc.pid, signal.SIGTERM)


def _wait(proc: subprocess.Popen[bytes], timeout: float) -> int | None:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return None


def _t(since: float) -> str:
    return f"{time.monotonic() - since:5.1f}s"


#: Where a request can be on its way: what the group must have committed to the end.
PIPELINE = ("ingest", "deliver", "delay-1s", "delay-5s", "delay-30s", "delay-2m", "delay-15m")


async def _committed(fleet: Fleet) -> bool:
    lag = await group_lag(fleet.prefix, [fleet.topic(role) for role in PIPELINE])
    return not any(lag.values())


def _generations(fleet: Fleet) -> set[int]:
    """Every group generation a worker of the storm joined (aiokafka logs each join)."""
    found: set[int] = set()
    for w in fleet.workers:
        text = w.log.read_text(errors="replace") if w.log.exists() else ""
        found.update(int(g) for g in re.findall(r"\(generation (\d+)\)", text))
    return found


async def _where(fleet: Fleet, seqs: set[int]) -> dict[str, list[tuple[int, int]]]:
    """Where the requests ``seqs`` are in the ingest and deliver topics: offset runs by
    topic and partition (what a reader of the commit logs needs)."""
    found: dict[str, list[int]] = {}
    for role in (*PIPELINE, "dlq"):
        if not await _exists(fleet, role):
            continue
        for record in await read_all(fleet.topic(role), timeout=60):
            with contextlib.suppress(ValueError, KeyError, TypeError):
                if orjson.loads(record.value)["payload"]["seq"] in seqs:
                    found.setdefault(f"{role}/{record.partition}", []).append(record.offset)
    return {k: _runs(sorted(v)) for k, v in sorted(found.items())}


async def _exists(fleet: Fleet, role: str) -> bool:
    return fleet.topic(role) in await list_topics()


def _runs(seqs: list[int]) -> list[tuple[int, int]]:
    """Consecutive runs of ``seqs`` as (first, last)."""
    out: list[tuple[int, int]] = []
    for s in seqs:
        if out and s == out[-1][1] + 1:
            out[-1] = (out[-1][0], s)
        else:
            out.append((s, s))
    return out
