"""Targets at their own pace: a webhook limited to 50 writes/s by two workers, and a
webhook that throttles - every write arrives once, nothing retried or dead-lettered for
the limit, memory flat, and another namespace on the same workers at its usual speed."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from typing import Any

import httpx
import psutil
import pytest

from tests.integration.harness import Fleet, Worker, eventually, pg_query, produce, request, totals
from tests.integration.targets.target_services import Webhook

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.slow]

LIMIT, WINDOW_S, RUN_S = 50, 5, 30


def paced(hook: Webhook, **limits: Any) -> dict[str, Any]:
    return {
        "name": "paced",
        "targets": [
            {
                "identifier": "hook",
                "type": "http",
                "config": {"url": hook.url()},
                "limits": limits,
            }
        ],
    }


def journal(table: str) -> dict[str, Any]:
    return {
        "name": "free",
        "targets": [{"identifier": "pg", "type": "sql", "config": {"table": table}}],
    }


def busiest_window(arrivals: list[float], window_s: float) -> int:
    """The most arrivals in any ``window_s`` seconds."""
    arrivals = sorted(arrivals)
    most, start = 0, 0
    for end, at in enumerate(arrivals):
        while at - arrivals[start] > window_s:
            start += 1
        most = max(most, end - start + 1)
    return most


def rss_mib(worker: Worker) -> float:
    assert worker.proc is not None
    return psutil.Process(worker.proc.pid).memory_info().rss / 2**20


async def paces(worker: Worker) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(timeout=5) as client:
        return list((await client.get(f"{worker.url}/wal/fleet")).json().get("paces") or [])


async def test_a_limited_webhook_gets_at_most_its_pace_and_every_write_once(
    fleet: Fleet, webhook: Webhook
) -> None:
    hook = webhook
    table = f"pf_{fleet.prefix}"
    fleet.apply(paced(hook, maxPerSecond=LIMIT), journal(table))
    one, two = fleet.worker(), fleet.worker()
    await one.ready()
    await two.ready()
    rss_start = [rss_mib(w) for w in (one, two)]

    run = uuid.uuid4().hex[:8]
    total = LIMIT * RUN_S  # thirty seconds of work at the limit, all sent at once
    await produce(
        fleet.topic("ingest"),
        [request("paced", {"n": n}, messageId=f"{run}-{n}") for n in range(total)],
    )
    started = time.time()
    free_sent: dict[int, float] = {}
    rss_peak = list(rss_start)
    waiting_seen = 0

    async def free_traffic() -> None:  # another namespace, 20 writes a second meanwhile
        n = 0
        while time.time() - started < RUN_S - 5:
            free_sent[n] = time.time()
            await produce(fleet.topic("ingest"), [request("free", {"n": n, "at": free_sent[n]})])
            n += 1
            await asyncio.sleep(0.05)

    async def all_arrived() -> bool | None:
        nonlocal waiting_seen
        for i, w in enumerate((one, two)):
            rss_peak[i] = max(rss_peak[i], rss_mib(w))
        waiting_seen = max(waiting_seen, sum(p["waiting"] for p in await paces(one)))
        return True if sum(r.ok for r in hook.received) >= total else None

    traffic = asyncio.ensure_future(free_traffic())
    await eventually(all_arrived, timeout=RUN_S * 3, interval=1.0, what="every paced write")
    await traffic
    took = time.time() - started

    ok = [r for r in hook.received if r.ok]
    ids = Counter(r.headers.get("Idempotency-Key") for r in ok)
    assert len(ids) == total and set(ids.values()) == {1}, "a write arrived twice or not at all"
    assert len(hook.received) == total, "a request was refused and sent again"
    busiest = busiest_window([r.at for r in ok], WINDOW_S)
    print(
        f"{total} writes limited to {LIMIT}/s took {took:.1f} s; busiest {WINDOW_S} s window "
        f"{busiest} ({busiest / WINDOW_S:.1f}/s); waiting at most {waiting_seen}; RSS "
        f"{[round(r) for r in rss_start]} -> peak {[round(r) for r in rss_peak]} MiB"
    )
    assert busiest <= WINDOW_S * LIMIT * 1.1, busiest
    assert waiting_seen > 0, "no write ever waited: the limit was not what held them back"
    counted = await totals(one, "paced", accepted=total, delivered=total)
    assert counted["retried"] == counted["dead_lettered"] == 0, counted
    assert all(peak - start < 40 for start, peak in zip(rss_start, rss_peak, strict=True))

    # the other namespace kept its usual latency while the paced one waited
    found = pg_query(f"SELECT (payload->>'at')::float, delivered_at_ms FROM \"{table}\"")
    assert len(found) == len(free_sent)
    lateness = sorted(at_ms / 1000 - sent for sent, at_ms in found)
    p99 = lateness[int(len(lateness) * 0.99)]
    print(
        f"free namespace: {len(found)} writes, p50 {lateness[len(lateness) // 2]:.3f} s, "
        f"p99 {p99:.3f} s"
    )
    assert p99 < 1.0, p99


async def test_a_throttling_webhook_sets_the_pace_and_gets_every_write_once(
    fleet: Fleet, webhook: Webhook
) -> None:
    hook = webhook
    capacity = 30  # the webhook answers 429 past 30 requests in a second
    arrivals: list[float] = []

    def over_capacity(body: Any) -> int | None:
        now = time.time()
        arrivals.append(now)
        recent = sum(1 for at in arrivals[-200:] if now - at < 1.0)
        return 429 if recent > capacity else None

    hook.fail_if = over_capacity
    fleet.apply(paced(hook))  # no limit: the pace is learned from the 429s
    worker = await fleet.worker().ready()
    run, total = uuid.uuid4().hex[:8], 900
    await produce(
        fleet.topic("ingest"),
        [request("paced", {"n": n}, messageId=f"{run}-{n}") for n in range(total)],
    )
    started, timeline = time.time(), []

    async def all_arrived() -> bool | None:
        now = [p for p in await paces(worker) if p["target"] == "hook"]
        if now:
            timeline.append((round(time.time() - started), round(now[0]["pace"] or 0, 1)))
        return True if sum(r.ok for r in hook.received) >= total else None

    try:
        await eventually(all_arrived, timeout=180, interval=1.0, what="every write")
    except AssertionError:
        done = sum(r.ok for r in hook.received)
        counted = await totals(worker, "paced")
        raise AssertionError(
            f"{done} of {total} arrived in {len(hook.received)} requests; counts {counted}; "
            f"pace over time {timeline}"
        ) from None
    ok = Counter(r.headers.get("Idempotency-Key") for r in hook.received if r.ok)
    assert len(ok) == total and set(ok.values()) == {1}
    refused = [r.at - started for r in hook.received if not r.ok]
    half = (time.time() - started) / 2
    early, late = sum(1 for t in refused if t < half), sum(1 for t in refused if t >= half)
    print(f"pace over time (s, writes/s): {timeline}; 429s first half {early}, second {late}")
    assert refused and late < early, "the pace did not settle below where the 429s begin"
