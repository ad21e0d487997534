"""Deliver: one record of a batch on its way to its targets, and what it asks for."""

from __future__ import annotations

from dataclasses import dataclass, field

import orjson

from app import names
from app.models import Lifecycle, Namespace, TargetDef, WriteRequest
from targets.base import Write

#: The target a namespace without targets delivers to: the default database's journal.
JOURNAL = TargetDef(identifier="journal", type="sql", config={})


@dataclass(slots=True)
class Item:
    """One record of a batch on its way to its targets."""

    raw: bytes | None
    headers: dict[str, str]
    key: bytes | None
    source: str
    namespace: Namespace | None = None
    request: WriteRequest | None = None
    writes: dict[str, Write] = field(default_factory=dict)  # target identifier -> write
    seqs: dict[str, int | None] = field(default_factory=dict)  # ordering: number per target
    cancelled: bool = False  #: its message was cancelled before this record (not delivered)

    @property
    def attempt(self) -> int:
        try:
            return max(1, int(self.headers.get(names.ATTEMPT) or 1))
        except ValueError:
            return 1


def lifecycle(item: Item) -> Lifecycle:
    """The request's lifecycle (validated when first needed: on a failure)."""
    if item.request is None:
        try:
            item.request = WriteRequest.model_validate(orjson.loads(item.raw or b"null"))
        except (orjson.JSONDecodeError, ValueError):
            return Lifecycle()
    return item.request.lifecycle


def ordered(item: Item) -> bool:
    return item.namespace is not None and item.namespace.ordering == "key"
