"""Admin access over HTTP against a real worker: who may start an admin operation, the
audit line each attempt leaves, its count, and no secret anywhere it can be read."""

from __future__ import annotations

import asyncio
import hashlib

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.harness import (
    ADMIN_DIGEST,
    ADMIN_KEY,
    Fleet,
    Worker,
    eventually,
    insert_only,
    pg_count,
    produce,
    request,
)

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]

NS_KEY = "orders-writer-key"


async def backfill(worker: Worker, body: dict[str, object], key: str | None) -> httpx.Response:
    headers = {"X-API-Key": key} if key else {}
    async with httpx.AsyncClient(timeout=30.0) as client:
        return await client.post(f"{worker.url}/wal/admin/backfill", json=body, headers=headers)


async def admin_actions(worker: Worker) -> dict[tuple[str, str], float]:
    async with httpx.AsyncClient(timeout=5.0) as client:
        text = (await client.get(f"{worker.url}/metrics")).text
    return {
        (s.labels["action"], s.labels["outcome"]): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "wal_admin_actions_total"
    }


def audit_lines(worker: Worker) -> list[dict[str, object]]:
    found = []
    for line in worker.log.read_text(errors="replace").splitlines():
        if '"wal.audit"' in line:
            found.append(orjson.loads(line))
    return found


async def test_only_an_admin_key_starts_a_backfill_and_every_attempt_is_audited(
    fleet: Fleet,
) -> None:
    table = f"a_{fleet.prefix}"
    namespace = insert_only(table)
    namespace["accessControl"] = {"allowedApiKeys": [f"sha256:{_sha(NS_KEY)}"]}
    fleet.apply(namespace)
    worker = await fleet.worker().ready()
    good = {"namespace": "orders", "target": "pg", "dryRun": True}

    missing = await backfill(worker, good, None)
    assert (missing.status_code, missing.json()["error"]["code"]) == (401, "UNAUTHORIZED")
    owner = await backfill(worker, good, NS_KEY)  # a namespace's own key is not an admin's
    assert (owner.status_code, owner.json()["error"]["code"]) == (403, "FORBIDDEN")
    assert "not an admin key" in owner.json()["error"]["message"]

    unknown = await backfill(worker, {**good, "namespace": "nope"}, ADMIN_KEY)
    assert (unknown.status_code, unknown.json()["error"]["code"]) == (404, "NAMESPACE_NOT_FOUND")
    no_target = await backfill(worker, {**good, "target": "cache"}, ADMIN_KEY)
    assert no_target.status_code == 404
    error = no_target.json()["error"]
    assert error["code"] == "TARGET_NOT_FOUND" and error["details"]["targets"] == ["pg"]
    assert "target 'cache' is not defined by namespace 'orders'" in error["message"]

    # the owner's writes still need only the namespace key
    async with httpx.AsyncClient(timeout=10.0) as client:
        wrote = await client.post(
            f"{worker.url}/wal/write",
            content=request("orders", {"seq": 1, "body": "x"}),
            headers={"X-API-Key": NS_KEY, "Content-Type": "application/json"},
        )
    assert wrote.status_code == 202, wrote.text
    await eventually(lambda: _rows(table, 1), timeout=30, what="the owner's write")

    ok = await backfill(worker, good, ADMIN_KEY)
    assert ok.status_code == 200 and ok.headers["content-type"] == "application/x-ndjson"
    events = [orjson.loads(line) for line in ok.text.splitlines()]
    assert events[0]["event"] == "start" and events[-1]["event"] == "done"
    assert (events[-1]["matched"], events[-1]["reEmitted"], events[-1]["dryRun"]) == (1, 1, True)

    counts = await admin_actions(worker)
    assert counts[("backfill", "refused")] == 2
    assert counts[("backfill", "started")] == counts[("backfill", "ok")] == 1

    lines = audit_lines(worker)
    me = f"admin:{ADMIN_DIGEST[7:15]}"
    assert [(a["actor"], a["outcome"]) for a in lines] == [
        ("anonymous", "refused"),
        (f"key:{_sha(NS_KEY)[:8]}", "refused"),
        (me, "started"),  # the 404s were refused before anything started: no line
        (me, "ok"),
    ]
    done = lines[-1]
    assert done["action"] == "backfill" and str(done["time"]).endswith("Z")
    assert done["details"] == {
        **{"namespace": "orders", "target": "pg", "since": None, "until": None},
        **{"dry_run": True, "rate": None, "request_id": ok.headers["x-request-id"]},
        **{"read": events[-1]["read"], "matched": 1, "re_emitted": 1, "skipped": 0},
    }
    log = worker.log.read_text(errors="replace")
    for secret in (ADMIN_KEY, NS_KEY, ADMIN_DIGEST, _sha(NS_KEY)):
        assert secret not in log
    for path in ("/wal/namespaces", "/wal/namespaces/orders/status", "/wal/fleet"):
        async with httpx.AsyncClient(timeout=10.0) as client:
            shown = (await client.get(f"{worker.url}{path}")).text
        assert ADMIN_DIGEST[7:] not in shown and ADMIN_KEY not in shown


async def _rows(table: str, n: int) -> bool:
    return pg_count(table) >= n


def _sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


async def test_a_backfill_stops_when_its_client_goes_away(fleet: Fleet) -> None:
    table = f"s_{fleet.prefix}"
    fleet.apply(insert_only(table))
    worker = await fleet.worker().ready()
    await produce(
        fleet.topic("ingest"), [request("orders", {"seq": i, "body": "x"}) for i in range(40)]
    )
    await eventually(lambda: _rows(table, 40), timeout=60, what="40 rows")

    body = {"namespace": "orders", "target": "pg", "rate": 4}  # 40 writes: 10 s
    async with (
        httpx.AsyncClient(timeout=30.0) as client,
        client.stream(
            "POST", f"{worker.url}/wal/admin/backfill", json=body, headers={"X-API-Key": ADMIN_KEY}
        ) as answer,
    ):
        assert answer.status_code == 200
        seen = []
        async for line in answer.aiter_lines():
            seen.append(orjson.loads(line))
            if seen[-1]["event"] == "progress":
                break  # and close the connection

    async def stopped() -> dict[str, object] | None:
        ends = [a for a in audit_lines(worker) if a["outcome"] != "started"]
        return ends[-1] if ends else None

    end = await eventually(stopped, timeout=15, what="the backfill's last audit line")
    assert end["outcome"] == "failed"
    details = end["details"]
    assert isinstance(details, dict) and details["error"] == "client went away"
    assert 0 < details["re_emitted"] < 40, details
    await asyncio.sleep(2)  # nothing more is re-emitted once it stopped
    assert (await admin_actions(worker))[("backfill", "failed")] == 1
    assert pg_count(table) == 40
