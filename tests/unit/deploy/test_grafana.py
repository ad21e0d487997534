"""deploy/grafana/wal-fleet.json: parses, uses ${DS_PROMETHEUS}, and only the fleet's metrics.

The metric names and labels below are the contract with app/metrics.py.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[3]
DASHBOARD = ROOT / "deploy" / "grafana" / "wal-fleet.json"
DATASOURCE = "${DS_PROMETHEUS}"

COUNTERS = {
    "wal_messages_total": {"namespace", "stage", "outcome"},
    "wal_dead_letters_total": {"namespace", "code"},
    "wal_commits_refused_total": {"topic"},
    "wal_target_deadlines_total": {"namespace", "target"},
}
GAUGES = {
    "wal_circuit_state": {"namespace", "target"},
    "wal_consumer_lag": {"topic", "partition"},
    "wal_partition_stalled_seconds": {"topic", "partition"},
    "wal_target_slow_calls": {"namespace", "target"},
}
HISTOGRAMS = {
    "wal_delivery_seconds": {"namespace", "target"},
    "wal_end_to_end_seconds": {"namespace"},
    "wal_batch_size": {"agent"},
}
#: Every series name an expression may select, with the labels it carries.
SERIES: dict[str, set[str]] = {**COUNTERS, **GAUGES}
for _name, _labels in HISTOGRAMS.items():
    SERIES[f"{_name}_bucket"] = _labels | {"le"}
    SERIES[f"{_name}_sum"] = _labels
    SERIES[f"{_name}_count"] = _labels
#: Labels Prometheus attaches to every scraped series.
TARGET_LABELS = {"instance", "job", "pod"}
LABEL_VALUES = {
    "stage": {"ingest", "deliver"},
    "outcome": {"accepted", "rejected", "delivered", "retried", "dead_lettered", "dropped"},
}
FUNCTIONS = {
    "sum", "min", "max", "avg", "count", "topk", "bottomk", "rate", "irate", "increase",
    "histogram_quantile", "clamp_min", "clamp_max", "sort_desc", "abs",
}  # fmt: skip
KEYWORDS = {"and", "or", "unless", "bool", "offset"}
GROUPING = r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)"


def promql_problems(expr: str) -> list[str]:
    """Metric names, labels and label values in ``expr`` that the fleet does not export."""
    problems = []
    for label, value in re.findall(r'(\w+)\s*(?:=|!=)\s*"([^"$]*)"', expr):
        if label in LABEL_VALUES and value not in LABEL_VALUES[label]:
            problems.append(f"{label}={value!r} is not a value the fleet exports")
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"\$\{?\w+\}?", "", e)  # Grafana variables
    e = re.sub(r"\[[^\]]*\]", "", e)  # range selectors
    labels = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", " ".join(re.findall(r"\{([^}]*)\}", e))))
    e = re.sub(r"\{[^}]*\}", "", e)
    for group in re.findall(GROUPING, e):
        labels |= {label.strip() for label in group.split(",") if label.strip()}
    e = re.sub(GROUPING, "", e)
    e = re.sub(r"\b\d+(?:\.\d+)?(?:[eE][+-]?\d+)?\b", "", e)
    metrics = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        word = match.group()
        if e[match.end() :].lstrip().startswith("("):
            if word not in FUNCTIONS:
                problems.append(f"unexpected function {word}")
        elif word not in KEYWORDS:
            metrics.add(word)
    problems += [f"unknown metric {m}" for m in sorted(metrics - set(SERIES))]
    if not metrics:
        problems.append("selects no metric")
    known = set().union(*(SERIES.get(m, set()) for m in metrics), TARGET_LABELS)
    problems += [f"label {label} is not on {sorted(metrics)}" for label in sorted(labels - known)]
    return problems


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in items:
        yield panel
        yield from panels(panel.get("panels", []))


def queries() -> Iterator[tuple[str, str]]:
    for panel in panels(dashboard()["panels"]):
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]


def test_the_dashboard_parses_and_uses_the_datasource_variable() -> None:
    model = dashboard()
    variables = {v["name"]: v for v in model["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    ids = [p["id"] for p in panels(model["panels"])]
    assert len(ids) == len(set(ids))
    for panel in panels(model["panels"]):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": DATASOURCE}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == DATASOURCE
    assert DATASOURCE in json.dumps(variables["namespace"]["datasource"])


def test_every_expression_uses_only_the_fleet_metrics() -> None:
    found = list(queries())
    assert found
    for title, expr in found:
        assert promql_problems(expr) == [], (title, expr)
    variable = {v["name"]: v for v in dashboard()["templating"]["list"]}["namespace"]
    metric, label = re.fullmatch(r"label_values\((\w+), (\w+)\)", variable["definition"]).groups()
    assert label in SERIES[metric]


def test_the_required_panels_are_there() -> None:
    exprs = {title: " ".join(e for t, e in queries() if t == title) for title, _ in queries()}
    by_metric = {
        metric: [t for t, e in exprs.items() if metric in e] for metric in (*SERIES, *HISTOGRAMS)
    }
    assert any("rate(wal_messages_total" in e and "outcome" in e for e in exprs.values())
    (e2e,) = by_metric["wal_end_to_end_seconds_bucket"]
    assert "histogram_quantile(0.5," in exprs[e2e] and "histogram_quantile(0.99," in exprs[e2e]
    assert any("target" in exprs[t] for t in by_metric["wal_delivery_seconds_bucket"])
    assert any("by (code)" in exprs[t] for t in by_metric["wal_dead_letters_total"])
    (circuit,) = by_metric["wal_circuit_state"]
    circuit_panel = next(p for p in panels(dashboard()["panels"]) if p["title"] == circuit)
    assert circuit_panel["type"] == "table"
    mapping = circuit_panel["fieldConfig"]["defaults"]["mappings"][0]["options"]
    assert {k: v["text"] for k, v in mapping.items()} == {
        "0": "closed",
        "1": "half-open",
        "2": "open",
    }
    assert any("by (topic)" in exprs[t] for t in by_metric["wal_consumer_lag"])
    assert by_metric["wal_partition_stalled_seconds"] and by_metric["wal_commits_refused_total"]
    assert by_metric["wal_target_slow_calls"] and by_metric["wal_target_deadlines_total"]


@pytest.mark.parametrize(
    ("expr", "problem"),
    [
        ("sum(rate(wal_message_total[5m]))", "unknown metric wal_message_total"),
        ("up", "unknown metric up"),
        ("histogram_quantile(0.99, sum by (le) (rate(wal_delivery_seconds[5m])))",
         "unknown metric wal_delivery_seconds"),
        ('sum(rate(wal_messages_total{outcome="failed"}[5m]))', "outcome='failed'"),
        ("sum by (code) (rate(wal_messages_total[5m]))", "label code"),
        ("sum by (le) (rate(wal_circuit_state[5m]))", "label le"),
        ("quantile_over_time(0.5, wal_consumer_lag[5m])", "unexpected function"),
    ],
)  # fmt: skip
def test_a_wrong_expression_is_caught(expr: str, problem: str) -> None:
    assert any(problem in p for p in promql_problems(expr)), promql_problems(expr)
