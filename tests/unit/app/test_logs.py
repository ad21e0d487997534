"""Worker log lines: one JSON object each, with context when the call passes it."""

from __future__ import annotations

import logging

import orjson

from app.logs import JsonFormatter, logging_config


def line(msg: str, *args: object, exc: bool = False, **extra: object) -> dict[str, object]:
    record = logging.LogRecord("wal.deliver", logging.WARNING, __file__, 1, msg, args, None)
    record.__dict__.update(extra)
    if exc:
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            import sys

            record.exc_info = sys.exc_info()
    text = JsonFormatter().format(record)
    assert "\n" not in text
    return dict(orjson.loads(text))


def test_a_line_has_time_level_logger_message_and_the_context_given() -> None:
    out = line(
        "batch of %d\nwith a newline",
        5,
        namespace="orders",
        message_id="m-1",
        request_id="r-9",
        password="hunter2",
        obj=object(),
    )
    assert out["level"] == "warning" and out["logger"] == "wal.deliver"
    assert out["message"] == "batch of 5\nwith a newline"
    assert str(out["time"]).endswith("Z")
    assert (out["namespace"], out["message_id"], out["request_id"]) == ("orders", "m-1", "r-9")
    assert "password" not in out and "obj" not in out  # only the named context fields


def test_exceptions_travel_inside_the_line() -> None:
    out = line("failed", exc=True)
    assert "RuntimeError: boom" in str(out["exception"])


def test_text_format_leaves_logging_to_the_worker() -> None:
    assert logging_config("text", "info") is None
    config = logging_config("json", "warning")
    assert config is not None
    assert config["root"]["level"] == "WARNING"
    assert config["formatters"]["json"]["()"] == "app.logs.JsonFormatter"


def test_a_client_library_s_repeated_errors_pass_once_a_minute_with_a_count() -> None:
    from app.logs import Repeats

    repeats = Repeats(every_s=60.0)

    def record(
        at: float, name: str = "aiokafka.conn", level: int = logging.ERROR
    ) -> logging.LogRecord:
        r = logging.LogRecord(name, level, __file__, 1, "No route to %s", ("b:9092",), None)
        r.created = at
        return r

    passed = [r for r in (record(float(t)) for t in range(0, 130)) if repeats.filter(r)]
    assert [r.created for r in passed] == [0.0, 60.0, 120.0]
    assert passed[1].getMessage() == "No route to b:9092 (and 59 more like it in the last 60 s)"
    assert repeats.filter(record(1.0, name="wal.consumer"))  # ours: every line
    assert repeats.filter(record(1.0, level=logging.INFO))  # below warning: every line
