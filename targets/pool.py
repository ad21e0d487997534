"""A worker's open targets: one per (namespace, target identifier), each behind its
circuit breaker (:mod:`targets.circuit`), opened on first use and reopened when the
namespace's definition of it changes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from app.models import TargetDef
from app.settings import Settings
from targets import create as create_target
from targets.base import Target
from targets.circuit import guard

Create = Callable[[str, str, Mapping[str, Any], Settings], Target]


@dataclass(slots=True)
class _Open:
    fingerprint: bytes
    target: Target


class TargetPool:
    """The open targets; :meth:`get` is all a caller needs."""

    def __init__(self, settings: Settings, create: Create = create_target) -> None:
        self.settings = settings
        self.create = create
        self._open: dict[tuple[str, str], _Open] = {}
        #: Opening a target is rare; two batches (or a warm-up) asking at once open it once.
        self._opening = asyncio.Lock()

    async def get(self, namespace: str, definition: TargetDef) -> Target:
        """The open target for a namespace's target definition; reopened when it changes."""
        fingerprint = orjson.dumps(definition.model_dump(), option=orjson.OPT_SORT_KEYS)
        key = (namespace, definition.identifier)
        slot = self._open.get(key)
        if slot is not None and slot.fingerprint == fingerprint:
            return slot.target
        async with self._opening:
            slot = self._open.get(key)
            if slot is not None and slot.fingerprint == fingerprint:
                return slot.target
            inner = self.create(
                definition.type, definition.identifier, definition.config, self.settings
            )
            circuit = definition.circuit  # a circuit breaker per (namespace, target)
            target = guard(
                namespace,
                inner,
                threshold=circuit.threshold,
                cooldown=circuit.cooldown_ms / 1000,
                max_cooldown=circuit.max_cooldown_ms / 1000,
            )
            await target.open()
            self._open[key] = _Open(fingerprint, target)
        if slot is not None:
            await slot.target.close()
        return target
