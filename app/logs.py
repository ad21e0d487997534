"""Worker logs: one JSON object per line (``WAL_LOG_FORMAT=json``, the default) or text.

Each line has ``time`` (UTC, ISO 8601, ms), ``level``, ``logger`` and ``message``,
plus the fields of :data:`CONTEXT` when a log call passes them::

    log.info("delivered batch", extra={"namespace": ns, "count": n})
    log.warning("produce failed", extra={"request_id": rid, "message_id": mid})

Only those named fields are copied from ``extra``, so nothing else a record
carries (arguments of Faust's own records, objects) reaches the line by
accident. Faust and mode log through the standard library, so their lines come
out as JSON too; the worker's banner and spinner are switched off in JSON mode.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import orjson

#: ``extra=`` fields copied into a JSON line, in this order.
CONTEXT = (
    "message_id",
    "namespace",
    "request_id",
    "target",
    "agent",
    "count",
    "topic",
    "partition",
    "actor",
    "action",
    "outcome",
    "details",
)


class JsonFormatter(logging.Formatter):
    """A log record as one compact JSON object (no newline inside)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in CONTEXT:
            value = record.__dict__.get(name)
            if value is not None:
                line[name] = value if isinstance(value, (int, float, bool, dict)) else str(value)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        return orjson.dumps(line, default=str).decode()


class Repeats(logging.Filter):
    """A client library's repeated warnings and errors, one line per ``every_s``.

    During a 17 s broker outage each worker wrote ~1 850 aiokafka error lines, one per
    connection attempt (issue 16). A warning or error of a logger under ``prefixes``
    passes once per ``every_s`` for each message (its template); the next one to pass
    says how many were held back meanwhile.
    """

    def __init__(self, prefixes: tuple[str, ...] = ("aiokafka",), every_s: float = 60.0):
        super().__init__()
        self.prefixes = prefixes
        self.every_s = every_s
        self._seen: dict[tuple[str, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or not record.name.startswith(self.prefixes):
            return True
        key = (record.name, str(record.msg))
        passed, held = self._seen.get(key, (float("-inf"), 0))
        if record.created - passed < self.every_s:
            self._seen[key] = (passed, held + 1)
            return False
        if held:
            record.msg = f"{record.msg} (and {held} more like it in the last {self.every_s:.0f} s)"
        self._seen[key] = (record.created, 0)
        return True


def logging_config(log_format: str, level: str) -> dict[str, Any] | None:
    """A ``logging.config.dictConfig`` for the worker, or None for mode's own (text) setup."""
    if log_format != "json":
        return None
    level_name = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": f"{__name__}.JsonFormatter"}},
        "filters": {"repeats": {"()": f"{__name__}.Repeats"}},
        "handlers": {
            "default": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stdout",
                "formatter": "json",
                "filters": ["repeats"],
                "level": level_name,
            }
        },
        "root": {"level": level_name, "handlers": ["default"]},
    }
