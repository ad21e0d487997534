"""Pausing in a namespace's config: set and lifted, per namespace or target, and kept
when a config is applied again without mentioning it."""

from __future__ import annotations

from typing import Any

import pytest

from app import pausing
from app.errors import Rejected
from app.models import Namespace, Pause

PAUSE = Pause(reason="maintenance", since_ms=1_000, by="admin:abcd1234")


def namespace(**extra: Any) -> Namespace:
    targets = [{"identifier": "db", "type": "sql"}, {"identifier": "cache", "type": "redis"}]
    return Namespace.model_validate({"name": "orders", "targets": targets, **extra})


def test_a_target_pause_holds_that_target_only_and_a_namespace_pause_every_one() -> None:
    ns, changed = pausing.paused(namespace(), "db", PAUSE)
    assert changed
    assert pausing.pause_of(ns, ns.target("db")) == PAUSE
    assert pausing.pause_of(ns, ns.target("cache")) is None
    assert pausing.paused(ns, "db", PAUSE)[1] is False  # pausing twice changes nothing
    whole, _ = pausing.paused(namespace(), None, PAUSE)
    assert pausing.pause_of(whole, whole.target("cache")) == PAUSE
    assert pausing.pause_of(whole, None) == PAUSE  # the journal too
    lifted, changed = pausing.paused(ns, "db", None)
    assert changed and pausing.pause_of(lifted, lifted.target("db")) is None
    assert pausing.pauses(ns) == [
        {"target": "db", "reason": "maintenance", "sinceMs": 1_000, "by": "admin:abcd1234"}
    ]


def test_an_unknown_target_is_refused_with_the_targets_there_are() -> None:
    with pytest.raises(Rejected) as refused:
        pausing.paused(namespace(), "nope", PAUSE)
    assert refused.value.http_status == 404 and "db, cache" in refused.value.message


def test_applying_a_config_again_keeps_the_pauses_it_does_not_mention() -> None:
    old, _ = pausing.paused(pausing.paused(namespace(), "db", PAUSE)[0], None, PAUSE)
    again = pausing.kept(old, namespace(description="edited"))
    assert again.description == "edited"
    assert again.paused == PAUSE and again.target("db").paused == PAUSE  # type: ignore[union-attr]
    # a pause survives the round trip through the topic's JSON
    stored = Namespace.model_validate_json(again.model_dump_json())
    assert pausing.kept(None, stored) == stored and stored.paused == PAUSE
    # naming it lifts it: `paused: null` in the file
    lifted = pausing.kept(old, namespace(paused=None))
    assert lifted.paused is None and lifted.target("db").paused == PAUSE  # type: ignore[union-attr]
