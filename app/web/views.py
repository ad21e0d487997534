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
from collections.abc import Awaitable
from datetime import UTC, datetime
from typing import Any, cast
from urllib.parse import quote

from aiohttp import web
from aiohttp.web_exceptions import HTTPRequestEntityTooLarge
from faust.web import Request, Response, View

from agents.ingest import HARD_SIZE_LIMIT, admit, deliver_record
from agents.status import book as status_book
from app import cancelling, names, topics
from app.audit import audit
from app.engine import offsets, producing, replicas
from app.errors import Rejected
from app.fleet import fleet, settings
from app.models import Namespace
from app.pausing import pauses
from app.web import access, openapi
from tables import namespaces as namespace_table
from tables import stats as stats_table
from tables import transactions as transactions_table
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

    def refuse(self, request: Request, rid: str, rejected: Rejected) -> Response:
        """The error answer of ``rejected``."""
        return self.fail(
            request, rid, rejected.http_status, rejected.code, rejected.message, rejected.details
        )

    def namespace_not_found(self, request: Request, name: str) -> Response:
        return self.fail(
            request,
            request_id(request),
            404,
            "NAMESPACE_NOT_FOUND",
            f"namespace '{name}' not found",
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
        passthrough = {h: request.headers[h] for h in names.PASSTHROUGH if h in request.headers}
        record = deliver_record(admitted, raw, passthrough, f"http/{rid}", None)
        try:
            meta = await asyncio.wait_for(
                producing.emit_one(record), timeout=settings.http_produce_timeout_s
            )
        except producing.RECORD_ERRORS as exc:  # refused for good: a retry cannot succeed
            too_large = isinstance(exc, producing.SIZE_ERRORS)
            fleet.log.warning(
                "POST /wal/write %s: Kafka refused the record: %r",
                rid,
                exc,
                extra={"request_id": rid},
            )
            return self.fail(
                request,
                rid,
                413 if too_large else 500,
                "MESSAGE_SIZE_LIMIT_EXCEEDED" if too_large else "RECORD_REJECTED",
                f"Kafka refused the write for good ({type(exc).__name__}); do not retry it as is",
                {"actualSize": len(raw)} if too_large else None,
            )
        except Exception as exc:  # Kafka did not acknowledge: nothing was accepted
            fleet.log.warning(
                "POST /wal/write %s: produce failed: %r", rid, exc, extra={"request_id": rid}
            )
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
            **({"transactionId": admitted.transaction_id} if admitted.transaction_id else {}),
            "partition": meta.partition,
            "offset": meta.offset,
            "topic": meta.topic,
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
        "paused": pauses(ns),
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
            return self.namespace_not_found(request, name)
        summary = namespace_summary(ns)
        keys = {t["identifier"]: f"{ns.name}/{t['identifier']}" for t in summary["targets"]}
        circuits = {t: BREAKERS[k].snapshot() for t, k in keys.items() if k in BREAKERS}
        return self.json({**summary, "circuits": circuits, **await _backlog_of(ns)})


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
    """Partitions assigned, tables recovered, commits keeping up: this worker is processing.
    ``kafka``: the fleet's partitions the brokers report offline or short of in-sync
    replicas (shown, never a reason to be unready: :mod:`app.engine.replicas`)."""

    async def get(self, request: Request) -> Response:
        checks = _readiness()
        status = "ready" if checks["ready"] else "starting"
        if not (checks["commitsAdvancing"] and checks["partitionsMoving"]):
            status = "stalled"
        body = {"status": status, "checks": checks, "stalled": offsets.stalled_partitions()}
        body["kafka"] = replicas.health.view()
        return self.json(body, status=200 if checks["ready"] else 503)


def _readiness() -> dict[str, bool]:
    """Cheap: no broker round trip. Idle is ready; acks that are not committed are not."""
    consumer: Any = fleet.consumer
    recovery: Any = cast(Any, fleet.tables).recovery
    checks = {
        "assigned": bool(consumer.assignment()) and fleet.rebalancing is False,
        "recovered": not recovery.in_recovery,
        "commitsAdvancing": offsets.commits_advancing(),
        "partitionsMoving": not offsets.stalled_partitions(),
    }
    return {**checks, "ready": all(checks.values())}


# -- transactions ------------------------------------------------------------------------


@fleet.page("/wal/transactions/{txn_id}")
class Transaction(WalView):
    """A transaction's status and each mutation's, from the worker that owns it."""

    # Faust's decorator is typed for handlers without path arguments.
    @fleet.table_route(table=transactions_table.transactions, match_info="txn_id")  # type: ignore[arg-type]
    async def get(self, request: Request, txn_id: str) -> Response:
        state = transactions_table.load(txn_id)
        if state is None:
            return self.fail(
                request, request_id(request), 404, "NOT_FOUND", f"transaction '{txn_id}' not found"
            )
        mutations = [{k: v for k, v in m.items() if k != "spec"} for m in state["mutations"]]
        return self.json({**state, "mutations": mutations})


# -- message status ------------------------------------------------------------------------


@fleet.page("/wal/messages/{message_id}")
class MessageStatus(WalView):
    """What became of a message, from the worker that owns its ``wal-status`` partition;
    ``DELETE`` cancels it if it has not been delivered (:mod:`app.cancelling`)."""

    @fleet.topic_route(topic=topics.status_topic, match_info="message_id")  # type: ignore[arg-type]
    async def delete(self, request: Request, message_id: str) -> Response:
        rid = request_id(request)
        doc = status_book.get(message_id)
        name = str(doc["namespace"]) if doc else ""
        ns = namespace_table.lookup(name) if name else None
        key = access.presented_key(dict(request.headers.items()))
        digests = access.admin_digests(settings.admin_api_keys.get_secret_value())
        try:
            caller = cancelling.canceller(key, digests, ns)
        except Rejected as rejected:
            who = f"key:{access.fingerprint(access.hash_key(key))}" if key else "anonymous"
            audit(who, "messages.cancel", "refused", message=message_id, reason=rejected.code)
            return self.refuse(request, rid, rejected)
        word = cancelling.outcome(doc)
        if word in ("pending", "cancelled", "partially cancelled"):
            try:
                word = await cancelling.cancel(
                    message_id,
                    name,
                    caller,
                    lambda: status_book.get(message_id),
                    settings.partitions,
                )
            except Rejected as rejected:
                return self.refuse(request, rid, rejected)
        audit(caller, "messages.cancel", "ok", message=message_id, namespace=name, result=word)
        body = {"messageId": message_id, "outcome": word, "status": status_book.get(message_id)}
        return self.json(body, headers={"X-Request-ID": rid})

    @fleet.topic_route(topic=topics.status_topic, match_info="message_id")  # type: ignore[arg-type]
    async def get(self, request: Request, message_id: str) -> Response:
        doc = status_book.get(message_id)
        if doc is None:
            return self.fail(
                request,
                request_id(request),
                404,
                "NOT_FOUND",
                f"no status for message '{message_id}': unknown, or older than "
                f"{settings.status_retention_s:g} s (WAL_STATUS_RETENTION_S)",
            )
        return self.json(doc)


# -- operations: stats, fleet, dashboard ----------------------------------------------------


@fleet.page("/wal/namespaces/{name}/metrics")
class NamespaceMetrics(WalView):
    """Totals, rates and latency of a namespace, from the worker that folds its stats."""

    async def get(self, request: Request, name: str) -> Response:
        canonical = name.strip().lower()
        if canonical != name:  # route by the stored key, or another worker is asked
            raise web.HTTPPermanentRedirect(f"/wal/namespaces/{quote(canonical, safe='')}/metrics")
        if namespace_table.lookup(name) is None:
            return self.namespace_not_found(request, name)
        return await self.owned(request)

    # Faust's decorator is typed for View itself, not its subclasses.
    @fleet.table_route(table=stats_table.stats, match_info="name")  # type: ignore[arg-type]
    async def owned(self, request: Request) -> Response:
        name = request.match_info["name"]
        if not _owns_stats(name):  # routed here mid-rebalance: do not answer with a stale copy
            return self.fail(
                request,
                request_id(request),
                503,
                "INTERNAL_ERROR",
                "the namespace's stats are moving between workers; retry shortly",
                headers={"Retry-After": "1"},
            )
        return self.json(stats_table.summary(name, stats_table.read(name), _now_ms()))


def _owns_stats(name: str) -> bool:
    recovery: Any = cast(Any, fleet.tables).recovery
    assignor: Any = fleet.assignor
    tp = fleet.producer.key_partition(
        stats_table.stats.changelog_topic.get_topic_name(), name.encode()
    )
    return assignor.is_active(tp) and not recovery.in_recovery


def _now_ms() -> int:
    return int(time.time() * 1000)


async def _backlog_of(ns: Namespace) -> dict[str, Any]:
    """What the status view adds: what waits in Kafka, and this worker's consumer lag.

    The retry/delay backlog is the fleet's (the tiers are shared by every
    namespace); the DLQ depth is that of the namespace's DLQ topic, which
    other namespaces share unless it names its own.
    """
    dlq_topic = ns.dlq_config.topic_name or topics.NAMES["dlq"]
    backlog = await _probed(offsets.probe.delay_backlog())
    depth = await _probed(offsets.probe.depth(dlq_topic))
    return {
        "backlog": {"scope": "fleet", **backlog},
        "dlq": {
            "topic": dlq_topic,
            "depth": depth or 0,
            "sharedTopic": ns.dlq_config.topic_name is None,
        },
        "consumerLag": _json_lag(offsets.consumer_lag()),
    }


async def _probed(what: Awaitable[Any]) -> Any:
    """A broker-side number for a view, or an error marker: a view never fails for it."""
    try:
        return await what
    except Exception as exc:
        fleet.log.warning("probing Kafka offsets failed: %r", exc)
        return {"error": "unavailable"}


def _json_lag(lag: dict[str, dict[int, int]]) -> dict[str, dict[str, int]]:
    return {t: {str(p): n for p, n in sorted(parts.items())} for t, parts in sorted(lag.items())}
