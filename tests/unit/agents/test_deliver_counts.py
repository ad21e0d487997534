"""What deliver's stats deltas count each outcome against (see ``agents.deliver._origin``)."""

from __future__ import annotations

from agents import deliver
from app import names
from app.models import Namespace
from tables.stats import parse

ORDERS = Namespace.model_validate({"name": "orders"})


def item(source: str, **headers: str) -> deliver.Item:
    return deliver.Item(raw=b"{}", headers=headers, key=b"k", source=source, namespace=ORDERS)


def test_a_first_pass_counts_by_its_ingest_record_through_its_deliver_partition() -> None:
    first = item("w-deliver/2/900", **{names.SOURCE: "w-ingest/1/17"})
    assert deliver._origin(first) == "w-ingest/1:2/17"
    again = item("w-deliver/2/950", **{names.SOURCE: "w-ingest/1/17"})  # ingest re-read it
    assert deliver._origin(again) == deliver._origin(first)


def test_retries_parks_and_mutations_count_by_their_own_deliver_record() -> None:
    retry = item("w-deliver/2/990", **{names.SOURCE: "w-ingest/1/17", names.TARGET: "pg"})
    assert deliver._origin(retry) == "w-deliver/2/990"
    mutation = item("w-deliver/0/5", **{names.SOURCE: "transaction/txn_ab"})
    assert deliver._origin(mutation) == "w-deliver/0/5"
    assert deliver._origin(item("w-deliver/0/6")) == "w-deliver/0/6"


def test_the_deltas_name_what_they_count_per_target() -> None:
    deliver._tally.clear()
    first = item("w-deliver/2/900", **{names.SOURCE: "w-ingest/1/17"})
    deliver._count(first, "pg", "dead_lettered")
    deliver._count(first, "cache", "retried")
    records = deliver._stats_deltas()
    assert deliver._tally == {}
    by_target = {parse(r.value).target: parse(r.value) for r in records}
    assert by_target["pg"].sources == {"dead_lettered": {"w-ingest/1:2": [(17, 17)]}}
    assert by_target["cache"].sources == {"retried": {"w-deliver/2": [(900, 900)]}}
    assert by_target["pg"].counts == {"dead_lettered": 1}
