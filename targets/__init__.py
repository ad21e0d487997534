"""Targets: where writes are delivered. The contract is in :mod:`targets.base`.

Targets are looked up by the type name a namespace gives (``sql``, ``redis``,
``http``), the way Faust looks up stores: a mapping from name to
``"module:Class"``, imported on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from app.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Mapping

    from app.settings import Settings
    from targets.base import Target

TARGETS: dict[str, str] = {
    "sql": "targets.sql:SqlTarget",
    "redis": "targets.redis:RedisTarget",
    "http": "targets.http:HttpTarget",
}


def by_kind(kind: str) -> type[Target]:
    """The target class for a namespace's ``type`` name."""
    try:
        module, _, cls = TARGETS[kind].partition(":")
    except KeyError:
        raise ConfigError(f"unknown target type {kind!r}; known: {', '.join(TARGETS)}") from None
    target_cls: type[Target] = getattr(import_module(module), cls)
    return target_cls


def create(kind: str, name: str, config: Mapping[str, Any], settings: Settings) -> Target:
    """A new, unopened target of ``kind``."""
    return by_kind(kind)(name, config, settings)
