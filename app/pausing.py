"""Pausing a namespace's deliveries, or one target's: what a pause changes in its config.

A pause is part of the namespace's live configuration (``paused`` on the namespace
or on a target, :class:`~app.models.Pause`), so it survives restarts and reaches
every worker through the namespaces topic in about a second. While it holds, deliver
parks the writes it would have sent (``agents/deliver``): they wait in Kafka, their
attempts, the breaker and the retry tiers untouched, and go once it is lifted - an
``ordering: key`` namespace's in their key's order.

``wal namespaces apply`` of a file that does not mention ``paused`` keeps the pauses
in force: lifting one is ``wal namespaces resume``'s business, never an accident of
re-applying a config.
"""

from __future__ import annotations

from app.errors import Rejected
from app.models import Namespace, Pause, TargetDef


def paused(ns: Namespace, target: str | None, pause: Pause | None) -> tuple[Namespace, bool]:
    """``ns`` with its pause (or ``target``'s) set to ``pause`` (None: lifted), and whether
    that changes anything. :class:`Rejected` (404) for a target it does not define."""
    if target is None:
        return ns.model_copy(update={"paused": pause}), (ns.paused is None) != (pause is None)
    found = ns.target(target)
    if found is None:
        defined = ", ".join(t.identifier for t in ns.targets) or "none: the journal"
        raise Rejected(
            f"target '{target}' is not defined by namespace '{ns.name}' (its targets: {defined})",
            code="TARGET_NOT_FOUND",
            http_status=404,
        )
    changed = (found.paused is None) != (pause is None)
    targets = [
        t.model_copy(update={"paused": pause}) if t.identifier == target else t for t in ns.targets
    ]
    return ns.model_copy(update={"targets": targets}), changed


def pause_of(ns: Namespace, definition: TargetDef | None) -> Pause | None:
    """The pause holding ``definition``'s deliveries back, if any (the namespace's first)."""
    if ns.paused is not None:
        return ns.paused
    return definition.paused if definition is not None else None


def pauses(ns: Namespace) -> list[dict[str, object]]:
    """The pauses in force for the views: the namespace's (target None) and its targets'."""
    found = [(None, ns.paused)] + [(t.identifier, t.paused) for t in ns.targets]
    return [
        {"target": target, "reason": p.reason, "sinceMs": p.since_ms, "by": p.by}
        for target, p in found
        if p is not None
    ]


def kept(old: Namespace | None, new: Namespace) -> Namespace:
    """``new`` as applied: the pauses of ``old`` it does not mention are kept."""
    if old is None:
        return new
    update: dict[str, object] = {}
    if "paused" not in new.model_fields_set and old.paused is not None:
        update["paused"] = old.paused
    targets = []
    for t in new.targets:
        before = old.target(t.identifier)
        if "paused" not in t.model_fields_set and before is not None and before.paused:
            t = t.model_copy(update={"paused": before.paused})
        targets.append(t)
    update["targets"] = targets
    return new.model_copy(update=update)
