"""The dashboard as a person sees it: headless Chromium loads it from a two-worker fleet."""

from __future__ import annotations

import asyncio
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tables.stats import delta
from tests.integration.harness import Fleet, eventually, produce
from tests.integration.ops.conftest import Settled
from tests.integration.ops.test_views import get, names_covering

pytestmark = [pytest.mark.kafka]

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1400,900",
]


async def chromium(tmp: Path, *args: str) -> str:
    """Run headless Chromium with its own profile under ``tmp``; its stdout."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    assert binary, "chromium is not installed: run deploy/local/install-deps.sh"
    proc = await asyncio.create_subprocess_exec(
        binary,
        *CHROMIUM_FLAGS,
        f"--user-data-dir={tmp / 'chromium-profile'}",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout=90)
    except TimeoutError:
        proc.kill()
        raise
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode()


class Visible(HTMLParser):
    """The text a person would read (not styles, not scripts)."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._skip += tag in ("style", "script", "title")

    def handle_endtag(self, tag: str) -> None:
        self._skip -= tag in ("style", "script", "title")

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(data)


def visible_text(dom: str) -> str:
    parser = Visible()
    parser.feed(dom)
    return re.sub(r"\s+", " ", " ".join(parser.parts))


async def test_dashboard_shows_namespaces_numbers_and_workers(
    fleet: Fleet, settled: Settled, tmp_path: Path
) -> None:
    names = names_covering(fleet.partitions)[:2]
    fleet.apply(*({"name": n} for n in names))
    first, second = await fleet.worker().ready(), await fleet.worker().ready()
    await settled(first, 2)
    records = [
        delta(
            names[0], accepted=1234, delivered=1200, target="pg", latency_ms=[40] * 98 + [900] * 2
        ),
        delta(names[1], accepted=77, delivered=70, retried=5, dead_lettered=2, target="pg"),
    ]
    await produce(fleet.topic("stats"), [r.value for r in records], keys=[r.key for r in records])
    await produce(fleet.topic("ingest"), [b"{garbage %d" % i for i in range(3)])  # DLQ depth 3

    async def dom() -> str | None:
        text = visible_text(await chromium(tmp_path, "--dump-dom", f"{second.url}/wal/dashboard"))
        return (
            text
            if "1,234" in text and "77" in text and f"3 DLQ depth ({fleet.topic('dlq')})" in text
            else None
        )

    text = await eventually(dom, timeout=90, interval=1.0, what="dashboard with the numbers")
    assert "WAL fleet" in text and "2 Workers" in text
    row = re.search(rf"{names[0]} 1,234 1,200 0 0 0 0 (\S+) · (\S+) · (\S+) (\S+) ms · ", text)
    assert row, text
    assert float(row.group(4)) == pytest.approx(900, rel=0.1)  # p99 of 98 at 40 ms, 2 at 900
    assert re.search(rf"{names[1]} 77 70 5 2 0 0 ", text), text
    # the shared DLQ's depth is not shown as any one namespace's
    assert text.count(f"shared ({fleet.topic('dlq')})") == 2, text
    for worker in (first, second):
        assert f"{worker.url} ready" in text
        for name in names:  # each worker opened (warmed) every namespace's target at its start
            assert f"{name}/journal closed 0 {worker.url}" in text, text

    shot = tmp_path / "dashboard.png"
    await chromium(tmp_path, f"--screenshot={shot}", f"{second.url}/wal/dashboard")
    png = shot.read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 20_000
    print(f"dashboard screenshot: {shot}")
    assert (await get(f"{first.url}/wal/dashboard")).headers["Content-Type"].startswith("text/html")
