"""``wal dlq list|show|replay`` against the real Kafka, run as the real CLI.

Dead letters are produced with a plain aiokafka producer into a topic prefix
of the test's own; what the CLI replays is read back with a plain consumer.
No worker runs, so nothing consumes the ingest topic behind the test's back.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError

from app.engine.admin import ensure_topics
from app.names import topic_names
from app.settings import Settings
from tests.integration.harness import BOOTSTRAP, ROOT, WAL, Fleet, header, read_all

pytestmark = [pytest.mark.kafka]

MINUTE_MS = 60_000
FAILURE_HEADERS = (
    "wal-error-code",
    "wal-error-message",
    "wal-attempt",
    "wal-first-failed-at",
    "wal-last-failed-at",
    "wal-target",
    "wal-due-at",
)


@dataclass(frozen=True)
class Spec:
    """One synthetic dead letter. ``ago_min`` None: no wal-last-failed-at header."""

    name: str
    namespace: str | None
    code: str
    target: str | None
    ago_min: int | None
    message_id: str | None
    value: bytes | None = None
    keyless: bool = False

    def record_key(self) -> bytes | None:
        return None if self.keyless else self.name.encode()

    def record_value(self) -> bytes:
        # Odd spacing and key order: a replay must keep the bytes, not re-serialise them.
        default = b'{ "payload": {"n": "%s"},  "namespace": "%s" }' % (
            self.name.encode(),
            (self.namespace or "none").encode(),
        )
        return self.value if self.value is not None else default

    def headers(self, now_ms: int, index: int) -> list[tuple[str, bytes]]:
        values = {
            "wal-error-code": self.code,
            "wal-error-message": f"{self.code} on {self.name}: " + "details " * 12,
            "wal-namespace": self.namespace,
            "wal-target": self.target,
            "wal-attempt": "3" if self.target else "0",
            "wal-first-failed-at": None if self.ago_min is None else str(now_ms - 10**8),
            "wal-last-failed-at": (
                None if self.ago_min is None else str(now_ms - self.ago_min * MINUTE_MS)
            ),
            "wal-due-at": "1700000000000" if self.target else None,
            "wal-source": f"wal-deliver/1/{index}",
            "wal-message-id": self.message_id,
            "traceparent": f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01",
        }
        return [(k, v.encode()) for k, v in values.items() if v is not None]


SPECS = (
    Spec("a", "orders", "TARGET_REJECTED", "pg", 5, "m-a"),
    Spec("b", "orders", "TARGET_REJECTED", "cache", 90, "m-b"),
    Spec("c", "orders", "RETRIES_EXHAUSTED", "pg", 300, "m-c"),
    Spec("d", "users", "TARGET_REJECTED", "pg", 2, "m-d"),
    Spec("e", "users", "VALIDATION_ERROR", None, None, None),  # time: the record's timestamp
    Spec("f", None, "INVALID_JSON", None, 3 * 1440, None, value=b"\xffnot json", keyless=True),
    Spec("g", "orders", "TARGET_UNAVAILABLE", "http", 20, "m-g"),
    Spec("h", "users", "RETRIES_EXHAUSTED", "cache", 45, "m-h"),
)
ALL = {s.name for s in SPECS}


@dataclass
class Done:
    code: int
    out: str
    err: str


@dataclass
class DeadLetters:
    """A test's own topics with the SPECS dead letters on its DLQ topic."""

    fleet: Fleet
    coords: dict[str, str] = field(default_factory=dict)  # spec name -> "partition/offset"
    extra_topics: list[str] = field(default_factory=list)

    @property
    def dlq(self) -> str:
        return self.fleet.topic("dlq")

    @property
    def ingest(self) -> str:
        return self.fleet.topic("ingest")

    def names(self, coordinates: list[str]) -> set[str]:
        by_coords = {c: n for n, c in self.coords.items()}
        assert len(set(coordinates)) == len(coordinates), f"duplicates in {coordinates}"
        return {by_coords[c] for c in coordinates}

    async def produce(self, topic: str, specs: tuple[Spec, ...]) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=BOOTSTRAP, acks="all")
        await producer.start()
        try:
            now = int(time.time() * 1000)
            for i, spec in enumerate(specs):
                meta = await producer.send_and_wait(
                    topic, spec.record_value(), key=spec.record_key(), headers=spec.headers(now, i)
                )
                self.coords[spec.name] = f"{meta.partition}/{meta.offset}"
        finally:
            await producer.stop()

    async def topic(self, role: str, **configs: str) -> str:
        name = self.fleet.topic(role)
        admin = AIOKafkaAdminClient(bootstrap_servers=BOOTSTRAP)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(name, 2, 1, topic_configs=configs)])
        finally:
            await admin.close()
        self.extra_topics.append(name)
        return name

    async def wal(self, *args: str) -> Done:
        """Run ``wal dlq ARGS`` with this test's prefix; stdin is a pipe, never a terminal."""
        proc = await asyncio.create_subprocess_exec(
            WAL,
            "dlq",
            *args,
            env=self.fleet.env(),
            cwd=ROOT,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        async with asyncio.timeout(120):
            out, err = await proc.communicate(b"")
        assert proc.returncode is not None
        return Done(proc.returncode, out.decode(), err.decode())

    async def listed(self, *args: str) -> set[str]:
        done = await self.wal("list", "--json", *args)
        assert done.code == 0, done.err
        rows = [orjson.loads(line) for line in done.out.splitlines()]
        assert all(row["topic"] == self.dlq for row in rows)
        return self.names([f"{row['partition']}/{row['offset']}" for row in rows])


@pytest.fixture
async def letters(fleet: Fleet) -> AsyncIterator[DeadLetters]:
    settings = Settings(
        topic_prefix=fleet.prefix, partitions=fleet.partitions, broker=f"kafka://{BOOTSTRAP}"
    )
    await ensure_topics(settings)
    dl = DeadLetters(fleet)
    await dl.produce(dl.dlq, SPECS)
    yield dl
    admin = AIOKafkaAdminClient(bootstrap_servers=BOOTSTRAP)
    await admin.start()
    with contextlib.suppress(KafkaError):
        await admin.delete_topics([*topic_names(settings).values(), *dl.extra_topics])
    await admin.close()


async def end_offsets(topic: str) -> dict[int, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=BOOTSTRAP, enable_auto_commit=False)
    await consumer.start()
    try:
        await consumer._client.force_metadata_update()
        tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        assert tps, f"no topic {topic}"
        return {tp.partition: offset for tp, offset in (await consumer.end_offsets(tps)).items()}
    finally:
        await consumer.stop()


def iso_minutes_ago(minutes: int) -> str:
    return datetime.fromtimestamp(time.time() - minutes * 60, UTC).isoformat()


# -- list --------------------------------------------------------------------------------


async def test_list_filters_return_exactly_the_matching_dead_letters(letters: DeadLetters) -> None:
    cases: dict[tuple[str, ...], set[str]] = {
        (): ALL,
        ("--namespace", "orders"): {"a", "b", "c", "g"},
        ("--namespace", "USERS"): {"d", "e", "h"},
        ("--code", "TARGET_REJECTED"): {"a", "b", "d"},
        ("--code", "target_rejected", "--code", "RETRIES_EXHAUSTED"): {"a", "b", "c", "d", "h"},
        ("--target", "pg"): {"a", "c", "d"},
        ("--namespace", "orders", "--target", "pg"): {"a", "c"},
        ("--since", "30m"): {"a", "d", "e", "g"},  # e: no header, its record is new
        ("--until", "1h"): {"b", "c", "f"},
        ("--since", "2h", "--until", "30m"): {"b", "h"},
        ("--since", iso_minutes_ago(60)): {"a", "d", "e", "g", "h"},
        ("--until", iso_minutes_ago(60), "--code", "RETRIES_EXHAUSTED"): {"c"},
        ("--message-id", "m-c"): {"c"},
        ("--namespace", "nobody"): set(),
    }
    results = await asyncio.gather(*(letters.listed(*args) for args in cases))
    for (args, expected), got in zip(cases.items(), results, strict=True):
        assert got == expected, f"wal dlq list {' '.join(args)}"


async def test_list_limit_takes_the_first_in_partition_offset_order(letters: DeadLetters) -> None:
    def order(name: str) -> tuple[int, int]:
        partition, offset = letters.coords[name].split("/")
        return int(partition), int(offset)

    first_three = set(sorted(ALL, key=order)[:3])
    assert await letters.listed("--limit", "3") == first_three
    assert await letters.listed("--limit", "2", "--namespace", "orders") == set(
        sorted({"a", "b", "c", "g"}, key=order)[:2]
    )


async def test_list_prints_one_line_of_columns_per_letter(letters: DeadLetters) -> None:
    done = await letters.wal("list", "--namespace", "users")
    assert done.code == 0, done.err
    lines = done.out.splitlines()
    assert len(lines) == 3
    (line_d,) = [line for line in lines if line.startswith(letters.coords["d"] + " ")]
    assert line_d.split()[2:6] == ["TARGET_REJECTED", "users", "pg", "m-d"]
    assert line_d.endswith(("TARGET_REJECTED on d: " + "details " * 12)[:60].rstrip())
    (line_e,) = [line for line in lines if line.startswith(letters.coords["e"] + " ")]
    assert line_e.split()[2:6] == ["VALIDATION_ERROR", "users", "-", "-"]


async def test_list_reads_a_namespace_dlq_topic_given_with_topic(letters: DeadLetters) -> None:
    own = await letters.topic("orders-dlq")
    await letters.produce(own, (Spec("z", "orders", "TARGET_ERROR", "pg", 1, "m-z"),))
    done = await letters.wal("list", "--json", "--topic", own)
    assert done.code == 0, done.err
    (row,) = [orjson.loads(line) for line in done.out.splitlines()]
    assert (row["topic"], row["message_id"], row["code"]) == (own, "m-z", "TARGET_ERROR")
    assert f"{row['partition']}/{row['offset']}" == letters.coords["z"]
    assert "m-z" not in (await letters.wal("list")).out
    missing = await letters.wal("list", "--topic", letters.fleet.topic("no-such"))
    assert missing.code == 1
    assert "does not exist" in missing.err


# -- show --------------------------------------------------------------------------------


async def test_show_prints_every_header_and_the_value(letters: DeadLetters) -> None:
    spec = SPECS[0]
    done = await letters.wal("show", letters.coords["a"])
    assert done.code == 0, done.err
    assert done.out.startswith(f"{letters.dlq}/{letters.coords['a']}\n")
    assert "key: a\n" in done.out
    for name, value in spec.headers(0, 0):
        if name not in ("wal-first-failed-at", "wal-last-failed-at", "traceparent"):
            assert f"  {name}: {value.decode()}\n" in done.out
    for name in ("wal-first-failed-at", "wal-last-failed-at", "traceparent"):
        assert f"  {name}: " in done.out
    pretty = orjson.dumps(orjson.loads(spec.record_value()), option=orjson.OPT_INDENT_2)
    assert done.out.rstrip().endswith("value:\n" + pretty.decode())


async def test_show_finds_by_message_id_and_by_topic_coordinates(letters: DeadLetters) -> None:
    by_id, by_coords, not_json = await asyncio.gather(
        letters.wal("show", "--message-id", "m-h"),
        letters.wal("show", f"{letters.dlq}/{letters.coords['h']}"),
        letters.wal("show", letters.coords["f"]),
    )
    assert by_id.code == by_coords.code == not_json.code == 0, by_id.err + by_coords.err
    assert by_id.out.startswith(f"{letters.dlq}/{letters.coords['h']}\n")
    assert "  wal-message-id: m-h\n" in by_id.out
    assert by_id.out == by_coords.out
    assert "key: (none)\n" in not_json.out
    assert not_json.out.rstrip().endswith("value:\nb'\\xffnot json'")


async def test_show_fails_when_nothing_is_there(letters: DeadLetters) -> None:
    partition = letters.coords["a"].split("/")[0]
    nothing, wrong_filter = await asyncio.gather(
        letters.wal("show", f"{partition}/999999"),
        letters.wal("show", letters.coords["a"], "--namespace", "users"),
    )
    assert nothing.code == wrong_filter.code == 1
    assert "no matching dead letter" in nothing.err
    assert "no matching dead letter" in wrong_filter.err


# -- replay ------------------------------------------------------------------------------


async def test_replay_dry_run_prints_the_matches_and_produces_nothing(
    letters: DeadLetters,
) -> None:
    before = await end_offsets(letters.ingest)
    done = await letters.wal("replay", "--dry-run", "--namespace", "orders")
    assert done.code == 0, done.err
    assert letters.names([line.split()[0] for line in done.out.splitlines()]) == {
        "a",
        "b",
        "c",
        "g",
    }
    assert "would replay 4 " in done.err
    everything = await letters.wal("replay", "--dry-run")  # no filter: no question either
    assert everything.code == 0, everything.err
    assert len(everything.out.splitlines()) == len(SPECS)
    assert await end_offsets(letters.ingest) == before


async def test_replay_produces_exactly_the_matches_as_they_were(letters: DeadLetters) -> None:
    first = await letters.wal(
        "replay", "--namespace", "orders", "--code", "TARGET_REJECTED", "--no-progress"
    )
    assert first.code == 0, first.err
    assert f"replayed 2 dead letters from {letters.dlq} to {letters.ingest}" in first.out
    second = await letters.wal("replay", "--code", "INVALID_JSON", "--no-progress")
    assert second.code == 0, second.err

    replayed = await read_all(letters.ingest)
    assert len(replayed) == 3
    by_origin = {header(r, "wal-replayed-from"): r for r in replayed}
    specs = {s.name: s for s in SPECS}
    assert set(by_origin) == {f"{letters.dlq}/{letters.coords[n]}" for n in ("a", "b", "f")}
    for name in ("a", "b", "f"):
        record, spec = by_origin[f"{letters.dlq}/{letters.coords[name]}"], specs[name]
        assert (record.key, record.value) == (spec.record_key(), spec.record_value())
        assert header(record, "wal-message-id") == spec.message_id
        assert header(record, "wal-namespace") == spec.namespace
        assert header(record, "traceparent") is not None
        assert header(record, "wal-source") is not None
        assert [h for h in FAILURE_HEADERS if header(record, h) is not None] == []
    assert by_origin[f"{letters.dlq}/{letters.coords['f']}"].key is None


async def test_replay_without_a_filter_needs_yes(letters: DeadLetters) -> None:
    refused = await letters.wal("replay", "--no-progress")
    assert refused.code == 1
    assert "--yes" in refused.err
    assert sum((await end_offsets(letters.ingest)).values()) == 0

    done = await letters.wal("replay", "--yes", "--no-progress")
    assert done.code == 0, done.err
    replayed = await read_all(letters.ingest)
    assert {header(r, "wal-replayed-from") for r in replayed} == {
        f"{letters.dlq}/{c}" for c in letters.coords.values()
    }
    assert len(replayed) == len(SPECS)


async def test_replay_exits_non_zero_and_counts_when_a_produce_fails(
    letters: DeadLetters,
) -> None:
    small = await letters.topic("small", **{"max.message.bytes": "2048"})
    big = Spec("big", "huge", "TARGET_REJECTED", "pg", 1, "m-big", value=b"[%s]" % (b"1," * 4000))
    fine = Spec("fine", "huge", "TARGET_REJECTED", "pg", 1, "m-fine")
    await letters.produce(letters.dlq, (fine, big))
    # Kafka refuses a whole batch that is too large: --rate keeps the two in batches of their own.
    done = await letters.wal(
        "replay", "--namespace", "huge", "--to", small, "--rate", "5", "--no-progress"
    )
    assert done.code == 1
    assert f"replayed 1 dead letters from {letters.dlq} to {small}" in done.out
    assert f"failed: {letters.dlq}/{letters.coords['big']}" in done.err
    assert "1 dead letters could not be replayed" in done.err
    assert [header(r, "wal-message-id") for r in await read_all(small)] == ["m-fine"]


@pytest.mark.slow
async def test_replay_rate_spreads_the_records_out(letters: DeadLetters) -> None:
    bulk = tuple(Spec(f"r{i}", "bulk", "TARGET_ERROR", "pg", 1, f"m-r{i}") for i in range(40))
    await letters.produce(letters.dlq, bulk)
    done = await letters.wal("replay", "--namespace", "bulk", "--rate", "20", "--no-progress")
    assert done.code == 0, done.err
    replayed: list[Any] = await read_all(letters.ingest)
    assert len(replayed) == 40
    stamps = sorted(r.timestamp for r in replayed)
    # 40 records at 20/s: the first is free, the other 39 wait 50 ms each (1.95 s).
    assert stamps[-1] - stamps[0] >= 1500
