"""What deliver's stats deltas count each outcome against (``outcomes.origin``)."""

from __future__ import annotations

from agents.deliver import items, outcomes
from app import names
from app.models import Namespace
from tables.stats import parse

ORDERS = Namespace.model_validate({"name": "orders"})


def item(source: str, **headers: str) -> items.Item:
    return items.Item(raw=b"{}", headers=headers, key=b"k", source=source, namespace=ORDERS)


def test_a_first_pass_counts_by_its_ingest_record_through_its_deliver_partition() -> None:
    first = item("w-deliver/2/900", **{names.SOURCE: "w-ingest/1/17"})
    assert outcomes.origin(first) == "w-ingest/1:2/17"
    again = item("w-deliver/2/950", **{names.SOURCE: "w-ingest/1/17"})  # ingest re-read it
    assert outcomes.origin(again) == outcomes.origin(first)


def test_retries_parks_and_mutations_count_by_their_own_deliver_record() -> None:
    retry = item("w-deliver/2/990", **{names.SOURCE: "w-ingest/1/17", names.TARGET: "pg"})
    assert outcomes.origin(retry) == "w-deliver/2/990"
    mutation = item("w-deliver/0/5", **{names.SOURCE: "transaction/txn_ab"})
    assert outcomes.origin(mutation) == "w-deliver/0/5"
    assert outcomes.origin(item("w-deliver/0/6")) == "w-deliver/0/6"


def test_the_deltas_name_what_they_count_per_target() -> None:
    outcomes._tally.clear()
    first = item("w-deliver/2/900", **{names.SOURCE: "w-ingest/1/17"})
    outcomes.count(first, "pg", "dead_lettered")
    outcomes.count(first, "cache", "retried")
    records = outcomes.stats_deltas()
    assert outcomes._tally == {}
    by_target = {parse(r.value).target: parse(r.value) for r in records}
    assert by_target["pg"].sources == {"dead_lettered": {"w-ingest/1:2": [(17, 17)]}}
    assert by_target["cache"].sources == {"retried": {"w-deliver/2": [(900, 900)]}}
    assert by_target["pg"].counts == {"dead_lettered": 1}
