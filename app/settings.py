"""Settings: one frozen object, read once from the environment (prefix ``WAL_``).

Nothing else in the code base reads the environment: build a :class:`Settings`
once (``Settings()``) and pass it down to the app, the targets and the CLI.
Each field's docstring names the variable that sets it.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="WAL_", frozen=True, extra="ignore", use_attribute_docstrings=True
    )

    app_id: str = "wal"
    """WAL_APP_ID: Faust app id, also the Kafka consumer group id."""

    broker: str = "kafka://127.0.0.1:9092"
    """WAL_BROKER: Kafka bootstrap servers, ``kafka://host:port[;host:port]``."""

    topic_prefix: str = "wal"
    """WAL_TOPIC_PREFIX: prefix of every topic name (``<prefix>-ingest`` …)."""

    partitions: int = Field(default=8, ge=1, le=1024)
    """WAL_PARTITIONS: partition count of the topics the fleet creates."""

    replication_factor: int = Field(default=1, ge=1)
    """WAL_REPLICATION_FACTOR: replication factor of the topics the fleet creates."""

    store: str = "memory://"
    """WAL_STORE: Faust table store, ``memory://`` or ``rocksdb://``."""

    web_host: str = "127.0.0.1"
    """WAL_WEB_HOST: address the worker's web server binds to."""

    web_port: int = 6066
    """WAL_WEB_PORT: port of the worker's web server (views, /metrics, health)."""

    canonical_url: str = ""
    """WAL_CANONICAL_URL: the URL other workers reach this one's web server at (table
    routing); default ``http://<web host>:<web port>``. In Kubernetes, the pod's DNS name."""

    standby_replicas: int = Field(default=0, ge=0, le=10)
    """WAL_STANDBY_REPLICAS: standby copies of each table partition kept by other workers,
    for faster failover (worth it with ``rocksdb://``)."""

    data_dir: Path = Path("./var")
    """WAL_DATA_DIR: where the worker keeps local state (table stores, SQLite file)."""

    database_url: str = ""
    """WAL_DATABASE_URL: SQLAlchemy URL of the default SQL target.

    Empty means the embedded default, a SQLite file ``<data_dir>/wal.db``.
    PostgreSQL: ``postgresql+psycopg://user:pass@127.0.0.1:5432/wal``.
    """

    redis_url: str = "redis://127.0.0.1:6379/0"
    """WAL_REDIS_URL: URL of the default Redis target."""

    batch_size: int = Field(default=2000, ge=1, le=100_000)
    """WAL_BATCH_SIZE: most events an agent takes from its stream at once (every agent)."""

    batch_within_ms: int = Field(default=20, ge=1, le=60_000)
    """WAL_BATCH_WITHIN_MS: longest an agent waits to fill a batch; the status and stats
    folds, which nobody waits on, wait ten times as long (at least 200 ms). Paid twice from
    ingest to target (ingest, deliver); under a backlog batches fill before it. At
    5 000 msgs/s on two workers 20 ms gave p50 ~80 / p99 ~170 ms against ~125 / ~240
    with 50 ms (``make bench``'s latency part, README)."""

    fetch_min_bytes: int = Field(default=64 * 1024, ge=1, le=64 * 1024 * 1024)
    """WAL_FETCH_MIN_BYTES: while a worker reads more than 500 records a second, the least
    the broker gathers before it answers its fetch (or ``WAL_FETCH_MAX_WAIT_MS`` passes):
    fewer, fuller fetches, less CPU. A busier worker's fetches gather more (25 ms of its
    traffic, up to 1 MiB: ``FetchPace``). Below 500 a second fetches are answered at once."""

    fetch_max_wait_ms: int = Field(default=100, ge=1, le=30_000)
    """WAL_FETCH_MAX_WAIT_MS: longest the broker holds a busy worker's fetch for
    ``WAL_FETCH_MIN_BYTES``: the most a record can wait per topic hop for that."""

    fetch_max_bytes: int = Field(default=4 * 1024 * 1024, ge=1024 * 1024, le=256 * 1024 * 1024)
    """WAL_FETCH_MAX_BYTES: the most one fetch brings back from a broker, all partitions
    together (Kafka's ``fetch.max.bytes``; a record larger than this still comes, alone).
    It bounds the fetched records a worker holds (aiokafka's own bound is 50 MiB a fetch).
    On ``make bench``'s delay part it left the settled RSS the same within noise and the
    busiest a few MiB lower (issue 19's note): a bound on the worst case, not a saving."""

    agent_concurrency: int = Field(default=2, ge=1, le=16)
    """WAL_AGENT_CONCURRENCY: batches the ingest and deliver agents each work on at once,
    each from its own share of the worker's partitions (a partition's records, and so a
    routing key's, are still handled in order, one batch at a time)."""

    commit_interval_s: float = Field(default=1.0, gt=0)
    """WAL_COMMIT_INTERVAL_S: how often acknowledged offsets are committed."""

    session_timeout_s: float = Field(default=10.0, ge=3, le=300)
    """WAL_SESSION_TIMEOUT_S: how long a silent worker keeps its partitions before the
    group hands them to others (after a crash, processing of its partitions resumes
    this much later)."""

    stall_after_s: float = Field(default=60.0, gt=0)
    """WAL_STALL_AFTER_S: a partition whose commit has not moved for this long while records
    wait is *stalled*: the worker answers 503 at /health/ready naming it, and
    ``wal_partition_stalled_seconds`` and the log say so (once a minute)."""

    sql_pool_size: int = Field(default=8, ge=1, le=200)
    """WAL_SQL_POOL_SIZE: connections a worker holds at most to one SQL database, shared by
    every namespace's targets on it (a batch that finds them all busy waits for one)."""

    target_deadline_s: float = Field(default=15.0, gt=0, le=600)
    """WAL_TARGET_DEADLINE_S: the longest one call to a target (a batch's writes for it) may
    run. Past it the call is abandoned, counted at once as a failure by the target's circuit
    breaker, and its writes go to the retry path."""

    target_slow_ms: int = Field(default=500, ge=50)
    """WAL_TARGET_SLOW_MS: a target call still running this long (or four times the target's
    usual call time, if more) after it started no longer holds its batch: the batch's other
    writes go on and its records are acked once the call ends; later calls to that target
    queue behind it (see ``agents/deliver/calls.py``). ``ordering: key`` namespaces wait."""

    circuit_probe_ms: int = Field(default=2000, ge=100, le=60_000)
    """WAL_CIRCUIT_PROBE_MS: while a target's circuit is open, how often it is probed
    (``SELECT 1``, ``PING``, an HTTP target's ``probe`` request); after a failed probe,
    twice as long. The first probe that finds the target up closes the circuit: writes
    flow again within about two of these after it is back (``targets/circuit.py``)."""

    shutdown_timeout_s: float = Field(default=25.0, gt=0, le=3600)
    """WAL_SHUTDOWN_TIMEOUT_S: the most a SIGTERM'd worker takes to exit; past it (the broker
    or a target away) it abandons what is in flight - not acked, read again elsewhere - and
    exits 3. Keep it below Kubernetes' grace period (30 s by default)."""

    producer_compression: Literal["none", "gzip", "lz4", "zstd", "snappy"] = "none"
    """WAL_PRODUCER_COMPRESSION: compression of the records the fleet produces (ingest's
    output, retries, dead letters, tables). ``none`` by default: the topics hold a worst-case
    request uncompressed (16 MiB under 16.5 MiB), and compression costs CPU on every hop.
    ``gzip`` is built in; ``lz4``, ``zstd`` and ``snappy`` need their codec installed
    (``lz4``, ``zstandard``, ``python-snappy``), checked at start."""

    producer_request_timeout_s: float = Field(default=10.0, ge=1, le=1200)
    """WAL_PRODUCER_REQUEST_TIMEOUT_S: how long the fleet's producer waits for the answer to one
    produce request before it drops the connection and sends the batch again, to whichever
    broker then leads the partition (a batch sent again may be written twice: at least once,
    the targets' ledgers apply a message once).
    Bounds how long a broker that hangs - paused, or cut off with its connections open -
    holds the stream once the cluster has moved its leaders (Faust's 1200 s held it for as
    long as the broker hung: ``tests/integration/cluster``). Also how long a leader may wait
    for its in-sync replicas before answering."""

    producer_linger_ms: int = Field(default=5, ge=0)
    """WAL_PRODUCER_LINGER_MS: producer linger; batches records sent together."""

    producer_client: Literal["aiokafka", "librdkafka"] = "librdkafka"
    """WAL_PRODUCER_CLIENT: the Kafka client that produces the agents' records. ``librdkafka``
    (confluent-kafka, the default) builds batches and requests in C instead of Python
    (x1.2 in alternating runs); same partitions, acks=all, one request in flight per
    connection, the same error handling (``app/engine/rdkafka.py``). ``aiokafka`` keeps
    them on Faust's producer. The guarantee tests passed on librdkafka five runs in a row,
    and so did the broker-kill and broker-pause tests once the latter no longer rested on
    commit timing (issue 19's notes). After a burst its buffers leave a worker's RSS ~12 MiB
    higher than aiokafka's (1 000 000 delayed requests parked). Faust's own writes stay on
    aiokafka."""

    delay_tiers: str = "1,5,30,120,900"
    """WAL_DELAY_TIERS: seconds of each delay tier topic (``wal-delay-<tier>``), comma-separated.
    A delayed or retried message waits in the largest tier that does not overshoot its
    due time; more tiers mean fewer hops for long delays."""

    transaction_retention_s: float = Field(default=3600.0, gt=0)
    """WAL_TRANSACTION_RETENTION_S: how long an ended transaction stays queryable."""

    status_retention_s: float = Field(default=3600.0, gt=0)
    """WAL_STATUS_RETENTION_S: how long ``GET /wal/messages/{id}`` knows a message
    (retention of the ``wal-status`` topic the owners rebuild their index from)."""

    status_capacity: int = Field(default=50_000, ge=100)
    """WAL_STATUS_CAPACITY: most message statuses one worker keeps in memory (the
    oldest go first, about 600 B each)."""

    http_produce_timeout_s: float = Field(default=5.0, gt=0, le=120)
    """WAL_HTTP_PRODUCE_TIMEOUT_S: how long POST /wal/write waits for Kafka before 503."""

    log_level: str = "info"
    """WAL_LOG_LEVEL: worker log level."""

    log_format: Literal["json", "text"] = "json"
    """WAL_LOG_FORMAT: worker log lines, ``json`` (one object per line: time, level, logger,
    message, and message id / namespace / request id when known) or ``text``."""

    # -- admin access ---------------------------------------------------------------
    admin_api_keys: SecretStr = SecretStr("")
    """WAL_ADMIN_API_KEYS: the keys that may change the fleet's behaviour (``wal backfill``,
    ``wal namespaces apply|delete``, ``wal dlq replay``, ``/wal/admin/*``), comma-separated:
    ``sha256:<hex>`` digests (``wal namespaces hash-key``), or plain keys, hashed when read.
    Empty: no admin operation is allowed. Never logged or shown."""

    admin_api_key: SecretStr = SecretStr("")
    """WAL_ADMIN_API_KEY: the admin key a ``wal`` command presents (to a worker over HTTP,
    or checked against ``WAL_ADMIN_API_KEYS`` by commands that write to Kafka directly)."""

    admin_url: str = ""
    """WAL_ADMIN_URL: the worker ``wal backfill`` asks; default ``http://<web host>:<port>``."""

    # -- Kafka security -------------------------------------------------------------
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    """WAL_SECURITY_PROTOCOL: Kafka security protocol."""

    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    """WAL_SASL_MECHANISM: SASL mechanism when the protocol is SASL_*."""

    sasl_username: str = ""
    """WAL_SASL_USERNAME: SASL user name."""

    sasl_password: SecretStr = SecretStr("")
    """WAL_SASL_PASSWORD: SASL password (never logged)."""

    ssl_cafile: str = ""
    """WAL_SSL_CAFILE: CA bundle to verify the brokers with (SSL, SASL_SSL)."""

    ssl_certfile: str = ""
    """WAL_SSL_CERTFILE: client certificate for mutual TLS."""

    ssl_keyfile: str = ""
    """WAL_SSL_KEYFILE: client key for mutual TLS."""

    # -- local stack (``wal stack``) ------------------------------------------------
    stack_dir: Path = Path("./var/stack")
    """WAL_STACK_DIR: data, logs and pid files of the local stack."""

    stack_cache_dir: Path = Path.home() / ".cache" / "wal"
    """WAL_STACK_CACHE_DIR: where Kafka's jars are resolved to (outside the repo)."""

    stack_brokers: int = Field(default=1, ge=1, le=5)
    """WAL_STACK_BROKERS: Kafka nodes of the local stack: 1, or a cluster of 3 (or 5) on
    WAL_BROKER's port and every second port after it, with ``min.insync.replicas=2``. Odd:
    a quorum of an even count survives no more failures than one node fewer."""

    kafka_version: str = "4.4.0"
    """WAL_KAFKA_VERSION: Apache Kafka release the local stack runs."""

    postgres_port: int = 5432
    """WAL_POSTGRES_PORT: port of the local stack's PostgreSQL."""

    redis_port: int = 6379
    """WAL_REDIS_PORT: port of the local stack's Redis."""

    @field_validator("stack_brokers")
    @classmethod
    def _odd(cls, n: int) -> int:
        if n % 2 == 0:
            raise ValueError(
                "WAL_STACK_BROKERS must be odd (1, 3 or 5): a KRaft quorum of "
                f"{n} survives no more failures than one of {n - 1}"
            )
        return n

    @model_validator(mode="after")
    def _fetch_bounds(self) -> Settings:
        if self.fetch_min_bytes > self.fetch_max_bytes:
            raise ValueError(
                f"WAL_FETCH_MIN_BYTES ({self.fetch_min_bytes}) is more than "
                f"WAL_FETCH_MAX_BYTES ({self.fetch_max_bytes}): a busy fetch could never "
                "gather it and would always wait WAL_FETCH_MAX_WAIT_MS"
            )
        return self

    @cached_property
    def tiers(self) -> tuple[int, ...]:
        """:attr:`delay_tiers` as sorted seconds."""
        try:
            tiers = sorted({int(t) for t in self.delay_tiers.split(",") if t.strip()})
        except ValueError:
            raise ValueError(
                f"WAL_DELAY_TIERS must be whole seconds: {self.delay_tiers!r}"
            ) from None
        if not tiers or tiers[0] < 1:
            raise ValueError("WAL_DELAY_TIERS needs at least one tier of 1 second or more")
        return tuple(tiers)

    @cached_property
    def bootstrap_servers(self) -> list[str]:
        """``host:port`` entries of :attr:`broker`, as aiokafka wants them."""
        servers = []
        for part in self.broker.replace(",", ";").split(";"):
            part = part.strip()
            if part:
                servers.append(part.split("://", 1)[-1])
        return servers

    @cached_property
    def broker_host_port(self) -> tuple[str, int]:
        """Host and port of the first bootstrap server."""
        parts = urlsplit("//" + self.bootstrap_servers[0])
        return parts.hostname or "127.0.0.1", parts.port or 9092

    @cached_property
    def sql_url(self) -> str:
        """The default SQL target's URL, with the embedded default filled in."""
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'wal.db').as_posix()}"

    @cached_property
    def worker_url(self) -> str:
        """Where ``wal`` commands reach a worker's web server (:attr:`admin_url`)."""
        return (self.admin_url or f"http://{self.web_host}:{self.web_port}").rstrip("/")

    def topic(self, name: str) -> str:
        """Full name of one of the fleet's topics: ``topic("ingest")`` is ``wal-ingest``."""
        return f"{self.topic_prefix}-{name}"
