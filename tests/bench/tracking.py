"""Status tracking: one worker's throughput with the namespace's ``statusTracking`` at
``all``, ``failures`` and ``none``, in alternating rounds on the same machine.

    .venv/bin/python -m tests.bench.tracking [--quick] [--out PATH] [-n N] [--rounds R]

Each round runs the throughput benchmark's fleet part (one worker, N pre-loaded 1 KB
requests into a journal table) once per level; every figure is kept, and the best
of each level is reported with its ratio to ``all``. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tests.bench.throughput import BATCH_BYTES, fleet_run

LEVELS = ("all", "failures", "none")


async def run(n: int, rounds: int, timeout: float) -> dict[str, Any]:
    runs: dict[str, list[int]] = {level: [] for level in LEVELS}
    for r in range(rounds):
        for level in LEVELS if r % 2 == 0 else reversed(LEVELS):
            part = await fleet_run(n, 1, timeout, BATCH_BYTES, statusTracking=level)
            runs[level].append(part["msgs_per_s"])
            print(f"round {r + 1} {level:>8}: {part['msgs_per_s']:>7,} msgs/s", file=sys.stderr)
    best = {level: max(rates) for level, rates in runs.items()}
    return {
        "messages": n,
        "rounds": rounds,
        "msgs_per_s": runs,
        "best_msgs_per_s": best,
        "best_vs_all": {level: round(rate / best["all"], 3) for level, rate in best.items()},
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def summarize(r: dict[str, Any]) -> str:
    """The best rate of each level and its ratio to ``all`` (``make bench``'s summary)."""
    return "\n".join(
        f"statusTracking {level:>8}: best {r['best_msgs_per_s'][level]:>7,} msgs/s"
        f" ({r['best_vs_all'][level]:.3f} of all)"
        for level in LEVELS
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.tracking", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="20 000 requests, one round")
    parser.add_argument("--out", default="var/bench-tracking.json")
    parser.add_argument("-n", type=int, default=None, help="requests a run (default 100000)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 2)")
    args = parser.parse_args(argv)
    n = args.n or (20_000 if args.quick else 100_000)
    rounds = args.rounds or (1 if args.quick else 2)
    result = asyncio.run(run(n, rounds, timeout=max(120.0, n / 500)))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(summarize(result))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
