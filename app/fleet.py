"""The Faust app: one per worker process, built from :class:`Settings` once.

Agents, tables and views import ``fleet`` and ``settings`` from here by name.
Discovery is explicit (``agents``, ``tables``, ``app.web``'s views): never
``autodiscover=True``, which would import ``targets/`` and ``deploy/``.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

import faust

from app.engine import consumer, memory, store
from app.engine.clients import has_codec, ssl_context
from app.engine.partitioner import partitioner
from app.engine.sensors import install_monitor
from app.models import MAX_REQUEST_BYTES, TOPIC_MAX_MESSAGE_BYTES
from app.settings import Settings

settings = Settings()
store.install()  # rocksdb:// -> app.engine.store:RocksStore


def broker_credentials(s: Settings) -> Any:
    """Faust credentials for the configured Kafka security, or None for PLAINTEXT."""
    context = ssl_context(s)
    if s.security_protocol.startswith("SASL"):
        return faust.SASLCredentials(
            username=s.sasl_username,
            password=s.sasl_password.get_secret_value(),
            mechanism=s.sasl_mechanism,
            ssl_context=context,
        )
    if context is not None:
        return faust.SSLCredentials(context)
    return None


def create_app(s: Settings) -> faust.App:
    return faust.App(
        s.app_id,
        broker=s.broker,
        broker_credentials=broker_credentials(s),
        store=s.store,
        datadir=str(s.data_dir / "faust"),
        autodiscover=False,  # see discover() below
        origin="app",
        topic_partitions=s.partitions,
        topic_replication_factor=s.replication_factor,
        # Kafka 4.x: the leader-election topic is not needed (no on_leader
        # timers here) and is one more thing to create and assign.
        topic_disable_leader=True,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        producer_linger_ms=s.producer_linger_ms,
        producer_request_timeout=s.producer_request_timeout_s,
        producer_partitioner=partitioner,
        producer_max_request_size=TOPIC_MAX_MESSAGE_BYTES,
        **_optional(producer_compression_type=compression(s)),
        broker_commit_interval=s.commit_interval_s,
        broker_commit_every=10_000,
        broker_session_timeout=s.session_timeout_s,
        broker_heartbeat_interval=max(1.0, s.session_timeout_s / 5),
        stream_buffer_maxsize=max(4096, s.batch_size * 4),
        web_host=s.web_host,
        web_port=s.web_port,
        web_bind=s.web_host,
        web_in_thread=False,
        **_optional(canonical_url=s.canonical_url),
        # Bodies up to the largest maxMessageSize a namespace may set (16 MiB).
        web_application_options={"client_max_size": MAX_REQUEST_BYTES + 65_536},
        table_standby_replicas=s.standby_replicas,
        key_serializer="raw",
        value_serializer="raw",
        logging_config=None,
    )


def compression(s: Settings) -> str | None:
    """The producers' compression type, or None; a codec that is not installed is an error
    at start, not a producer that fails on its first record."""
    if s.producer_compression == "none":
        return None
    if not has_codec(s.producer_compression):
        raise RuntimeError(
            f"WAL_PRODUCER_COMPRESSION={s.producer_compression}: its codec is not installed"
        )
    return s.producer_compression


def _optional(**kwargs: Any) -> dict[str, Any]:
    """Keyword arguments whose value is set; Faust's defaults stand for the others."""
    return {k: v for k, v in kwargs.items() if v}


fleet = create_app(settings)
consumer.install(
    fleet,
    busy_fetch=(settings.fetch_min_bytes, settings.fetch_max_wait_ms),
    fetch_max_bytes=settings.fetch_max_bytes,
)


@fleet.timer(5.0)
async def heal_held_partitions() -> None:
    """Re-read any partition whose commits wait for a record Faust never delivered."""
    try:
        await fleet.consumer.heal(after=10.0)  # type: ignore[attr-defined]
    except Exception:  # a timer that raises stops for good
        fleet.log.exception("healing held partitions failed")


_trimmer = memory.Trimmer()


@fleet.timer(memory.TRIM_EVERY_S)
async def trim_memory() -> None:
    """Give the memory of a busy spell back once it is over (:mod:`app.engine.memory`)."""
    try:
        _trimmer.look()
    except Exception:  # a timer that raises stops for good
        fleet.log.exception("trimming memory failed")


install_monitor(fleet)

#: What a worker runs: every module of these packages, and the views.
ROLE_PACKAGES = ("agents", "tables")
VIEWS = ("app.web.views", "app.web.fleet_views", "app.web.admin")


def discover() -> list[str]:
    """Import every agent, table and view module; return their names.

    Faust's own ``discover()`` logs an import error as a warning and starts a
    worker without that module's agents. A worker that cannot import one of
    its roles must not start, so this imports them plainly and lets errors out.
    """
    names = [
        f"{package}.{module.name}"
        for package in ROLE_PACKAGES
        for module in pkgutil.iter_modules(importlib.import_module(package).__path__)
    ]
    names += VIEWS
    for name in names:
        importlib.import_module(name)
    return names
