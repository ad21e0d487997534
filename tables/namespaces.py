"""Namespaces: a GlobalTable over the compacted ``wal-namespaces`` topic.

Every worker holds every namespace config. ``wal namespaces apply`` writes the
topic (key: name, value: the config as JSON; a tombstone deletes), and each
worker's table follows it within moments: a change applies without restart.

Keys and values are raw bytes, so any Kafka client can write the topic.
"""

from __future__ import annotations

import orjson
from pydantic import ValidationError

from app.engine.tables import TopicGlobalTable
from app.fleet import fleet
from app.models import Namespace
from app.topics import NAMES

namespaces = TopicGlobalTable(
    fleet,
    changelog_name=NAMES["namespaces"],
    name="namespaces",
    key_type=bytes,
    value_type=bytes,
    partitions=1,
    beacon=fleet.tables.beacon,
    standby_buffer_size=1,
    # Faust resumes an active-only changelog partition after recovery (so the
    # table keeps following the topic live) only when this is 1.
    recovery_buffer_size=1,
    is_global=True,
    help="Namespace configs by name (source: the compacted namespaces topic).",
)
fleet.tables.add(namespaces)

# name -> (raw config, parsed config): parse each version of a config once.
_parsed: dict[str, tuple[bytes, Namespace | None]] = {}


def lookup(name: str) -> Namespace | None:
    """The live config of namespace ``name``, or None when it is unknown.

    A stored config that no longer validates (written by hand, or by an older
    version) counts as unknown, and is logged once per version.
    """
    raw = namespaces.data.get(name.encode())  # the store: no per-call sensors, on the hot path
    if raw is None:
        _parsed.pop(name, None)
        return None
    cached = _parsed.get(name)
    if cached is not None and cached[0] == raw:
        return cached[1]
    parsed = parse(raw)
    if parsed is None:
        fleet.log.error("namespace %r: stored config is invalid; treating it as unknown", name)
    _parsed[name] = (raw, parsed)
    return parsed


def parse(raw: bytes) -> Namespace | None:
    try:
        return Namespace.model_validate(orjson.loads(raw))
    except (orjson.JSONDecodeError, ValidationError):
        return None


def all_names() -> list[str]:
    return sorted(k.decode() for k in namespaces)
