"""Redis target: SET / DEL / HSET / HDEL / INCRBY / EXPIRE, a batch per round trip (redis-py).

Config: ``url`` (default ``settings.redis_url``), ``keyPrefix`` (""), ``ttlSeconds``
(none), ``operation`` ("set"), ``keyPath`` ("key": dotted path in the payload
to the key), ``valuePath`` ("value"; the whole payload when the path is
missing), ``dedupeTtlSeconds`` (7 days), ``timeoutMs`` (5000, connect and
socket). A write's operation is ``Write.operation``, else its ``operation``
option, else the config's; its ``keyPrefix``/``ttlSeconds`` options override
the config's.

What each operation takes from the value (at ``valuePath``):

* ``set``     any value; a string is stored as is, anything else as JSON; TTL applies.
* ``del``     nothing.
* ``hset``    a non-empty object of field -> value (encoded like ``set``); TTL applies.
* ``hdel``    a field name or a list of them.
* ``incrby``  an integer; TTL applies.
* ``expire``  an integer number of seconds at ``valuePath``, else the TTL.

Effectively-once: each write runs as one Lua script (EVALSHA) that returns at
once if the marker ``wal:applied:<namespace>:<target>:<Write.id>`` exists, else
applies the operation and sets the marker (``dedupeTtlSeconds``) - one atomic
step, so a replayed INCRBY counts once. The batch's scripts go in one pipeline
without MULTI: one round trip, and one item's error (WRONGTYPE) fails that
item alone. A pipeline that broke mid-way is safe to send again for the same
reason. The script is loaded on first NOSCRIPT (a new or restarted server).

Conditions (``Write.options["conditions"]``, an object) are checked inside that
same script, after the marker and before the operation: check and write are one
atomic step, and a write sees the effect of those before it in the batch (of
many writes conditioned on the value one of them changes, only the first
applies). A write without conditions runs the script exactly as before.

* ``value``   the key's string value equals this value, encoded as ``set``
              encodes it (a string as is, anything else as JSON); ``null``: the
              key is absent. A key that is not a string does not match.
* ``exists``  ``true``: the key exists; ``false``: it does not.
* ``fields``  a non-empty object of field -> value: each hash field holds that
              value (encoded like ``hset``); ``null``: the field is absent. A key
              that is not a hash does not match.

All of a write's conditions must hold. Any other name, or a value of the wrong
kind, refuses the write before Redis is asked (permanent ``TARGET_REJECTED``
naming it). A condition that does not hold: the operation is not applied, the
marker is not set, and the outcome is permanent ``CONDITION_FAILED`` saying
which condition and how (``condition 'value' not met: the key's value
differs``, ``condition 'fields' not met: field 'f' is absent``); the same id
applies later, once its conditions hold. A replay of an applied write stays
``delivered`` whatever its conditions say now. Messages never quote stored
values.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import orjson
import redis.asyncio as aioredis
from redis import exceptions as rx
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from app.errors import ConfigError
from targets.base import (
    DELIVERED,
    MISSING,
    Outcome,
    Target,
    Write,
    at_path,
    condition_failed,
    conditions_of,
    permanent,
    retryable,
)

__all__ = ["RedisTarget"]

_OPERATIONS = {"set", "del", "hset", "hdel", "incrby", "expire"}
_WITH_TTL = {"set", "hset", "incrby"}
#: The most a :meth:`RedisTarget.probe` waits for its ``PONG``.
PROBE_TIMEOUT_S = 2.0

# KEYS: marker, key. ARGV: marker TTL, operation, TTL ('' for none), operation arguments...
# A write with conditions has its operation prefixed '?', the number of condition
# triples (test, field, operand) in ARGV[4], those triples, then its operation arguments.
# A condition not met returns {its 1-based index, why} and changes nothing.
_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local op, ttl, a = ARGV[2], ARGV[3], 4
if string.byte(op) == 63 then
  op, a = string.sub(op, 2), 5 + 3 * tonumber(ARGV[4])
  for i = 5, a - 1, 3 do
    local test, want, r, why = ARGV[i], ARGV[i + 2], nil, nil
    if test == 'exists' then
      r = redis.call('EXISTS', KEYS[2])
      if r ~= tonumber(want) then why = r == 1 and 'exists' or 'absent' end
    elseif test == 'nofield' then
      r = redis.pcall('HEXISTS', KEYS[2], ARGV[i + 1])
      if type(r) == 'table' then why = 'wrongtype' elseif r == 1 then why = 'exists' end
    else
      if test == 'get' then r = redis.pcall('GET', KEYS[2])
      else r = redis.pcall('HGET', KEYS[2], ARGV[i + 1]) end
      if type(r) == 'table' then why = 'wrongtype'
      elseif not r then why = 'absent'
      elseif r ~= want then why = 'differs' end
    end
    if why then return {(i - 2) / 3, why} end
  end
end
local r
if op == 'set' then
  if ttl ~= '' then r = redis.pcall('SET', KEYS[2], ARGV[a], 'EX', ttl)
  else r = redis.pcall('SET', KEYS[2], ARGV[a]) end
elseif op == 'del' then r = redis.pcall('DEL', KEYS[2])
elseif op == 'hset' then r = redis.pcall('HSET', KEYS[2], unpack(ARGV, a))
elseif op == 'hdel' then r = redis.pcall('HDEL', KEYS[2], unpack(ARGV, a))
elseif op == 'incrby' then r = redis.pcall('INCRBY', KEYS[2], ARGV[a])
elseif op == 'expire' then r = redis.pcall('EXPIRE', KEYS[2], ARGV[a])
else return redis.error_reply('ERR unknown operation ' .. op) end
if type(r) == 'table' and r.err then return r end
if ttl ~= '' and op ~= 'set' then redis.call('EXPIRE', KEYS[2], ttl) end
redis.call('SET', KEYS[1], '1', 'EX', ARGV[1])
return 1
"""
_SHA = hashlib.sha1(_SCRIPT.encode()).hexdigest()

# Error-reply prefixes that mean "not now" rather than "never".
_THROTTLED = ("BUSY", "LOADING", "TRYAGAIN", "OOM")
_UNAVAILABLE = ("READONLY", "MASTERDOWN", "CLUSTERDOWN", "NOAUTH", "WRONGPASS", "NOPERM")


class _Invalid(Exception):
    """A write that can never apply (no key, wrong kind of value)."""


class RedisTarget(Target):
    kind = "redis"

    _client: aioredis.Redis | None = None

    async def open(self) -> None:
        c = self.config
        url = c.get("url") or self.settings.redis_url
        self.prefix = _option(self.name, c, "keyPrefix", str, "")
        self.ttl = _option(self.name, c, "ttlSeconds", int, None)
        self.operation = _option(self.name, c, "operation", str, "set").lower()
        self.key_path = _option(self.name, c, "keyPath", str, "key")
        self.value_path = _option(self.name, c, "valuePath", str, "value")
        self.dedupe_ttl = _option(self.name, c, "dedupeTtlSeconds", int, 7 * 86_400)
        timeout = _option(self.name, c, "timeoutMs", int, 5_000) / 1000
        if self.operation not in _OPERATIONS:
            known = ", ".join(sorted(_OPERATIONS))
            raise ConfigError(f"redis target {self.name}: operation must be one of {known}")
        self._password = urlsplit(url).password if isinstance(url, str) else None
        try:
            self._client = aioredis.Redis.from_url(
                url,
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
                retry=Retry(NoBackoff(), 1),  # one quick reconnect; the caller owns backoff
            )
        except (ValueError, TypeError, rx.RedisError):
            raise ConfigError(f"redis target {self.name}: unusable url") from None

    async def warm(self) -> None:
        if self._client is not None:
            await self._client.ping()

    async def probe(self) -> Outcome:
        """``PING``, within :data:`PROBE_TIMEOUT_S`."""
        assert self._client is not None, "open() first"
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_S):
                await self._client.ping()
        except TimeoutError:
            return retryable("TARGET_UNAVAILABLE", f"no PONG within {PROBE_TIMEOUT_S:g} s")
        except Exception as exc:  # whatever it was (LOADING too), the server is not there yet
            return retryable("TARGET_UNAVAILABLE", self._scrub(classify(exc)).message)
        return DELIVERED

    async def close(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):  # close never raises
                await self._client.aclose()

    async def deliver(self, batch: Sequence[Write]) -> list[Outcome]:
        outcomes: list[Outcome] = [DELIVERED] * len(batch)
        calls: dict[int, list[Any]] = {}
        for i, item in enumerate(batch):
            try:
                calls[i] = self.command(item)
            except _Invalid as exc:
                outcomes[i] = permanent("TARGET_REJECTED", str(exc))
        for attempt in range(2):  # a second round only after loading the script
            results = await self._run(list(calls.values()))
            again: dict[int, list[Any]] = {}
            for (i, call), result in zip(calls.items(), results, strict=True):
                if isinstance(result, rx.NoScriptError) and attempt == 0:
                    again[i] = call
                elif isinstance(result, BaseException):
                    outcomes[i] = self._scrub(classify(result))
                elif isinstance(result, list):  # a condition that did not hold
                    outcomes[i] = condition_failed(unmet(conditions_of(batch[i]), result))
            if not again or not await self._load_script(again, outcomes):
                break
            calls = again
        return outcomes

    def command(self, item: Write) -> list[Any]:
        """The EVALSHA arguments that apply ``item``; :class:`_Invalid` if it never can."""
        op = (item.operation or item.options.get("operation") or self.operation).lower()
        if op not in _OPERATIONS:
            raise _Invalid(f"unknown operation {op!r}")
        key = at_path(item.payload, self.key_path)
        if isinstance(key, bool) or not isinstance(key, (str, int)) or key == "":
            raise _Invalid(f"no key at {self.key_path!r}")
        prefix = _opt(item.options, "keyPrefix", "key_prefix", self.prefix)
        ttl = _opt(item.options, "ttlSeconds", "ttl_seconds", self.ttl)
        value = at_path(item.payload, self.value_path)
        if value is MISSING:
            value = item.payload
        args = _arguments(op, value, ttl)
        ttl_arg = str(ttl) if ttl and op in _WITH_TTL else ""
        if conditions := conditions_of(item):  # see _SCRIPT for where they go
            tests = [part for _, test in _tests(conditions) for part in test]
            op, args = f"?{op}", [len(tests) // 3, *tests, *args]
        marker = f"wal:applied:{item.namespace}:{self.name}:{item.id}"
        return ["EVALSHA", _SHA, 2, marker, f"{prefix}{key}", self.dedupe_ttl, op, ttl_arg, *args]

    async def _run(self, calls: list[list[Any]]) -> list[Any]:
        """Send the calls in one pipeline; a failure of the whole round trip fails each call."""
        if not calls:
            return []
        assert self._client is not None, "open() first"
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for call in calls:
                    pipe.execute_command(*call)
                return list(await pipe.execute(raise_on_error=False))
        except Exception as exc:  # redis-py's or the socket's: classify() sorts them out
            return [exc] * len(calls)

    async def _load_script(self, pending: dict[int, list[Any]], outcomes: list[Outcome]) -> bool:
        assert self._client is not None
        try:
            await self._client.script_load(_SCRIPT)
            return True
        except (rx.RedisError, OSError) as exc:
            for i in pending:
                outcomes[i] = self._scrub(classify(exc))
            return False

    def _scrub(self, outcome: Outcome) -> Outcome:
        if not self._password or self._password not in outcome.message:
            return outcome
        message = outcome.message.replace(self._password, "***")
        return Outcome(outcome.status, outcome.code, message, outcome.retry_after)


def classify(exc: BaseException) -> Outcome:
    """Translate a redis-py error (or a script's error reply) into an outcome."""
    name = type(exc).__name__
    text = str(exc).strip().splitlines()
    message = f"{name}: {text[0][:300]}" if text else name
    if isinstance(exc, rx.TimeoutError):
        return retryable("TARGET_UNAVAILABLE", message)
    if isinstance(exc, rx.BusyLoadingError):
        return retryable("TARGET_THROTTLED", message)
    if isinstance(exc, (rx.ConnectionError, OSError)):
        return retryable("TARGET_UNAVAILABLE", message)
    if isinstance(exc, rx.NoScriptError):
        return retryable("TARGET_ERROR", message)
    if isinstance(exc, rx.ResponseError):
        reply = text[0].lstrip() if text else ""
        if reply.startswith(_THROTTLED):
            return retryable("TARGET_THROTTLED", message)
        if isinstance(exc, rx.ReadOnlyError) or reply.startswith(_UNAVAILABLE):
            return retryable("TARGET_UNAVAILABLE", message)
        return permanent("TARGET_REJECTED", message)
    return retryable("TARGET_ERROR", message)


#: What the script's ``why`` means, for the outcome's message.
_WHY = {
    "absent": "the key is absent",
    "exists": "the key exists",
    "differs": "the key's value differs",
    "wrongtype": "the key does not hold a string",
}
_FIELD_WHY = {
    "absent": "field {} is absent",
    "exists": "field {} exists",
    "differs": "field {} differs",
    "wrongtype": "the key does not hold a hash",
}


def _tests(conditions: Mapping[str, Any]) -> list[tuple[str, tuple[str, str, bytes | str]]]:
    """The script's condition triples (test, field, operand), each after its condition's name.

    :class:`_Invalid` for a name this target does not know or a value of the wrong kind.
    """
    tests: list[tuple[str, tuple[str, str, bytes | str]]] = []
    for name, want in conditions.items():
        if name == "value":
            test = ("exists", "", "0") if want is None else ("get", "", _encode(want, name))
            tests.append((name, test))
        elif name == "exists":
            if not isinstance(want, bool):
                raise _Invalid("condition 'exists' must be true or false")
            tests.append((name, ("exists", "", "1" if want else "0")))
        elif name == "fields":
            if not isinstance(want, Mapping) or not want:
                raise _Invalid("condition 'fields' must be a non-empty object of field -> value")
            for field, v in want.items():
                test = (
                    ("nofield", str(field), "")
                    if v is None
                    else ("hget", str(field), _encode(v, name))
                )
                tests.append((name, test))
        else:
            raise _Invalid(f"unknown condition {str(name)[:100]!r} (value, exists, fields)")
    return tests


def unmet(conditions: Mapping[str, Any], reply: list[Any]) -> str:
    """The message of the script's reply ``[index, why]`` for a condition that did not hold."""
    index, why = reply
    why = why.decode() if isinstance(why, bytes) else str(why)
    name, (test, field, _) = _tests(conditions)[int(index) - 1]
    if test in ("hget", "nofield"):
        detail = _FIELD_WHY.get(why, why).format(repr(field[:100]))
    else:
        detail = _WHY.get(why, why)
    return f"condition {name!r} not met: {detail}"


def _arguments(op: str, value: Any, ttl: int | None) -> list[Any]:
    if op == "set":
        return [_encode(value)]
    if op == "del":
        return []
    if op == "hset":
        if not isinstance(value, Mapping) or not value:
            raise _Invalid("hset needs a non-empty object of fields")
        return [part for field, v in value.items() for part in (str(field), _encode(v))]
    if op == "hdel":
        fields = [value] if isinstance(value, str) else value
        if not (isinstance(fields, list) and fields and all(isinstance(f, str) for f in fields)):
            raise _Invalid("hdel needs a field name or a list of them")
        return list(fields)
    if op == "incrby":
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid("incrby needs an integer amount")
        return [value]
    seconds = value if isinstance(value, int) and not isinstance(value, bool) else ttl
    if not seconds or seconds < 1:
        raise _Invalid("expire needs a positive number of seconds (value or ttlSeconds)")
    return [seconds]


def _encode(value: Any, condition: str = "") -> bytes:
    if isinstance(value, str):
        return value.encode()
    try:
        return orjson.dumps(value)
    except TypeError as exc:
        what = f"condition {condition!r}" if condition else "value"
        raise _Invalid(f"{what} is not JSON: {exc}") from None


def _opt(options: Mapping[str, Any], camel: str, snake: str, default: Any) -> Any:
    value = options.get(camel, options.get(snake))
    return default if value is None else value


def _option(name: str, config: Mapping[str, Any], key: str, kind: type, default: Any) -> Any:
    value = config.get(key, default)
    if value is None and default is None:
        return None
    ok = isinstance(value, kind) and not isinstance(value, bool)
    if not ok or (kind is int and value < 1):
        expected = "a positive integer" if kind is int else "a string"
        raise ConfigError(f"redis target {name}: {key} must be {expected}")
    return value
