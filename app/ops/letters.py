"""Dead letters as the DLQ tools see them: a letter's fields, the filters that choose
letters, times given as ``2h``/``2026-11-20T10:00``, and how a letter is printed."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from app import names
from app.names import LAST_FAILED_AT, decode_headers

RawHeaders = list[tuple[str, bytes]]


_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}


_RELATIVE = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")


def parse_when(text: str, now_ms: int) -> int:
    """``15m``, ``2h``, ``3d`` (ago) or an ISO-8601 time, as epoch ms.

    An ISO time without a zone is UTC, as every time these commands print is.
    """
    relative = _RELATIVE.match(text)
    if relative:
        return now_ms - int(relative[1]) * _UNITS_S[relative[2]] * 1000
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"{text!r} is neither a relative time (15m, 2h, 3d) nor ISO-8601"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp() * 1000)


def format_ms(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


@dataclass(frozen=True, slots=True)
class Letter:
    """One dead letter: where it is, its bytes, and its reason headers."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    raw_headers: RawHeaders
    headers: dict[str, str]

    @classmethod
    def of(cls, record: Any) -> Letter:
        """From an aiokafka ``ConsumerRecord`` (or anything with its attributes)."""

        raw = [(k, bytes(v)) for k, v in record.headers or ()]
        return cls(
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            timestamp_ms=int(record.timestamp or 0),
            key=record.key,
            value=record.value,
            raw_headers=raw,
            headers=decode_headers(raw),
        )

    @property
    def coordinates(self) -> str:
        return f"{self.partition}/{self.offset}"

    @property
    def time_ms(self) -> int:
        """When it last failed (``wal-last-failed-at``), else the record's timestamp."""

        last = self.headers.get(LAST_FAILED_AT, "")
        return int(last) if last.isdigit() else self.timestamp_ms

    def get(self, header: str) -> str:
        return self.headers.get(header) or ""

    def summary(self) -> dict[str, Any]:
        """What ``list`` prints of a dead letter."""

        return {
            "topic": self.topic,
            "partition": self.partition,
            "offset": self.offset,
            "time": format_ms(self.time_ms),
            "code": self.get(names.ERROR_CODE),
            "namespace": self.get(names.NAMESPACE),
            "target": self.get(names.TARGET),
            "message_id": self.get(names.MESSAGE_ID),
            "error": self.get(names.ERROR_MESSAGE),
            "key": None if self.key is None else self.key.decode("utf-8", "replace"),
            "headers": self.headers,
        }

    def line(self) -> str:
        s = self.summary()
        error = " ".join(s["error"].split())[:60]
        return (
            f"{self.coordinates:<10}  {s['time']}  {s['code'] or '-':<19}  "
            f"{s['namespace'] or '-':<16}  {s['target'] or '-':<12}  "
            f"{s['message_id'] or '-':<28}  {error}"
        ).rstrip()


@dataclass(frozen=True, slots=True)
class Filter:
    """Which dead letters a command acts on; an unset field matches everything."""

    namespace: str | None = None
    codes: frozenset[str] = frozenset()
    target: str | None = None
    since_ms: int | None = None
    until_ms: int | None = None
    message_id: str | None = None

    @property
    def empty(self) -> bool:
        return self == Filter()

    def described(self) -> dict[str, str]:
        """The fields that are set, as text (an audit line's details)."""
        out = {
            "namespace": self.namespace,
            "codes": ",".join(sorted(self.codes)) or None,
            "target": self.target,
            "since_ms": self.since_ms,
            "until_ms": self.until_ms,
            "message_id": self.message_id,
        }
        return {k: str(v) for k, v in out.items() if v is not None}

    def matches(self, letter: Letter) -> bool:
        """Namespace, target and message id exactly; any of ``codes``; since <= time < until."""

        checks = (
            (self.namespace, letter.get(names.NAMESPACE)),
            (self.target, letter.get(names.TARGET)),
            (self.message_id, letter.get(names.MESSAGE_ID)),
        )
        if any(wanted is not None and wanted != got for wanted, got in checks):
            return False
        if self.codes and letter.get(names.ERROR_CODE) not in self.codes:
            return False
        t = letter.time_ms
        return (self.since_ms is None or t >= self.since_ms) and (
            self.until_ms is None or t < self.until_ms
        )


@dataclass(frozen=True, slots=True)
class Scope:
    """A filter on one DLQ topic, with an optional cap on how many letters to take."""

    topic: str
    filter: Filter = field(default_factory=Filter)
    limit: int | None = None


def render(letter: Letter) -> str:
    """Every header and the value: pretty JSON when it parses, else the bytes' repr."""
    lines = [
        f"{letter.topic}/{letter.coordinates}",
        f"timestamp: {format_ms(letter.timestamp_ms)}",
        f"key: {_text(letter.key)}",
        "headers:",
        *(f"  {k}: {v.decode('utf-8', 'replace')}" for k, v in letter.raw_headers),
        "value:",
        _value(letter.value),
    ]
    return "\n".join(lines)


def _text(raw: bytes | None) -> str:
    if raw is None:
        return "(none)"
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return repr(raw)


def _value(raw: bytes | None) -> str:
    if raw is None:
        return "(none)"
    try:
        return orjson.dumps(orjson.loads(raw), option=orjson.OPT_INDENT_2).decode()
    except orjson.JSONDecodeError:
        return repr(raw)
