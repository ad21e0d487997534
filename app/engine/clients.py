"""Plain Kafka clients - no consumer group, no Faust app - for the ``wal`` commands, the
local stack and the fleet's own probes, and the client settings every Kafka client of
the fleet shares (security, compression codecs).

The rest of the code takes aiokafka's types from here (``Consumer``, ``Producer``,
``TopicPartition``, ``KafkaError``): this package alone imports aiokafka.
"""

from __future__ import annotations

import ssl
from typing import Any

from aiokafka import AIOKafkaConsumer as Consumer
from aiokafka import AIOKafkaProducer as Producer
from aiokafka import TopicPartition, codec
from aiokafka.admin import AIOKafkaAdminClient as Admin
from aiokafka.errors import KafkaError
from aiokafka.helpers import create_ssl_context

from app.settings import Settings

__all__ = [
    "Admin",
    "Consumer",
    "KafkaError",
    "Producer",
    "TopicPartition",
    "admin_client",
    "has_codec",
    "plain_consumer",
    "plain_producer",
    "security",
    "ssl_context",
]


def ssl_context(s: Settings) -> ssl.SSLContext | None:
    """The TLS context for ``SSL``/``SASL_SSL``, from the configured files; else None."""
    if s.security_protocol not in ("SSL", "SASL_SSL"):
        return None
    return create_ssl_context(
        cafile=s.ssl_cafile or None,
        certfile=s.ssl_certfile or None,
        keyfile=s.ssl_keyfile or None,
    )


def security(s: Settings) -> dict[str, Any]:
    """aiokafka client keyword arguments for the configured Kafka security."""
    if s.security_protocol == "PLAINTEXT":
        return {}
    kwargs: dict[str, Any] = {"security_protocol": s.security_protocol}
    if s.security_protocol.startswith("SASL"):
        kwargs.update(
            sasl_mechanism=s.sasl_mechanism,
            sasl_plain_username=s.sasl_username,
            sasl_plain_password=s.sasl_password.get_secret_value(),
        )
    context = ssl_context(s)
    if context is not None:
        kwargs["ssl_context"] = context
    return kwargs


def has_codec(name: str) -> bool:
    """Whether aiokafka can compress with ``name`` (gzip, snappy, lz4, zstd) here."""
    check = getattr(codec, f"has_{name}", None)
    return bool(check and check())


def plain_consumer(s: Settings) -> Consumer:
    """A consumer in no group, reading from the beginning, committing nothing (not started)."""
    return Consumer(
        bootstrap_servers=s.bootstrap_servers,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        **security(s),
    )


def plain_producer(s: Settings, **kwargs: Any) -> Producer:
    """An idempotent producer with ``acks=all`` (not started)."""
    return Producer(
        bootstrap_servers=s.bootstrap_servers,
        acks="all",
        enable_idempotence=True,
        **security(s),
        **kwargs,
    )


def admin_client(bootstrap_servers: str, **kwargs: Any) -> Admin:
    """An admin client (not started)."""
    return Admin(bootstrap_servers=bootstrap_servers, **kwargs)
