"""Admission and routing: pure logic, no services (namespaces come from a dict)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agents.ingest import admit, derived_id, routing_key
from app.errors import CODES, Rejected
from app.models import Namespace, WriteRequest

NOW = 1_800_000_000_000

NAMESPACES = {
    "orders": Namespace.model_validate(
        {
            "name": "orders",
            "maxMessageSize": 512,
            "targets": [
                {"identifier": "pg", "type": "sql"},
                {"identifier": "cache", "type": "redis"},
            ],
            "shardConfig": {"strategy": "hash", "keyPath": "payload.customer"},
        }
    ),
    "off": Namespace.model_validate({"name": "off", "enabled": False}),
}


def run(raw: bytes | None, **kw: Any) -> Any:
    kw.setdefault("timestamp_ms", NOW)
    kw.setdefault("now_ms", NOW)
    return admit(
        raw, kw.pop("headers", {}), fallback_id="wal_fallback", namespace_of=NAMESPACES.get, **kw
    )


def code_of(raw: bytes | None, **kw: Any) -> str:
    with pytest.raises(Rejected) as info:
        run(raw, **kw)
    return info.value.code


def req(**fields: Any) -> bytes:
    return orjson.dumps({"namespace": "orders", "payload": {"customer": "c1"}, **fields})


def test_a_valid_request_is_admitted_with_its_own_or_a_derived_id() -> None:
    admitted = run(req())
    assert admitted.message_id == "wal_fallback"
    assert admitted.namespace.name == "orders"
    assert run(req(messageId="client-1")).message_id == "client-1"
    assert run(req(), headers={"wal-message-id": "replayed-1"}).message_id == "replayed-1"


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"{", "INVALID_JSON"),
        (b"null", "INVALID_JSON"),
        (None, "INVALID_JSON"),
        (b'{"payload": {}}', "VALIDATION_ERROR"),
        (b'{"namespace": "orders"}', "VALIDATION_ERROR"),
        (b'{"namespace": "orders", "payload": 3}', "VALIDATION_ERROR"),
        (b'{"namespace": "orders", "payload": {}, "priority": 11}', "VALIDATION_ERROR"),
        (b'{"namespace": "orders", "payload": {}, "lifecycle": {"ttl": 5}}', "VALIDATION_ERROR"),
        (b'{"namespace": "ghost", "payload": {}}', "NAMESPACE_NOT_FOUND"),
        (b'{"namespace": "off", "payload": {}}', "NAMESPACE_DISABLED"),
        (b'{"namespace": "orders", "payload": {}, "target": "nope"}', "TARGET_NOT_FOUND"),
    ],
)
def test_each_rejection_has_its_documented_code(raw: bytes | None, code: str) -> None:
    assert code_of(raw) == code
    assert code in CODES


def test_oversize_is_measured_against_the_namespace_limit() -> None:
    assert code_of(req(metadata={"pad": "x" * 600})) == "MESSAGE_SIZE_LIMIT_EXCEEDED"


def test_expired_ttl_is_rejected() -> None:
    raw = req(lifecycle={"ttl": 60})
    assert run(raw, timestamp_ms=NOW - 59_000).message_id
    assert code_of(raw, timestamp_ms=NOW - 61_000) == "MESSAGE_EXPIRED"


def test_a_request_may_never_name_a_host() -> None:
    raw = req(target={"identifier": "pg", "config": {"host": "evil.example", "port": 5432}})
    assert code_of(raw) == "VALIDATION_ERROR"


def test_hash_routing_is_stable_and_follows_the_key_path() -> None:
    ns = NAMESPACES["orders"]
    a = WriteRequest.model_validate({"namespace": "orders", "payload": {"customer": "c1", "n": 1}})
    b = WriteRequest.model_validate({"namespace": "orders", "payload": {"customer": "c1", "n": 2}})
    assert routing_key(ns, a, "m1", 0) == routing_key(ns, b, "m2", 99) == "orders:c1"


def test_payload_hash_routing_ignores_key_order() -> None:
    ns = Namespace.model_validate({"name": "n"})
    a = WriteRequest.model_validate({"namespace": "n", "payload": {"x": 1, "y": 2}})
    b = WriteRequest.model_validate({"namespace": "n", "payload": {"y": 2, "x": 1}})
    assert routing_key(ns, a, "m1", 0) == routing_key(ns, b, "m2", 5)


def test_round_robin_and_random_are_replay_stable() -> None:
    rr = Namespace.model_validate(
        {"name": "n", "shardConfig": {"strategy": "round_robin", "partitionCount": 4}}
    )
    rnd = Namespace.model_validate(
        {"name": "n", "shardConfig": {"strategy": "random", "partitionCount": 4}}
    )
    r = WriteRequest.model_validate({"namespace": "n", "payload": {}})
    assert [routing_key(rr, r, "m", i) for i in range(5)] == ["n#0", "n#1", "n#2", "n#3", "n#0"]
    assert routing_key(rnd, r, "m-1", 0) == routing_key(rnd, r, "m-1", 7)
    assert len({routing_key(rnd, r, f"m-{i}", 0) for i in range(100)}) == 4


def test_custom_routing_uses_the_value_itself() -> None:
    ns = Namespace.model_validate(
        {"name": "n", "shardConfig": {"strategy": "custom", "keyPath": "metadata.tenant"}}
    )
    r = WriteRequest.model_validate(
        {"namespace": "n", "payload": {}, "metadata": {"tenant": "acme"}}
    )
    assert routing_key(ns, r, "m", 0) == "n:acme"


def test_derived_ids_sort_by_time() -> None:
    assert derived_id(1_000, 3, 7) < derived_id(2_000, 0, 0)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)
request_like = st.fixed_dictionaries(
    {},
    optional={
        "namespace": st.sampled_from(["orders", "ORDERS ", "off", "ghost", ""])
        | st.text(max_size=5)
        | json_values,
        "payload": json_values,
        "target": json_values | st.sampled_from(["pg", "cache", ["pg", "cache"]]),
        "lifecycle": json_values,
        "priority": json_values,
        "messageId": json_values,
        "metadata": json_values,
    },
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        st.binary(max_size=300), json_values.map(orjson.dumps), request_like.map(orjson.dumps)
    )
)
def test_any_input_is_admitted_or_rejected_with_a_documented_code(raw: bytes) -> None:
    try:
        admitted = run(raw)
    except Rejected as rejected:
        assert rejected.code in CODES
        assert rejected.message
    else:
        assert admitted.namespace.name == "orders"
        assert admitted.message_id
        assert admitted.routing_key.startswith("orders")


def _dumped_at(request: WriteRequest, path: str) -> str:
    """How a key path was read before: a walk of the request's ``model_dump()``."""
    value: Any = request.model_dump(by_alias=False)
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if isinstance(value, dict | list):
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
    return "" if value is None else str(value)


@pytest.mark.parametrize(
    "path",
    [
        "payload.user.id",
        "payload.user",
        "payload.user.tags",
        "payload.flag",
        "payload.none",
        "payload.missing.deeper",
        "metadata.tenant",
        "metadata",
        "lifecycle.delay",
        "lifecycle",
        "target",
        "tags",
        "priority",
        "namespace",
        "message_id",
        "messageId",
        "nothing",
    ],
)
def test_a_key_path_reads_what_the_dumped_request_held(path: str) -> None:
    """Routing must not change across versions: the walk without a dump gives the same."""
    request = WriteRequest.model_validate(
        {
            "namespace": "a",
            "messageId": "m-1",
            "payload": {"user": {"id": 7, "tags": [1, "x"]}, "flag": True, "none": None},
            "metadata": {"tenant": "t1"},
            "lifecycle": {"delay": 5},
            "target": [{"identifier": "pg"}],
            "tags": ["a"],
            "priority": 3,
        }
    )
    key_path = {"shardConfig": {"strategy": "custom", "keyPath": path}}
    namespace = Namespace.model_validate({"name": "a", **key_path})
    assert routing_key(namespace, request, "m-1", 0) == f"a:{_dumped_at(request, path)}"
