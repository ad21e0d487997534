"""The dashboard page: what it shows for given data, and that nothing in the data is markup."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from typing import Any

from app.web.dashboard import REFRESH_S, render

EVIL = "<script>alert('x')</script>"


def fleet_data(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "generatedAt": "2025-01-01T00:00:00.000Z",
        "source": "http://127.0.0.1:6066",
        "namespaces": [
            {
                "name": "orders",
                "enabled": True,
                "totals": {
                    "accepted": 12345,
                    "delivered": 12000,
                    "retried": 7,
                    "dead_lettered": 3,
                    "rejected": 2,
                },
                "rates": {
                    "1m": {"delivered": 41.5},
                    "5m": {"delivered": 40.0},
                    "1h": {"delivered": 3.25},
                },
                "latencyMs": {"5m": {"p99": 87.2}, "1h": {"p99": 1520.0}},
                "dlq": {"topic": "orders-dlq", "depth": 42, "shared": False},
            },
            {
                "name": "billing",
                "totals": {"dead_lettered": 5},
                "dlq": {"topic": "wal-dlq", "depth": None, "shared": True},
            },
        ],
        "dlq": {"topic": "wal-dlq", "depth": 900},
        "backlog": {"total": 17, "byTopic": {"wal-delay-1s": 17}},
        "circuits": [
            {
                "worker": "http://127.0.0.1:6066",
                "key": "orders/pg",
                "state": "open",
                "consecutive_failures": 5,
            }
        ],
        "workers": [
            {
                "url": "http://127.0.0.1:6066",
                "ready": True,
                "assigned": {"wal-ingest": [0, 2], "wal-deliver": [0, 2], "wal-stats": [1]},
                "lag": {"wal-ingest": {"0": 250, "2": 0}},
            },
            {"url": "http://127.0.0.1:6067", "error": "ConnectTimeout: timed out"},
        ],
    }
    data.update(overrides)
    return data


class Text(HTMLParser):
    """What a person reads: the text of the page, plus which elements it has."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)

    def handle_data(self, data: str) -> None:
        self.parts.append(data)

    @property
    def text(self) -> str:
        return re.sub(r"\s+", " ", " ".join(self.parts))


def read(html: str) -> Text:
    parser = Text()
    parser.feed(html)
    return parser


def test_it_shows_namespaces_with_totals_rates_latency_and_dlq_depth() -> None:
    html = render(fleet_data())
    text = read(html).text
    assert "orders" in text
    for shown in ("12,345", "12,000", "41.5 · 40.0 · 3.2", "87.2 ms · 1.52 s", "42 orders-dlq"):
        assert shown in text, shown
    assert "17 Retry/delay backlog" in text
    # the shared topic's depth is the fleet's: a card, not a number on each namespace's row
    assert "900 DLQ depth (wal-dlq)" in text and text.count("900") == 1
    assert "billing 0 0 0 5 0" in text and "shared (wal-dlq)" in text
    assert f"<meta http-equiv='refresh' content='{REFRESH_S}'>" in html


def test_it_shows_workers_partitions_lag_and_circuits() -> None:
    page = read(render(fleet_data()))
    text = page.text
    assert "http://127.0.0.1:6066 ready" in text
    assert "0, 2 wal-deliver, wal-ingest" in text  # co-partitioned topics share one line
    assert "1 wal-stats" in text
    assert "250" in text and "wal-ingest/0: 250" in text
    assert "unreachable: ConnectTimeout: timed out" in text
    assert "orders/pg open 5" in text
    assert "2 Workers" in text


def test_every_value_from_the_data_is_escaped() -> None:
    evil_ns = fleet_data()["namespaces"][0] | {"name": EVIL, "error": EVIL}
    evil_ns["dlq"] = {"topic": EVIL, "depth": 1}
    data = fleet_data(
        namespaces=[evil_ns],
        source=EVIL,
        generatedAt=EVIL,
        circuits=[{"worker": EVIL, "key": EVIL, "state": EVIL, "consecutive_failures": 1}],
        workers=[
            {"url": EVIL, "ready": True, "assigned": {EVIL: [0]}, "lag": {EVIL: {"0": 3}}},
            {"url": "x", "error": EVIL},
        ],
    )
    html = render(data)
    page = read(html)
    assert "script" not in page.tags
    assert "<script>" not in html
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in html
    assert EVIL in page.text  # shown as text, as it was


def test_empty_fleet_and_unknown_numbers_render() -> None:
    text = read(render({"namespaces": [], "workers": [], "circuits": [], "backlog": None})).text
    assert "no namespaces" in text and "no workers" in text and "no targets opened yet" in text
    assert "n/a Retry/delay backlog" in text
    ns = {"name": "fresh", "dlq": {"topic": "wal-dlq", "depth": None}}
    text = read(render(fleet_data(namespaces=[ns]))).text
    dash = "\N{EN DASH}"
    assert f"fresh 0 0 0 0 0 0 0.0 · 0.0 · 0.0 {dash} · {dash} {dash} wal-dlq" in text


def test_a_stalled_partition_is_named_beside_its_worker() -> None:
    data = fleet_data()
    data["workers"][0] = {
        **data["workers"][0],
        "ready": False,
        "stalled": [{"topic": "wal-ingest", "partition": 3, "seconds": 75.4}],
    }
    text = read(render(data)).text
    assert "not ready" in text and "stalled wal-ingest/3: 75 s" in text


def test_partitions_short_of_replicas_are_named_with_their_leader_and_isr() -> None:
    from app.engine.replicas import summarize

    described = [
        {
            "error_code": 0,
            "topic": "wal-ingest",
            "partitions": [
                {"partition": 0, "leader": 1, "replicas": [1, 2, 3], "isr": [1, 2, 3]},
                {"partition": 1, "leader": 2, "replicas": [2, 3, 1], "isr": [2, 3]},
                {"partition": 2, "leader": 3, "replicas": [3, 1, 2], "isr": [3]},
                {"partition": 3, "leader": -1, "replicas": [1, 2, 3], "isr": [1]},
            ],
        },
        {"error_code": 3, "topic": "wal-gone", "partitions": []},
    ]
    kafka = {**summarize(described), "ageSeconds": 4.2}
    assert kafka["partitions"] == 4
    assert [kafka[s]["count"] for s in ("offline", "underMinIsr", "underReplicated")] == [1, 2, 3]
    text = read(render(fleet_data(kafka=kafka))).text
    assert "Kafka partitions (4 of the fleet's topics, described 4.2 s ago)" in text
    assert "offline (no leader) 1 wal-ingest/3 (-1, 1/3)" in text
    assert "under min ISR (writes refused) 2 wal-ingest/2 (3, 1/3), wal-ingest/3" in text
    assert "under-replicated 3 wal-ingest/1 (2, 2/3)" in text
    healthy = read(render(fleet_data(kafka={**summarize(described[:1])}))).text
    assert "not described yet" not in healthy
    assert "not described yet" in read(render(fleet_data())).text
