"""Access control: keys, addresses and token buckets (pure logic, fake clock)."""

from __future__ import annotations

import pytest

from app.errors import Rejected
from app.models import Namespace
from app.rates import TokenBucket
from app.web.access import (
    Caller,
    RateLimiter,
    address_allowed,
    admin,
    admin_digests,
    authorize,
    fingerprint,
    hash_key,
    presented_key,
)


class Clock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_keys_come_from_either_header() -> None:
    assert presented_key({"X-API-Key": "a"}) == "a"
    assert presented_key({"authorization": "Bearer b"}) == "b"
    assert presented_key({"Authorization": "Basic c"}) is None
    assert presented_key({}) is None


def test_addresses_and_networks() -> None:
    assert address_allowed("10.1.2.3", [])
    assert address_allowed("10.1.2.3", ["10.0.0.0/8"])
    assert not address_allowed("127.0.0.1", ["10.0.0.0/8", "192.168.1.1"])
    assert address_allowed("::1", ["::1"])
    assert not address_allowed(None, ["10.0.0.0/8"])
    assert not address_allowed("not-an-ip", ["10.0.0.0/8"])


def test_token_bucket_refills_at_its_rate() -> None:
    clock = Clock()
    bucket = TokenBucket(1.0, 2, clock=clock)
    assert bucket.take() == 0.0 and bucket.take() == 0.0
    assert bucket.take() == pytest.approx(1.0)
    clock.now = 0.5
    assert bucket.take() == pytest.approx(0.5)
    clock.now = 1.0
    assert bucket.take() == 0.0


def ns(**access: object) -> Namespace:
    return Namespace.model_validate({"name": "n", "accessControl": access})


def codes(
    namespace: Namespace,
    key: str | None,
    address: str = "127.0.0.1",
    known: bool = False,
    limiter: RateLimiter | None = None,
) -> str:
    try:
        authorize(
            namespace,
            key=key,
            known_anywhere=lambda _: known,
            address=address,
            limiter=limiter or RateLimiter(),
        )
    except Rejected as r:
        return f"{r.http_status} {r.code}"
    return "ok"


def test_authorize_distinguishes_missing_unknown_and_forbidden_keys() -> None:
    guarded = ns(allowedApiKeys=[hash_key("right")])
    assert codes(guarded, "right") == "ok"
    assert codes(guarded, None) == "401 UNAUTHORIZED"
    assert codes(guarded, "stranger") == "401 UNAUTHORIZED"
    assert codes(guarded, "someone-elses", known=True) == "403 FORBIDDEN"
    assert codes(ns(), None) == "ok"
    assert codes(ns(ipAllowlist=["10.0.0.0/8"]), None) == "403 FORBIDDEN"


def test_rate_limits_answer_429_with_a_wait() -> None:
    clock = Clock()
    limiter = RateLimiter(clock=clock)
    limited = ns(rateLimits={"requestsPerMinute": 60, "burstLimit": 2})
    assert [codes(limited, None, limiter=limiter) for _ in range(3)] == [
        "ok",
        "ok",
        "429 RATE_LIMIT_EXCEEDED",
    ]
    clock.now = 1.0
    assert codes(limited, None, limiter=limiter) == "ok"


def test_stored_keys_must_be_hashes() -> None:
    with pytest.raises(ValueError, match="sha256"):
        ns(allowedApiKeys=["plain-text-key"])


# -- admin keys ---------------------------------------------------------------------------


def test_admin_keys_are_kept_as_digests_whether_given_hashed_or_plain() -> None:
    hashed = hash_key("ops-one")
    digests = admin_digests(f" {hashed.upper().replace('SHA256:', 'sha256:')} , ops-two,, ")
    assert digests == {hashed, hash_key("ops-two")}
    assert all(d.startswith("sha256:") and "ops" not in d for d in digests)
    assert admin_digests("") == frozenset()


def test_a_malformed_digest_is_taken_as_a_plain_key_not_trusted_as_a_digest() -> None:
    assert admin_digests("sha256:abc") == {hash_key("sha256:abc")}


def test_admin_answers_the_caller_by_fingerprint_only() -> None:
    digests = admin_digests(hash_key("s3cret-admin"))
    caller = admin("s3cret-admin", digests)
    assert caller == Caller("admin", hash_key("s3cret-admin")[7:15])
    assert str(caller) == f"admin:{fingerprint(hash_key('s3cret-admin'))}"
    assert "s3cret" not in str(caller) and len(caller.key) == 8


@pytest.mark.parametrize(
    ("key", "configured", "status", "code"),
    [
        (None, "admin-key", 401, "UNAUTHORIZED"),
        ("", "admin-key", 401, "UNAUTHORIZED"),
        ("a-namespace-key", "admin-key", 403, "FORBIDDEN"),
        ("admin-key", "", 403, "FORBIDDEN"),  # no admin key configured: nobody is admin
    ],
)
def test_admin_refuses_no_key_a_wrong_key_and_everyone_when_none_is_configured(
    key: str | None, configured: str, status: int, code: str
) -> None:
    with pytest.raises(Rejected) as refused:
        admin(key, admin_digests(configured))
    assert (refused.value.http_status, refused.value.code) == (status, code)
    assert "admin-key" not in refused.value.message
