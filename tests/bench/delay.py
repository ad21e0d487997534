"""Delay: one worker's memory while M delayed requests are ingested and parked.

    .venv/bin/python -m tests.bench.delay [--quick] [--out PATH] [-m M]

M requests (1 000 000; 50 000 with --quick) of 512 B, each with
``lifecycle: {delay: 6 hours, ttl: 7 days}``, are pre-encoded and produced as
fast as a plain producer can into the ingest topic of a fleet of ONE worker
(own topic prefix and group). A request counts as *parked* once the worker
has forwarded it into a delay tier (the sum of the delay topics' end offsets;
exact while the run is shorter than the largest tier, 15 minutes, after which
the first records would hop again; the deadline stays below that).

Reported: the worker's RSS at 0, 10 %, 50 % and 100 % of M parked, RSS every
5 s (with the parked count), RSS after a settling time, and the slope of RSS
against parked messages (least squares over every sample, and 10 %→100 %),
in MiB per 100 000 messages. Memory should not grow with M; the bench only
reports it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import psutil
from aiokafka import AIOKafkaConsumer, TopicPartition

from tests.bench.resources import rss_mib, sample
from tests.bench.throughput import (
    BOOTSTRAP,
    TimedOut,
    bench_fleet,
    finish,
    preload,
    run_reported,
    write_request,
)
from tests.integration.harness import Fleet

REQUEST_BYTES = 512
LIFECYCLE = {"delay": 6, "delayUnit": "hours", "ttl": 604_800}
MILESTONES = (0.1, 0.5, 1.0)
SIZES = {"full": {"m": 1_000_000, "settle_s": 30}, "quick": {"m": 50_000, "settle_s": 10}}
#: Below the largest tier (900 s), so no record has hopped again while we count.
PARK_DEADLINE_S = 840
#: No record parked for this long: the run is reported as stalled.
STALL_S = 30.0


def delayed_requests(prefix: str, m: int) -> list[bytes]:
    return [write_request(prefix, i, REQUEST_BYTES, lifecycle=LIFECYCLE) for i in range(m)]


async def delay_partitions(consumer: AIOKafkaConsumer, prefix: str) -> list[TopicPartition]:
    await consumer._client.force_metadata_update()
    topics = sorted(t for t in await consumer.topics() if t.startswith(f"{prefix}-delay-"))
    return [
        TopicPartition(t, p) for t in topics for p in sorted(consumer.partitions_for_topic(t) or ())
    ]


async def watch(
    m: int,
    parked: Callable[[], Any],
    proc: psutil.Process,
    producing: asyncio.Task[Any],
    deadline_s: float,
) -> tuple[dict[str, dict[str, float]], str | None]:
    """Poll the parked count every 0.5 s; RSS when it crosses each milestone, until all are
    parked (then the second value is None) or none was parked for STALL_S (it says so)."""
    started = moved = time.monotonic()
    marks = {"0%": {"parked": 0, "rss_mib": rss_mib(proc), "t_s": 0.0}}
    count = 0
    while count < m:
        now_count = await parked()
        if now_count > count:
            count, moved = now_count, time.monotonic()
        elif time.monotonic() - moved > STALL_S:
            return marks, f"stalled at {count} of {m} parked: none parked for {STALL_S:.0f} s"
        elapsed = time.monotonic() - started
        for fraction in MILESTONES:
            label = f"{fraction:.0%}"
            if label not in marks and count >= fraction * m:
                marks[label] = {"parked": count, "rss_mib": rss_mib(proc), "t_s": round(elapsed, 1)}
        if elapsed > deadline_s:
            raise TimedOut("parking delayed requests", deadline_s, count, m)
        if producing.done() and producing.exception() is not None:
            raise producing.exception()  # type: ignore[misc]
        if proc.status() == psutil.STATUS_ZOMBIE:
            raise AssertionError("the worker exited")
        await asyncio.sleep(0.5)
    return marks, None


def slope_per_100k(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of RSS (MiB) against parked messages, per 100 000 messages."""
    if len(points) < 2:
        return None
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if not sxx:
        return None
    return round(sum((x - mx) * (y - my) for x, y in points) / sxx * 100_000, 3)


async def run(m: int, settle_s: float) -> dict[str, Any]:
    result: dict[str, Any] = {"m": m, "request_bytes": REQUEST_BYTES, "lifecycle": LIFECYCLE}
    async with bench_fleet("delay") as (fleet, _table):
        encoded = time.perf_counter()
        values = delayed_requests(fleet.prefix, m)
        result["encode_s"] = round(time.perf_counter() - encoded, 2)
        worker = fleet.worker()
        await worker.ready(timeout=90)
        assert worker.proc is not None
        proc = psutil.Process(worker.proc.pid)
        await asyncio.sleep(3)  # start-up work done
        consumer = AIOKafkaConsumer(bootstrap_servers=BOOTSTRAP)
        await consumer.start()
        try:
            result.update(await park(m, settle_s, fleet, proc, consumer, values))
        finally:
            await consumer.stop()
    result.update(slopes(result))
    return result


async def park(
    m: int,
    settle_s: float,
    fleet: Fleet,
    proc: psutil.Process,
    consumer: AIOKafkaConsumer,
    values: list[bytes],
) -> dict[str, Any]:
    """Produce the requests and watch them being parked; RSS samples, milestones, settled."""
    result: dict[str, Any] = {}
    tps = await delay_partitions(consumer, fleet.prefix)

    async def parked() -> int:
        return sum((await consumer.end_offsets(tps)).values())

    stop = asyncio.Event()
    result["samples"] = samples = []
    sampler = asyncio.create_task(sample(proc, parked, samples, stop, "delay"))
    producing = asyncio.create_task(preload(fleet.topic("ingest"), values, timeout=PARK_DEADLINE_S))
    try:
        result["milestones"], stalled = await watch(m, parked, proc, producing, PARK_DEADLINE_S)
        result["parked"] = await parked()
        if stalled:
            result["incomplete"] = stalled
            print(f"[delay] {stalled}", file=sys.stderr, flush=True)
        else:
            result["producer"] = await producing
    except TimedOut as exc:
        result["timed_out"] = str(exc)
    try:
        if "timed_out" not in result:
            await asyncio.sleep(settle_s)
            result["settled"] = {"after_s": settle_s, "rss_mib": rss_mib(proc)}
    finally:
        stop.set()
        producing.cancel()
        for task in (sampler, producing):
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await task
    return result


def slopes(r: dict[str, Any]) -> dict[str, float | None]:
    marks = r.get("milestones", {})
    points = [(0.0, marks["0%"]["rss_mib"])] if "0%" in marks else []
    points += [(float(s["done"]), s["rss_mib"]) for s in r.get("samples", [])]
    two_point = None
    if "10%" in marks and "100%" in marks:
        a, b = marks["10%"], marks["100%"]
        if b["parked"] > a["parked"]:
            two_point = round(
                (b["rss_mib"] - a["rss_mib"]) / (b["parked"] - a["parked"]) * 100_000, 3
            )
    return {
        "slope_mib_per_100k": slope_per_100k(points),
        "slope_10_to_100_mib_per_100k": two_point,
    }


def summarize(r: dict[str, Any]) -> str:
    if "milestones" not in r:
        return f"delay: {r.get('timed_out') or r.get('failed') or r.get('cancelled')}"
    marks = r["milestones"]
    rss = ", ".join(f"{k} {v['rss_mib']} MiB" for k, v in marks.items())
    lines = [
        f"delay ({r['m']} requests of {r['request_bytes']} B, delay 6 h, one worker)",
        f"  RSS at parked {rss}",
    ]
    took = marks.get("100%", {}).get("t_s")
    if took:
        lines.append(
            f"  all parked after {took} s ({round(r['m'] / took)} msgs/s); "
            f"producer {r['producer']['msgs_per_s']:,} msgs/s"
        )
    if "settled" in r:
        lines.append(f"  RSS {r['settled']['after_s']} s later: {r['settled']['rss_mib']} MiB")
    lines.append(
        f"  slope {r['slope_mib_per_100k']} MiB per 100 000 parked (least squares), "
        f"{r['slope_10_to_100_mib_per_100k']} (10 %→100 %)"
    )
    for key in ("incomplete", "timed_out"):
        if key in r:
            lines.append(f"  {key.upper()}: {r[key]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.delay",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="M = 50000")
    parser.add_argument("--out", default="var/bench-delay.json")
    parser.add_argument("-m", type=int, default=None, help="delayed requests (1000000)")
    args = parser.parse_args(argv)
    sizes = SIZES["quick" if args.quick else "full"]
    started = datetime.now(UTC).isoformat(timespec="seconds")
    result = run_reported(run(args.m or sizes["m"], sizes["settle_s"]))
    return finish(result, started, args.out, summarize)


if __name__ == "__main__":
    sys.exit(main())
