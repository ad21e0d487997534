"""Admin endpoints (``/wal/admin/*``): operations that change what the fleet does.

Each one starts with :func:`admin_of` - the one check that a request comes from an
admin key of ``WAL_ADMIN_API_KEYS`` - and ends with an audit line
(:func:`app.audit.audit`): who (the key's fingerprint), what, and how it ended.

``POST /wal/admin/backfill`` runs a backfill (:mod:`app.backfill`) on this worker,
with this worker's Kafka credentials, and answers with its progress as it goes:
one JSON object per line (``application/x-ndjson``): ``start`` (the records to
read), ``progress`` every half second, then ``done`` with the summary, or
``error``. A client that goes away stops it (a new run redoes nothing: the target's
ledger has what was delivered).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, cast

import orjson
from aiohttp import web
from faust.web import Request, Response

from app import backfill as backfill_run
from app import pausing
from app.audit import audit, require_admin
from app.engine import producing
from app.errors import Rejected
from app.fleet import fleet, settings
from app.models import Pause
from app.names import Record
from app.topics import NAMES
from app.web import access
from app.web.views import WalView, request_id
from tables.namespaces import lookup


def admin_of(request: Request, action: str) -> access.Caller:
    """The admin making ``request`` for ``action``; :class:`Rejected` (401/403, audited)
    when its key (``X-API-Key`` or ``Authorization: Bearer``) is not an admin key."""
    key = access.presented_key(dict(request.headers.items()))
    digests = access.admin_digests(settings.admin_api_keys.get_secret_value())
    return require_admin(action, key, digests)


def backfill_plan(body: Any) -> backfill_run.Plan:
    """The request body as a :class:`~app.backfill.Plan`, checked against the namespace's
    live config: :class:`Rejected` saying what is wrong."""
    if not isinstance(body, dict):
        raise Rejected("the body is a JSON object: {namespace, target, since?, until?, ...}")
    namespace, target = body.get("namespace"), body.get("target")
    if not isinstance(namespace, str) or not isinstance(target, str) or not target:
        raise Rejected("namespace and target (strings) are required")
    since, until, rate = body.get("since"), body.get("until"), body.get("rate")
    for name, value in (("since", since), ("until", until)):
        if value is not None and not isinstance(value, int):
            raise Rejected(f"{name} is epoch milliseconds (an integer)")
    if rate is not None and (not isinstance(rate, int | float) or rate <= 0):
        raise Rejected("rate is a positive number of writes a second")
    found = lookup(namespace.strip().lower())
    if found is None:
        raise Rejected(
            f"namespace '{namespace}' not found", code="NAMESPACE_NOT_FOUND", http_status=404
        )
    defined = [t.identifier for t in found.targets] or ["journal"]
    definition = found.target(target) if found.targets else None
    if target not in defined:
        raise Rejected(
            f"target '{target}' is not defined by namespace '{found.name}' "
            f"(its targets: {', '.join(defined)}); add it to the namespace first",
            code="TARGET_NOT_FOUND",
            details={"target": target, "targets": defined},
            http_status=404,
        )
    if definition is not None and not definition.enabled:
        raise Rejected(
            f"target '{target}' of namespace '{found.name}' is disabled: enable it first",
            details={"target": target},
        )
    return backfill_run.Plan(
        found.name, target, since, until, bool(body.get("dryRun")), float(rate) if rate else None
    )


@fleet.page("/wal/admin/backfill")
class Backfill(WalView):
    """Re-deliver what ``wal-deliver`` holds for a namespace to one of its targets."""

    async def post(self, request: Request) -> Any:
        rid = request_id(request)
        try:
            caller = admin_of(request, "backfill")
            try:
                body = orjson.loads(await request.read())
            except orjson.JSONDecodeError as exc:
                raise Rejected(f"invalid JSON: {exc}", code="INVALID_JSON") from None
            plan = backfill_plan(body)
        except Rejected as rejected:
            return self.refuse(request, rid, rejected)
        asked = {
            "namespace": plan.namespace,
            "target": plan.target,
            "since": plan.since_ms,
            "until": plan.until_ms,
            "dry_run": plan.dry_run,
            "rate": plan.rate,
            "request_id": rid,
        }
        audit(caller, "backfill", "started", **asked)
        stream = web.StreamResponse(
            headers={"Content-Type": "application/x-ndjson", "X-Request-ID": rid}
        )
        await stream.prepare(cast(web.Request, request))

        async def send(event: str, tally: backfill_run.Tally, **more: Any) -> None:
            line = {"event": event, **tally.as_json(), "dryRun": plan.dry_run, **more}
            await stream.write(orjson.dumps(line) + b"\n")

        async def emit(records: list[Record]) -> None:
            what = f"backfill of {len(records)} to {plan.namespace}/{plan.target}"
            await producing.emit_until_durable(records, what=what)

        tally = backfill_run.Tally()
        try:
            await backfill_run.run(settings, plan, emit, send, tally)
        except asyncio.CancelledError:  # the worker stops
            audit(caller, "backfill", "failed", **asked, **_counts(tally), error="worker stopping")
            raise
        except ConnectionError:  # the client went away: that stops the backfill
            audit(caller, "backfill", "failed", **asked, **_counts(tally), error="client went away")
            return stream
        except Exception as exc:
            fleet.log.exception("backfill %s failed", rid, extra={"request_id": rid})
            audit(caller, "backfill", "failed", **asked, **_counts(tally), error=type(exc).__name__)
            await send("error", tally, message=f"{type(exc).__name__}: {exc}"[:500])
        else:
            audit(caller, "backfill", "ok", **asked, **_counts(tally))
            await send("done", tally)
        await stream.write_eof()
        return stream


class _Pausing(WalView):
    """``POST /wal/admin/namespaces/{name}/pause`` (body ``{"target"?, "reason"?}``) and
    ``.../resume`` (body ``{"target"?}``): the namespace's new config goes to the
    namespaces topic, every worker has it in about a second (:mod:`app.pausing`)."""

    action = ""

    async def post(self, request: Request, name: str) -> Response:
        rid = request_id(request)
        try:
            caller = admin_of(request, f"namespaces.{self.action}")
            raw = await request.read()
            body = orjson.loads(raw) if raw.strip() else {}
            if not isinstance(body, dict):
                raise Rejected("the body is a JSON object: {target?, reason?}")
            target, reason = body.get("target"), str(body.get("reason") or "")[:500]
            found = lookup(name.strip().lower())
            if found is None:
                raise Rejected(
                    f"namespace '{name}' not found", code="NAMESPACE_NOT_FOUND", http_status=404
                )
            pause = None
            if self.action == "pause":
                pause = Pause(reason=reason, since_ms=int(time.time() * 1000), by=str(caller))
            ns, changed = pausing.paused(found, target, pause)
        except orjson.JSONDecodeError as exc:
            return self.refuse(request, rid, Rejected(f"invalid JSON: {exc}", code="INVALID_JSON"))
        except Rejected as rejected:
            return self.refuse(request, rid, rejected)
        if changed:
            record = Record(
                NAMES["namespaces"], ns.name.encode(), ns.model_dump_json().encode(), {}
            )
            await producing.emit_until_durable([record], what=f"{self.action} of {ns.name}")
        audit(
            caller,
            f"namespaces.{self.action}",
            namespace=ns.name,
            target=target,
            reason=reason or None,
            changed=changed,
        )
        return self.json(
            {
                "namespace": ns.name,
                "target": target,
                "changed": changed,
                "paused": pausing.pause_of(ns, ns.target(target) if target else None) is not None,
            },
            headers={"X-Request-ID": rid},
        )


@fleet.page("/wal/admin/namespaces/{name}/pause")
class PauseNamespace(_Pausing):
    action = "pause"


@fleet.page("/wal/admin/namespaces/{name}/resume")
class ResumeNamespace(_Pausing):
    action = "resume"


def _counts(tally: backfill_run.Tally) -> dict[str, int]:
    return {
        "read": tally.read,
        "matched": tally.matched,
        "re_emitted": tally.re_emitted,
        "skipped": sum(tally.skipped.values()),
    }
