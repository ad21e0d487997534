"""The fleet dashboard (``GET /wal/dashboard``): data in, one HTML page out.

:func:`render` is a pure function of the data ``app.web.fleet_views`` gathers from
every worker; it escapes every value it prints, and the page refreshes itself
every few seconds. No scripts, no external assets: inline CSS only.

The data::

    {"generatedAt": str, "source": str (the worker that rendered it),
     "namespaces": [{"name", "enabled", "paused": [{"target", "reason", "sinceMs", "by"}],
                     "totals": {outcome: n},
                     "rates": {"1m"|"5m"|"1h": {outcome: per_s}},
                     "latencyMs": {"1m"|"5m"|"1h"|"total": {"p50", "p95", "p99", "count"}},
                     "dlq": {"topic", "depth", "shared"}, "error"?}],
     "backlog": {"total": n, "byTopic": {topic: n}} | None,
     "dlq": {"topic", "depth"} | None (the shared DLQ topic),
     "circuits": [{"worker", "key", "state", "consecutive_failures"}],
     "paces": [{"worker", "namespace", "target", "limit", "fleetPace", "pace", "share",
                "inFlight", "maxInFlight", "waiting"}],
     "workers": [{"url", "ready", "assigned": {topic: [p]}, "lag": {topic: {p: n}},
                  "stalled"?: [{"topic", "partition", "seconds"}], "error"?}],
     "kafka"?: {"checked", "ageSeconds", "error"?, "partitions": n,
                "offline"|"underMinIsr"|"underReplicated": {"count", "partitions": [
                    {"topic", "partition", "leader", "replicas", "inSync"}]}}}
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

REFRESH_S = 5

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;background:#f5f6f8;color:#1d2330}
header{background:#1d2330;color:#fff;padding:12px 24px}
header h1{font-size:18px;margin:0}header p{margin:4px 0 0;color:#b8c0d0;font-size:12px}
main{padding:16px 24px}section{margin-bottom:24px}h2{font-size:15px;margin:0 0 8px}
.cards{display:flex;gap:12px;flex-wrap:wrap;margin-bottom:20px}
.card{background:#fff;border-radius:6px;padding:10px 16px;min-width:140px;
box-shadow:0 1px 2px rgba(0,0,0,.08)}
.card b{display:block;font-size:22px}.card span{color:#5b6478;font-size:12px}
table{border-collapse:collapse;background:#fff;width:100%;box-shadow:0 1px 2px rgba(0,0,0,.08)}
th,td{padding:6px 10px;border-bottom:1px solid #e6e8ee;text-align:left;vertical-align:top}
th{background:#eef0f4;font-weight:600;font-size:12px}td.n{text-align:right;
font-variant-numeric:tabular-nums}
.ok{color:#137333}.warn{color:#b06000}.bad{color:#c5221f;font-weight:600}
.muted{color:#8a93a6}small{color:#5b6478}
"""

_NONE = "&ndash;"  # shown for a number nobody knows
_STATE_CLASS = {"closed": "ok", "half_open": "warn", "open": "bad"}


def render(data: Mapping[str, Any]) -> str:
    """The whole page for ``data`` (see the module docstring)."""
    namespaces = list(data.get("namespaces") or [])
    workers = list(data.get("workers") or [])
    body = "".join(
        [
            _header(data, workers),
            "<main>",
            _cards(namespaces, workers, data.get("backlog"), data.get("dlq")),
            _namespaces(namespaces),
            _circuits(list(data.get("circuits") or [])),
            _paces(list(data.get("paces") or [])),
            _kafka(data.get("kafka") or {}),
            _workers(workers),
            "</main>",
        ]
    )
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<meta http-equiv='refresh' content='{REFRESH_S}'>"
        "<meta name='viewport' content='width=device-width,initial-scale=1'>"
        f"<title>WAL fleet</title><style>{_CSS}</style></head><body>{body}</body></html>"
    )


def _header(data: Mapping[str, Any], workers: Sequence[Mapping[str, Any]]) -> str:
    return (
        "<header><h1>WAL fleet</h1>"
        f"<p>{len(workers)} worker(s) · rendered by {_e(data.get('source'))} at "
        f"{_e(data.get('generatedAt'))} · refreshes every {REFRESH_S} s</p></header>"
    )


def _cards(
    namespaces: Sequence[Mapping[str, Any]],
    workers: Sequence[Mapping[str, Any]],
    backlog: Mapping[str, Any] | None,
    dlq: Mapping[str, Any] | None,
) -> str:
    delivered = sum(_total(ns, "delivered") for ns in namespaces)
    dead = sum(_total(ns, "dead_lettered") for ns in namespaces)
    rate = sum(_rate(ns, "5m", "delivered") for ns in namespaces)
    cards = [
        ("Namespaces", _int(len(namespaces))),
        ("Workers", _int(len(workers))),
        ("Delivered", _int(delivered)),
        ("Delivered/s (5 min)", f"{rate:,.1f}"),
        ("Dead-lettered", _int(dead)),
        ("Retry/delay backlog", _int(backlog.get("total")) if backlog else "n/a"),
    ]
    if dlq:  # the shared topic's depth is the fleet's, not any one namespace's
        cards.append((f"DLQ depth ({dlq.get('topic')})", _int(dlq.get("depth"))))
    return (
        "<div class='cards'>"
        + "".join(
            f"<div class='card'><b>{value}</b><span>{_e(label)}</span></div>"
            for label, value in cards
        )
        + "</div>"
    )


def _namespaces(namespaces: Sequence[Mapping[str, Any]]) -> str:
    head = _row(
        "th",
        [
            "Namespace",
            "Accepted",
            "Delivered",
            "Retried",
            "Dead-lettered",
            "Rejected",
            "Re-read",
            "Delivered/s 1m · 5m · 1h",
            "p99 latency (5m · 1h)",
            "Own DLQ depth",
        ],
    )
    rows = []
    for ns in namespaces:
        name = _e(ns.get("name"))
        if not ns.get("enabled", True):
            name += " <small>(disabled)</small>"
        if ns.get("error"):
            name += f" <small class='warn'>{_e(ns['error'])}</small>"
        for pause in ns.get("paused") or []:
            what = f"{pause['target']} " if pause.get("target") else ""
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(pause["sinceMs"] / 1000))
            reason = f": {_e(pause['reason'])}" if pause.get("reason") else ""
            name += f" <small class='warn'>{_e(what)}paused since {since} UTC{reason}</small>"
        rates = " · ".join(f"{_rate(ns, w, 'delivered'):,.1f}" for w in ("1m", "5m", "1h"))
        latency = " · ".join(_ms(_p99(ns, w)) for w in ("5m", "1h"))
        dlq = ns.get("dlq") or {}
        cells = [
            name,
            *(_int(_total(ns, o)) for o in ("accepted", "delivered", "retried")),
            *(_int(_total(ns, o)) for o in ("dead_lettered", "rejected", "replayed")),
            rates,
            latency,
            (
                f"<small>shared ({_e(dlq.get('topic'))})</small>"
                if dlq.get("shared")
                else f"{_int(dlq.get('depth'))} <small>{_e(dlq.get('topic'))}</small>"
            ),
        ]
        rows.append(_row("td", cells, raw=True, numeric=range(1, 7)))
    empty = "<tr><td colspan='10' class='muted'>no namespaces</td></tr>"
    return _section("Namespaces", head + ("".join(rows) or empty)) + _COUNTS_LEGEND


#: What the namespace counts are (README "Operations"); each record is counted once.
_COUNTS_LEGEND = (
    "<p class='muted'><small>Accepted and rejected count requests read from the ingest topic;"
    " delivered, retried and dead-lettered count deliver records once per target. A record"
    " read again after a crash or a rebalance is not counted again: it shows under"
    " Re-read. A request a client sent twice is two requests; SQL and Redis targets apply"
    " it once.</small></p>"
)


def _circuits(circuits: Sequence[Mapping[str, Any]]) -> str:
    head = _row("th", ["Target (namespace/target)", "State", "Consecutive failures", "Worker"])
    rows = []
    for c in sorted(circuits, key=lambda c: (str(c.get("key")), str(c.get("worker")))):
        state = str(c.get("state"))
        cells = [
            _e(c.get("key")),
            f"<span class='{_STATE_CLASS.get(state, 'muted')}'>{_e(state)}</span>",
            _int(c.get("consecutive_failures")),
            _e(c.get("worker")),
        ]
        rows.append(_row("td", cells, raw=True, numeric=[2]))
    empty = "<tr><td colspan='4' class='muted'>no targets opened yet</td></tr>"
    return _section("Circuit breakers", head + ("".join(rows) or empty))


def _paces(paces: Sequence[Mapping[str, Any]]) -> str:
    """Targets with a pace on some worker: the fleet's limit and its pace now (lower
    after throttling), this worker's share of it, and the writes waiting in Kafka."""
    if not paces:
        return ""
    titles = ["Target (namespace/target)", "Limit /s", "Fleet pace /s", "Pace here /s"]
    head = _row("th", [*titles, "Waiting", "In flight", "Worker"])
    rows = []
    for p in sorted(paces, key=lambda p: (str(p.get("namespace")), str(p.get("target")))):
        flight = _int(p.get("inFlight"))
        if p.get("maxInFlight"):
            flight += f" / {_int(p.get('maxInFlight'))}"
        cells = [
            _e(f"{p.get('namespace')}/{p.get('target')}"),
            _num(p.get("limit")),
            _num(p.get("fleetPace")),
            _num(p.get("pace")),
            _int(p.get("waiting")),
            flight,
            _e(p.get("worker")),
        ]
        rows.append(_row("td", cells, raw=True, numeric=[1, 2, 3, 4]))
    return _section("Target pace", head + "".join(rows))


#: How the dashboard names each state of :mod:`app.engine.replicas`, worst first.
_AT_RISK = {
    "offline": "offline (no leader)",
    "underMinIsr": "under min ISR (writes refused)",
    "underReplicated": "under-replicated",
}


def _kafka(kafka: Mapping[str, Any]) -> str:
    """The fleet's partitions the brokers report at risk (or that all are in sync)."""
    if not kafka.get("checked"):
        return _section("Kafka partitions", "<tr><td class='muted'>not described yet</td></tr>")
    title = (
        f"Kafka partitions ({_int(kafka.get('partitions'))} of the fleet's topics, "
        f"described {kafka.get('ageSeconds')} s ago)"
    )
    if kafka.get("error"):
        title += f"; the last describe failed: {kafka['error']}"
    head = _row("th", ["State", "Partitions", "Where (leader, in sync / replicas)"])
    rows = []
    for state, label in _AT_RISK.items():
        found = kafka.get(state) or {}
        where = ", ".join(
            f"{p['topic']}/{p['partition']} ({p['leader']}, {p['inSync']}/{p['replicas']})"
            for p in found.get("partitions") or ()
        )
        css = "bad" if found.get("count") and state != "underReplicated" else "warn"
        cells = [_e(label), _int(found.get("count")), f"<span class='{css}'>{_e(where)}</span>"]
        rows.append(_row("td", cells, raw=True, numeric=[1]))
    return _section(title, head + "".join(rows))


def _workers(workers: Sequence[Mapping[str, Any]]) -> str:
    head = _row("th", ["Worker", "Ready", "Partitions", "Lag (records)"])
    rows = []
    for w in workers:
        if w.get("error"):
            ready = f"<span class='bad'>unreachable: {_e(w['error'])}</span>"
        else:
            ready = (
                "<span class='ok'>ready</span>"
                if w.get("ready")
                else ("<span class='warn'>not ready</span>")
            )
            for stalled in w.get("stalled") or ():  # records waiting, the commit not moving
                where = f"{stalled['topic']}/{stalled['partition']}"
                ready += (
                    f"<br><span class='bad'>stalled {_e(where)}: {stalled['seconds']:.0f} s</span>"
                )
        lag = w.get("lag") or {}
        total = sum(n for parts in lag.values() for n in parts.values())
        cells = [_e(w.get("url")), ready, _partitions(w.get("assigned") or {}), _lag(lag, total)]
        rows.append(_row("td", cells, raw=True))
    empty = "<tr><td colspan='4' class='muted'>no workers</td></tr>"
    return _section("Workers", head + ("".join(rows) or empty))


def _partitions(assigned: Mapping[str, Sequence[int]]) -> str:
    """Topics grouped by their partition list: co-partitioned topics share one line."""
    groups: dict[tuple[int, ...], list[str]] = {}
    for topic, parts in sorted(assigned.items()):
        groups.setdefault(tuple(sorted(parts)), []).append(topic)
    if not groups:
        return "<span class='muted'>none</span>"
    return "<br>".join(
        f"<b>{_e(', '.join(str(p) for p in parts))}</b> <small>{_e(', '.join(topics))}</small>"
        for parts, topics in sorted(groups.items())
    )


def _lag(lag: Mapping[str, Mapping[Any, int]], total: int) -> str:
    behind = [
        f"{topic}/{p}: {n:,}" for topic, parts in sorted(lag.items()) for p, n in parts.items() if n
    ]
    detail = f"<br><small>{_e('; '.join(behind[:8]))}</small>" if behind else ""
    return f"{_int(total)}{detail}"


def _section(title: str, rows: str) -> str:
    return f"<section><h2>{_e(title)}</h2><table>{rows}</table></section>"


def _row(tag: str, cells: Sequence[str], *, raw: bool = False, numeric: Any = ()) -> str:
    """A table row; ``raw`` cells are already escaped HTML."""
    out = []
    for i, cell in enumerate(cells):
        css = " class='n'" if i in numeric else ""
        out.append(f"<{tag}{css}>{cell if raw else _e(cell)}</{tag}>")
    return "<tr>" + "".join(out) + "</tr>"


def _total(ns: Mapping[str, Any], outcome: str) -> int:
    return int((ns.get("totals") or {}).get(outcome) or 0)


def _rate(ns: Mapping[str, Any], window: str, outcome: str) -> float:
    return float(((ns.get("rates") or {}).get(window) or {}).get(outcome) or 0.0)


def _p99(ns: Mapping[str, Any], window: str) -> float | None:
    value = ((ns.get("latencyMs") or {}).get(window) or {}).get("p99")
    return None if value is None else float(value)


def _ms(value: float | None) -> str:
    if value is None:
        return _NONE
    return f"{value / 1000:,.2f} s" if value >= 1000 else f"{value:,.1f} ms"


def _int(value: Any) -> str:
    return _NONE if value is None else f"{int(value):,}"


def _num(value: Any) -> str:
    return _NONE if value is None else f"{float(value):,.1f}"


def _e(value: Any) -> str:
    return escape("" if value is None else str(value), quote=True)
