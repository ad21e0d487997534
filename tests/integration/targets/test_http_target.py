"""The HTTP target against a real aiohttp server on loopback."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from email.utils import formatdate
from typing import Any

import orjson
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


def conditional(id: str, conditions: dict[str, Any] | None, n: int = 0) -> Write:
    options = {} if conditions is None else {"conditions": conditions}
    return Write(id=id, namespace="orders", payload={"n": n}, options=options)


async def test_conditions_arrive_as_if_match_and_wal_conditions_headers(
    webhook: Webhook, http_target: Callable[..., Any]
) -> None:
    target = await http_target(webhook.url())
    sent = {
        "etag": {"etag": "abc", "owner": "me"},
        "quoted": {"etag": '"abc"'},
        "weak": {"etag": 'W/"abc"', "version": 9},
        "version": {"version": 7},
        "text-version": {"version": "2024-01-01"},
        "other": {"state": "open", "who": "Zoë"},
        "none": None,
    }
    batch = [conditional(id, conditions) for id, conditions in sent.items()]
    assert [o.status for o in await target.deliver(batch)] == ["delivered"] * len(batch)
    headers = {r.headers["Idempotency-Key"]: r.headers for r in webhook.received}
    assert {id: h.get("If-Match") for id, h in headers.items()} == {
        "etag": '"abc"',
        "quoted": '"abc"',
        "weak": 'W/"abc"',
        "version": '"7"',
        "text-version": '"2024-01-01"',
        "other": None,
        "none": None,
    }
    for id, conditions in sent.items():
        if conditions is None:
            assert "WAL-Conditions" not in headers[id]
        else:
            assert orjson.loads(headers[id]["WAL-Conditions"]) == conditions
    assert headers["etag"]["WAL-Conditions"] == '{"etag":"abc","owner":"me"}'  # compact
    assert headers["other"]["WAL-Conditions"] == '{"state":"open","who":"Zo\\u00eb"}'


async def test_412_is_condition_failed_for_a_conditional_write_and_not_retried(
    webhook: Webhook, http_target: Callable[..., Any]
) -> None:
    target = await http_target(webhook.url())
    webhook.etag = '"v2"'
    batch = [
        conditional("stale", {"version": "v1"}),
        conditional("fresh", {"version": "v2"}),
        conditional("stale-etag", {"etag": "v1"}),
        conditional("unconditional", None),
    ]
    outcomes = await target.deliver(batch)
    assert [(o.status, o.code) for o in outcomes] == [
        ("permanent", "CONDITION_FAILED"),
        ("delivered", None),
        ("permanent", "CONDITION_FAILED"),
        ("delivered", None),
    ]
    assert outcomes[0].message == "HTTP 412 Precondition Failed"
    assert outcomes[0].retry_after is None
    assert sorted(webhook.keys()) == sorted(w.id for w in batch)  # one request each: no retry
    # A 412 to a write that carried no conditions keeps its old meaning.
    webhook.fail(1, 412)
    [outcome] = await target.deliver([conditional("plain", None)])
    assert (outcome.status, outcome.code) == ("permanent", "TARGET_REJECTED")
    assert webhook.keys().count("plain") == 1


async def test_conditions_that_cannot_be_sent_are_refused_without_a_request(
    webhook: Webhook, http_target: Callable[..., Any]
) -> None:
    target = await http_target(webhook.url())
    batch = [
        conditional("number-etag", {"etag": 5}),
        conditional("object-version", {"version": {"a": 1}}),
        conditional("newline", {"etag": "a\r\nX-Injected: 1"}),
        conditional("ok", {"etag": "fine"}),
    ]
    outcomes = await target.deliver(batch)
    assert [(o.status, o.code) for o in outcomes] == [("permanent", "TARGET_REJECTED")] * 3 + [
        ("delivered", None)
    ]
    assert [o.message.split(" ")[1] for o in outcomes[:3]] == ["'etag'", "'version'", "'etag'"]
    assert webhook.keys() == ["ok"]
