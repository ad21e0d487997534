"""Access control: API keys, client addresses, rate limits, and admin keys.

API keys are never stored: a namespace lists ``sha256:<hex>`` digests of the
keys it accepts (``wal namespaces hash-key``), and a presented key is hashed
and compared in constant time. Rate limits are token buckets per namespace,
per worker process: a fleet of N workers admits up to N times the limit.

Admin keys (``WAL_ADMIN_API_KEYS``) are kept the same way, and :func:`admin` is
the one check that a caller (an HTTP request or a ``wal`` command) is an admin:
it answers a :class:`Caller`, named by the key's :func:`fingerprint` only, for
the audit line (:mod:`app.audit`).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache

from app.errors import Rejected
from app.models import Namespace
from app.rates import TokenBucket


def hash_key(api_key: str) -> str:
    return f"sha256:{hashlib.sha256(api_key.encode()).hexdigest()}"


def key_matches(digest: str, allowed: Iterable[str]) -> bool:
    """Is ``digest`` one of ``allowed``? Compares every entry, in constant time each."""
    found = False
    for candidate in allowed:
        found |= hmac.compare_digest(candidate, digest)
    return found


def fingerprint(digest: str) -> str:
    """A key's name in logs and audit lines: the first 8 hex digits of its digest. It
    tells keys apart and says nothing usable about the key."""
    return digest.removeprefix("sha256:")[:8]


@dataclass(frozen=True, slots=True)
class Caller:
    """Who asks: ``admin`` with a key's fingerprint (never the key)."""

    role: str
    key: str

    def __str__(self) -> str:
        return f"{self.role}:{self.key}"


@lru_cache(maxsize=8)
def admin_digests(configured: str) -> frozenset[str]:
    """``WAL_ADMIN_API_KEYS`` (comma-separated digests or plain keys) as digests."""
    out = set()
    for entry in configured.split(","):
        entry = entry.strip()
        if entry:
            out.add(entry.lower() if _is_digest(entry) else hash_key(entry))
    return frozenset(out)


def _is_digest(entry: str) -> bool:
    hexpart = entry.removeprefix("sha256:")
    return entry.startswith("sha256:") and len(hexpart) == 64 and _is_hex(hexpart)


def _is_hex(text: str) -> bool:
    try:
        int(text, 16)
    except ValueError:
        return False
    return True


def admin(key: str | None, digests: frozenset[str]) -> Caller:
    """The admin ``key`` belongs to; :class:`Rejected` (401 without a key, 403 with a key
    that is not an admin's, or when no admin key is configured) otherwise."""
    if not digests:
        raise Rejected(
            "admin operations are disabled: no admin key is configured (WAL_ADMIN_API_KEYS)",
            code="FORBIDDEN",
            http_status=403,
        )
    if not key:
        raise Rejected(
            "an admin API key is required (X-API-Key or Authorization: Bearer)",
            code="UNAUTHORIZED",
            http_status=401,
        )
    digest = hash_key(key)
    if not key_matches(digest, digests):
        raise Rejected("this API key is not an admin key", code="FORBIDDEN", http_status=403)
    return Caller("admin", fingerprint(digest))


def presented_key(headers: dict[str, str]) -> str | None:
    """The API key from ``X-API-Key`` or ``Authorization: Bearer`` (any header case)."""
    lowered = {k.lower(): v for k, v in headers.items()}
    if lowered.get("x-api-key"):
        return lowered["x-api-key"].strip() or None
    auth = lowered.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


def address_allowed(address: str | None, allowlist: Iterable[str]) -> bool:
    """Is the client address within the allowlist (addresses or CIDR networks)? Empty: all are."""
    networks = list(allowlist)
    if not networks:
        return True
    if not address:
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in ipaddress.ip_network(n, strict=False) for n in networks)


class RateLimiter:
    """Per-namespace buckets for requestsPerMinute (with burstLimit) and requestsPerHour."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[tuple[str, str, float, float], TokenBucket] = {}

    def check(self, namespace: Namespace) -> float:
        """0.0 when the request may pass, else seconds to wait (Retry-After)."""
        limits = namespace.access_control.rate_limits
        waits = []
        if limits.requests_per_minute:
            burst = limits.burst_limit or limits.requests_per_minute
            waits.append(
                self._bucket(
                    namespace.name, "minute", burst, limits.requests_per_minute / 60
                ).take()
            )
        if limits.requests_per_hour:
            waits.append(
                self._bucket(
                    namespace.name,
                    "hour",
                    limits.requests_per_hour,
                    limits.requests_per_hour / 3600,
                ).take()
            )
        return max(waits, default=0.0)

    def _bucket(self, name: str, period: str, capacity: float, rate: float) -> TokenBucket:
        key = (name, period, capacity, rate)  # a changed limit gets a fresh bucket
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(rate, capacity, clock=self._clock)
        return bucket


def authorize(
    namespace: Namespace,
    *,
    key: str | None,
    known_anywhere: Callable[[str], bool],
    address: str | None,
    limiter: RateLimiter,
) -> None:
    """Raise :class:`Rejected` (401, 403 or 429) unless this caller may write to ``namespace``."""
    control = namespace.access_control
    digest = hash_key(key) if key else None
    if control.allowed_api_keys:
        if digest is None:
            raise Rejected(
                "an API key is required (X-API-Key or Authorization: Bearer)",
                code="UNAUTHORIZED",
                http_status=401,
            )
        if not key_matches(digest, control.allowed_api_keys):
            if not known_anywhere(digest):
                raise Rejected("unknown API key", code="UNAUTHORIZED", http_status=401)
            raise Rejected(
                f"this API key may not write to namespace '{namespace.name}'",
                code="FORBIDDEN",
                http_status=403,
            )
    if not address_allowed(address, control.ip_allowlist):
        raise Rejected(
            f"client address not allowed for namespace '{namespace.name}'",
            code="FORBIDDEN",
            http_status=403,
        )
    wait = limiter.check(namespace)
    if wait > 0:
        raise Rejected(
            f"rate limit of namespace '{namespace.name}' exceeded",
            code="RATE_LIMIT_EXCEEDED",
            http_status=429,
            details={"retryAfterSeconds": math.ceil(wait)},
        )
