"""A Kafka cluster of the module's own (three KRaft nodes on free ports, ``min.insync.replicas``
2), the fleet on it with replication factor 3, and what the fault tests do to its nodes."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from app.ops import stack
from app.settings import Settings
from tests.integration import harness
from tests.integration.conftest import private_stack, thaw_and_stop
from tests.integration.harness import ROOT, Fleet, Worker, delete_topics, eventually, pg_count

#: DescribeConfigs' source of a value set on the topic itself (DYNAMIC_TOPIC_CONFIG).
TOPIC_CONFIG = 1


@pytest.fixture(scope="module")
def cluster_settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """Three nodes for the whole module: each test leaves them all running (the fixture
    below restarts any it did not)."""
    settings = private_stack(tmp_path_factory.mktemp("cluster"), brokers=3)
    try:
        yield settings
    finally:
        thaw_and_stop(settings)


@dataclass
class Cluster:
    """The nodes of :func:`cluster_settings`, by node id, and what the brokers say."""

    settings: Settings

    @property
    def bootstrap(self) -> str:
        return stack.bootstrap(self.settings).removeprefix("kafka://").replace(";", ",")

    def pid(self, node: int) -> int:
        found = {s.name: s.pid for s in stack.status(self.settings)}
        pid = found[f"kafka-{node}"]
        assert isinstance(pid, int), f"kafka-{node} is not running: {pid}"
        return pid

    def signal(self, node: int, sig: signal.Signals) -> float:
        """Send ``sig`` to the node; when it was sent (monotonic)."""
        os.kill(self.pid(node), sig)
        return time.monotonic()

    async def start_all(self) -> float:
        """Start every node that is down (its data kept); how long until all answered."""
        began = time.monotonic()
        await asyncio.to_thread(stack.up, self.settings)
        return time.monotonic() - began

    async def admin(self) -> AIOKafkaAdminClient:
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=5000)
        await admin.start()
        return admin

    async def leaders(self, topic: str) -> dict[int, int]:
        """Partition -> the node leading it."""
        admin = await self.admin()
        try:
            (described,) = await admin.describe_topics([topic])
        finally:
            await admin.close()
        return {p["partition"]: p["leader"] for p in described["partitions"]}

    async def busiest_leader(self, topic: str) -> int:
        """The node leading most of ``topic``'s partitions."""
        counts = collections.Counter((await self.leaders(topic)).values())
        return counts.most_common(1)[0][0]

    async def coordinator(self, group: str) -> int:
        admin = await self.admin()
        try:
            return await admin.find_coordinator(group)
        finally:
            await admin.close()

    async def durability(self, prefix: str) -> dict[str, tuple[set[int], str | None]]:
        """Per topic starting with ``prefix``: its partitions' replica counts, and its own
        ``min.insync.replicas`` (None where the topic has none set: the brokers' default)."""
        admin = await self.admin()
        try:
            names = sorted(t for t in await admin.list_topics() if t.startswith(prefix))
            described = await admin.describe_topics(names)
            wanted = {"min.insync.replicas": None}
            resources = [ConfigResource(ConfigResourceType.TOPIC, n, wanted) for n in names]
            configs = await admin.describe_configs(resources)
        finally:
            await admin.close()
        own: dict[str, str | None] = dict.fromkeys(names)
        for response in configs:
            for _error, _message, _type, name, entries, *_ in response.resources:
                for key, value, _read_only, source, *_ in entries:
                    if key == "min.insync.replicas" and source == TOPIC_CONFIG:
                        own[name] = value
        return {
            t["topic"]: ({len(p["replicas"]) for p in t["partitions"]}, own[t["topic"]])
            for t in described
        }

    async def fully_replicated(self, prefix: str) -> bool:
        """Every partition of the topics starting with ``prefix`` has all replicas in sync."""
        admin = await self.admin()
        try:
            names = [t for t in await admin.list_topics() if t.startswith(prefix)]
            described = await admin.describe_topics(names)
        finally:
            await admin.close()
        return all(len(p["isr"]) == len(p["replicas"]) for t in described for p in t["partitions"])


@pytest.fixture
async def cluster(
    fleet: Fleet, cluster_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Cluster]:
    """The module's cluster with every node up and in sync, this test's fleet on it with
    replication factor 3, and the harness's clients too; the fleet's topics go after."""
    c = Cluster(cluster_settings)
    for node in (1, 2, 3):
        with contextlib.suppress(AssertionError):  # down: started below
            c.signal(node, signal.SIGCONT)
    await c.start_all()
    monkeypatch.setattr(harness, "BOOTSTRAP", c.bootstrap)
    fleet.extra_env.update(WAL_BROKER=stack.bootstrap(cluster_settings), WAL_REPLICATION_FACTOR="3")
    yield c
    fleet.stop_all()  # before its topics go: a worker that loses them cannot drain
    try:
        await asyncio.wait_for(delete_topics(f"{fleet.prefix}-"), 30)
    except Exception as exc:  # the cluster is the test's subject, not this cleanup's
        print(f"could not delete the topics of {fleet.prefix}: {exc!r}")


# -- traffic and how it moves ----------------------------------------------------------------


async def steady(topic: str, values: list[bytes], rate: float, bootstrap: str) -> float:
    """Produce ``values`` at ``rate`` a second with an idempotent ``acks=all`` producer, the
    way a careful client does through a broker failure; the longest a send waited for its
    ack (seconds)."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=5
    )
    await producer.start()
    worst = 0.0
    try:
        began, pending = time.monotonic(), []
        for i, value in enumerate(values):
            wait = began + i / rate - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            sent = time.monotonic()
            future = await producer.send(topic, value)
            pending.append((sent, future))
            while pending and pending[0][1].done():
                at, done = pending.pop(0)
                await done
                worst = max(worst, time.monotonic() - at)
        for at, future in pending:
            await future
            worst = max(worst, time.monotonic() - at)
        return worst
    finally:
        await producer.stop()


@dataclass
class Rows:
    """Samples of a table's row count, to see when a fault stopped it and when it moved again."""

    table: str
    samples: list[tuple[float, int]] = field(default_factory=list)

    async def run(self) -> None:
        while True:
            count = await asyncio.to_thread(pg_count, self.table)
            self.samples.append((time.monotonic(), count))
            await asyncio.sleep(0.25)

    def now(self) -> int:
        return self.samples[-1][1] if self.samples else 0

    def recovery(self, fault: float, until: float | None = None) -> dict[str, float]:
        """From ``fault`` (to ``until``): the seconds until the first new row, and the longest
        time without one."""
        after = [(t, n) for t, n in self.samples if t >= fault and (until is None or t <= until)]
        assert after, "no samples after the fault"
        first = next((t for t, n in after if n > after[0][1]), None)
        longest, last_t, last_n = 0.0, fault, after[0][1]
        for t, n in after:
            if n > last_n:
                longest = max(longest, t - last_t)
                last_t, last_n = t, n
        return {
            "first_row_s": round((first or after[-1][0]) - fault, 1),
            "longest_pause_s": round(longest, 1),
        }


async def at_risk(worker: Worker) -> dict[str, Any]:
    """The ``kafka`` part of the worker's /health/ready body."""
    async with httpx.AsyncClient(timeout=5.0) as client:
        body: dict[str, Any] = (await client.get(f"{worker.url}/health/ready")).json()
    return body["kafka"]


async def reported(worker: Worker, *, short: bool, timeout: float) -> dict[str, Any]:
    """Wait until the worker's readiness reports partitions short of replicas (``short``)
    or every partition in sync (and described since); what it reported."""

    async def check() -> dict[str, Any] | None:
        kafka = await at_risk(worker)
        if not kafka.get("checked") or kafka.get("error"):
            return None
        lacking = kafka["underReplicated"]["count"] + kafka["offline"]["count"]
        return kafka if bool(lacking) == short else None

    what = "partitions short of replicas" if short else "every partition in sync"
    found: dict[str, Any] = await eventually(check, timeout=timeout, interval=1.0, what=what)
    return found


def requests(run: str, total: int, namespace: str = "orders") -> list[bytes]:
    """``total`` write requests with a client message id each: a client's retried send of
    one is the same write (the target applies it once), so what is counted is the fleet."""
    return [
        orjson.dumps(
            {"namespace": namespace, "messageId": f"{run}-{i}", "payload": {"seq": i, "body": "b"}}
        )
        for i in range(total)
    ]


#: Where each fault test's measurements are kept too (``pytest`` shows them only with ``-s``).
REPORT = ROOT / "var" / "cluster-recovery.log"


def report(line: str) -> None:
    """Print a fault test's measurements and append them to :data:`REPORT`, dated."""
    print(f"\n{line}")
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    with REPORT.open("a") as out:
        out.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {line}\n")
