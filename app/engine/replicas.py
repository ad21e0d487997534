"""The brokers' view of the fleet's partitions: offline, short of in-sync replicas.

A timer describes the fleet's topics (its own and the tables' changelogs) every
:data:`INTERVAL_S` with one metadata request, bounded by :data:`DEADLINE_S`, and keeps
what it found for readiness, ``/wal/fleet``, the dashboard and ``wal_kafka_partitions``:
nothing a view answers waits for a broker. A describe that fails or times out (the brokers
away) keeps the last answer, with its age, and says why.

What is counted, per partition: *offline* (no leader: nothing can be read or written),
*under min ISR* (fewer replicas in sync than ``min(2, replicas)``: an ``acks=all`` write
is refused until one catches up), *under-replicated* (fewer in sync than assigned: one
more failure from being under min ISR). None of it makes a worker unready: it is the
brokers' state, no worker can change it, and restarting workers would not help.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient

from app import metrics
from app.engine.clients import security
from app.fleet import fleet, settings
from app.names import topic_names

INTERVAL_S = 10.0
DEADLINE_S = 3.0
#: Partitions named in a snapshot at most (the counts are complete).
LISTED = 20


class ReplicaHealth:
    """The last describe of the fleet's topics, as counts and the partitions at risk."""

    def __init__(self) -> None:
        self._admin: AIOKafkaAdminClient | None = None
        self.snapshot: dict[str, Any] = {"checked": False}
        self._at = 0.0

    async def refresh(self, names: list[str]) -> None:
        try:
            described = await asyncio.wait_for(self._describe(names), DEADLINE_S)
        except Exception as exc:  # the brokers away: keep the last answer, say why
            await self._drop_admin()
            self.snapshot = {**self.snapshot, "error": f"{type(exc).__name__}: {exc}"[:200]}
            return
        self._at = time.monotonic()
        self.snapshot = summarize(described)
        for state in ("offline", "underMinIsr", "underReplicated"):
            metrics.PARTITIONS_AT_RISK.labels(_LABELS[state]).set(self.snapshot[state]["count"])

    def view(self) -> dict[str, Any]:
        """The snapshot with its age in seconds (None before the first answer)."""
        age = round(time.monotonic() - self._at, 1) if self._at else None
        return {**self.snapshot, "ageSeconds": age}

    async def _describe(self, names: list[str]) -> list[dict[str, Any]]:
        admin = self._admin
        if admin is None:  # kept before it starts: a start cut short is closed too
            admin = self._admin = AIOKafkaAdminClient(
                bootstrap_servers=settings.bootstrap_servers,
                request_timeout_ms=int(DEADLINE_S * 1000),
                **security(settings),
            )
            await admin.start()
        return list(await admin.describe_topics(names))

    async def _drop_admin(self) -> None:
        admin, self._admin = self._admin, None
        if admin is not None:
            try:
                await asyncio.wait_for(admin.close(), DEADLINE_S)
            except Exception:  # closing a client of brokers that are away
                fleet.log.debug("closing the replica probe's admin client failed")

    async def close(self) -> None:
        await self._drop_admin()


_LABELS = {
    "offline": "offline",
    "underMinIsr": "under_min_isr",
    "underReplicated": "under_replicated",
}


def summarize(described: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts and (up to :data:`LISTED`) partitions offline, under min ISR, under-replicated,
    from aiokafka's ``describe_topics`` answer; topics that do not exist are left out."""
    found: dict[str, list[dict[str, Any]]] = {s: [] for s in _LABELS}
    partitions = 0
    for topic in described:
        if topic.get("error_code"):
            continue
        for p in topic["partitions"]:
            partitions += 1
            replicas, isr = len(p["replicas"]), len(p["isr"])
            where = {"topic": topic["topic"], "partition": p["partition"]}
            where |= {"leader": p["leader"], "replicas": replicas, "inSync": isr}
            if p["leader"] < 0:
                found["offline"].append(where)
            if isr < min(2, replicas):
                found["underMinIsr"].append(where)
            if isr < replicas:
                found["underReplicated"].append(where)
    out: dict[str, Any] = {"checked": True, "partitions": partitions}
    for state, places in found.items():
        places.sort(key=lambda w: (w["topic"], w["partition"]))
        out[state] = {"count": len(places), "partitions": places[:LISTED]}
    return out


health = ReplicaHealth()


def fleet_topics() -> list[str]:
    """The fleet's topics and its tables' changelogs."""
    return sorted(set(topic_names(settings).values()) | set(fleet.tables.changelog_topics))


@fleet.timer(INTERVAL_S)
async def refresh_replica_health() -> None:
    """Keep :data:`health` current; never raises (a timer that raises stops for good)."""
    try:
        await health.refresh(fleet_topics())
    except Exception:
        fleet.log.exception("describing the fleet's partitions failed")


@fleet.on_before_shutdown.connect
async def _close(app: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
    await health.close()
