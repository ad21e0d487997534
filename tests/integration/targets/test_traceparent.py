"""``traceparent`` travels unchanged from the client to the HTTP target and to the DLQ:
through Kafka or POST /wal/write, across a retry in a delay tier, into a dead letter."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest

from tests.integration.harness import Fleet, eventually, header, produce, read_all, request
from tests.integration.targets.target_services import Webhook

pytestmark = [pytest.mark.kafka]


def trace() -> str:
    return f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01"


async def test_traceparent_reaches_the_target_and_the_dlq_unchanged(
    fleet: Fleet, webhook: Webhook
) -> None:
    failed_once: set[str] = set()

    def fail_if(body: Any) -> int | None:  # "retry" fails once: it goes round a delay tier
        if isinstance(body, dict) and body.get("case") == "retry" and "retry" not in failed_once:
            failed_once.add("retry")
            return 503
        return None

    webhook.fail_if = fail_if
    fleet.apply(
        {
            "name": "traced",
            "retryPolicy": {
                "maxAttempts": 3,
                "backoffStrategy": "constant",
                "initialDelayMs": 300,
                "jitterMs": 0,
            },
            "targets": [{"identifier": "hook", "type": "http", "config": {"url": webhook.url()}}],
        }
    )
    worker = await fleet.worker().ready()
    traces = {case: trace() for case in ("kafka", "http", "retry", "reject")}
    for case in ("kafka", "retry", "reject"):
        body = {"case": case, **({"reject": True} if case == "reject" else {})}
        await produce(
            fleet.topic("ingest"),
            [request("traced", body, messageId=f"tp-{case}")],
            headers=[("traceparent", traces[case].encode())],
        )
    async with httpx.AsyncClient(base_url=worker.url, timeout=10) as client:
        r = await client.post(
            "/wal/write",
            json={"namespace": "traced", "payload": {"case": "http"}, "messageId": "tp-http"},
            headers={"traceparent": traces["http"]},
        )
    assert r.status_code == 202, r.text

    async def answered() -> dict[str, str] | None:
        seen = {
            r.body["case"]: r.headers.get("traceparent", "")
            for r in webhook.received
            if r.ok and isinstance(r.body, dict)
        }
        return seen if {"kafka", "http", "retry"} <= set(seen) else None

    seen = await eventually(answered, timeout=60, what="three writes at the webhook")
    assert seen == {case: traces[case] for case in ("kafka", "http", "retry")}, seen
    assert "retry" in failed_once  # it did go round a delay tier first

    async def dead() -> list[Any] | None:
        return await read_all(fleet.topic("dlq")) or None

    (letter,) = await eventually(dead, timeout=60, what="the rejected write's dead letter")
    assert header(letter, "wal-message-id") == "tp-reject"
    assert header(letter, "traceparent") == traces["reject"]
