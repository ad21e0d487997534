"""HTTP status and error classification, Retry-After parsing, config checks."""

from __future__ import annotations

import httpx
import pytest

from app.errors import ConfigError
from app.settings import Settings
from targets.http import HttpTarget, classify_error, classify_response, parse_retry_after

NOW = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC


@pytest.mark.parametrize("status", [200, 201, 202, 204, 299])
def test_2xx_is_delivered(status: int) -> None:
    assert classify_response(status, "OK").ok


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (408, "TARGET_UNAVAILABLE"),
        (425, "TARGET_ERROR"),
        (429, "TARGET_THROTTLED"),
        (500, "TARGET_ERROR"),
        (502, "TARGET_ERROR"),
        (503, "TARGET_ERROR"),
        (504, "TARGET_ERROR"),
    ],
)
def test_retryable_statuses(status: int, code: str) -> None:
    outcome = classify_response(status, "Reason")
    assert (outcome.status, outcome.code) == ("retryable", code)
    assert outcome.message == f"HTTP {status} Reason"


@pytest.mark.parametrize("status", [301, 302, 400, 401, 403, 404, 409, 410, 413, 422])
def test_other_statuses_are_permanent(status: int) -> None:
    outcome = classify_response(status, "Nope")
    assert (outcome.status, outcome.code) == ("permanent", "TARGET_REJECTED")
    assert outcome.message.startswith(f"HTTP {status} Nope")


def test_retry_after_seconds_and_dates() -> None:
    assert classify_response(429, "", "7").retry_after == 7.0
    assert classify_response(503, "", "Tue, 14 Nov 2023 22:13:50 GMT", now=NOW).retry_after == 30.0
    assert parse_retry_after("Tue, 14 Nov 2023 22:00:00 GMT", now=NOW) == 0.0  # in the past
    assert parse_retry_after("0") == 0.0
    for junk in (None, "", "soon", "-5", "1.5e9x", "Tue, 14 Nov 2023 22:13:50"):
        assert parse_retry_after(junk, now=NOW) is None
    assert classify_response(400, "", "10").retry_after is None


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (httpx.ConnectError("[Errno 111] Connection refused"), "TARGET_UNAVAILABLE"),
        (httpx.ConnectTimeout("timed out"), "TARGET_UNAVAILABLE"),
        (httpx.ReadTimeout("timed out"), "TARGET_UNAVAILABLE"),
        (httpx.PoolTimeout("timed out"), "TARGET_UNAVAILABLE"),
        (httpx.ReadError("reset"), "TARGET_UNAVAILABLE"),
        (httpx.RemoteProtocolError("Server disconnected"), "TARGET_UNAVAILABLE"),
        (httpx.DecodingError("bad gzip"), "TARGET_ERROR"),
    ],
)
def test_transport_errors_are_retryable(exc: httpx.HTTPError, code: str) -> None:
    outcome = classify_error(exc)
    assert (outcome.status, outcome.code) == ("retryable", code)
    assert type(exc).__name__ in outcome.message


@pytest.mark.parametrize(
    ("config", "fault"),
    [
        ({}, "needs a url"),
        ({"url": "ftp://example.com/x"}, r"http\(s\)"),
        ({"url": "https://user:pw@example.com/x"}, "no credentials"),
        ({"url": "https://evil.example/x", "allowedHosts": ["good.example"]}, "allowedHosts"),
        ({"url": "https://good.example/x", "method": "GET"}, "method"),
        ({"url": "https://good.example/x", "headers": {"X-N": 1}}, "headers"),
        ({"url": "https://good.example/x", "concurrency": 0}, "concurrency"),
        ({"url": "https://good.example/x", "timeoutMs": "fast"}, "timeoutMs"),
    ],
)
async def test_config_that_can_never_work_fails_open(config: dict, fault: str) -> None:
    target = HttpTarget("hook", config, Settings())
    with pytest.raises(ConfigError, match=fault):
        await target.open()


async def test_allowed_hosts_match_host_or_host_port() -> None:
    for allowed in (["GOOD.example"], ["good.example:8443"]):
        config = {"url": "https://good.example:8443/x", "allowedHosts": allowed}
        target = HttpTarget("hook", config, Settings())
        await target.open()  # accepted: would raise ConfigError otherwise
        assert target.url == "https://good.example:8443/x"
        await target.close()
    for refused in (["bad.example"], ["good.example:9999"], ["good.example.evil"]):
        config = {"url": "https://good.example:8443/x", "allowedHosts": refused}
        with pytest.raises(ConfigError, match="allowedHosts"):
            await HttpTarget("hook", config, Settings()).open()
