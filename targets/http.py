"""HTTP target: one request per write to a webhook the namespace configures (httpx).

Config: ``url`` (required, http/https, no credentials in it; its host must be in
``allowedHosts`` when that list is given), ``method`` (POST, PUT, PATCH or
DELETE), ``headers`` (values may be ``${ENV}`` references; never logged or put
in messages), ``timeoutMs`` (10000), ``concurrency`` (16 requests in flight),
``probe`` (none): how to ask whether the receiver is back while its circuit is
open - ``{"path": "/health"}`` (on the url's host) or ``{"url": ...}`` (checked
like ``url``), ``method`` HEAD (default) or GET, ``timeoutMs`` (2000), sent with
the configured headers. Any answer but 408, 425, 429 and 5xx means it is back.
Without ``probe`` the circuit lets a real write through after its cooldown.

The URL comes from the config only: nothing in a message can choose where a
request goes. Each request carries the payload as JSON, ``Idempotency-Key:
<Write.id>`` (HTTP cannot be effectively-once on its own; the receiver dedupes
by that key) and the write's ``traceparent``. Redirects are not followed: they
could lead off the allowed hosts.

Conditions (``Write.options["conditions"]``, an object) travel with the write's
own request (every write has one; none is shared) for the receiver to check:
``WAL-Conditions: <all of them as compact JSON>`` (non-ASCII escaped as
``\\uXXXX``), and ``If-Match`` from ``etag`` (sent as is when it starts with
``"`` or ``W/``, or is ``*``; else quoted) or else from ``version`` (its text, quoted). An
``etag`` that is not a string, a ``version`` that is not a string or number, or
an ``If-Match`` that would not be a visible-ASCII header value refuses the write
before any request (permanent ``TARGET_REJECTED``). A write without conditions
sends neither header.

Status codes: 2xx delivered; 408, 425, 429, 5xx retryable (``Retry-After`` in
seconds or as an HTTP date becomes ``retry_after``); 412 to a write with
conditions is permanent ``CONDITION_FAILED`` (the receiver found them not met:
not applied, and the same id may apply later); other codes - 412 to a write
without conditions too - permanent ``TARGET_REJECTED``.

httpx logs every request's URL at INFO; webhook URLs often carry a secret in
their path or query (Slack-style hooks), so opening a target raises the
``httpx`` logger to WARNING.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import orjson

from app.errors import ConfigError
from targets.base import (
    DELIVERED,
    Outcome,
    Target,
    Write,
    condition_failed,
    conditions_of,
    permanent,
    retryable,
)

__all__ = ["HttpTarget"]

_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
_PROBE_METHODS = {"HEAD", "GET"}
_PASSTHROUGH = ("traceparent", "tracestate")
_NON_ASCII = re.compile(r"[^\x00-\x7f]")


class HttpTarget(Target):
    kind = "http"

    _client: httpx.AsyncClient | None = None

    async def open(self) -> None:
        self.url = _checked_url(self.name, self.config)
        self.method = str(self.config.get("method", "POST")).upper()
        if self.method not in _METHODS:
            raise ConfigError(f"http target {self.name}: method must be one of {sorted(_METHODS)}")
        headers = self.config.get("headers") or {}
        if not isinstance(headers, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
        ):
            raise ConfigError(f"http target {self.name}: headers must map names to strings")
        # Values, and their long parts (the token of "Bearer <token>"), kept out of messages.
        parts = {s for v in headers.values() for s in (v, *v.split()) if len(s) >= 8}
        self._secrets = sorted(parts, key=len, reverse=True)
        concurrency = _positive_int(self.name, self.config, "concurrency", 16)
        timeout = _positive_int(self.name, self.config, "timeoutMs", 10_000) / 1000
        self._probe = _probe_request(self.name, self.config, self.url)
        self._gate = asyncio.Semaphore(concurrency)
        logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger("httpx").level))
        self._client = httpx.AsyncClient(
            headers=dict(headers),
            timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
            follow_redirects=False,
            trust_env=False,  # settings are the only reader of the environment
        )

    async def probe(self) -> Outcome | None:
        """The configured ``probe`` request; None without one."""
        if self._probe is None:
            return None
        assert self._client is not None, "open() first"
        method, url, timeout = self._probe
        try:
            response = await self._client.request(method, url, timeout=timeout)
        except httpx.HTTPError as exc:
            return self._scrub(classify_error(exc))
        except Exception as exc:
            return retryable("TARGET_ERROR", f"unexpected {type(exc).__name__}")
        outcome = classify_response(response.status_code, response.reason_phrase)
        return outcome if outcome.status == "retryable" else DELIVERED

    async def close(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):  # close never raises
                await self._client.aclose()

    async def deliver(self, batch: Sequence[Write]) -> list[Outcome]:
        return list(await asyncio.gather(*(self._send(item) for item in batch)))

    async def _send(self, item: Write) -> Outcome:
        assert self._client is not None, "open() first"
        headers = {
            "Content-Type": "application/json",
            "Idempotency-Key": item.id,
            **{h: v for h in _PASSTHROUGH if (v := item.headers.get(h))},
        }
        if conditions := conditions_of(item):
            try:
                headers.update(condition_headers(conditions))
            except ValueError as exc:
                return permanent("TARGET_REJECTED", str(exc)[:300])
        async with self._gate:
            try:
                response = await self._client.request(
                    self.method, self.url, content=orjson.dumps(dict(item.payload)), headers=headers
                )
            except httpx.HTTPError as exc:
                return self._scrub(classify_error(exc))
            except TypeError as exc:  # orjson.JSONEncodeError
                return permanent("TARGET_REJECTED", f"payload is not JSON: {exc}"[:300])
            except Exception as exc:
                return retryable("TARGET_ERROR", f"unexpected {type(exc).__name__}")
        return self._scrub(
            classify_response(
                response.status_code,
                response.reason_phrase,
                response.headers.get("Retry-After"),
                conditional=bool(conditions),
            )
        )

    def _scrub(self, outcome: Outcome) -> Outcome:
        message = outcome.message
        if not message:
            return outcome
        for secret in self._secrets:
            message = message.replace(secret, "***")
        return Outcome(outcome.status, outcome.code, message, outcome.retry_after)


def classify_response(
    status: int,
    reason: str = "",
    retry_after: str | None = None,
    now: float | None = None,
    *,
    conditional: bool = False,
) -> Outcome:
    """The outcome of an HTTP status (``now``: epoch seconds, for HTTP-date hints;
    ``conditional``: the request carried the write's conditions)."""
    message = f"HTTP {status} {reason}".strip()
    if 200 <= status < 300:
        return DELIVERED
    if status == 412 and conditional:
        return condition_failed(message)
    hint = parse_retry_after(retry_after, now)
    if status == 429:
        return retryable("TARGET_THROTTLED", message, hint)
    if status == 408:
        return retryable("TARGET_UNAVAILABLE", message, hint)
    if status == 425 or status >= 500:
        return retryable("TARGET_ERROR", message, hint)
    if 300 <= status < 400:
        return permanent("TARGET_REJECTED", f"{message} (redirects are not followed)")
    return permanent("TARGET_REJECTED", message)


def condition_headers(conditions: Mapping[str, Any]) -> dict[str, str]:
    """``WAL-Conditions`` and, from ``etag`` or ``version``, ``If-Match``; ValueError
    (naming the condition) for one that cannot be sent."""
    try:
        text = orjson.dumps(dict(conditions)).decode()
    except TypeError as exc:  # orjson.JSONEncodeError
        raise ValueError(f"conditions are not JSON: {exc}") from None
    headers = {"WAL-Conditions": _NON_ASCII.sub(_json_escape, text)}
    etag, version = conditions.get("etag"), conditions.get("version")
    if etag is not None:
        if not isinstance(etag, str) or not etag:
            raise ValueError("condition 'etag' must be a non-empty string")
        name, tag = "etag", etag if etag == "*" or etag.startswith(('"', "W/")) else f'"{etag}"'
    elif version is not None:
        if isinstance(version, bool) or not isinstance(version, (str, int, float)):
            raise ValueError("condition 'version' must be a string or a number")
        name, tag = "version", f'"{version}"'
    else:
        return headers
    if not (tag.isascii() and tag.isprintable()) or len(tag) > 1024:
        raise ValueError(f"condition {name!r} is not a usable entity tag (visible ASCII)")
    headers["If-Match"] = tag
    return headers


def _json_escape(match: re.Match[str]) -> str:
    """A non-ASCII character as JSON escapes (a surrogate pair above U+FFFF)."""
    encoded = match.group().encode("utf-16-be")
    return "".join(f"\\u{encoded[i : i + 2].hex()}" for i in range(0, len(encoded), 2))


def classify_error(exc: httpx.HTTPError) -> Outcome:
    """The outcome of a request that got no response; never mentions the URL."""
    name = type(exc).__name__
    if isinstance(exc, httpx.TimeoutException):
        return retryable("TARGET_UNAVAILABLE", f"timeout ({name})")
    if isinstance(exc, (httpx.NetworkError, httpx.RemoteProtocolError, httpx.ProxyError)):
        detail = str(exc).strip().splitlines()
        return retryable("TARGET_UNAVAILABLE", f"{name}: {detail[0][:200]}" if detail else name)
    return retryable("TARGET_ERROR", name)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds from ``now``: delta-seconds or an HTTP date; None if unusable."""
    if not value:
        return None
    value = value.strip()
    try:
        if value.isascii() and value.isdigit():
            return float(value)
        return _date_hint(value, now)
    except (TypeError, ValueError, OverflowError):
        return None


def _date_hint(value: str, now: float | None) -> float:
    when = email.utils.parsedate_to_datetime(value)
    if when.tzinfo is None:
        raise ValueError("Retry-After date without a zone")
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _checked_url(name: str, config: Mapping[str, Any]) -> str:
    url = config.get("url")
    if not isinstance(url, str) or not url:
        raise ConfigError(f"http target {name}: needs a url")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"http target {name}: url must be http(s)://host/...")
    if parts.username or parts.password:
        raise ConfigError(f"http target {name}: no credentials in the url; use headers")
    allowed = config.get("allowedHosts")
    if allowed is not None:
        hosts = {str(h).lower() for h in allowed}
        if parts.hostname.lower() not in hosts and parts.netloc.lower() not in hosts:
            raise ConfigError(f"http target {name}: host {parts.hostname} is not in allowedHosts")
    return url


def _probe_request(name: str, config: Mapping[str, Any], url: str) -> tuple[str, str, float] | None:
    """(method, url, timeout in seconds) of the config's ``probe``, or None."""
    probe = config.get("probe")
    if probe is None:
        return None
    if not isinstance(probe, Mapping) or ("url" in probe and "path" in probe):
        raise ConfigError(f"http target {name}: probe must be an object (url or path, not both)")
    method = str(probe.get("method", "HEAD")).upper()
    if method not in _PROBE_METHODS:
        raise ConfigError(f"http target {name}: probe method must be HEAD or GET")
    if "url" in probe:
        url = _checked_url(name, {**config, "url": probe["url"]})
    elif "path" in probe:
        path = probe["path"]
        if not isinstance(path, str) or not path.startswith("/"):
            raise ConfigError(f"http target {name}: probe path must start with /")
        parts = urlsplit(url)
        path, _, query = path.partition("?")
        url = urlunsplit((parts.scheme, parts.netloc, path, query, ""))
    return method, url, _positive_int(name, probe, "timeoutMs", 2_000) / 1000


def _positive_int(name: str, config: Mapping[str, Any], key: str, default: int) -> int:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"http target {name}: {key} must be a positive integer")
    return value
