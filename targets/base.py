"""The one contract every target keeps.

A *target* is a place writes are delivered to: a SQL database, a Redis
server, an HTTP endpoint. A namespace names its targets and configures each
(``TargetDef``); the worker opens one :class:`Target` per (namespace, target)
and keeps it for as long as that configuration stands.

Lifecycle
    ``open()`` once before the first batch; it may raise :class:`ConfigError`
    for a configuration that can never work (unknown option, bad URL). It
    must not fail because the remote end is down: connect lazily, so that a
    target that is down shows up as *retryable* outcomes, not as a crash.
    ``close()`` once at the end; never raises. ``warm()``, optional, connects
    ahead of the first batch (the worker calls it once its partitions are
    assigned, so the first write does not pay for connections and tables); it
    may raise, and a failure changes nothing: ``deliver`` still connects lazily.

Probes
    ``probe()``, optional, asks the remote end whether it answers, as cheaply
    as it can (SQL: a pooled connection and ``SELECT 1``; Redis: ``PING``;
    HTTP: a ``HEAD``/``GET`` its config names). While a target's circuit is
    open (:mod:`targets.circuit`) it is probed every few seconds instead of
    being sent real writes, and the circuit closes on the first probe that
    finds it up. It returns ``DELIVERED`` when the target answered, a
    retryable outcome (with the reason) when it did not, or ``None`` - the
    default - when the target has no probe: its circuit then lets a real
    batch through after the cooldown. A probe keeps a short timeout of its
    own (seconds, not the target's delivery timeout) and never raises.

Batches
    ``deliver(batch)`` takes a sequence of :class:`Write` items and returns a
    list of :class:`Outcome`, one per item, in the same order. Items of one
    batch come from one namespace and one target; their order is the order
    of the source partition, and a target applies them in that order where
    the store has a notion of order (a key written twice in one batch ends
    with the later value).

Outcomes
    ``delivered``  the write is applied and durable - or it had already been
                   applied under the same ``Write.id`` (a replay). Either way
                   the caller may commit past it.
    ``retryable``  not applied; may work later (connection refused, timeout,
                   throttled, deadlock). ``retry_after`` is the target's own
                   hint in seconds, when it gave one. The caller re-emits the
                   item on the retry path; nothing about it is half-applied.
    ``permanent``  not applied, and the same item will never apply (constraint
                   violation, wrong type, HTTP 4xx). The caller dead-letters
                   it with ``code`` and ``message``.

Effectively-once
    ``Write.id`` is the item's idempotency key (a message id, or a mutation id
    for transactions). A target records it in the same atomic step as the
    effect - the same SQL transaction, the same Redis MULTI - so delivering
    an item twice has the effect of delivering it once. HTTP cannot promise
    this by itself; it sends the id as ``Idempotency-Key`` for the receiver.

Errors
    ``deliver`` never raises for a failed write: client-library exceptions
    (SQLAlchemy, redis, httpx) are translated into outcomes inside the
    target's module and nowhere else. Messages in outcomes are safe to log
    and to put in dead-letter headers: they never contain credentials.
    Only ``asyncio.CancelledError`` may escape.
"""

from __future__ import annotations

import os
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from app.errors import ConfigError

if TYPE_CHECKING:
    from app.settings import Settings

Status = Literal["delivered", "retryable", "permanent"]


@dataclass(slots=True)  # not frozen: one per message, and frozen init costs 5x
class Write:
    """One item of a batch: what to apply, to where, under which idempotency key."""

    id: str
    namespace: str
    payload: Mapping[str, Any]
    operation: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    received_at_ms: int = 0
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened to one :class:`Write`."""

    status: Status
    code: str | None = None
    message: str = ""
    retry_after: float | None = None

    @property
    def ok(self) -> bool:
        return self.status == "delivered"


DELIVERED = Outcome("delivered")


def retryable(code: str, message: str, retry_after: float | None = None) -> Outcome:
    return Outcome("retryable", code, message, retry_after)


def permanent(code: str, message: str) -> Outcome:
    return Outcome("permanent", code, message)


def condition_failed(message: str) -> Outcome:
    """The write's ``conditions`` (``Write.options["conditions"]``) did not hold: not
    applied, and not recorded as applied (the same id may apply once they hold)."""
    return Outcome("permanent", "CONDITION_FAILED", message)


def conditions_of(write: Write) -> Mapping[str, Any]:
    """The write's conditions (empty: none)."""
    found = write.options.get("conditions")
    return found if isinstance(found, Mapping) else {}


class Target(ABC):
    """Base of every target; see the module docstring for the contract."""

    #: The name namespaces use in ``targets[].type``.
    kind: ClassVar[str]

    def __init__(self, name: str, config: Mapping[str, Any], settings: Settings) -> None:
        self.name = name
        self.config = resolve_secrets(config)
        self.settings = settings

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Prepare to deliver; connect lazily (see the module docstring)."""

    async def warm(self) -> None:  # noqa: B027 - optional hook
        """Connect now rather than at the first batch (see the module docstring)."""

    @abstractmethod
    async def deliver(self, batch: Sequence[Write]) -> list[Outcome]:
        """Apply ``batch``; one :class:`Outcome` per item, in order. Never raises."""

    async def probe(self) -> Outcome | None:
        """Does the target answer? ``None``: no probe (see the module docstring)."""
        return None

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections. Never raises."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


#: What :func:`at_path` returns for a path the payload does not have.
MISSING: Any = object()


def at_path(payload: Mapping[str, Any], path: str) -> Any:
    """The value at a dotted path in a payload (``payload.`` prefix optional), or MISSING."""
    value: Any = payload
    for part in path.removeprefix("payload.").split("."):
        if not isinstance(value, Mapping) or part not in value:
            return MISSING
        value = value[part]
    return value


_ENV_REF = re.compile(r"\$\{([A-Z_][A-Z0-9_]*)\}")


def resolve_secrets(config: Mapping[str, Any]) -> dict[str, Any]:
    """Replace ``${ENV_VAR}`` references in string values with the variable's value.

    This is the one place outside settings that reads the environment: secret
    references are how operators keep credentials out of namespace configs.
    A reference to an unset variable is a :class:`ConfigError`.
    """

    def resolve(value: Any) -> Any:
        if isinstance(value, str):
            return _ENV_REF.sub(lambda m: _env(m.group(1)), value)
        if isinstance(value, Mapping):
            return {k: resolve(v) for k, v in value.items()}
        if isinstance(value, list):
            return [resolve(v) for v in value]
        return value

    return {k: resolve(v) for k, v in config.items()}


def _env(name: str) -> str:
    try:
        return os.environ[name]
    except KeyError:
        raise ConfigError(f"secret reference ${{{name}}} is not set on this worker") from None
