"""What the Redis target sends for each write, and how it reads redis errors."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from redis import exceptions as rx

from app.errors import ConfigError
from app.settings import Settings
from targets.base import Write
from targets.redis import RedisTarget, classify, unmet


async def target(**config: Any) -> RedisTarget:
    t = RedisTarget("cache", {"url": "redis://127.0.0.1:1/0", **config}, Settings())
    await t.open()  # connects lazily: nothing listens on port 1
    return t


def write(payload: dict[str, Any], op: str | None = None, **options: Any) -> Write:
    return Write(id="m-1", namespace="orders", payload=payload, operation=op, options=options)


def tail(call: list[Any]) -> list[Any]:
    """The script's arguments after the SHA: numkeys, marker, key, dedupe TTL, op, TTL, args..."""
    assert call[0] == "EVALSHA"
    return call[2:]


async def test_set_defaults_and_json_encoding() -> None:
    t = await target()
    call = tail(t.command(write({"key": "a", "value": {"x": 1}})))
    assert call == [2, "wal:applied:orders:cache:m-1", "a", 604_800, "set", "", b'{"x":1}']
    assert tail(t.command(write({"key": 7, "value": "plain"})))[-1] == b"plain"
    whole = {"key": "a", "other": [1, 2]}
    assert tail(t.command(write(whole)))[-1] == orjson.dumps(whole)


async def test_prefix_and_ttl_come_from_the_message_before_the_config() -> None:
    t = await target(keyPrefix="cfg:", ttlSeconds=60, dedupeTtlSeconds=3600)
    assert tail(t.command(write({"key": "a", "value": 1})))[2:6] == ["cfg:a", 3600, "set", "60"]
    camel = t.command(write({"key": "a", "value": 1}, keyPrefix="msg:", ttlSeconds=5))
    snake = t.command(write({"key": "a", "value": 1}, key_prefix="msg:", ttl_seconds=5))
    assert tail(camel)[2:6] == tail(snake)[2:6] == ["msg:a", 3600, "set", "5"]


async def test_operation_from_write_then_options_then_config() -> None:
    t = await target(operation="del")
    assert tail(t.command(write({"key": "a"})))[4] == "del"
    assert tail(t.command(write({"key": "a", "value": 1}, operation="INCRBY")))[4] == "incrby"
    assert tail(t.command(write({"key": "a", "value": 1}, "set", operation="del")))[4] == "set"


async def test_each_operation_arguments() -> None:
    t = await target(keyPath="id", valuePath="data.v", ttlSeconds=9)

    def args(op: str, value: Any) -> list[Any]:
        return tail(t.command(write({"id": "k", "data": {"v": value}}, op)))[4:]

    assert args("hset", {"a": "x", "b": 2}) == ["hset", "9", "a", b"x", "b", b"2"]
    assert args("hdel", ["a", "b"]) == ["hdel", "", "a", "b"]
    assert args("hdel", "a") == ["hdel", "", "a"]
    assert args("incrby", -3) == ["incrby", "9", -3]
    assert args("expire", 30) == ["expire", "", 30]
    assert args("expire", None) == ["expire", "", 9]
    assert args("del", None) == ["del", ""]


@pytest.mark.parametrize(
    ("payload", "op", "fault"),
    [
        ({"value": 1}, "set", "no key"),
        ({"key": None, "value": 1}, "set", "no key"),
        ({"key": True, "value": 1}, "set", "no key"),
        ({"key": {"a": 1}}, "set", "no key"),
        ({"key": "a", "value": 1.5}, "incrby", "integer"),
        ({"key": "a", "value": "3"}, "incrby", "integer"),
        ({"key": "a"}, "incrby", "integer"),
        ({"key": "a", "value": {}}, "hset", "non-empty object"),
        ({"key": "a", "value": [1]}, "hdel", "field name"),
        ({"key": "a"}, "expire", "seconds"),
        ({"key": "a"}, "getdel", "unknown operation"),
    ],
)
async def test_writes_that_can_never_apply(payload: dict[str, Any], op: str, fault: str) -> None:
    t = await target()
    outcomes = await t.deliver([write(payload, op)])  # refused before any round trip
    assert [(o.status, o.code) for o in outcomes] == [("permanent", "TARGET_REJECTED")]
    assert fault in outcomes[0].message
    await t.close()


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (rx.ConnectionError("Error 111 connecting"), "retryable", "TARGET_UNAVAILABLE"),
        (rx.TimeoutError("Timeout reading"), "retryable", "TARGET_UNAVAILABLE"),
        (rx.AuthenticationError("invalid password"), "retryable", "TARGET_UNAVAILABLE"),
        (rx.BusyLoadingError("LOADING Redis is loading"), "retryable", "TARGET_THROTTLED"),
        (rx.ResponseError("BUSY Redis is busy running a script"), "retryable", "TARGET_THROTTLED"),
        (rx.ResponseError("TRYAGAIN Multiple keys"), "retryable", "TARGET_THROTTLED"),
        (rx.ResponseError("OOM command not allowed"), "retryable", "TARGET_THROTTLED"),
        (
            rx.ReadOnlyError("You can't write against a read only replica."),
            "retryable",
            "TARGET_UNAVAILABLE",
        ),
        (
            rx.ResponseError("MASTERDOWN Link with MASTER is down"),
            "retryable",
            "TARGET_UNAVAILABLE",
        ),
        (rx.NoScriptError("NOSCRIPT No matching script"), "retryable", "TARGET_ERROR"),
        (rx.ResponseError("WRONGTYPE Operation against a key"), "permanent", "TARGET_REJECTED"),
        (
            rx.ResponseError("ERR value is not an integer or out of range"),
            "permanent",
            "TARGET_REJECTED",
        ),
        (OSError(113, "No route to host"), "retryable", "TARGET_UNAVAILABLE"),
    ],
)
def test_classify(exc: Exception, status: str, code: str) -> None:
    outcome = classify(exc)
    assert (outcome.status, outcome.code) == (status, code)
    assert outcome.message.startswith(type(exc).__name__)


@pytest.mark.parametrize(
    "config",
    [
        {"operation": "getdel"},
        {"ttlSeconds": 0},
        {"keyPrefix": 3},
        {"dedupeTtlSeconds": "x"},
        {"url": "http://127.0.0.1/"},
    ],
)
async def test_bad_config_fails_open(config: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        await target(**config)


async def test_conditions_go_before_the_operation_arguments() -> None:
    t = await target(ttlSeconds=9)
    conditions = {"value": {"v": 1}, "exists": True, "fields": {"a": "x", "b": 2, "c": None}}
    call = tail(t.command(write({"key": "k", "value": {"a": "y"}}, "hset", conditions=conditions)))
    assert call[4:] == [
        "?hset",
        "9",  # the operation's TTL, as without conditions
        5,
        *("get", "", b'{"v":1}'),
        *("exists", "", "1"),
        *("hget", "a", b"x"),
        *("hget", "b", b"2"),
        *("nofield", "c", ""),
        *("a", b"y"),
    ]
    absent = {"value": None, "exists": False}
    assert tail(t.command(write({"key": "k", "value": "s"}, conditions=absent)))[4:] == [
        "?set",
        "9",
        2,
        *("exists", "", "0"),
        *("exists", "", "0"),
        b"s",
    ]


async def test_no_or_empty_conditions_send_the_same_call_as_before() -> None:
    t = await target()
    plain = t.command(write({"key": "k", "value": 1}, "incrby"))
    assert t.command(write({"key": "k", "value": 1}, "incrby", conditions={})) == plain
    assert t.command(write({"key": "k", "value": 1}, "incrby", conditions=None)) == plain
    assert tail(plain)[4:] == ["incrby", "", 1]


@pytest.mark.parametrize(
    ("conditions", "fault"),
    [
        ({"when": "now"}, "unknown condition 'when'"),
        ({"value": 1, "Value": 1}, "unknown condition 'Value'"),
        ({"exists": 1}, "condition 'exists' must be true or false"),
        ({"exists": None}, "condition 'exists' must be true or false"),
        ({"fields": {}}, "condition 'fields' must be a non-empty object"),
        ({"fields": ["a"]}, "condition 'fields' must be a non-empty object"),
        ({"value": {1, 2}}, "condition 'value' is not JSON"),
    ],
)
async def test_conditions_that_can_never_be_checked(conditions: dict[str, Any], fault: str) -> None:
    t = await target()
    outcomes = await t.deliver([write({"key": "a", "value": 1}, conditions=conditions)])
    assert [(o.status, o.code) for o in outcomes] == [("permanent", "TARGET_REJECTED")]
    assert fault in outcomes[0].message
    await t.close()


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        ([1, b"differs"], "condition 'value' not met: the key's value differs"),
        ([1, b"wrongtype"], "condition 'value' not met: the key does not hold a string"),
        ([2, b"absent"], "condition 'exists' not met: the key is absent"),
        ([3, b"exists"], "condition 'fields' not met: field 'gone' exists"),
        ([4, "differs"], "condition 'fields' not met: field 'f' differs"),
        ([4, b"absent"], "condition 'fields' not met: field 'f' is absent"),
        ([4, b"wrongtype"], "condition 'fields' not met: the key does not hold a hash"),
    ],
)
def test_unmet_names_the_condition(reply: list[Any], message: str) -> None:
    conditions = {"value": "7", "exists": True, "fields": {"gone": None, "f": 1}}
    assert unmet(conditions, reply) == message
