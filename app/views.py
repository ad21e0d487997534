"""The worker's web views (Faust web server): health now; the WAL API joins here."""

from __future__ import annotations

from typing import Any

from faust.web import Request, Response, View

from app.fleet import fleet


@fleet.page("/health/live")
class Live(View):
    """The event loop answers."""

    async def get(self, request: Request) -> Response:
        return self.json({"status": "ok"})


@fleet.page("/health/ready")
class Ready(View):
    """Partitions assigned and tables recovered: this worker is processing."""

    async def get(self, request: Request) -> Response:
        ready = _ready()
        return self.json({"status": "ready" if ready else "starting"}, status=200 if ready else 503)


def _ready() -> bool:
    consumer: Any = fleet.consumer
    recovery: Any = fleet.tables.recovery
    return bool(consumer.assignment()) and not recovery.in_recovery and fleet.rebalancing is False
