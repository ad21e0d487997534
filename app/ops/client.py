"""Talking to the fleet's topics without a worker: what ``wal`` commands use.

Plain aiokafka clients (no consumer group), built from the same settings as
the workers.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Iterable
from typing import IO, Any

import click
import orjson
from tqdm import tqdm

from app import audit, pausing
from app.engine.admin import ensure_topics
from app.engine.clients import plain_producer
from app.engine.reading import read_topic
from app.errors import Rejected
from app.logs import JsonFormatter
from app.models import Namespace, Pause
from app.names import encode_headers, topic_names
from app.settings import Settings
from app.web import access


def admin_caller(s: Settings, action: str) -> access.Caller:
    """The admin running a command that changes the fleet by writing to Kafka directly
    (``namespaces apply|delete``, ``dlq replay``): ``WAL_ADMIN_API_KEY`` must be one of
    ``WAL_ADMIN_API_KEYS``. Audit lines of the command go to stderr, as JSON.

    Such a command holds Kafka credentials, which are the hard boundary (Kafka ACLs on
    the fleet's topics); this check makes the operator name an admin key, so that every
    change is audited with who made it, and keeps a namespace owner's environment (a
    namespace key, no admin key) from changing the fleet by mistake."""
    if not audit.log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        audit.log.addHandler(handler)
        audit.log.setLevel(logging.INFO)
        audit.log.propagate = False
    digests = access.admin_digests(s.admin_api_keys.get_secret_value())
    try:
        return audit.require_admin(action, s.admin_api_key.get_secret_value() or None, digests)
    except Rejected as refused:
        why = "WAL_ADMIN_API_KEY is not set" if refused.code == "UNAUTHORIZED" else refused.message
        raise click.ClickException(
            f"{action} needs an admin key: {why}; set WAL_ADMIN_API_KEY to a key whose "
            "digest is in WAL_ADMIN_API_KEYS"
        ) from None


def validate(doc: dict[str, Any]) -> Namespace:
    return Namespace.model_validate(doc)


producer = plain_producer


async def read_all(s: Settings) -> dict[str, Namespace]:
    """The namespaces as the topic holds them now (later records win; tombstones delete)."""
    latest: dict[str, bytes | None] = {}
    for record in await read_topic(s, topic_names(s)["namespaces"]):
        latest[record.key.decode()] = record.value
    out = {}
    for name, raw in latest.items():
        if raw is not None:
            out[name] = Namespace.model_validate(orjson.loads(raw))
    return out


async def apply(
    s: Settings, wanted: Iterable[Namespace], *, dry_run: bool = False
) -> list[tuple[str, str]]:
    """Write namespace configs; return (name, "created"|"updated"|"unchanged") for each."""
    await ensure_topics(s)
    current = await read_all(s)
    changes: list[tuple[str, str]] = []
    writes: list[tuple[str, bytes]] = []
    for ns in wanted:
        old = current.get(ns.name)
        ns = pausing.kept(old, ns)  # re-applying a config does not lift a pause
        value = ns.model_dump_json().encode()
        if old is None:
            changes.append((ns.name, "created"))
        elif old.model_dump_json().encode() == value:
            changes.append((ns.name, "unchanged"))
            continue
        else:
            changes.append((ns.name, "updated"))
        writes.append((ns.name, value))
    if writes and not dry_run:
        await _send(s, topic_names(s)["namespaces"], [(n.encode(), v) for n, v in writes])
    return changes


async def set_pause(
    s: Settings, name: str, target: str | None, pause: Pause | None
) -> tuple[Namespace, bool]:
    """Pause (or, ``pause`` None, resume) a namespace's deliveries or one target's: its
    config as written, and whether that changed anything. :class:`click.ClickException`
    for a namespace or target it does not know."""
    found = (await read_all(s)).get(name)
    if found is None:
        raise click.ClickException(f"namespace '{name}' not found")
    try:
        ns, changed = pausing.paused(found, target, pause)
    except Rejected as rejected:
        raise click.ClickException(rejected.message) from None
    if changed:
        await _send(
            s, topic_names(s)["namespaces"], [(name.encode(), ns.model_dump_json().encode())]
        )
    return ns, changed


async def delete(s: Settings, names: Iterable[str]) -> None:
    await _send(s, topic_names(s)["namespaces"], [(n.encode(), None) for n in names])


async def _send(s: Settings, topic: str, records: list[tuple[bytes, bytes | None]]) -> None:
    p = producer(s)
    await p.start()
    try:
        futures = [await p.send(topic, value, key=key) for key, value in records]
        await asyncio.gather(*futures)
    finally:
        await p.stop()


async def produce_lines(
    s: Settings,
    source: IO[bytes],
    topic: str,
    key_field: str | None,
    progress: bool,
    headers: dict[str, str] | None = None,
) -> int:
    """Produce each non-empty line of ``source`` as one record; return how many."""
    await ensure_topics(s)
    p = producer(s, linger_ms=5, max_batch_size=256 * 1024)
    await p.start()
    sent = 0
    pending: list[asyncio.Future[Any]] = []
    bar = tqdm(unit="msg", disable=not progress, file=None)
    try:
        for line in source:
            line = line.strip()
            if not line:
                continue
            key = _key_of(line, key_field) if key_field else None
            pending.append(
                await p.send(topic, line, key=key, headers=encode_headers(headers or {}))
            )
            sent += 1
            if len(pending) >= 1000:
                await asyncio.gather(*pending)
                bar.update(len(pending))
                pending.clear()
        await asyncio.gather(*pending)
        bar.update(len(pending))
    finally:
        bar.close()
        await p.stop()
    return sent


def _key_of(line: bytes, path: str) -> bytes | None:
    try:
        value: Any = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return None if value is None else str(value).encode()
