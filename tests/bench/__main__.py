"""``make bench``: every benchmark, one after another, into one JSON file.

    .venv/bin/python -m tests.bench [--quick] [--only NAME[,NAME]] [--out PATH]

Benchmarks: throughput, tracking, resources, delay (tests/bench/<name>.py) and sink
(tests/bench/sink.py, skipped when it is not there). Each runs as its own
process, ``python -m tests.bench.<name>``, with a hard timeout: past it the
process gets SIGTERM (it stops its workers and drops its topics and tables),
then SIGKILL, and the JSON says "timed out after X s". The figures are
measurements under whatever else the machine is doing; the JSON records the
load average around each benchmark. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tests.integration.harness import ROOT

#: name → hard timeout in seconds (quick, full).
BENCHES: dict[str, tuple[int, int]] = {
    "throughput": (420, 2400),
    "tracking": (300, 900),
    "resources": (300, 1200),
    "delay": (300, 1500),
    "sink": (300, 1200),
}
QUICK_SINK_ROWS = "20000"
REASONS = {"skipped", "timed_out", "failed", "cancelled"}


def command(name: str, out: Path, quick: bool) -> list[str]:
    module = f"tests.bench.{name}"
    if name == "sink":  # another engineer's module: its interface is a positional path
        return [sys.executable, "-m", module, str(out), *(["--rows", QUICK_SINK_ROWS] * quick)]
    return [sys.executable, "-m", module, "--out", str(out), *(["--quick"] * quick)]


def present(name: str) -> bool:
    return importlib.util.find_spec(f"tests.bench.{name}") is not None


def run_one(name: str, quick: bool, folder: Path) -> dict[str, Any]:
    """One benchmark in a child process; its JSON, or what stopped it."""
    if not present(name):
        print(f"== {name}: skipped: not present", flush=True)
        return {"skipped": "not present"}
    out = folder / f"{name}.json"
    hard = BENCHES[name][0 if quick else 1]
    print(f"== {name} (hard timeout {hard} s)", flush=True)
    started, load = time.monotonic(), os.getloadavg()
    proc = subprocess.Popen(command(name, out, quick), cwd=ROOT)
    try:
        code: int | None = proc.wait(hard)
    except KeyboardInterrupt:  # the child got the Ctrl-C too: let it clean up
        proc.wait(120)
        raise
    except subprocess.TimeoutExpired:
        code = stop(proc)
        result: dict[str, Any] = {"timed_out": f"timed out after {hard} s (hard timeout)"}
    else:
        result = load_result(out, code)
    result["bench"] = {
        "wall_s": round(time.monotonic() - started, 1),
        "exit_code": code,
        "loadavg_before": [round(x, 2) for x in load],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }
    return result


def stop(proc: subprocess.Popen[bytes]) -> int | None:
    """SIGTERM (the benchmark cleans up), then SIGKILL if it does not end."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(90)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(10)


def load_result(out: Path, code: int) -> dict[str, Any]:
    if code != 0 or not out.exists():
        return {"failed": f"exited with {code}" + ("" if out.exists() else ", no JSON written")}
    data: dict[str, Any] = json.loads(out.read_text())
    return data


def conditions(quick: bool) -> dict[str, Any]:
    git = subprocess.run(
        ["git", "describe", "--always", "--dirty"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    return {
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": quick,
        "commit": git.stdout.strip() or None,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "note": "shared machine: other processes (tests, workers) may run at the same time",
    }


def summary(name: str, result: dict[str, Any]) -> str:
    if set(result) <= REASONS | {"bench", "at"}:  # no figures, only why
        reason = next(k for k in REASONS if k in result)
        return f"{name}: {reason.replace('_', ' ')}: {result[reason]}"
    if name == "sink":
        return (
            f"sink: SQL target {result.get('sql_target_rows_per_s')} rows/s, "
            f"COPY {result.get('copy_rows_per_s')} rows/s, ratio {result.get('ratio')}"
        )
    module = importlib.import_module(f"tests.bench.{name}")
    text: str = module.summarize(result)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, for smoke runs")
    parser.add_argument("--only", default="", help=f"comma-separated: {', '.join(BENCHES)}")
    parser.add_argument("--out", default="var/bench.json")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(BENCHES)
    unknown = sorted(set(names) - set(BENCHES))
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHES)}")
    report: dict[str, Any] = {"conditions": conditions(args.quick)}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="wal-bench-") as folder:
        for name in names:
            report[name] = run_one(name, args.quick, Path(folder))
    report["conditions"]["total_s"] = round(time.monotonic() - started, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print("\n== summary " + "=" * 60)
    for name in names:
        print(summary(name, report[name]))
    print(f"total {report['conditions']['total_s']} s; all figures in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
