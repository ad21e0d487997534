"""Resources: a worker's idle CPU, and its memory before, during and after a sustained run.

    .venv/bin/python -m tests.bench.resources [--quick] [--out PATH] [--rate R]

One ``wal worker`` (own topic prefix, group, journal table in PostgreSQL):

* idle CPU - once ready and settled, (CPU seconds of the process and its
  children) / wall seconds over 60 s (10 s with --quick), as % of one core;
* RSS before a sustained run, every 5 s during it (with the CPU % of each
  interval and the rows delivered so far), and after the last row landed.
  The run produces 1 KB requests at a modest rate (500/s) for 10 minutes
  (60 s with --quick).

Measured with psutil; nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import psutil

from tests.bench.throughput import (
    TimedOut,
    bench_fleet,
    cpu_seconds,
    family,
    finish,
    journal_progress,
    paced,
    run_reported,
    wait_rows,
)
from tests.integration.harness import Fleet, Worker

MIB = 1024 * 1024
SAMPLE_S = 5.0
SIZES = {"full": {"idle_s": 60, "run_s": 600}, "quick": {"idle_s": 10, "run_s": 60}}
RATE = 500


def rss_mib(proc: psutil.Process) -> float:
    """Resident memory of the process and its live children, MiB."""
    total = 0
    for p in family(proc):
        with contextlib.suppress(psutil.NoSuchProcess):
            total += p.memory_info().rss
    return round(total / MIB, 1)


async def idle_cpu(proc: psutil.Process, seconds: float) -> float:
    """CPU use over ``seconds`` as % of one core."""
    cpu, started = cpu_seconds(proc), time.monotonic()
    await asyncio.sleep(seconds)
    return round(100 * (cpu_seconds(proc) - cpu) / (time.monotonic() - started), 2)


async def sample(
    proc: psutil.Process,
    progress: Callable[[], Awaitable[int]],
    samples: list[dict[str, Any]],
    stop: asyncio.Event,
    label: str,
    interval: float = SAMPLE_S,
) -> None:
    """Append {t_s, rss_mib, cpu_pct, done} every ``interval`` seconds until ``stop``;
    each sample is also printed to stderr, so a long run shows it is alive."""
    started = last_t = time.monotonic()
    last_cpu = cpu_seconds(proc)
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)
        if not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE:
            return
        now, cpu = time.monotonic(), cpu_seconds(proc)
        samples.append(
            {
                "t_s": round(now - started, 1),
                "rss_mib": rss_mib(proc),
                "cpu_pct": round(100 * (cpu - last_cpu) / max(now - last_t, 1e-6), 1),
                "done": await progress(),
            }
        )
        print(f"[{label}] {samples[-1]}", file=sys.stderr, flush=True)
        last_cpu, last_t = cpu, now


async def run(idle_s: float, run_s: float, rate: int) -> dict[str, Any]:
    result: dict[str, Any] = {"idle_s": idle_s, "run_s": run_s, "rate_msgs_per_s": rate}
    async with bench_fleet("resources") as (fleet, table):
        worker = fleet.worker()
        spawned = time.monotonic()
        await worker.ready(timeout=90)
        assert worker.proc is not None
        proc = psutil.Process(worker.proc.pid)
        result["startup_s"] = round(time.monotonic() - spawned, 2)
        result["rss_at_ready_mib"] = rss_mib(proc)
        await asyncio.sleep(min(5, idle_s / 2))  # start-up work (recovery, commits) done
        result["idle_cpu_pct"] = await idle_cpu(proc, idle_s)
        result["rss_before_mib"] = rss_mib(proc)
        result.update(await sustained(fleet, table, worker, run_s, rate))
        result["rss_after_mib"] = rss_mib(proc)
        result["idle_cpu_after_pct"] = await idle_cpu(proc, min(idle_s / 2, 10))
    return result


async def sustained(
    fleet: Fleet, table: str, worker: Worker, seconds: float, rate: int
) -> dict[str, Any]:
    """Produce at ``rate`` for ``seconds`` while sampling the worker; wait for the rows."""
    assert worker.proc is not None
    proc = psutil.Process(worker.proc.pid)

    async def rows() -> int:
        return (await asyncio.to_thread(journal_progress, table))[0]

    samples: list[dict[str, Any]] = []
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample(proc, rows, samples, stop, "resources"))
    out: dict[str, Any] = {"samples": samples}
    cpu, started = cpu_seconds(proc), time.monotonic()
    try:
        out["producer"] = await paced(fleet.topic("ingest"), fleet.prefix, rate, seconds)
        _, _, stalled = await wait_rows(fleet, table, out["producer"]["sent"], 120)
        out.update(stalled)
        out["run_cpu_pct"] = round(
            100 * (cpu_seconds(proc) - cpu) / (time.monotonic() - started), 1
        )
    except TimedOut as exc:
        out["timed_out"] = str(exc)
    finally:
        stop.set()
        await sampler
    return out


def summarize(r: dict[str, Any]) -> str:
    if "idle_cpu_pct" not in r:
        return f"resources: {r.get('timed_out') or r.get('failed') or 'no result'}"
    rss = [s["rss_mib"] for s in r.get("samples", [])]
    lines = [
        "resources (one worker)",
        f"  {'idle CPU over ' + str(r['idle_s']) + ' s':<34} {r['idle_cpu_pct']} % of one core"
        f" (after the run: {r.get('idle_cpu_after_pct')} %)",
        f"  {'RSS at ready / before the run':<34} {r['rss_at_ready_mib']} / "
        f"{r['rss_before_mib']} MiB",
        f"  {'run: ' + str(r['rate_msgs_per_s']) + '/s for ' + str(r['run_s']) + ' s':<34} CPU "
        f"{r.get('run_cpu_pct')} %, RSS min/max {min(rss, default=0)}/{max(rss, default=0)} MiB"
        f" over {len(rss)} samples",
        f"  {'RSS after the run':<34} {r.get('rss_after_mib')} MiB",
    ]
    for key in ("incomplete", "timed_out"):
        if key in r:
            lines.append(f"  {key.upper()}: {r[key]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.resources",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="10 s idle, 60 s run")
    parser.add_argument("--out", default="var/bench-resources.json")
    parser.add_argument("--rate", type=int, default=RATE, help=f"msgs/s of the run ({RATE})")
    args = parser.parse_args(argv)
    sizes = SIZES["quick" if args.quick else "full"]
    started = datetime.now(UTC).isoformat(timespec="seconds")
    result = run_reported(run(sizes["idle_s"], sizes["run_s"], args.rate))
    return finish(result, started, args.out, summarize)


if __name__ == "__main__":
    sys.exit(main())
