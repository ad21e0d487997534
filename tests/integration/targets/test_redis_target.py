"""The Redis target against the local stack's Redis (and private servers for BUSY/READONLY)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from app.settings import Settings
from targets.base import Outcome, Write
from targets.redis import RedisTarget
from tests.integration.targets.target_services import TcpProxy, eventually, free_port, unique

pytestmark = pytest.mark.redis


@pytest.fixture
async def ns(redis_url: str) -> AsyncIterator[str]:
    """A namespace of its own; its keys (``<ns>:*``) and markers are deleted afterwards."""
    name = unique("rt")
    yield name
    for db in (0, 1):  # the fan-out test's second region is db 1
        client = aioredis.Redis.from_url(f"{redis_url.rsplit('/', 1)[0]}/{db}")
        for pattern in (f"{name}:*", f"wal:applied:{name}:*"):
            keys = [k async for k in client.scan_iter(match=pattern, count=1000)]
            if keys:
                await client.delete(*keys)
        await client.aclose()


@pytest.fixture
async def rdb(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def redis_target(redis_url: str) -> AsyncIterator[Callable[..., Any]]:
    opened: list[RedisTarget] = []

    async def make(name: str = "cache", **config: Any) -> RedisTarget:
        target = RedisTarget(name, {"url": redis_url, **config}, Settings())
        await target.open()
        opened.append(target)
        return target

    yield make
    for target in opened:
        await target.close()


def w(ns: str, id: str, op: str | None, key: str, value: Any = None, **options: Any) -> Write:
    payload: dict[str, Any] = {"key": key}
    if value is not None:
        payload["value"] = value
    return Write(id=f"{ns}-{id}", namespace=ns, payload=payload, operation=op, options=options)


def statuses(outcomes: list[Outcome]) -> list[str]:
    return [o.status for o in outcomes]


async def test_every_operation(
    ns: str, rdb: aioredis.Redis, redis_target: Callable[..., Any]
) -> None:
    target = await redis_target(keyPrefix=f"{ns}:")
    batch = [
        w(ns, "1", "set", "s", {"a": 1}),
        w(ns, "2", "set", "plain", "text", ttlSeconds=100),
        w(ns, "3", "hset", "h", {"f1": "x", "f2": 2, "f3": True}),
        w(ns, "4", "hdel", "h", ["f3"]),
        w(ns, "5", "incrby", "n", 5),
        w(ns, "6", "incrby", "n", -2),
        w(ns, "7", "set", "gone", "x"),
        w(ns, "8", "del", "gone"),
        w(ns, "9", "expire", "s", 300),
        w(ns, "10", "set", "p", "x", keyPrefix=f"{ns}:other:"),
    ]
    assert statuses(await target.deliver(batch)) == ["delivered"] * len(batch)
    assert orjson.loads(await rdb.get(f"{ns}:s")) == {"a": 1}
    assert await rdb.get(f"{ns}:plain") == b"text"
    assert 95 <= await rdb.ttl(f"{ns}:plain") <= 100
    assert await rdb.hgetall(f"{ns}:h") == {b"f1": b"x", b"f2": b"2"}
    assert await rdb.get(f"{ns}:n") == b"3"
    assert await rdb.exists(f"{ns}:gone") == 0
    assert 295 <= await rdb.ttl(f"{ns}:s") <= 300
    assert await rdb.get(f"{ns}:other:p") == b"x"
    assert await rdb.ttl(f"{ns}:n") == -1  # no TTL configured, none given


async def test_config_ttl_applies_to_set_hset_incrby(
    ns: str, rdb: aioredis.Redis, redis_target: Callable[..., Any]
) -> None:
    target = await redis_target(
        keyPrefix=f"{ns}:", ttlSeconds=50, operation="hset", valuePath="fields", keyPath="id"
    )
    batch = [
        Write(id=f"{ns}-1", namespace=ns, payload={"id": 7, "fields": {"a": "b"}}),
        Write(id=f"{ns}-2", namespace=ns, payload={"id": "c", "fields": 3}, operation="incrby"),
        Write(id=f"{ns}-3", namespace=ns, payload={"id": "d", "x": 1}, operation="set"),
    ]
    assert statuses(await target.deliver(batch)) == ["delivered"] * 3
    assert await rdb.hgetall(f"{ns}:7") == {b"a": b"b"}
    assert orjson.loads(await rdb.get(f"{ns}:d")) == {"id": "d", "x": 1}  # whole payload
    for key in ("7", "c", "d"):
        assert 45 <= await rdb.ttl(f"{ns}:{key}") <= 50


async def test_replay_changes_nothing(
    ns: str, rdb: aioredis.Redis, redis_target: Callable[..., Any]
) -> None:
    target = await redis_target(keyPrefix=f"{ns}:", dedupeTtlSeconds=3600)
    batch = [
        w(ns, "1", "incrby", "n", 5),
        w(ns, "2", "incrby", "n", 7),
        w(ns, "2", "incrby", "n", 7),  # the same write twice in one batch
        w(ns, "3", "set", "k", "first"),
        w(ns, "4", "set", "k", "second"),
        w(ns, "5", "hset", "h", {"a": 1}),
    ]
    assert statuses(await target.deliver(batch)) == ["delivered"] * 6
    await rdb.set(f"{ns}:k", "changed since")
    for _ in range(2):
        assert statuses(await target.deliver(batch)) == ["delivered"] * 6
        assert await rdb.get(f"{ns}:n") == b"12"
        assert await rdb.get(f"{ns}:k") == b"changed since"
    marker = f"wal:applied:{ns}:cache:{ns}-1"
    assert 3590 <= await rdb.ttl(marker) <= 3600


async def test_a_poison_item_fails_alone(
    ns: str, rdb: aioredis.Redis, redis_target: Callable[..., Any]
) -> None:
    target = await redis_target(keyPrefix=f"{ns}:")
    await rdb.set(f"{ns}:str", "not a hash")
    await rdb.set(f"{ns}:word", "abc")
    batch = [
        w(ns, "1", "incrby", "n", 1),
        w(ns, "2", "hset", "str", {"a": 1}),  # WRONGTYPE
        w(ns, "3", "incrby", "word", 1),  # not an integer
        w(ns, "4", "incrby", "n", 1),
        Write(id=f"{ns}-5", namespace=ns, payload={"value": 1}),  # no key at all
    ]
    outcomes = await target.deliver(batch)
    assert statuses(outcomes) == ["delivered", "permanent", "permanent", "delivered", "permanent"]
    assert {o.code for o in outcomes if not o.ok} == {"TARGET_REJECTED"}
    assert "WRONGTYPE" in outcomes[1].message
    assert "not an integer" in outcomes[2].message
    assert await rdb.get(f"{ns}:n") == b"2"
    # A refused write leaves no marker: once the data is fixed, its replay applies.
    assert await rdb.exists(f"wal:applied:{ns}:cache:{ns}-2") == 0
    await rdb.delete(f"{ns}:str")
    assert statuses(await target.deliver(batch[1:2])) == ["delivered"]
    assert await rdb.hgetall(f"{ns}:str") == {b"a": b"1"}


async def test_script_is_reloaded_after_a_flush(
    ns: str, rdb: aioredis.Redis, redis_target: Callable[..., Any]
) -> None:
    target = await redis_target(keyPrefix=f"{ns}:")
    assert statuses(await target.deliver([w(ns, "1", "incrby", "n", 1)])) == ["delivered"]
    await rdb.script_flush()
    assert statuses(await target.deliver([w(ns, "2", "incrby", "n", 1)])) == ["delivered"]
    assert await rdb.get(f"{ns}:n") == b"2"


async def test_server_down_then_back(
    ns: str, rdb: aioredis.Redis, redis_target: Callable[..., Any], redis_proxy: TcpProxy
) -> None:
    target = await redis_target(
        url=f"redis://127.0.0.1:{redis_proxy.port}/0", keyPrefix=f"{ns}:", timeoutMs=1000
    )
    assert statuses(await target.deliver([w(ns, "1", "incrby", "n", 1)])) == ["delivered"]
    await redis_proxy.stop()
    batch = [w(ns, "2", "incrby", "n", 10), w(ns, "3", "set", "k", "v")]
    outcomes = await target.deliver(batch)
    assert {(o.status, o.code) for o in outcomes} == {("retryable", "TARGET_UNAVAILABLE")}
    await redis_proxy.start()
    assert statuses(await target.deliver(batch)) == ["delivered"] * 2
    assert statuses(await target.deliver(batch)) == ["delivered"] * 2  # a replay, too
    assert await rdb.get(f"{ns}:n") == b"11"


async def test_fan_out_to_two_regions_is_independent(
    ns: str, redis_url: str, redis_target: Callable[..., Any], redis_proxy: TcpProxy
) -> None:
    eu = await redis_target("eu", keyPrefix=f"{ns}:")  # db 0 of redis_url
    us = await redis_target(
        "us", url=f"redis://127.0.0.1:{redis_proxy.port}/1", keyPrefix=f"{ns}:", timeoutMs=1000
    )
    batch = [w(ns, "1", "incrby", "n", 3), w(ns, "2", "set", "k", "v")]
    assert statuses(await eu.deliver(batch)) == ["delivered"] * 2
    await redis_proxy.stop()
    assert statuses(await us.deliver(batch)) == ["retryable"] * 2
    await redis_proxy.start()
    # The retry goes to both (as a replayed batch would); each region applies it once.
    outcomes = await asyncio.gather(eu.deliver(batch), us.deliver(batch))
    assert [statuses(o) for o in outcomes] == [["delivered"] * 2] * 2
    for db in (0, 1):
        client = aioredis.Redis.from_url(f"{redis_url.rsplit('/', 1)[0]}/{db}")
        assert await client.get(f"{ns}:n") == b"3"
        assert await client.exists(f"wal:applied:{ns}:{'eu' if db == 0 else 'us'}:{ns}-1") == 1
        await client.aclose()


async def test_busy_and_readonly_servers_are_retryable(
    ns: str, throwaway_redis: int, redis_target: Callable[..., Any]
) -> None:
    url = f"redis://127.0.0.1:{throwaway_redis}/0"
    target = await redis_target(url=url, keyPrefix=f"{ns}:")
    admin = aioredis.Redis(port=throwaway_redis)
    await admin.config_set("busy-reply-threshold", 100)
    script = "local s = redis.call('TIME')[1] while redis.call('TIME')[1] - s < 2 do end return 1"
    runner = aioredis.Redis(port=throwaway_redis)
    busy = asyncio.create_task(runner.eval(script, 0))  # type: ignore[arg-type]

    async def is_busy() -> bool:
        [outcome] = await target.deliver([w(ns, "1", "incrby", "n", 1)])
        return outcome.code == "TARGET_THROTTLED" and outcome.status == "retryable"

    try:
        await eventually(is_busy, timeout=5, interval=0.05, what="a BUSY reply")
    finally:
        assert await busy == 1
        await runner.aclose()
    assert statuses(await target.deliver([w(ns, "1", "incrby", "n", 1)])) == ["delivered"]
    await admin.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))
    [outcome] = await target.deliver([w(ns, "2", "incrby", "n", 1)])
    assert (outcome.status, outcome.code) == ("retryable", "TARGET_UNAVAILABLE")
    assert "read only" in outcome.message
    await admin.execute_command("REPLICAOF", "NO", "ONE")
    assert statuses(await target.deliver([w(ns, "2", "incrby", "n", 1)])) == ["delivered"]
    assert await admin.get(f"{ns}:n") == b"2"
    await admin.aclose()


async def test_passwords_never_reach_messages_or_logs(
    ns: str, redis_target: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    secret = "pw-5e1f-SECRET-do-not-log"
    caplog.set_level(logging.DEBUG)
    closed = await redis_target(url=f"redis://user:{secret}@127.0.0.1:{free_port()}/0")
    wrong_user = await redis_target(url=f"redis://nobody:{secret}@127.0.0.1:6379/0")
    outcomes = [
        *await closed.deliver([w(ns, "1", "set", "k", "v")]),
        *await wrong_user.deliver([w(ns, "1", "set", "k", "v")]),
    ]
    assert [(o.status, o.code) for o in outcomes] == [("retryable", "TARGET_UNAVAILABLE")] * 2
    for o in outcomes:
        assert secret not in o.message
    assert secret not in caplog.text


def codes(outcomes: list[Outcome]) -> list[str | None]:
    return [o.code if not o.ok else None for o in outcomes]


async def markers(rdb: aioredis.Redis, ns: str, *ids: str) -> list[int]:
    return [await rdb.exists(f"wal:applied:{ns}:cache:{ns}-{i}") for i in ids]


async def test_conditions_that_hold_apply_once(
    ns: str, rdb: aioredis.Redis, redis_target: Callable[..., Any]
) -> None:
    target = await redis_target(keyPrefix=f"{ns}:")
    await rdb.set(f"{ns}:v", "7")
    await rdb.set(f"{ns}:doc", orjson.dumps({"rev": 1}))
    await rdb.set(f"{ns}:n", 10)
    await rdb.hset(f"{ns}:h", mapping={"state": "open", "n": "2"})
    batch = [
        w(ns, "1", "set", "v", "8", conditions={"value": "7"}),
        w(ns, "2", "set", "doc", {"rev": 2}, conditions={"value": {"rev": 1}}),  # JSON, as set
        w(ns, "3", "incrby", "n", 5, conditions={"exists": True, "value": 10}),
        w(ns, "4", "set", "new", "x", conditions={"exists": False}),
        w(ns, "5", "set", "new2", "y", conditions={"value": None}),
        w(ns, "6", "hset", "h", {"state": "done"}, conditions={"fields": {"state": "open"}}),
        w(ns, "7", "hdel", "h", "n", conditions={"fields": {"n": 2, "gone": None}}),
    ]
    for _ in range(2):  # the second time is a replay: delivered, and nothing changes
        assert statuses(await target.deliver(batch)) == ["delivered"] * len(batch)
        assert await rdb.get(f"{ns}:v") == b"8"
        assert orjson.loads(await rdb.get(f"{ns}:doc")) == {"rev": 2}
        assert await rdb.get(f"{ns}:n") == b"15"
        assert await rdb.mget(f"{ns}:new", f"{ns}:new2") == [b"x", b"y"]
        assert await rdb.hgetall(f"{ns}:h") == {b"state": b"done"}


async def test_conditions_not_met_change_nothing_and_the_write_applies_later(
    ns: str, rdb: aioredis.Redis, redis_target: Callable[..., Any]
) -> None:
    target = await redis_target(keyPrefix=f"{ns}:")
    await rdb.set(f"{ns}:v", "6")
    await rdb.set(f"{ns}:here", "1")
    await rdb.hset(f"{ns}:h", mapping={"state": "closed", "lock": "x"})
    batch = [
        w(ns, "1", "set", "v", "8", conditions={"value": "7"}),
        w(ns, "2", "incrby", "absent", 1, conditions={"exists": True}),
        w(ns, "3", "set", "here", "2", conditions={"exists": False}),
        w(ns, "4", "set", "here", "3", conditions={"value": None}),
        w(ns, "5", "hset", "h", {"state": "done"}, conditions={"fields": {"state": "open"}}),
        w(ns, "6", "hset", "h", {"state": "done"}, conditions={"fields": {"lock": None}}),
        w(ns, "7", "hset", "h", {"state": "done"}, conditions={"fields": {"owner": "me"}}),
        w(ns, "8", "set", "h", "s", conditions={"value": "closed"}),  # a hash is no string
        w(ns, "9", "set", "v", "9", conditions={"fields": {"a": "1"}}),  # a string is no hash
        w(ns, "10", "incrby", "v", 1, conditions={"exists": True, "value": "7"}),  # 2nd fails
    ]
    outcomes = await target.deliver(batch)
    assert [(o.status, o.code) for o in outcomes] == [("permanent", "CONDITION_FAILED")] * 10
    assert [o.message for o in outcomes] == [
        "condition 'value' not met: the key's value differs",
        "condition 'exists' not met: the key is absent",
        "condition 'exists' not met: the key exists",
        "condition 'value' not met: the key exists",
        "condition 'fields' not met: field 'state' differs",
        "condition 'fields' not met: field 'lock' exists",
        "condition 'fields' not met: field 'owner' is absent",
        "condition 'value' not met: the key does not hold a string",
        "condition 'fields' not met: the key does not hold a hash",
        "condition 'value' not met: the key's value differs",
    ]
    assert await rdb.get(f"{ns}:v") == b"6"
    assert await rdb.get(f"{ns}:here") == b"1"
    assert await rdb.exists(f"{ns}:absent") == 0
    assert await rdb.hgetall(f"{ns}:h") == {b"state": b"closed", b"lock": b"x"}
    assert await markers(rdb, ns, *(str(i) for i in range(1, 11))) == [0] * 10
    # Once the conditions hold, the same ids apply - once.
    await rdb.set(f"{ns}:v", "7")
    await rdb.set(f"{ns}:absent", 0)
    applied = [batch[0], batch[1], batch[9]]
    for _ in range(2):
        assert statuses(await target.deliver(applied)) == ["delivered", "delivered", "permanent"]
        assert await rdb.get(f"{ns}:v") == b"8"
        assert await rdb.get(f"{ns}:absent") == b"1"
    assert await markers(rdb, ns, "1", "2", "10") == [1, 1, 0]


async def test_a_batch_mixing_conditions_met_and_not(
    ns: str, rdb: aioredis.Redis, redis_target: Callable[..., Any]
) -> None:
    target = await redis_target(keyPrefix=f"{ns}:")
    await rdb.mset({f"{ns}:a": "1", f"{ns}:b": "1", f"{ns}:c": "1"})
    batch = [
        w(ns, "1", "set", "a", "2", conditions={"value": "1"}),
        w(ns, "2", "set", "b", "2", conditions={"value": "0"}),
        w(ns, "3", "incrby", "n", 1),  # no conditions
        w(ns, "4", "set", "c", "2", conditions={"exists": True}),
        w(ns, "5", "set", "d", "2", conditions={"exists": True}),
        w(ns, "6", "set", "e", "2", conditions={"when": "now"}),  # refused before Redis
        w(ns, "7", "set", "e", "2", conditions={"exists": "yes"}),
        w(ns, "8", "set", "e", "2", conditions={"fields": {}}),
    ]
    outcomes = await target.deliver(batch)
    assert codes(outcomes) == [
        None,
        "CONDITION_FAILED",
        None,
        None,
        "CONDITION_FAILED",
        "TARGET_REJECTED",
        "TARGET_REJECTED",
        "TARGET_REJECTED",
    ]
    assert "unknown condition 'when'" in outcomes[5].message
    assert "condition 'exists'" in outcomes[6].message
    assert "condition 'fields'" in outcomes[7].message
    keys = [f"{ns}:{k}" for k in "abcden"]
    assert await rdb.mget(keys) == [b"2", b"1", b"2", None, None, b"1"]


async def test_of_writes_racing_on_one_version_exactly_the_first_applies(
    ns: str, rdb: aioredis.Redis, redis_target: Callable[..., Any]
) -> None:
    target = await redis_target(keyPrefix=f"{ns}:")
    await rdb.set(f"{ns}:version", "7")
    batch = [w(ns, str(i), "set", "version", "8", conditions={"value": "7"}) for i in range(20)]
    outcomes = await target.deliver(batch)
    assert codes(outcomes) == [None] + ["CONDITION_FAILED"] * 19
    assert await rdb.get(f"{ns}:version") == b"8"
    assert await markers(rdb, ns, *(str(i) for i in range(20))) == [1] + [0] * 19


async def test_conditional_writes_survive_a_script_flush(
    ns: str, rdb: aioredis.Redis, redis_target: Callable[..., Any]
) -> None:
    target = await redis_target(keyPrefix=f"{ns}:")
    await rdb.script_flush()
    batch = [
        w(ns, "1", "set", "k", "1", conditions={"exists": False}),
        w(ns, "2", "set", "k", "2", conditions={"exists": False}),
        w(ns, "3", "set", "k", "3", conditions={"value": "1"}),
    ]
    assert codes(await target.deliver(batch)) == [None, "CONDITION_FAILED", None]
    assert await rdb.get(f"{ns}:k") == b"3"
