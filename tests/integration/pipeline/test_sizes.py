"""Large requests end to end, and a record Kafka refuses: dead-lettered, the stream goes on.

A namespace may allow requests up to 16 MiB, so the fleet's topics must hold them; a
client may gzip a request that the fleet then re-produces uncompressed. When a topic
cannot hold a record (created before with Kafka's ~1 MiB default), that record is
dead-lettered with the reason and every other request behind it is delivered once.
"""

from __future__ import annotations

import httpx
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from app.models import MAX_REQUEST_BYTES, TOPIC_MAX_MESSAGE_BYTES
from tests.integration.harness import (
    BOOTSTRAP,
    Fleet,
    eventually,
    group_lag,
    header,
    insert_only,
    pg_query,
    read_all,
    request,
)

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]

BIG = 2 * 1024 * 1024  # over Kafka's default record limit, far under a namespace's 16 MiB


def big_namespace(table: str) -> dict[str, object]:
    return {**insert_only(table), "maxMessageSize": MAX_REQUEST_BYTES}


def big_request(seq: int) -> bytes:
    return request("orders", {"seq": seq, "body": "x" * BIG})


async def produce_gzipped(topic: str, values: list[bytes]) -> None:
    """As a client that compresses would: the broker stores the small gzipped batch."""
    producer = AIOKafkaProducer(
        bootstrap_servers=BOOTSTRAP,
        acks="all",
        compression_type="gzip",
        max_request_size=MAX_REQUEST_BYTES + 65_536,
    )
    await producer.start()
    try:
        for value in values:
            await (await producer.send(topic, value))
    finally:
        await producer.stop()


@pytest.mark.parametrize("compression", ["none", "gzip"])
async def test_requests_of_megabytes_pass_end_to_end(fleet: Fleet, compression: str) -> None:
    table = f"z_{fleet.prefix}"
    fleet.apply(big_namespace(table))
    worker = await fleet.worker(WAL_PRODUCER_COMPRESSION=compression).ready()
    values = [request("orders", {"seq": i, "body": "b"}) for i in range(50)]
    await produce_gzipped(fleet.topic("ingest"), [*values, big_request(50)])
    async with httpx.AsyncClient(base_url=worker.url, timeout=30) as client:
        r = await client.post("/wal/write", content=big_request(51))
    assert r.status_code == 202, r.text

    await eventually(lambda: _rows(table, 52), timeout=90, what="every row")
    sizes = dict(pg_query(f'SELECT seq, length(body) FROM "{table}"'))
    assert sizes[50] == sizes[51] == BIG and len(sizes) == 52
    assert (await read_all(fleet.topic("dlq"))) == []

    roles = ("ingest", "deliver", "dlq", "delay-1s", "status")
    limits = await record_limits([fleet.topic(role) for role in roles])
    assert limits == {fleet.topic(role): TOPIC_MAX_MESSAGE_BYTES for role in roles}


@pytest.mark.parametrize("client", ["aiokafka", "librdkafka"])  # WAL_PRODUCER_CLIENT
async def test_a_record_the_topic_cannot_hold_is_dead_lettered_and_the_rest_delivered(
    fleet: Fleet, client: str
) -> None:
    table = f"y_{fleet.prefix}"
    # wal-deliver made before the fleet, with Kafka's default record limit (~1 MiB)
    admin = AIOKafkaAdminClient(bootstrap_servers=BOOTSTRAP)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(fleet.topic("deliver"), fleet.partitions, 1)])
    finally:
        await admin.close()
    fleet.apply(big_namespace(table))
    worker = await fleet.worker(WAL_PRODUCER_CLIENT=client).ready()

    before = [request("orders", {"seq": i, "body": "b" * 100}) for i in range(200)]
    after = [request("orders", {"seq": i, "body": "b" * 100}) for i in range(201, 401)]
    await produce_gzipped(fleet.topic("ingest"), [*before, big_request(200), *after])
    async with httpx.AsyncClient(base_url=worker.url, timeout=30) as client:
        r = await client.post("/wal/write", content=big_request(401))
    assert r.status_code == 413, r.text  # never 503: a retry could not succeed
    assert r.json()["error"]["code"] == "MESSAGE_SIZE_LIMIT_EXCEEDED"

    await eventually(lambda: _rows(table, 400), timeout=90, what="every ordinary row")
    dead = await eventually(lambda: _dlq(fleet), timeout=60, what="the dead letter")
    assert len(dead) == 1
    assert dead[0].value == big_request(200)  # the original bytes, to replay once fixed
    assert header(dead[0], "wal-error-code") == "MESSAGE_SIZE_LIMIT_EXCEEDED"
    assert "MessageSizeTooLargeError" in (header(dead[0], "wal-error-message") or "")
    await eventually(lambda: _committed(fleet), timeout=60, what="every offset committed")
    counts = dict(pg_query(f'SELECT seq, count(*) FROM "{table}" GROUP BY seq'))
    assert counts == {seq: 1 for seq in [*range(200), *range(201, 401)]}
    assert "holds records up to" in worker.log.read_text()  # reported at start


async def record_limits(names: list[str]) -> dict[str, int]:
    """Each topic's max.message.bytes, as the broker describes it."""
    admin = AIOKafkaAdminClient(bootstrap_servers=BOOTSTRAP)
    await admin.start()
    try:
        wanted = {"max.message.bytes": None}
        resources = [ConfigResource(ConfigResourceType.TOPIC, n, wanted) for n in names]
        return {
            name: int(entry[1])
            for response in await admin.describe_configs(resources)
            for _e, _m, _t, name, entries, *_ in response.resources
            for entry in entries
            if entry[0] == "max.message.bytes"
        }
    finally:
        await admin.close()


async def _rows(table: str, n: int) -> bool:
    return int(pg_query(f'SELECT count(*) FROM "{table}"')[0][0]) >= n


async def _dlq(fleet: Fleet) -> list[object] | None:
    records = await read_all(fleet.topic("dlq"))
    return records or None


async def _committed(fleet: Fleet) -> bool:
    lag = await group_lag(fleet.prefix, [fleet.topic("ingest"), fleet.topic("deliver")])
    return not any(lag.values())
