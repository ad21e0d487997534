"""What deliver's stats deltas count each outcome against (``outcomes.origin``)."""

from __future__ import annotations

import orjson

from agents.deliver import items, outcomes
from app import names
from app.models import Namespace
from tables.stats import parse
from tables.status import entries_of

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
    outcomes.begin()
    first = item("w-deliver/2/900", **{names.SOURCE: "w-ingest/1/17"})
    outcomes.count(first, "pg", "dead_lettered")
    outcomes.count(first, "cache", "retried")
    records = outcomes.stats_deltas()
    assert outcomes.current().sources == {}
    by_target = {parse(r.value).target: parse(r.value) for r in records}
    assert by_target["pg"].sources == {"dead_lettered": {"w-ingest/1:2": [(17, 17)]}}
    assert by_target["cache"].sources == {"retried": {"w-deliver/2": [(900, 900)]}}
    assert by_target["pg"].counts == {"dead_lettered": 1}


async def test_concurrent_batches_each_send_out_only_their_own_counts() -> None:
    """Each batch has its tally (``outcomes.begin``): batches worked on at once - two
    slots of partitions, or a batch finishing late behind a slow call - never send out
    each other's counts or notes."""
    import asyncio

    first_counted, second_may_finish = asyncio.Event(), asyncio.Event()

    async def batch(offset: int, *, wait: bool) -> list[dict[str, list[tuple[int, int]]]]:
        outcomes.begin()
        outcomes.count(item(f"w-deliver/0/{offset}"), "pg", "retried")
        first_counted.set()
        if wait:
            await second_may_finish.wait()  # the other batch finishes meanwhile
        return [parse(r.value).sources["retried"] for r in outcomes.stats_deltas()]

    slow = asyncio.ensure_future(batch(1, wait=True))
    await first_counted.wait()
    fast = await asyncio.ensure_future(batch(2, wait=False))
    second_may_finish.set()
    assert fast == [{"w-deliver/0": [(2, 2)]}]
    assert await slow == [{"w-deliver/0": [(1, 1)]}]


async def test_delivered_writes_note_what_finishing_each_would() -> None:
    """``follow_ups_of`` notes a call's plain delivered writes once per attempt number:
    the same status entries :func:`outcomes.finish` notes for each, with the ids of
    statuses-off namespaces and the failures still going the way of each write."""
    import asyncio

    from agents.deliver.calls import Call
    from targets.base import Outcome

    quiet = Namespace.model_validate({"name": "quiet", "statusTracking": "none"})
    members = [
        item(f"w-deliver/0/{n}", **{names.MESSAGE_ID: f"m{n}", names.ATTEMPT: str(1 + n % 3)})
        for n in range(30)
    ]
    members[4].namespace = quiet
    answers = [Outcome("delivered") for _ in members]
    answers[7] = Outcome("permanent", "TARGET_REJECTED", "no")

    async def done() -> list[Outcome]:
        return answers

    task = asyncio.ensure_future(done())
    await task
    call = Call("orders", "pg", members, ordered=False, task=task, slow_at=0.0)

    def entries() -> list[tuple[object, ...]]:
        bundles = outcomes.current().status.drain("wal-status", 1)
        found = [e for r in bundles for e in entries_of(orjson.loads(r.value or b""))]
        return sorted((e["id"], e["st"], e.get("target"), e.get("attempt")) for e in found)

    outcomes.begin()
    follow_ups = outcomes.follow_ups_of(call, {})
    at_once = entries()
    outcomes.begin()
    for member, answer in zip(members, answers, strict=True):
        if answer.ok:
            outcomes.finish(member, "pg", outcomes.DELIVERED_DECISION)
    each = entries()
    assert [e for e in at_once if e[1] == "delivered"] == each
    assert len(each) == 28  # not the statuses-off one, not the failed one
    assert ("m7", "dead_lettered", "pg", 2) in at_once and len(follow_ups) == 1
