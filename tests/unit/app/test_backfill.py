"""Backfill, pure logic: which ``wal-deliver`` records are a namespace's writes, which are
re-emitted, which skipped and why, and what a re-emitted record carries."""

from __future__ import annotations

from dataclasses import dataclass

import orjson
import pytest
from click.testing import CliRunner

from app.backfill import EMIT, Plan, Seen, Tally, again, choose
from app.ops.backfill import summary
from app.ops.cli import main

T0 = 1_700_000_000_000


def first_pass(message_id: str = "m-1", **more: str) -> dict[str, str]:
    """Headers of a write's first pass on wal-deliver, as ingest writes them."""
    return {
        "wal-message-id": message_id,
        "wal-namespace": "orders",
        "wal-received-at": str(T0),
        "wal-source": "t-ingest/3/41",
        "wal-attempt": "1",
        **more,
    }


VALUE = orjson.dumps({"namespace": "orders", "payload": {"key": "k1", "value": 1}})
PLAN = Plan("orders", "cache")


def verdict(headers: dict[str, str], value: bytes = VALUE, plan: Plan = PLAN) -> str | None:
    return choose(headers, value, T0 + 5, plan, Seen())


def test_a_first_pass_of_the_namespace_is_re_emitted() -> None:
    assert verdict(first_pass()) == EMIT


def test_other_namespaces_and_later_passes_are_not_the_backfill_s() -> None:
    assert verdict(first_pass(**{"wal-namespace": "billing"})) is None
    assert verdict({k: v for k, v in first_pass().items() if k != "wal-namespace"}) is None
    # a retry or a parked write is for the target that failed: its first pass is in the log
    assert verdict(first_pass(**{"wal-target": "pg", "wal-attempt": "3"})) is None


@pytest.mark.parametrize(
    ("since", "until", "chosen"),
    [
        (T0, None, True),
        (T0 + 1, None, False),
        (None, T0 + 1, True),
        (None, T0, False),  # until is exclusive
        (T0 - 10, T0 + 10, True),
    ],
)
def test_the_time_range_is_when_the_write_was_admitted(
    since: int | None, until: int | None, chosen: bool
) -> None:
    plan = Plan("orders", "cache", since_ms=since, until_ms=until)
    assert (verdict(first_pass(), plan=plan) == EMIT) is chosen


def test_without_wal_received_at_the_record_time_counts() -> None:
    headers = {k: v for k, v in first_pass().items() if k != "wal-received-at"}
    assert verdict(headers, plan=Plan("orders", "cache", since_ms=T0 + 5)) == EMIT
    assert verdict(headers, plan=Plan("orders", "cache", since_ms=T0 + 6)) is None


def test_skipped_writes_say_why() -> None:
    assert verdict(first_pass(**{"wal-transaction-id": "txn_1"})) == "transaction"
    assert verdict({k: v for k, v in first_pass().items() if k != "wal-message-id"}) == (
        "no-message-id"
    )
    named = orjson.dumps({"namespace": "orders", "payload": {}, "target": ["pg", "audit"]})
    assert verdict(first_pass(), named) == "other-targets"
    for asks in ("cache", {"identifier": "cache"}, ["pg", "cache"]):
        value = orjson.dumps({"namespace": "orders", "payload": {}, "target": asks})
        assert verdict(first_pass(), value) == EMIT, asks


def test_a_message_id_is_re_emitted_once_per_run() -> None:
    seen = Seen()
    assert choose(first_pass("m-1"), VALUE, T0, PLAN, seen) == EMIT
    assert choose(first_pass("m-2"), VALUE, T0, PLAN, seen) == EMIT
    assert choose(first_pass("m-1"), VALUE, T0, PLAN, seen) == "duplicate"


def test_seen_forgets_the_oldest_past_its_capacity() -> None:
    seen = Seen(capacity=2)
    assert seen.first("a") and seen.first("b") and seen.first("c")
    assert not seen.first("c") and not seen.first("b")
    assert seen.first("a")  # forgotten: offered again


@dataclass
class Source:
    topic: str = "t-deliver"
    partition: int = 5
    offset: int = 1234
    key: bytes | None = b"orders:k1"
    value: bytes | None = VALUE


def test_a_re_emitted_write_goes_to_the_same_partition_for_one_target_with_its_id() -> None:
    headers = first_pass(
        **{
            "traceparent": "00-abc-def-01",
            "wal-order-seq": "7",
            "wal-due-at": str(T0 + 10),
            "wal-replayed-from": "t-dlq/0/1",
            "wal-original-key": "k1",
        }
    )
    out = again(Source(), headers, "cache", T0 + 99_000)
    assert (out.topic, out.partition, out.key, out.value) == (
        "t-deliver",
        5,
        b"orders:k1",
        VALUE,
    )
    assert dict(out.headers) == {
        "wal-message-id": "m-1",
        "wal-namespace": "orders",
        "wal-source": "t-ingest/3/41",
        "wal-original-key": "k1",
        "traceparent": "00-abc-def-01",
        "wal-target": "cache",
        "wal-attempt": "1",
        "wal-received-at": str(T0 + 99_000),
        "wal-replayed-from": "t-deliver/5/1234",
    }


def test_the_tally_and_the_summary_line() -> None:
    tally = Tally(total=100, read=100, matched=12, re_emitted=9)
    tally.skipped.update({"duplicate": 2, "transaction": 1})
    done = {"event": "done", **tally.as_json(), "dryRun": False}
    assert done["skipped"] == 3
    assert summary("orders", "cache", done) == (
        "backfill orders -> cache: read 100, matched 12, re-emitted 9, skipped 3 "
        "(2 duplicate, 1 transaction)"
    )
    dry = {**Tally(total=5, read=5, matched=5, re_emitted=5).as_json(), "dryRun": True}
    assert summary("orders", "cache", dry) == (
        "backfill orders -> cache: read 5, matched 5, would re-emit 5, skipped 0 "
        "(dry run: nothing emitted)"
    )


def test_the_command_needs_an_admin_key_before_it_asks_anyone() -> None:
    result = CliRunner().invoke(
        main,
        ["backfill", "--namespace", "orders", "--target", "cache", "--url", "http://127.0.0.1:9"],
        env={"WAL_ADMIN_API_KEY": ""},
    )
    assert result.exit_code == 1
    assert "needs an admin key: set WAL_ADMIN_API_KEY" in result.output


@pytest.mark.parametrize(
    "args",
    [["namespaces", "delete", "orders"], ["dlq", "replay", "--namespace", "orders"]],
)
@pytest.mark.parametrize(
    ("given", "configured"),
    [("", "sha256:" + "0" * 64), ("not-the-admin", "the-admin"), ("the-admin", "")],
)
def test_commands_that_change_the_fleet_need_an_admin_key_before_touching_kafka(
    args: list[str], given: str, configured: str
) -> None:
    env = {
        "WAL_ADMIN_API_KEY": given,
        "WAL_ADMIN_API_KEYS": configured,
        "WAL_BROKER": "kafka://127.0.0.1:9",  # nothing listens: reaching Kafka would hang
    }
    result = CliRunner().invoke(main, args, env=env)
    assert result.exit_code == 1, result.output
    assert "needs an admin key" in result.output
    assert "the-admin" not in result.output.replace("not-the-admin", "")
