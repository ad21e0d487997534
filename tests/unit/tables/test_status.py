"""Message status: bundling by partition, folding, the bounded book. Pure logic."""

from __future__ import annotations

from typing import Any

import orjson
from aiokafka.partitioner import DefaultPartitioner

from tables.status import (
    FAILURE_STEPS,
    Collector,
    StatusBook,
    entries_of,
    fold,
    status_partition,
    tracked,
)


def entry(step: str, at: int, **fields: object) -> dict[str, object]:
    return {"id": "m1", "ns": "orders", "st": step, "at": at, **fields}


def test_an_id_lands_in_the_partition_kafkas_default_partitioner_gives_its_key() -> None:
    partitioner = DefaultPartitioner()
    for n in range(200):
        key = f"wal_{n:05d}"
        assert status_partition(key, 8) == partitioner(key.encode(), list(range(8)), list(range(8)))


def test_a_batch_goes_out_as_one_bundle_per_partition() -> None:
    collector = Collector()
    ids = [f"id-{n}" for n in range(50)]
    for message_id in ids:
        collector.note(message_id, "orders", "accepted")
    collector.note(None, "orders", "accepted")  # nothing to key it by: not noted
    records = collector.drain("wal-status", 4)
    assert len(records) <= 4 and len({r.partition for r in records}) == len(records)
    seen = []
    for record in records:
        entries = entries_of(orjson.loads(record.value or b""))
        assert {status_partition(e["id"], 4) for e in entries} == {record.partition}
        seen += [e["id"] for e in entries]
    assert sorted(seen) == sorted(ids)
    assert collector.drain("wal-status", 4) == []


def test_a_message_goes_from_accepted_through_retrying_to_completed() -> None:
    doc = fold(None, entry("accepted", 1))
    assert doc["status"] == "pending"
    doc = fold(doc, entry("retrying", 2, target="hook", attempt=1, code="TARGET_UNAVAILABLE"))
    doc = fold(doc, entry("delivered", 3, target="pg", attempt=1))
    assert doc["status"] == "retrying"
    doc = fold(doc, entry("delivered", 9, target="hook", attempt=2))
    assert doc["status"] == "completed"
    assert doc["targets"]["hook"]["attempts"] == 2
    assert doc["targets"]["hook"]["lastError"]["code"] == "TARGET_UNAVAILABLE"
    assert doc["acceptedAt"] == 1 and doc["updatedAt"] == 9


def test_folding_an_entry_again_changes_nothing_and_a_replay_readmits() -> None:
    steps = [
        entry("delayed", 1, dueAt=50),
        entry("dead_lettered", 60, target="pg", attempt=3, code="RETRIES_EXHAUSTED"),
    ]
    doc = None
    for e in steps:
        doc = fold(doc, e)
    assert doc is not None and doc["status"] == "dlq" and doc["dueAt"] == 50
    again = fold(orjson.loads(orjson.dumps(doc)), steps[0])
    assert fold(again, steps[1]) == doc
    replayed = fold(fold(doc, entry("accepted", 70)), entry("delivered", 71, target="pg"))
    assert replayed["status"] == "completed"


def test_a_rejected_request_says_why() -> None:
    doc = fold(None, entry("rejected", 5, code="VALIDATION_ERROR", message="payload missing"))
    assert doc["status"] == "rejected"
    assert doc["error"] == {"code": "VALIDATION_ERROR", "message": "payload missing"}


def test_the_book_keeps_the_most_recently_changed_and_forgets_by_partition() -> None:
    book = StatusBook(capacity=3)
    for n in range(4):
        book.fold(n % 2, [{"id": f"m{n}", "ns": "o", "st": "accepted", "at": n}])
    assert book.get("m0") is None and len(book) == 3
    book.fold(1, [{"id": "m1", "ns": "o", "st": "delivered", "target": "pg", "at": 9}])
    book.fold(0, [{"id": "m4", "ns": "o", "st": "accepted", "at": 10}])
    assert book.get("m1") is not None and book.get("m2") is None
    assert "_admittedAt" not in (book.get("m1") or {})
    book.forget({1})
    assert book.get("m1") is None and book.get("m3") is None and book.get("m4") is not None


def test_the_book_answers_as_folding_every_entry_would_however_many_it_holds() -> None:
    steps = [entry("accepted", 1)]
    steps += [
        entry("retrying", 1 + n, target="hook", attempt=n, code="TARGET_UNAVAILABLE", next=9 + n)
        for n in range(1, 12)  # more than the entries an id keeps unfolded
    ]
    steps += [entry("delivered", 30, target="pg", attempt=1), entry("delivered", 31, target="hook")]
    book = StatusBook(capacity=10)
    expected = None
    for n, step in enumerate(steps, 1):
        book.fold(0, [step])
        expected = fold(expected, step)
        answer = {k: v for k, v in expected.items() if k != "_admittedAt"}
        assert book.get("m1") == answer, f"after {n} entries"
    assert (book.get("m1") or {})["status"] == "completed"


def test_a_bundle_groups_the_entries_that_share_namespace_step_time_and_fields() -> None:
    collector = Collector()
    for n in range(40):
        collector.note(f"id-{n}", "orders", "delivered", target="pg", attempt=1, code=None)
    collector.note("id-x", "orders", "retrying", target="hook", attempt=2, code="TIMEOUT")
    records = collector.drain("wal-status", 1)
    bundle = orjson.loads(records[0].value or b"")
    heads = sorted((g[1], g[3]["target"]) for g in bundle["g"])
    assert ("retrying", "hook") in heads and len(heads) <= 4  # at most one per millisecond
    assert sum(len(g[4]) for g in bundle["g"]) == 41
    assert len(records[0].value or b"") < 41 * 60  # about an id a message, not an object
    entries = {e["id"]: e for e in entries_of(bundle)}
    assert entries["id-x"]["code"] == "TIMEOUT" and entries["id-x"]["attempt"] == 2
    assert "code" not in entries["id-0"]  # a field that was None is left out


def test_a_grouped_bundle_folds_as_its_entries_do() -> None:
    collector = Collector()
    collector.note("m1", "orders", "accepted", transactionId="t1")
    collector.note("m2", "orders", "accepted")
    collector.note("m1", "orders", "retrying", target="hook", attempt=1, next=99)
    grouped = orjson.loads(collector.drain("wal-status", 1)[0].value or b"")
    by_groups, by_entries = StatusBook(capacity=10), StatusBook(capacity=10)
    by_groups.fold_groups(0, grouped["g"])
    by_entries.fold(0, entries_of(grouped))
    for message_id in ("m1", "m2"):
        assert by_groups.get(message_id) == by_entries.get(message_id) is not None
    assert (by_groups.get("m1") or {})["transactionId"] == "t1"


def test_tracking_levels() -> None:
    steps = ["accepted", "delayed", "delivered", *sorted(FAILURE_STEPS)]
    assert all(tracked("all", step) for step in steps)
    assert not any(tracked("none", step, attempt) for step in steps for attempt in (1, 3))
    assert [s for s in steps if tracked("failures", s)] == sorted(FAILURE_STEPS)
    assert tracked("failures", "delivered", attempt=2)  # a write that failed before


def test_a_cancelled_message_says_so_unless_every_target_had_it_first() -> None:
    delayed = fold(None, entry("delayed", 1))
    doc = fold(dict(delayed), entry("cancel", 5, by="admin:abcd1234"))
    assert doc["status"] == "cancelled" and doc["cancelledBy"] == "admin:abcd1234"
    doc = fold(doc, entry("cancel", 4))  # the mark of another partition: the first counts
    doc = fold(doc, entry("cancelled", 9, target="pg", code="CANCELLED"))
    assert doc["status"] == "cancelled" and doc["cancelledAt"] == 4
    two = fold(fold(None, entry("accepted", 1)), entry("delivered", 3, target="hook"))
    two = fold(two, entry("cancel", 4))
    two = fold(two, entry("cancelled", 8, target="pg"))
    assert two["status"] == "partially cancelled"  # the hook had it before the cancel
    lost = fold(fold(None, entry("accepted", 1)), entry("cancel", 4))
    lost = fold(lost, entry("delivered", 3, target="pg"))  # delivered before the mark
    assert lost["status"] == "completed"


def test_noting_many_ids_at_once_is_noting_each() -> None:
    """``note_many`` (a batch's accepted or delivered ids) bundles the same entries as a
    ``note`` per id: the same groups, the same ids in the same order; empty ids skipped."""
    ids = [f"id-{n}" for n in range(300)]
    one_by_one, at_once = Collector(), Collector()
    for message_id in ids:
        one_by_one.note(message_id, "orders", "delivered", target="pg", attempt=2)
    at_once.note_many([*ids[:150], "", *ids[150:]], "orders", "delivered", target="pg", attempt=2)
    at_once.note_many([], "orders", "accepted")  # nothing: no empty group either

    def entries(collector: Collector) -> list[list[dict[str, Any]]]:
        bundles = collector.drain("wal-status", 4)
        return [
            sorted(entries_of(orjson.loads(r.value or b"")), key=lambda e: e["id"]) for r in bundles
        ]

    first, second = entries(one_by_one), entries(at_once)
    for bundle in (*first, *second):
        for e in bundle:
            e.pop("at")  # the millisecond of each call
    assert first == second and sum(len(b) for b in second) == 300
