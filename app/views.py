"""The worker's web API on Faust's web server (ARCHITECTURE.md §7).

``POST /wal/write`` runs the same admission as the Kafka ingest
(:func:`agents.ingest.admit`), plus access control, then produces the
admitted record with acks=all and answers 202 only once Kafka has it.
Errors use the reference's body (section 8.2) with a request id.
"""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from datetime import UTC, datetime
from typing import Any, cast

from aiohttp import web
from aiohttp.web_exceptions import HTTPRequestEntityTooLarge
from faust.web import Request, Response, View

from agents.ingest import HARD_SIZE_LIMIT, admit, deliver_record
from app import access, openapi, topics
from app.errors import Rejected
from app.fleet import fleet, settings
from app.models import Namespace
from tables import namespaces as namespace_table
from targets.circuit import BREAKERS

limiter = access.RateLimiter()


def _aio(request: Request) -> web.Request:
    """Faust hands views the aiohttp request; its own type does not say so."""
    return cast(web.Request, request)


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def request_id(request: Request) -> str:
    return request.headers.get("X-Request-ID") or str(uuid.uuid4())


def error_body(
    request: Request, rid: str, code: str, message: str, details: Any = None
) -> dict[str, Any]:
    """The reference's error body (section 8.2)."""
    return {
        "success": False,
        "error": {"code": code, "message": message, "details": details},
        "metadata": {
            "requestId": rid,
            "timestamp": now_iso(),
            "path": _aio(request).path,
            "method": request.method,
        },
    }


class WalView(View):
    """A view that answers errors in the reference's body and echoes the request id."""

    def fail(
        self,
        request: Request,
        rid: str,
        status: int,
        code: str,
        message: str,
        details: Any = None,
        headers: dict[str, str] | None = None,
    ) -> Response:
        return self.json(
            error_body(request, rid, code, message, details),
            status=status,
            headers={"X-Request-ID": rid, **(headers or {})},
        )


@fleet.page("/wal/write")
class Write(WalView):
    """WriteToLog: admit one write request and make it durable in Kafka."""

    async def post(self, request: Request) -> Response:
        rid = request_id(request)
        try:
            raw = await _body(request)
            headers = {k: v for k, v in request.headers.items()}
            key = access.presented_key(headers)
            if key and not _known_anywhere(access.hash_key(key)):
                raise Rejected("unknown API key", code="UNAUTHORIZED", http_status=401)
            admitted = admit(
                raw,
                {},
                timestamp_ms=int(time.time() * 1000),
                fallback_id=f"wal_{int(time.time() * 1000):013d}_{secrets.token_hex(6)}",
                sequence=secrets.randbelow(1 << 30),
                authorize=lambda ns: access.authorize(
                    ns,
                    key=key,
                    known_anywhere=_known_anywhere,
                    address=_aio(request).remote,
                    limiter=limiter,
                ),
            )
        except Rejected as rejected:
            retry = (
                (rejected.details or {}).get("retryAfterSeconds")
                if isinstance(rejected.details, dict)
                else None
            )
            return self.fail(
                request,
                rid,
                rejected.http_status,
                rejected.code,
                rejected.message,
                rejected.details,
                {"Retry-After": str(retry)} if retry else None,
            )
        passthrough = {h: request.headers[h] for h in topics.PASSTHROUGH if h in request.headers}
        record = deliver_record(admitted, raw, passthrough, f"http/{rid}", None)
        try:
            meta = await asyncio.wait_for(
                topics.emit([record]), timeout=settings.http_produce_timeout_s
            )
        except Exception as exc:  # Kafka did not acknowledge: nothing was accepted
            fleet.log.warning("POST /wal/write %s: produce failed: %r", rid, exc)
            return self.fail(
                request,
                rid,
                503,
                "PRODUCER_UNAVAILABLE",
                "Kafka did not acknowledge the write; retry with the same messageId",
                headers={"Retry-After": "1"},
            )
        body = {
            "durable": True,
            "messageId": admitted.message_id,
            "partition": meta[0].partition,
            "offset": meta[0].offset,
            "topic": meta[0].topic,
            "timestamp": now_iso(),
            "message": "Message accepted for processing",
        }
        return self.json(body, status=202, headers={"X-Request-ID": rid})


async def _body(request: Request) -> bytes:
    length = _aio(request).content_length
    if length is not None and length > HARD_SIZE_LIMIT:
        raise Rejected(
            f"body of {length} bytes is larger than any namespace accepts",
            code="PAYLOAD_TOO_LARGE",
            http_status=413,
        )
    try:
        return bytes(await request.read())
    except HTTPRequestEntityTooLarge:
        raise Rejected(
            "body is larger than any namespace accepts", code="PAYLOAD_TOO_LARGE", http_status=413
        ) from None


def _known_anywhere(digest: str) -> bool:
    for name in namespace_table.all_names():
        ns = namespace_table.lookup(name)
        if ns is not None and access.key_matches(digest, ns.access_control.allowed_api_keys):
            return True
    return False


def namespace_summary(ns: Namespace) -> dict[str, Any]:
    """What the views show of a namespace: never target configs (they may hold secrets)."""
    return {
        "name": ns.name,
        "enabled": ns.enabled,
        "description": ns.description,
        "ordering": ns.ordering,
        "shardStrategy": ns.shard_config.strategy.value,
        "maxMessageSize": ns.max_message_size,
        "messageTtlSeconds": ns.message_ttl_seconds,
        "targets": [
            {"identifier": t.identifier, "type": t.type, "enabled": t.enabled, "region": t.region}
            for t in ns.targets
        ]
        or [{"identifier": "journal", "type": "sql", "enabled": True, "region": None}],
        "requiresApiKey": bool(ns.access_control.allowed_api_keys),
    }


@fleet.page("/wal/namespaces")
class Namespaces(WalView):
    async def get(self, request: Request) -> Response:
        found = [namespace_table.lookup(n) for n in namespace_table.all_names()]
        return self.json({"namespaces": [namespace_summary(ns) for ns in found if ns]})


@fleet.page("/wal/namespaces/{name}/status")
class NamespaceStatus(WalView):
    async def get(self, request: Request, name: str) -> Response:
        ns = namespace_table.lookup(name.strip().lower())
        if ns is None:
            return self.fail(
                request,
                request_id(request),
                404,
                "NAMESPACE_NOT_FOUND",
                f"namespace '{name}' not found",
            )
        summary = namespace_summary(ns)
        keys = {t["identifier"]: f"{ns.name}/{t['identifier']}" for t in summary["targets"]}
        circuits = {t: BREAKERS[k].snapshot() for t, k in keys.items() if k in BREAKERS}
        return self.json({**summary, "circuits": circuits})


@fleet.page("/wal/openapi.json")
class OpenApi(View):
    async def get(self, request: Request) -> Response:
        return self.json(openapi.document())


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
    recovery: Any = cast(Any, fleet.tables).recovery
    return bool(consumer.assignment()) and not recovery.in_recovery and fleet.rebalancing is False
