"""The fleet as operators see it: every worker's assignment, lag, circuits and paces
(``GET /wal/fleet``), and the dashboard page built from them (``GET /wal/dashboard``)."""

from __future__ import annotations

import asyncio
from typing import Any, cast
from urllib.parse import quote

import httpx
from faust.web import Request, Response, View

from agents.deliver import pace
from app import topics
from app.engine import offsets, replicas
from app.fleet import fleet
from app.pausing import pauses
from app.web import dashboard
from app.web.views import WalView, _json_lag, _now_ms, _owns_stats, _probed, _readiness, now_iso
from tables import namespaces as namespace_table
from tables import stats as stats_table
from targets.circuit import BREAKERS


@fleet.page("/wal/fleet")
class FleetView(WalView):
    """This worker's partitions, lag and circuits, and the group's members (``?all=1``: every
    member's view, merged)."""

    async def get(self, request: Request) -> Response:
        if request.query.get("all") in ("1", "true", "yes"):
            return self.json(await fleet_all())
        return self.json(worker_view())


def worker_view() -> dict[str, Any]:
    """What ``GET /wal/fleet`` answers: this worker as it sees itself and the group."""
    return {
        "url": _own_url(),
        "ready": _readiness()["ready"],
        "rebalancing": bool(fleet.rebalancing),
        "assigned": offsets.assignment(),
        "tables": offsets.table_partitions(),
        "lag": _json_lag(offsets.consumer_lag()),
        "stalled": offsets.stalled_partitions(),
        "circuits": {key: breaker.snapshot() for key, breaker in sorted(BREAKERS.items())},
        "paces": pace.view(),
        "members": offsets.members(),
        "kafka": replicas.health.view(),
    }


async def fleet_all() -> dict[str, Any]:
    """Every member's ``/wal/fleet``, and who holds each partition (a list: one, normally)."""
    me = worker_view()
    others = [m["url"] for m in me["members"] if m["url"].rstrip("/") != me["url"]]
    async with httpx.AsyncClient(timeout=FLEET_TIMEOUT_S) as client:
        fetched = await asyncio.gather(*(_fetch_view(client, url) for url in others))
    workers = [me, *fetched]
    holders: dict[str, dict[str, list[str]]] = {}
    for w in workers:
        for topic, parts in (w.get("assigned") or {}).items():
            for p in parts:
                holders.setdefault(topic, {}).setdefault(str(p), []).append(w["url"])
    return {"workers": workers, "members": me["members"], "assignment": holders}


#: How long ``?all=1`` and the dashboard wait for another worker.
FLEET_TIMEOUT_S = 2.0


async def _fetch_view(client: httpx.AsyncClient, url: str) -> dict[str, Any]:
    try:
        response = await client.get(f"{url.rstrip('/')}/wal/fleet")
        response.raise_for_status()
        return cast(dict[str, Any], response.json())
    except (httpx.HTTPError, ValueError) as exc:
        return {"url": url.rstrip("/"), "error": f"{type(exc).__name__}: {exc}"[:200]}


def _own_url() -> str:
    return str(fleet.conf.canonical_url).rstrip("/")


@fleet.page("/wal/dashboard")
class Dashboard(View):
    """The fleet on one page (HTML, refreshes itself)."""

    async def get(self, request: Request) -> Response:
        fleet_data = await fleet_all()
        names = namespace_table.all_names()
        async with httpx.AsyncClient(timeout=FLEET_TIMEOUT_S) as client:
            rows = await asyncio.gather(*(_namespace_row(client, n) for n in names))
        backlog = await _probed(offsets.probe.delay_backlog())
        shared = await _probed(offsets.probe.depth(topics.NAMES["dlq"]))
        data = {
            "generatedAt": now_iso(),
            "source": _own_url(),
            "namespaces": [r for r in rows if r is not None],
            "backlog": None if "error" in backlog else backlog,
            "dlq": {
                "topic": topics.NAMES["dlq"],
                "depth": None if isinstance(shared, dict) else shared,
            },
            "circuits": [
                {"worker": w["url"], "key": key, **snapshot}
                for w in fleet_data["workers"]
                for key, snapshot in (w.get("circuits") or {}).items()
            ],
            "paces": [
                {"worker": w["url"], **paced}
                for w in fleet_data["workers"]
                for paced in (w.get("paces") or [])
            ],
            "workers": fleet_data["workers"],
            "kafka": fleet_data["workers"][0]["kafka"],
        }
        return self.html(dashboard.render(data))


async def _namespace_row(client: httpx.AsyncClient, name: str) -> dict[str, Any] | None:
    ns = namespace_table.lookup(name)
    if ns is None:
        return None
    row: dict[str, Any] = {"name": ns.name, "enabled": ns.enabled, "paused": pauses(ns)}
    try:
        row.update(await _metrics_of(client, ns.name))
    except (httpx.HTTPError, KeyError, ValueError) as exc:
        row["error"] = f"metrics unavailable ({type(exc).__name__})"
    if ns.dlq_config.topic_name is None:  # the shared topic: its depth is not this namespace's
        row["dlq"] = {"topic": topics.NAMES["dlq"], "depth": None, "shared": True}
        return row
    depth = await _probed(offsets.probe.depth(ns.dlq_config.topic_name))
    row["dlq"] = {
        "topic": ns.dlq_config.topic_name,
        "depth": None if isinstance(depth, dict) else depth,
        "shared": False,
    }
    return row


async def _metrics_of(client: httpx.AsyncClient, name: str) -> dict[str, Any]:
    """A namespace's stats summary from the worker that owns them (this one, or over HTTP)."""
    owner = str(fleet.router.key_store(stats_table.stats.name, name)).rstrip("/")
    if owner == _own_url() and _owns_stats(name):
        return stats_table.summary(name, stats_table.read(name), _now_ms())
    response = await client.get(f"{owner}/wal/namespaces/{quote(name, safe='')}/metrics")
    response.raise_for_status()
    return cast(dict[str, Any], response.json())
