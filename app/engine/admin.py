"""The fleet's topics on the brokers: created with the right settings, and how large a
record each takes; the client security every Kafka client of the fleet uses."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import (
    TopicAlreadyExistsError,
)

from app.engine.clients import security
from app.models import TOPIC_MAX_MESSAGE_BYTES
from app.names import topic_names
from app.settings import Settings

log = logging.getLogger("wal.topics")


def durability(replication: int) -> dict[str, str]:
    """Topic configs every topic the fleet creates has (its own here, and every topic Faust
    declares, changelogs and all, through :class:`app.engine.consumer.StrictTransport`): an
    ``acks=all`` write is on two replicas before it is acknowledged, wherever the topic has
    more than one (``WAL_REPLICATION_FACTOR``), whatever the brokers' default."""
    return {"min.insync.replicas": str(min(2, replication))}


async def ensure_topics(s: Settings, *, timeout: float = 30.0) -> list[str]:
    """Create every topic the fleet needs that does not exist yet; return those created."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=s.bootstrap_servers,
        request_timeout_ms=int(timeout * 1000),
        **security(s),
    )
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = []
        for role, name in topic_names(s).items():
            if name in existing:
                continue
            configs = {
                **durability(s.replication_factor),
                "max.message.bytes": str(TOPIC_MAX_MESSAGE_BYTES),
            }
            if role == "namespaces":
                configs["cleanup.policy"] = "compact"
            if role == "status":  # history for GET /wal/messages/{id}, then gone
                retention_ms = int(s.status_retention_s * 1000)
                configs["retention.ms"] = str(retention_ms)
                configs["segment.ms"] = str(max(60_000, retention_ms // 6))
            wanted.append(
                NewTopic(
                    name,
                    s.partitions if role != "namespaces" else 1,
                    s.replication_factor,
                    topic_configs=configs,
                )
            )
        if wanted:
            with contextlib.suppress(TopicAlreadyExistsError):  # another worker won the race
                await admin.create_topics(wanted, timeout_ms=int(timeout * 1000))
        ours = sorted(set(topic_names(s).values()) & existing)
        for name, limit in (await record_limits(admin, ours)).items():
            if limit < TOPIC_MAX_MESSAGE_BYTES:
                log.warning(
                    "topic %s holds records up to %d bytes (max.message.bytes): larger "
                    "requests are dead-lettered; raise it to %d (kafka-configs.sh --alter "
                    "--entity-type topics --entity-name %s --add-config max.message.bytes=%d)",
                    name,
                    limit,
                    TOPIC_MAX_MESSAGE_BYTES,
                    name,
                    TOPIC_MAX_MESSAGE_BYTES,
                )
        return [t.name for t in wanted]
    finally:
        await admin.close()


async def record_limits(admin: AIOKafkaAdminClient, names: Sequence[str]) -> dict[str, int]:
    """Each topic's ``max.message.bytes`` (what the broker says it is, default or not)."""
    if not names:
        return {}
    wanted = {"max.message.bytes": None}
    resources = [ConfigResource(ConfigResourceType.TOPIC, n, wanted) for n in names]
    limits = {}
    for response in await admin.describe_configs(resources):
        for _error, _message, _type, name, entries, *_ in response.resources:
            for entry in entries:
                if entry[0] == "max.message.bytes" and entry[1] is not None:
                    limits[name] = int(entry[1])
    return limits
