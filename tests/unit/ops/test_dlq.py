"""Dead-letter redrive, pure logic: filters, times, replay headers, the rate limiter."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import pytest
from click.testing import CliRunner

from app.ops.cli import main
from app.ops.dlq import replay_headers
from app.ops.letters import Filter, Letter, format_ms, parse_when, render

NOW = 1_800_000_000_000
MINUTE = 60_000


@dataclass
class FakeRecord:
    """What aiokafka's ConsumerRecord offers, and no more."""

    headers: list[tuple[str, bytes]]
    timestamp: int = NOW
    topic: str = "wal-dlq"
    partition: int = 2
    offset: int = 7
    key: bytes | None = b"k"
    value: bytes | None = b'{"namespace": "orders"}'


def letter(
    *,
    namespace: str | None = "orders",
    code: str | None = "TARGET_REJECTED",
    target: str | None = "pg",
    failed_at: int | None = NOW,
    message_id: str | None = "m-1",
    timestamp: int = NOW,
) -> Letter:
    values = {
        "wal-namespace": namespace,
        "wal-error-code": code,
        "wal-target": target,
        "wal-last-failed-at": None if failed_at is None else str(failed_at),
        "wal-message-id": message_id,
    }
    headers = [(k, v.encode()) for k, v in values.items() if v is not None]
    return Letter.of(FakeRecord(headers=headers, timestamp=timestamp))


# -- filters -----------------------------------------------------------------------------


def test_an_empty_filter_matches_everything_even_a_letter_without_headers() -> None:
    bare = Letter.of(FakeRecord(headers=[]))
    assert Filter().empty
    assert Filter().matches(bare)
    assert Filter().matches(letter())


@pytest.mark.parametrize(
    ("flt", "expected"),
    [
        (Filter(namespace="orders"), True),
        (Filter(namespace="users"), False),
        (Filter(codes=frozenset({"TARGET_REJECTED"})), True),
        (Filter(codes=frozenset({"VALIDATION_ERROR", "TARGET_REJECTED"})), True),
        (Filter(codes=frozenset({"VALIDATION_ERROR"})), False),
        (Filter(target="pg"), True),
        (Filter(target="cache"), False),
        (Filter(message_id="m-1"), True),
        (Filter(message_id="m-2"), False),
        (Filter(namespace="orders", target="cache"), False),
        (Filter(since_ms=NOW), True),  # since is inclusive
        (Filter(since_ms=NOW + 1), False),
        (Filter(until_ms=NOW), False),  # until is exclusive
        (Filter(until_ms=NOW + 1), True),
        (Filter(since_ms=NOW - MINUTE, until_ms=NOW + MINUTE), True),
    ],
)
def test_each_filter_field(flt: Filter, expected: bool) -> None:
    assert not flt.empty
    assert flt.matches(letter()) is expected


def test_a_letter_without_the_header_a_filter_asks_for_does_not_match() -> None:
    rejected_at_ingest = letter(target=None, message_id=None)
    assert not Filter(target="pg").matches(rejected_at_ingest)
    assert not Filter(message_id="m-1").matches(rejected_at_ingest)
    assert Filter(namespace="orders").matches(rejected_at_ingest)


def test_time_is_last_failed_at_else_the_record_timestamp() -> None:
    old_failure = letter(failed_at=NOW - 60 * MINUTE, timestamp=NOW)
    no_header = letter(failed_at=None, timestamp=NOW - 60 * MINUTE)
    recent = Filter(since_ms=NOW - 30 * MINUTE)
    assert old_failure.time_ms == NOW - 60 * MINUTE
    assert not recent.matches(old_failure)
    assert no_header.time_ms == NOW - 60 * MINUTE
    assert not recent.matches(no_header)
    assert recent.matches(letter(failed_at=None, timestamp=NOW))


# -- times -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "ago_ms"),
    [("15m", 15 * MINUTE), ("2h", 120 * MINUTE), ("3d", 3 * 1440 * MINUTE), ("30s", 30_000)],
)
def test_relative_times_are_that_long_before_now(text: str, ago_ms: int) -> None:
    assert parse_when(text, NOW) == NOW - ago_ms


def test_iso_times_naive_ones_in_utc() -> None:
    expected = int(datetime(2027, 1, 2, 3, 4, 5, tzinfo=UTC).timestamp() * 1000)
    assert parse_when("2027-01-02T03:04:05Z", NOW) == expected
    assert parse_when("2027-01-02T03:04:05", NOW) == expected
    assert parse_when("2027-01-02T05:04:05+02:00", NOW) == expected
    assert parse_when(format_ms(expected), NOW) == expected  # what list prints reads back


@pytest.mark.parametrize("text", ["yesterday", "15", "m15", "-5m", "2027-13-01"])
def test_other_times_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="relative time"):
        parse_when(text, NOW)


# -- replay headers ----------------------------------------------------------------------


def test_replay_drops_failure_headers_keeps_the_rest_and_adds_provenance() -> None:
    original = [
        ("wal-message-id", b"m-1"),
        ("wal-namespace", b"orders"),
        ("wal-error-code", b"TARGET_REJECTED"),
        ("wal-error-message", b"duplicate key"),
        ("wal-attempt", b"3"),
        ("wal-first-failed-at", b"1"),
        ("wal-last-failed-at", b"2"),
        ("wal-target", b"pg"),
        ("wal-due-at", b"3"),
        ("wal-source", b"wal-ingest/0/5"),
        ("traceparent", b"00-abc-def-01"),
        ("wal-replayed-from", b"wal-dlq/0/1"),  # an earlier replay: replaced, not repeated
        ("x-custom", b"\xff\x00"),
    ]
    assert replay_headers(original, "wal-dlq/2/7") == [
        ("wal-message-id", b"m-1"),
        ("wal-namespace", b"orders"),
        ("wal-source", b"wal-ingest/0/5"),
        ("traceparent", b"00-abc-def-01"),
        ("x-custom", b"\xff\x00"),
        ("wal-replayed-from", b"wal-dlq/2/7"),
    ]


# -- printing ----------------------------------------------------------------------------


def test_list_line_has_every_column_and_60_chars_of_the_error() -> None:
    error = "duplicate key value violates\nunique constraint " + "x" * 100
    headers = [("wal-error-message", error.encode()), ("wal-message-id", b"m-9")]
    line = Letter.of(FakeRecord(headers=headers, timestamp=NOW)).line()
    assert line.startswith("2/7 ")
    assert format_ms(NOW) in line
    assert " m-9 " in line
    flattened = "duplicate key value violates unique constraint " + "x" * 100
    assert line.endswith("  " + flattened[:60])
    assert flattened[:61] not in line


def test_show_renders_json_pretty_and_other_bytes_as_repr() -> None:
    as_json = render(Letter.of(FakeRecord(headers=[("wal-error-code", b"INVALID_JSON")])))
    assert "  wal-error-code: INVALID_JSON" in as_json
    assert '{\n  "namespace": "orders"\n}' in as_json
    garbage = render(Letter.of(FakeRecord(headers=[], value=b"\xffnot json", key=b"\xfe")))
    assert "b'\\xffnot json'" in garbage
    assert "key: b'\\xfe'" in garbage


# -- command line (no Kafka: these fail before connecting) -------------------------------


def test_replay_help_says_it_is_at_least_once() -> None:
    out = CliRunner().invoke(main, ["dlq", "replay", "--help"]).output
    assert "twice" in " ".join(out.split())
    assert "--dry-run" in out and "--rate" in out and "--yes" in out


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["list", "--code", "NO_SUCH_CODE"], "unknown NO_SUCH_CODE"),
        (["list", "--since", "yesterday"], "neither a relative time"),
        (["show"], "give PARTITION/OFFSET or --message-id"),
        (["show", "3-17"], "is not [TOPIC/]PARTITION/OFFSET"),
        (["replay", "--rate", "0"], "--rate"),
    ],
)
def test_bad_arguments_are_refused(args: list[str], complaint: str) -> None:
    result = CliRunner().invoke(main, ["dlq", *args])
    assert result.exit_code == 2
    assert complaint in result.output


def test_unfiltered_replay_without_a_terminal_or_yes_is_refused() -> None:
    result = CliRunner().invoke(main, ["dlq", "replay"], input="")
    assert result.exit_code == 1
    assert "--yes" in result.output
