"""The HTTP target against a real aiohttp server on loopback."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from email.utils import formatdate
from typing import Any

import pytest

from app.settings import Settings
from targets.base import Write
from targets.http import HttpTarget
from tests.integration.targets.target_services import Webhook

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def writes(n: int, prefix: str = "m", **payload: Any) -> list[Write]:
    return [
        Write(
            id=f"{prefix}-{i}",
            namespace="orders",
            payload={"n": i, **payload},
            headers={"traceparent": TRACEPARENT},
        )
        for i in range(n)
    ]


@pytest.fixture
async def http_target() -> AsyncIterator[Callable[..., Any]]:
    opened: list[HttpTarget] = []

    async def make(url: str, **config: Any) -> HttpTarget:
        target = HttpTarget("hook", {"url": url, **config}, Settings())
        await target.open()
        opened.append(target)
        return target

    yield make
    for target in opened:
        await target.close()


async def test_each_write_is_one_request_with_idempotency_key(
    webhook: Webhook, http_target: Callable[..., Any]
) -> None:
    target = await http_target(webhook.url(), method="PUT", headers={"X-Tenant": "acme"})
    batch = writes(5)
    assert [o.status for o in await target.deliver(batch)] == ["delivered"] * 5
    assert sorted(webhook.keys()) == [w.id for w in batch]
    for received in webhook.received:
        assert received.method == "PUT"
        assert received.headers["Content-Type"] == "application/json"
        assert received.headers["traceparent"] == TRACEPARENT
        assert received.headers["X-Tenant"] == "acme"
        assert received.body == {"n": int(received.headers["Idempotency-Key"].split("-")[1])}


async def test_server_errors_are_retryable_until_they_pass(
    webhook: Webhook, http_target: Callable[..., Any]
) -> None:
    target = await http_target(webhook.url())
    batch = writes(1)
    webhook.fail(2, 503, {"Retry-After": "4"})
    for _ in range(2):
        [outcome] = await target.deliver(batch)
        assert (outcome.status, outcome.code) == ("retryable", "TARGET_ERROR")
        assert outcome.retry_after == 4
        assert outcome.message == "HTTP 503 Service Unavailable"
    [outcome] = await target.deliver(batch)
    assert outcome.ok
    assert webhook.keys() == ["m-0"] * 3  # the same key every time: the receiver dedupes


async def test_throttling_honours_retry_after_seconds_and_dates(
    webhook: Webhook, http_target: Callable[..., Any]
) -> None:
    target = await http_target(webhook.url())
    webhook.fail(1, 429, {"Retry-After": "7"})
    [outcome] = await target.deliver(writes(1))
    assert (outcome.status, outcome.code) == ("retryable", "TARGET_THROTTLED")
    assert outcome.retry_after == 7

    webhook.fail(1, 429, {"Retry-After": formatdate(time.time() + 60, usegmt=True)})
    [outcome] = await target.deliver(writes(1))
    assert outcome.code == "TARGET_THROTTLED"
    assert outcome.retry_after is not None and 55 <= outcome.retry_after <= 60
    webhook.fail(1, 408)
    webhook.fail(1, 425)
    outcomes = await target.deliver(writes(1)) + await target.deliver(writes(1))
    assert [(o.status, o.code) for o in outcomes] == [
        ("retryable", "TARGET_UNAVAILABLE"),
        ("retryable", "TARGET_ERROR"),
    ]


async def test_a_rejected_item_fails_alone_and_outcomes_keep_input_order(
    webhook: Webhook, http_target: Callable[..., Any]
) -> None:
    target = await http_target(webhook.url(), concurrency=4)
    batch = writes(9)
    batch[4] = Write(id="poison", namespace="orders", payload={"reject": True})
    outcomes = await target.deliver(batch)
    assert [o.status for o in outcomes] == ["delivered"] * 4 + ["permanent"] + ["delivered"] * 4
    assert outcomes[4].code == "TARGET_REJECTED"
    assert outcomes[4].message == "HTTP 422 Unprocessable Entity"
    assert sorted(webhook.keys()) == sorted(w.id for w in batch)


async def test_concurrency_is_bounded(webhook: Webhook, http_target: Callable[..., Any]) -> None:
    target = await http_target(webhook.url(), concurrency=3)
    webhook.hold_s = 0.05
    assert all(o.ok for o in await target.deliver(writes(12)))
    assert webhook.max_in_flight == 3
    assert len(webhook.received) == 12


async def test_timeout_is_retryable(webhook: Webhook, http_target: Callable[..., Any]) -> None:
    target = await http_target(webhook.url("/slow"), timeoutMs=200)
    [outcome] = await target.deliver(writes(1))
    assert (outcome.status, outcome.code) == ("retryable", "TARGET_UNAVAILABLE")
    assert outcome.message.startswith("timeout")


async def test_redirects_are_not_followed(
    webhook: Webhook, http_target: Callable[..., Any]
) -> None:
    target = await http_target(webhook.url("/moved"))
    [outcome] = await target.deliver(writes(1))
    assert (outcome.status, outcome.code) == ("permanent", "TARGET_REJECTED")
    assert [r.path for r in webhook.received] == ["/moved"]


async def test_server_down_then_back(webhook: Webhook, http_target: Callable[..., Any]) -> None:
    target = await http_target(webhook.url())
    assert (await target.deliver(writes(1, "before")))[0].ok
    await webhook.stop()
    outcomes = await target.deliver(writes(3, "during"))
    assert {(o.status, o.code) for o in outcomes} == {("retryable", "TARGET_UNAVAILABLE")}
    await webhook.start()
    assert all(o.ok for o in await target.deliver(writes(3, "during")))
    assert webhook.keys()[0] == "before-0"
    assert sorted(webhook.keys()[1:]) == ["during-0", "during-1", "during-2"]


async def test_secrets_never_reach_messages_or_logs(
    webhook: Webhook,
    http_target: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    secret = "tok-7f3a9c-SECRET-do-not-log"
    monkeypatch.setenv("WAL_TEST_HOOK_TOKEN", secret)
    caplog.set_level(logging.DEBUG)
    headers = {"Authorization": "Bearer ${WAL_TEST_HOOK_TOKEN}"}
    echo = await http_target(webhook.url(f"/echo401?token={secret}"), headers=headers)
    [outcome] = await echo.deliver(writes(1))
    assert (outcome.status, outcome.code) == ("permanent", "TARGET_REJECTED")
    assert outcome.message == "HTTP 401 Unauthorized"
    assert webhook.received[0].headers["Authorization"] == f"Bearer {secret}"  # it was sent
    down = await http_target(f"http://127.0.0.1:{webhook.port}/x?token={secret}", headers=headers)
    await webhook.stop()
    outcomes = [outcome, *await down.deliver(writes(2))]
    assert outcomes[1].status == "retryable"
    for o in outcomes:
        assert secret not in o.message
    assert secret not in caplog.text
    assert secret not in repr(echo)


async def test_a_receiver_echoing_the_secret_is_scrubbed_from_messages(
    webhook: Webhook, http_target: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = "tok-0b1d2e-SECRET-echoed-back"
    monkeypatch.setenv("WAL_TEST_HOOK_TOKEN", secret)
    headers = {"Authorization": "Bearer ${WAL_TEST_HOOK_TOKEN}"}
    target = await http_target(webhook.url("/echo-reason"), headers=headers)
    [outcome] = await target.deliver(writes(1))
    assert outcome.message.startswith("HTTP 401 Denied")
    assert "Authorization=***" in outcome.message
    assert secret not in outcome.message
