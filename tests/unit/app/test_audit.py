"""Audit lines of admin actions: who (a fingerprint, never the key), what, how it ended."""

from __future__ import annotations

import logging

import orjson
import pytest

from app import metrics
from app.audit import audit, require_admin
from app.errors import Rejected
from app.logs import JsonFormatter
from app.web.access import admin_digests, fingerprint, hash_key

KEY = "the-admin-key-0123456789"


def counted(action: str, outcome: str) -> float:
    return metrics.ADMIN_ACTIONS.labels(action, outcome)._value.get()  # type: ignore[attr-defined]


def lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    formatter = JsonFormatter()
    return [orjson.loads(formatter.format(r)) for r in caplog.records if r.name == "wal.audit"]


def test_an_admin_action_is_one_line_with_who_what_when_and_a_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="wal.audit")
    before = counted("backfill", "ok")
    caller = require_admin("backfill", KEY, admin_digests(KEY))
    audit(caller, "backfill", namespace="orders", target="cache", re_emitted=10, since=None)
    (line,) = lines(caplog)
    assert line["actor"] == f"admin:{fingerprint(hash_key(KEY))}"
    assert (line["action"], line["outcome"]) == ("backfill", "ok")
    assert line["details"] == {
        "namespace": "orders",
        "target": "cache",
        "re_emitted": 10,
        "since": None,
    }
    assert str(line["time"]).endswith("Z")
    assert "namespace=orders target=cache re_emitted=10" in str(line["message"])
    assert KEY not in orjson.dumps(line).decode()
    assert hash_key(KEY) not in orjson.dumps(line).decode()  # the digest is not shown either
    assert counted("backfill", "ok") == before + 1


def test_a_refused_caller_is_audited_by_the_fingerprint_of_the_key_it_presented(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="wal.audit")
    before = counted("namespaces.delete", "refused")
    with pytest.raises(Rejected):
        require_admin("namespaces.delete", "a-namespace-key", admin_digests(KEY))
    with pytest.raises(Rejected):
        require_admin("namespaces.delete", None, admin_digests(KEY))
    first, second = lines(caplog)
    assert first["actor"] == f"key:{fingerprint(hash_key('a-namespace-key'))}"
    assert second["actor"] == "anonymous"
    assert first["details"] == {"reason": "FORBIDDEN"}
    assert "a-namespace-key" not in str(first)
    assert counted("namespaces.delete", "refused") == before + 2
