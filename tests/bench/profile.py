"""Where a saturated worker's CPU goes: py-spy on one worker draining a backlog.

    .venv/bin/python -m tests.bench.profile [-n 200000] [--out var/profile] [--rate 200]

The throughput benchmark's one-worker part (a backlog of N 1 KB requests into a
``sql`` journal table), with ``py-spy record`` attached to the worker from the
moment it is ready until the last row. Writes a speedscope profile and a
collapsed-stack file under ``--out``, and prints the functions holding the most
samples: on their own (self) and with what they call (total). Needs py-spy
(``pip install py-spy``) and, on Linux, ptrace rights (root, or
``kernel.yama.ptrace_scope=0``). Not part of ``make bench``: py-spy's sampling
costs the worker a few per cent.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.bench.throughput import (
    BATCH_BYTES,
    bench_fleet,
    journal_progress,
    preload,
    requests,
    wait_rows,
)


async def profiled(n: int, out: Path, rate: int) -> dict[str, float | int]:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    async with bench_fleet("profile") as (fleet, table):
        await preload(fleet.topic("ingest"), requests(fleet.prefix, n), batch_bytes=BATCH_BYTES)
        worker = fleet.worker()
        await worker.ready(timeout=90)
        assert worker.proc is not None
        collapsed = out / "worker.collapsed.txt"
        pid, raw = str(worker.proc.pid), ["--format", "raw", "--output", str(collapsed)]
        record = await asyncio.create_subprocess_exec(
            *[spy, "record", "--pid", pid, "--rate", str(rate), *raw, "--nonblocking"],
            stdout=subprocess.DEVNULL,
        )
        started = time.time()
        at_ready, _ = await asyncio.to_thread(journal_progress, table)
        rows, last_ms, _ = await wait_rows(fleet, table, n, 600)
        record.send_signal(signal.SIGINT)  # py-spy writes what it has
        await asyncio.wait_for(record.wait(), 60)
    return {
        "rows": rows - at_ready,
        "seconds": round(last_ms / 1000 - started, 2),
        "msgs_per_s": round((rows - at_ready) / max(last_ms / 1000 - started, 1e-9)),
    }


def top(collapsed: Path, count: int) -> tuple[int, list[tuple[str, int]], list[tuple[str, int]]]:
    """Samples in all, and the ``count`` frames with the most samples (self, total)."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in collapsed.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack:
            continue
        k = int(n)
        samples += k
        frames = stack.split(";")
        own[frames[-1]] += k
        for frame in set(frames):
            total[frame] += k
    return samples, own.most_common(count), total.most_common(count)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.profile", description=__doc__)
    parser.add_argument("-n", type=int, default=200_000)
    parser.add_argument("--out", default="var/profile")
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples a second")
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = asyncio.run(profiled(args.n, out, args.rate))
    print(f"one worker under py-spy: {result}")
    samples, own, total = top(out / "worker.collapsed.txt", args.top)
    for title, rows in (("self", own), ("total", total)):
        print(f"\n-- {title} ({samples} samples)")
        for frame, k in rows:
            print(f"{100 * k / samples:6.1f}%  {frame[:150]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
