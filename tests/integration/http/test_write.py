"""POST /wal/write against a real worker: 202 only after Kafka has it, and every error status."""

from __future__ import annotations

import os
import signal
from typing import Any

import httpx
import pytest

from app.ops import stack
from app.settings import Settings
from app.web.access import hash_key
from tests.integration.harness import Fleet, Worker, eventually, pg_query

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]

KEY, OTHER_KEY = "k-shop-secret-1", "k-blog-secret-2"


def namespaces(table: str) -> list[dict[str, Any]]:
    return [
        {
            "name": "shop",
            "maxMessageSize": 512,
            "targets": [{"identifier": "pg", "type": "sql", "config": {"table": table}}],
            "accessControl": {
                "allowedApiKeys": [hash_key(KEY)],
                "rateLimits": {"requestsPerMinute": 60, "burstLimit": 3},
            },
        },
        {"name": "blog", "accessControl": {"allowedApiKeys": [hash_key(OTHER_KEY)]}},
        {"name": "fenced", "accessControl": {"ipAllowlist": ["10.0.0.0/8"]}},
    ]


@pytest.fixture
async def worker(fleet: Fleet) -> Worker:
    fleet.apply(*namespaces(f"h_{fleet.prefix}"))
    return await fleet.worker().ready()


def assert_error_body(
    r: httpx.Response, status: int, code: str, request_id: str | None = None
) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["success"] is False
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    meta = body["metadata"]
    assert meta["path"] == "/wal/write" and meta["method"] == "POST" and meta["timestamp"]
    assert meta["requestId"] == (request_id or r.headers["X-Request-ID"])
    assert KEY not in r.text and OTHER_KEY not in r.text


async def test_202_means_durable_and_the_row_arrives(fleet: Fleet, worker: Worker) -> None:
    async with httpx.AsyncClient(base_url=worker.url) as client:
        r = await client.post(
            "/wal/write",
            json={"namespace": "shop", "payload": {"sku": "a-1"}},
            headers={"X-API-Key": KEY, "X-Request-ID": "req-123"},
        )
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["durable"] is True and body["messageId"].startswith("wal_")
    assert isinstance(body["partition"], int) and isinstance(body["offset"], int)
    assert r.headers["X-Request-ID"] == "req-123"
    table = f"h_{fleet.prefix}"

    async def landed() -> list[Any]:
        try:
            return pg_query(
                f"SELECT payload->>'sku' FROM \"{table}\" WHERE message_id = %s", body["messageId"]
            )
        except Exception:
            return []

    assert await eventually(landed, timeout=30, what="row") == [("a-1",)]


async def test_each_error_status_uses_the_reference_body(worker: Worker) -> None:
    ok = {"namespace": "shop", "payload": {"a": 1}}
    async with httpx.AsyncClient(base_url=worker.url) as client:
        post = client.post
        assert_error_body(
            await post("/wal/write", content=b"{oops", headers={"X-API-Key": KEY}),
            400,
            "INVALID_JSON",
        )
        assert_error_body(
            await post("/wal/write", json={"namespace": "shop"}, headers={"X-API-Key": KEY}),
            400,
            "VALIDATION_ERROR",
        )
        assert_error_body(await post("/wal/write", json=ok), 401, "UNAUTHORIZED")
        assert_error_body(
            await post("/wal/write", json=ok, headers={"Authorization": "Bearer nope"}),
            401,
            "UNAUTHORIZED",
        )
        assert_error_body(
            await post("/wal/write", json=ok, headers={"X-API-Key": OTHER_KEY}), 403, "FORBIDDEN"
        )
        assert_error_body(
            await post("/wal/write", json={"namespace": "fenced", "payload": {}}), 403, "FORBIDDEN"
        )
        assert_error_body(
            await post(
                "/wal/write",
                json={"namespace": "ghost", "payload": {}},
                headers={"X-Request-ID": "r-404"},
            ),
            404,
            "NAMESPACE_NOT_FOUND",
            "r-404",
        )
        big = {"namespace": "shop", "payload": {"blob": "x" * 1000}}
        assert_error_body(
            await post("/wal/write", json=big, headers={"X-API-Key": KEY}),
            413,
            "MESSAGE_SIZE_LIMIT_EXCEEDED",
        )
        statuses = []
        for _ in range(6):  # burst of 3 (one already spent above on the 413), then 429
            r = await post("/wal/write", json=ok, headers={"Authorization": f"Bearer {KEY}"})
            statuses.append(r.status_code)
        # the two tokens left, then refused (a third 202 only if a token refilled meanwhile:
        # 1 a second); never a 202 after a 429 within the burst
        accepted = statuses.count(202)
        assert accepted in (2, 3) and statuses == [202] * accepted + [429] * (6 - accepted), (
            statuses
        )
        assert_error_body(r, 429, "RATE_LIMIT_EXCEEDED")
        assert int(r.headers["Retry-After"]) >= 1


async def test_openapi_describes_the_write_endpoint(worker: Worker) -> None:
    async with httpx.AsyncClient(base_url=worker.url) as client:
        doc = (await client.get("/wal/openapi.json")).json()
    op = doc["paths"]["/wal/write"]["post"]
    assert {"202", "400", "401", "403", "404", "413", "429", "503"} <= set(op["responses"])
    assert "namespace" in doc["components"]["schemas"]["WriteRequest"]["properties"]


async def test_503_when_kafka_does_not_acknowledge(fleet: Fleet, private_broker: Settings) -> None:
    fleet.extra_env.update({"WAL_BROKER": private_broker.broker, "WAL_HTTP_PRODUCE_TIMEOUT_S": "2"})
    fleet.apply({"name": "shop"})
    worker = await fleet.worker().ready()
    async with httpx.AsyncClient(base_url=worker.url, timeout=30) as client:
        r = await client.post("/wal/write", json={"namespace": "shop", "payload": {"n": 1}})
        assert r.status_code == 202, r.text
        kafka = next(s for s in stack.status(private_broker) if s.name == "kafka")
        assert isinstance(kafka.pid, int)
        os.kill(kafka.pid, signal.SIGSTOP)
        try:
            r = await client.post("/wal/write", json={"namespace": "shop", "payload": {"n": 2}})
        finally:
            os.kill(kafka.pid, signal.SIGCONT)
    assert_error_body(r, 503, "PRODUCER_UNAVAILABLE")
    assert r.headers["Retry-After"]
