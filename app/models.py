"""The wire schema: what goes on Kafka and over HTTP.

Two documents: the *write request* a client produces to ``wal-ingest`` (or
POSTs to ``/wal/write``), and the *namespace config* an operator applies to
``wal-namespaces``. Field names and limits follow the reference design
(sections 5 and 6.1); JSON accepts camelCase and snake_case alike.

A request refers to targets by identifier only. Connection details (hosts,
URLs, credentials) live in the namespace config and settings, never in a
message: :class:`TargetRef` forbids any field it does not know.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

#: Largest total delay a request may ask for (7 days, the longest TTL).
MAX_DELAY_SECONDS = 7 * 24 * 3600
DEFAULT_MAX_MESSAGE_SIZE = 1024 * 1024
#: The largest request the fleet takes: the most a namespace's maxMessageSize may allow.
MAX_REQUEST_BYTES = 16 * 1024 * 1024
#: What a topic of the fleet holds per record (``max.message.bytes``, and the producers'
#: ``max_request_size``): the largest request with room for its headers and the batch's
#: framing. Kafka's default (~1 MiB) refused larger requests for good (issue 16).
TOPIC_MAX_MESSAGE_BYTES = MAX_REQUEST_BYTES + 512 * 1024
DEFAULT_TTL_SECONDS = 86_400

_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@/+=-]{0,127}$"
_NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,99}$"
_KEY_HASH = re.compile(r"^sha256:[0-9a-f]{64}$")


def _normalise_name(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


NamespaceName = Annotated[
    str,
    BeforeValidator(_normalise_name),
    Field(min_length=1, max_length=100, pattern=_NAME_PATTERN),
]


def _empty(kind: type[dict[Any, Any]] | type[list[Any]]) -> Any:
    """An empty ``{}``/``[]`` default, made fresh per instance without pydantic's deepcopy of
    a mutable default (about a microsecond per field, per request); shown as the default in
    the JSON schema as before."""
    return Field(default_factory=kind, json_schema_extra={"default": kind()})


Identifier = Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9._-]+$")]


class Wire(BaseModel):
    """Base of every wire model: camelCase or snake_case in, camelCase out, no unknown fields."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
        extra="forbid",
        frozen=True,
    )


class DelayUnit(StrEnum):
    SECONDS = "seconds"
    MINUTES = "minutes"
    HOURS = "hours"
    DAYS = "days"

    @property
    def seconds(self) -> int:
        return _UNIT_SECONDS[self.value]


_UNIT_SECONDS = {"seconds": 1, "minutes": 60, "hours": 3600, "days": 86_400}


class BackoffStrategy(StrEnum):
    EXPONENTIAL = "exponential"
    LINEAR = "linear"
    CONSTANT = "constant"
    CUSTOM = "custom"


class RetryPolicy(Wire):
    """How often and how far apart failed deliveries are tried again (reference RetryPolicyDto).

    In a request every field is optional and overrides the namespace's policy
    within these limits; ``maxAttempts`` counts the first try too.
    """

    max_attempts: int | None = Field(default=None, ge=0, le=10)
    backoff_strategy: BackoffStrategy | None = None
    initial_delay_ms: int | None = Field(default=None, ge=100, le=60_000)
    max_delay_ms: int | None = Field(default=None, ge=1_000, le=300_000)
    jitter_ms: int | None = Field(default=None, ge=0, le=5_000)
    custom_delays_ms: list[Annotated[int, Field(ge=0, le=300_000)]] | None = Field(
        default=None, max_length=10
    )
    retryable_error_codes: list[str] | None = None


class Lifecycle(Wire):
    """Delay, TTL, retries and dead-lettering of one request (reference LifecycleConfigDto)."""

    delay: int | None = Field(default=None, ge=0, le=86_400)
    delay_unit: DelayUnit = DelayUnit.SECONDS
    ttl: int | None = Field(default=None, ge=60, le=604_800)
    retry_policy: RetryPolicy | None = None
    enable_dlq: bool = Field(default=True, alias="enableDLQ")
    compression: bool = False

    @property
    def delay_seconds(self) -> int:
        return (self.delay or 0) * self.delay_unit.seconds

    @model_validator(mode="after")
    def _delay_within_limits(self) -> Lifecycle:
        if self.delay_seconds > MAX_DELAY_SECONDS:
            raise ValueError(f"delay exceeds {MAX_DELAY_SECONDS} seconds (7 days)")
        if self.ttl is not None and self.delay_seconds >= self.ttl:
            raise ValueError("delay must be shorter than ttl")
        return self


class TargetOptions(Wire):
    """Per-message options for one target; never a host, URL or credential."""

    table: Identifier | None = None
    key_prefix: str | None = Field(default=None, max_length=200)
    ttl_seconds: int | None = Field(default=None, ge=1, le=31_536_000)
    operation: str | None = Field(default=None, max_length=20)
    #: Apply the write only where these hold, checked where the write happens (SQL:
    #: columns in the statement; Redis: the key's value or hash fields in the script;
    #: HTTP: ``If-Match`` and ``WAL-Conditions`` headers). Not met: ``CONDITION_FAILED``.
    conditions: dict[str, Any] | None = Field(default=None, max_length=32)


class TargetRef(Wire):
    """A target of the request's namespace, by identifier, with optional per-message options."""

    identifier: Identifier
    type: str | None = None
    config: TargetOptions = TargetOptions()
    region: str | None = None
    weight: int | None = Field(default=None, ge=0, le=100)
    enabled: bool = True
    tags: list[str] = _empty(list)


def _target_shorthand(value: Any) -> Any:
    if isinstance(value, str):
        return {"identifier": value}
    if isinstance(value, list):
        return [{"identifier": v} if isinstance(v, str) else v for v in value]
    return value


class Compensation(Wire):
    """What undoes a mutation if its transaction has to be rolled back."""

    operation: str = Field(min_length=1, max_length=20)
    data: dict[str, Any] = _empty(dict)
    conditions: dict[str, Any] | None = None


class Mutation(Wire):
    """One step of a transaction (reference 6.3)."""

    operation: str = Field(min_length=1, max_length=20)
    target: Identifier
    data: dict[str, Any] = _empty(dict)
    conditions: dict[str, Any] | None = None
    partition_key: str | None = Field(default=None, max_length=200)
    compensation: Compensation | None = None


class WriteRequest(Wire):
    """A client's write request (reference WriteToLogDto)."""

    namespace: NamespaceName
    payload: dict[str, Any]
    target: Annotated[TargetRef | list[TargetRef] | None, BeforeValidator(_target_shorthand)] = None
    lifecycle: Lifecycle = Lifecycle()
    metadata: dict[str, str] = _empty(dict)
    priority: int = Field(default=5, ge=1, le=10)
    tags: list[Annotated[str, Field(max_length=100)]] = Field(
        default_factory=list, max_length=50, json_schema_extra={"default": []}
    )
    message_id: str | None = Field(default=None, pattern=_ID_PATTERN)

    @property
    def targets(self) -> list[TargetRef]:
        """The named targets as a list (empty: every enabled target of the namespace)."""
        if self.target is None:
            return []
        return self.target if isinstance(self.target, list) else [self.target]

    @property
    def mutations(self) -> list[Mutation] | None:
        """The transaction's mutations, when ``payload.transactions`` makes this one."""
        raw = self.payload.get("transactions")
        if isinstance(raw, list) and len(raw) >= 2:
            return [Mutation.model_validate(item) for item in raw]
        return None


# -- namespace config -------------------------------------------------------------------


class NamespaceRetryPolicy(Wire):
    """A namespace's default retry policy (reference 6.1 retryPolicy)."""

    max_attempts: int = Field(default=5, ge=1, le=20)
    backoff_strategy: BackoffStrategy = BackoffStrategy.EXPONENTIAL
    initial_delay_ms: int = Field(default=1_000, ge=100, le=60_000)
    max_delay_ms: int = Field(default=60_000, ge=1_000, le=3_600_000)
    jitter_ms: int = Field(default=250, ge=0, le=5_000)
    custom_delays_ms: list[Annotated[int, Field(ge=0, le=3_600_000)]] = Field(
        default=[], max_length=20
    )
    retryable_error_codes: list[str] = ["TARGET_UNAVAILABLE", "TARGET_THROTTLED", "TARGET_ERROR"]


class DlqConfig(Wire):
    enabled: bool = True
    topic_name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._-]{1,249}$")
    alert_on_dlq: bool = Field(default=False, alias="alertOnDLQ")


class ShardStrategy(StrEnum):
    HASH = "hash"
    ROUND_ROBIN = "round_robin"
    RANDOM = "random"
    CUSTOM = "custom"


class ShardConfig(Wire):
    """How a namespace's requests are spread over partitions.

    ``hash`` hashes ``keyPath`` (a dotted path into the request, e.g.
    ``payload.userId``), or the whole payload when none is set; ``custom``
    uses the value at ``keyPath`` as the routing key itself; ``round_robin``
    and ``random`` spread over ``partitionCount`` keys.
    """

    strategy: ShardStrategy = ShardStrategy.HASH
    key_path: str | None = Field(default=None, max_length=200)
    partition_count: int = Field(default=64, ge=1, le=4096)

    @model_validator(mode="after")
    def _custom_needs_path(self) -> ShardConfig:
        if self.strategy is ShardStrategy.CUSTOM and not self.key_path:
            raise ValueError("strategy 'custom' needs keyPath")
        return self


_TARGET_KINDS = {
    "sql": "sql",
    "database": "sql",
    "postgresql": "sql",
    "sqlite": "sql",
    "redis": "redis",
    "cache": "redis",
    "http": "http",
    "http_service": "http",
    "webhook": "http",
}


def _target_kind(value: Any) -> Any:
    if isinstance(value, str) and value.lower() in _TARGET_KINDS:
        return _TARGET_KINDS[value.lower()]
    return value


class CircuitConfig(Wire):
    """When a target's circuit opens, and how long it stays open before a probe."""

    threshold: int = Field(default=5, ge=1, le=1000)
    cooldown_ms: int = Field(default=30_000, ge=100, le=3_600_000)
    max_cooldown_ms: int = Field(default=300_000, ge=100, le=3_600_000)

    @model_validator(mode="after")
    def _ordered(self) -> CircuitConfig:
        if self.max_cooldown_ms < self.cooldown_ms:
            raise ValueError("maxCooldownMs must be at least cooldownMs")
        return self


class TargetLimits(Wire):
    """How fast the whole fleet may write to a target; each worker takes the share that
    matches its share of ``wal-deliver``'s partitions (``agents/deliver/pace.py``)."""

    max_per_second: float | None = Field(default=None, gt=0, le=1_000_000)
    max_in_flight: int | None = Field(default=None, ge=1, le=100_000)


class Pause(Wire):
    """A pause of a namespace's deliveries, or of one target's (``wal namespaces pause``):
    writes are accepted and wait in Kafka until it is lifted (``agents/deliver``)."""

    reason: str = Field(default="", max_length=500)
    #: When it began (epoch ms), and who began it (an admin key's fingerprint).
    since_ms: int = Field(ge=0)
    by: str = Field(default="", max_length=100)


class TargetDef(Wire):
    """A named target of a namespace: its kind and its configuration.

    ``config`` is the kind's own (see ``targets/``); connection strings may be
    ``${ENV_VAR}`` references, resolved on the worker and never logged.
    """

    identifier: Identifier
    type: Annotated[Literal["sql", "redis", "http"], BeforeValidator(_target_kind)]
    config: dict[str, Any] = {}
    circuit: CircuitConfig = CircuitConfig()
    limits: TargetLimits = TargetLimits()
    region: str | None = None
    weight: int = Field(default=100, ge=0, le=100)
    enabled: bool = True
    tags: list[str] = []
    paused: Pause | None = None


def _hashed_key(value: str) -> str:
    if not _KEY_HASH.match(value):
        raise ValueError(
            "allowedApiKeys holds hashes, 'sha256:<64 hex>' (see `wal namespaces hash-key`)"
        )
    return value


class RateLimits(Wire):
    requests_per_minute: int | None = Field(default=None, ge=1)
    requests_per_hour: int | None = Field(default=None, ge=1)
    burst_limit: int | None = Field(default=None, ge=1)


class AccessControl(Wire):
    allowed_api_keys: list[Annotated[str, AfterValidator(_hashed_key)]] = []
    rate_limits: RateLimits = RateLimits()
    ip_allowlist: list[str] = Field(default=[], alias="ipAllowlist")

    @model_validator(mode="before")
    @classmethod
    def _whitelist_alias(cls, data: Any) -> Any:
        if isinstance(data, dict) and "ipWhitelist" in data and "ipAllowlist" not in data:
            data = {**data, "ipAllowlist": data["ipWhitelist"]}
            del data["ipWhitelist"]
        return data


class Namespace(Wire):
    """A namespace's configuration (reference 6.1, as adapted in ARCHITECTURE.md §5)."""

    name: NamespaceName
    enabled: bool = True
    description: str = Field(default="", max_length=1000)
    retry_policy: NamespaceRetryPolicy = NamespaceRetryPolicy()
    dlq_config: DlqConfig = DlqConfig()
    shard_config: ShardConfig = ShardConfig()
    targets: list[TargetDef] = Field(default=[], max_length=32)
    access_control: AccessControl = AccessControl()
    max_message_size: int = Field(default=DEFAULT_MAX_MESSAGE_SIZE, ge=256, le=MAX_REQUEST_BYTES)
    message_ttl_seconds: int = Field(default=DEFAULT_TTL_SECONDS, ge=60, le=604_800)
    ordering: Literal["none", "key"] = "none"
    transaction_timeout_seconds: int = Field(default=300, ge=1, le=86_400)
    #: What ``GET /wal/messages/{id}`` can tell about this namespace's messages:
    #: every step (``all``), only messages that met a failure, from it on
    #: (``failures``), or nothing (``none``). Less tracking, less work a message.
    status_tracking: Literal["all", "failures", "none"] = "all"
    #: Deliveries of every target paused (``wal namespaces pause``); see :class:`Pause`.
    paused: Pause | None = None

    @field_validator("targets")
    @classmethod
    def _unique_targets(cls, targets: list[TargetDef]) -> list[TargetDef]:
        names = [t.identifier for t in targets]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate target identifiers: {', '.join(duplicates)}")
        return targets

    def target(self, identifier: str) -> TargetDef | None:
        return next((t for t in self.targets if t.identifier == identifier), None)


#: The published JSON Schema files (``app/schemas/``), by file name.
SCHEMA_FILES: dict[str, type[Wire]] = {
    "write-request.schema.json": WriteRequest,
    "namespace.schema.json": Namespace,
}


def json_schema(model: type[Wire]) -> dict[str, Any]:
    """The JSON Schema of a wire model, as published (by alias, draft 2020-12)."""
    schema = model.model_json_schema(by_alias=True, mode="validation")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}
