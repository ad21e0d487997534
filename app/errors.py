"""Errors, and the one list of every error code a user can see.

``WalError`` is the root. Errors that steer flow carry their data:

* :class:`Rejected` - the request can never be accepted as sent (bad JSON,
  unknown namespace, oversize …). Ingest dead-letters it; HTTP answers 4xx.
* :class:`ConfigError` - invalid settings, namespace or target, at load time.

What became of a delivery is not an exception: a target answers each write with
a :class:`targets.base.Outcome` (delivered, retryable or permanent, with a code).

Each carries a ``code`` from :data:`CODES`. That mapping is the documented
list (README links here); a test keeps README and this list in step.
"""

from __future__ import annotations

from typing import Any

#: Every error code a user can see, with its meaning. Codes travel in the
#: ``wal-error-code`` header of dead letters and in HTTP error bodies.
CODES: dict[str, str] = {
    # -- rejected at ingest (Kafka: dead-lettered; HTTP: 4xx) --------------------------
    "INVALID_JSON": "The message value is not valid UTF-8 JSON, or not a JSON object.",
    "VALIDATION_ERROR": "The request does not match the write-request schema; "
    "details name each field and why.",
    "NAMESPACE_NOT_FOUND": "The request names a namespace that is not registered.",
    "NAMESPACE_DISABLED": "The namespace exists but is disabled.",
    "TARGET_NOT_FOUND": "The request names a target identifier its namespace does not define.",
    "MESSAGE_SIZE_LIMIT_EXCEEDED": "The request is larger than the namespace's maxMessageSize.",
    "MESSAGE_EXPIRED": "The request's TTL (lifecycle.ttl or the namespace's messageTtlSeconds) "
    "passed before it could be delivered.",
    # -- HTTP only ----------------------------------------------------------------------
    "UNAUTHORIZED": "No API key was given, or the key is not known to any namespace.",
    "FORBIDDEN": "The API key or the client address is not allowed for this namespace, or "
    "the operation needs an admin key (WAL_ADMIN_API_KEYS) and this key is not one.",
    "RATE_LIMIT_EXCEEDED": "The namespace's rate limit is exhausted; retry after Retry-After.",
    "PAYLOAD_TOO_LARGE": "The HTTP body is larger than the largest request any namespace takes.",
    "RECORD_REJECTED": "Kafka refused a record the fleet produced for good (invalid, not "
    "authorized, no such topic): it went to the dead-letter topic instead.",
    "PRODUCER_UNAVAILABLE": "Kafka did not acknowledge the write in time; nothing was accepted.",
    "NOT_FOUND": "No such resource (message, transaction or path).",
    "INTERNAL_ERROR": "An unexpected error; the request id in the body finds it in the logs.",
    # -- delivery (dead-lettered after the retry policy) ------------------------------
    "TARGET_UNAVAILABLE": "The target could not be reached (connection refused, timeout, "
    "circuit open).",
    "TARGET_REJECTED": "The target refused the write for good (constraint violation, "
    "bad type, HTTP 4xx).",
    "TARGET_THROTTLED": "The target asked us to slow down (HTTP 429, Redis busy).",
    "CONDITION_FAILED": "The write's conditions did not hold at its target (SQL: the row "
    "or its columns; Redis: the key's value or hash fields; HTTP: 412), so it was not "
    "applied; a transaction's mutation that fails so is compensated.",
    "CANCELLED": "The message was cancelled (DELETE /wal/messages/{id}) before this write "
    "was delivered; it never will be.",
    "CANCELLATIONS_FULL": "The worker holds its most cancellations (100 000, kept 7 days); "
    "try again later.",
    "TARGET_ERROR": "The target failed in a way that may pass (HTTP 5xx, database error).",
    "RETRIES_EXHAUSTED": "Every attempt the retry policy allows failed; "
    "wal-error-message holds the last failure.",
}


class WalError(Exception):
    """Root of the fleet's errors."""

    code: str = "INTERNAL_ERROR"

    def __init__(self, message: str = "", *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        assert self.code in CODES, f"undocumented error code {self.code}"

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.code


class Rejected(WalError):
    """A request that can never be accepted as sent; dead-lettered or answered 4xx."""

    code = "VALIDATION_ERROR"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        details: Any = None,
        http_status: int = 400,
    ) -> None:
        super().__init__(message, code=code)
        self.details = details
        self.http_status = http_status


class ConfigError(WalError):
    """Invalid configuration (settings, namespace, target); raised at load time."""

    code = "VALIDATION_ERROR"
