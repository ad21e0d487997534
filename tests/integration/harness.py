"""Driving a real fleet from tests: worker processes, plain Kafka clients, counts.

Each test gets its own topic prefix and consumer group, so tests share the
local stack (``make stack-up``) without seeing each other's records. Records
are produced and read with plain aiokafka clients, not the project's code.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import psycopg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from prometheus_client.parser import text_string_to_metric_families

from app.ops import stack
from app.settings import Settings

BOOTSTRAP = "127.0.0.1:9092"
PG_DSN = "postgresql://wal:wal@127.0.0.1:5432/wal"
PG_URL = "postgresql+psycopg://wal:wal@127.0.0.1:5432/wal"
REDIS_URL = "redis://127.0.0.1:6379/0"
ROOT = Path(__file__).resolve().parents[2]
WAL = str(Path(sys.executable).with_name("wal"))
#: The admin key of every test fleet (its workers know its digest; its ``wal`` commands
#: present it): ``namespaces apply``, ``dlq replay`` and ``backfill`` need one.
ADMIN_KEY = "test-admin-key"
ADMIN_DIGEST = "sha256:" + hashlib.sha256(ADMIN_KEY.encode()).hexdigest()


def free_port() -> int:
    """A free port below Linux's ephemeral range (32768-60999), so no outgoing
    connection takes it between this check and the bind of whoever it is for."""
    for port in random.sample(range(10_000, 20_000), 50):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 10000-19999")


async def eventually(
    check: Callable[[], Awaitable[Any]], *, timeout: float, interval: float = 0.25, what: str = ""
) -> Any:
    """Poll ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or check}: last={last!r}")


@dataclass
class Worker:
    """One ``wal worker`` process."""

    env: dict[str, str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        return int(self.env["WAL_WEB_PORT"])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Worker:
        handle = self.log.open("ab")
        self.proc = subprocess.Popen(
            [WAL, "worker"],
            env=self.env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
        )
        return self

    async def ready(self, timeout: float = 60.0) -> Worker:
        async def check() -> bool:
            self.assert_alive()
            try:
                async with httpx.AsyncClient(timeout=1.0) as client:
                    r = await client.get(f"{self.url}/health/ready")
                    return r.status_code == 200
            except httpx.HTTPError:
                return False

        await eventually(check, timeout=timeout, what=f"worker on {self.port} ready")
        return self

    def assert_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.tail()}")

    def kill9(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class Fleet:
    """A test's own slice of the stack: topic prefix, group id, workers, tables."""

    tmp: Path
    prefix: str = field(default_factory=lambda: f"t{uuid.uuid4().hex[:10]}")
    partitions: int = 4
    workers: list[Worker] = field(default_factory=list)
    extra_env: dict[str, str] = field(default_factory=dict)

    def topic(self, role: str) -> str:
        return f"{self.prefix}-{role}"

    def env(self, **overrides: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("WAL_")}
        env.update(
            {
                "WAL_BROKER": f"kafka://{BOOTSTRAP}",
                "WAL_TOPIC_PREFIX": self.prefix,
                "WAL_APP_ID": self.prefix,
                "WAL_PARTITIONS": str(self.partitions),
                "WAL_DATA_DIR": str(self.tmp / f"data-{len(self.workers)}"),
                "WAL_WEB_PORT": str(free_port()),
                "WAL_DATABASE_URL": PG_URL,
                "WAL_REDIS_URL": REDIS_URL,
                "WAL_COMMIT_INTERVAL_S": "0.5",
                "WAL_LOG_LEVEL": "info",
                "WAL_ADMIN_API_KEYS": ADMIN_DIGEST,
                "WAL_ADMIN_API_KEY": ADMIN_KEY,
            }
        )
        env.update(self.extra_env)
        env.update(overrides)
        return env

    def worker(self, **overrides: str) -> Worker:
        w = Worker(self.env(**overrides), self.tmp / f"worker-{len(self.workers)}.log")
        self.workers.append(w)
        return w.start()

    def wal(self, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        """Run the ``wal`` CLI against this fleet's topics."""
        return subprocess.run(
            [WAL, *args],
            env=self.env(),
            input=stdin,
            capture_output=True,
            cwd=ROOT,
            timeout=120,
            check=False,
        )

    def apply(self, *namespaces: dict[str, Any]) -> None:
        path = self.tmp / f"ns-{uuid.uuid4().hex[:6]}.json"
        path.write_bytes(orjson.dumps({"namespaces": list(namespaces)}))
        done = self.wal("namespaces", "apply", "-f", str(path))
        assert done.returncode == 0, done.stderr.decode() + done.stdout.decode()

    def stop_all(self) -> None:
        for w in self.workers:
            w.stop()


async def list_topics() -> list[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=BOOTSTRAP)
    await admin.start()
    try:
        return list(await admin.list_topics())
    finally:
        await admin.close()


async def delete_topics(prefix: str) -> None:
    """Delete every topic whose name starts with ``prefix`` (a fleet's own)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=BOOTSTRAP)
    await admin.start()
    try:
        names = [t for t in await admin.list_topics() if t.startswith(prefix)]
        if names:
            await admin.delete_topics(names)
    finally:
        await admin.close()


async def produce(
    topic: str,
    values: Iterable[bytes | None],
    *,
    keys: Iterable[bytes | None] | None = None,
    headers: list[tuple[str, bytes]] | None = None,
) -> int:
    """Produce with a plain aiokafka producer (acks=all); return how many."""
    producer = AIOKafkaProducer(bootstrap_servers=BOOTSTRAP, acks="all", linger_ms=5)
    await producer.start()
    try:
        futures = []
        key_iter = iter(keys) if keys is not None else None
        for value in values:
            key = next(key_iter) if key_iter is not None else None
            futures.append(await producer.send(topic, value, key=key, headers=headers))
        await asyncio.gather(*futures)
        return len(futures)
    finally:
        await producer.stop()


async def read_all(topic: str, *, timeout: float = 20.0) -> list[Any]:
    """Every record of ``topic`` up to its current end (plain consumer, no group)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=BOOTSTRAP, enable_auto_commit=False)
    await consumer.start()
    try:
        parts = await eventually(
            lambda: _partitions(consumer, topic), timeout=timeout, what=f"topic {topic}"
        )
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        out: list[Any] = []
        deadline = time.monotonic() + timeout
        while any([await consumer.position(tp) < end[tp] for tp in tps]):
            if time.monotonic() > deadline:
                raise AssertionError(f"could not read {topic} to its end")
            for records in (await consumer.getmany(timeout_ms=200)).values():
                out.extend(records)
        return out
    finally:
        await consumer.stop()


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> set[int] | None:
    await consumer._client.force_metadata_update()
    return consumer.partitions_for_topic(topic)


async def group_lag(group: str, topics: list[str]) -> dict[str, int]:
    """Per topic: end offsets minus the group's committed offsets (what is not committed)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=BOOTSTRAP)
    consumer = AIOKafkaConsumer(bootstrap_servers=BOOTSTRAP, enable_auto_commit=False)
    await admin.start()
    await consumer.start()
    try:
        committed = await admin.list_consumer_group_offsets(group)
        lag: dict[str, int] = {}
        for topic in topics:
            parts = await _partitions(consumer, topic) or set()
            tps = [TopicPartition(topic, p) for p in parts]
            end = await consumer.end_offsets(tps) if tps else {}
            lag[topic] = sum(
                end[tp]
                - (committed[tp].offset if tp in committed and committed[tp].offset >= 0 else 0)
                for tp in tps
            )
        return lag
    finally:
        await consumer.stop()
        await admin.close()


async def committed_count(group: str, topic: str) -> int:
    """How many of ``topic``'s records the group has committed past (offsets from 0)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=BOOTSTRAP)
    await admin.start()
    try:
        committed = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    return sum(o.offset for tp, o in committed.items() if tp.topic == topic and o.offset > 0)


async def messages_total(url: str, outcome: str) -> float:
    """``wal_messages_total{outcome=...}`` of the worker at ``url``, every label summed."""
    async with httpx.AsyncClient(timeout=5.0) as client:
        text = (await client.get(f"{url}/metrics")).text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "wal_messages_total" and s.labels.get("outcome") == outcome
    )


async def metrics_view(worker: Worker, namespace: str, **want: int) -> dict[str, Any]:
    """The namespace's metrics view, once its totals hold ``want`` (stats trail the stream
    by a batch or two); an assertion naming both when they never do."""
    last: dict[str, Any] = {}

    async def check() -> dict[str, Any] | None:
        async with httpx.AsyncClient(timeout=5.0) as client:
            r = await client.get(f"{worker.url}/wal/namespaces/{namespace}/metrics")
        last.clear()
        last.update(r.json() if r.status_code == 200 else {"status": r.status_code})
        got = last.get("totals") or {}
        return dict(last) if all(got.get(k) == v for k, v in want.items()) else None

    try:
        found: dict[str, Any] = await eventually(check, timeout=60, what=f"{namespace}'s totals")
    except AssertionError:
        raise AssertionError(f"{namespace} from {worker.url}: want {want}, view {last}") from None
    return found


async def totals(worker: Worker, namespace: str, **want: int) -> dict[str, int]:
    """The namespace's totals from the metrics view, once they hold ``want``."""
    found: dict[str, int] = (await metrics_view(worker, namespace, **want))["totals"]
    return found


def kafka_pid(settings: Settings) -> int:
    """The pid of the broker the local stack started under ``settings``."""
    kafka = next(s for s in stack.status(settings) if s.name == "kafka")
    assert isinstance(kafka.pid, int), kafka
    return kafka.pid


def pg_query(sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        cursor = conn.execute(sql, params)  # type: ignore[arg-type]
        return cursor.fetchall() if cursor.description else []


def pg_count(table: str) -> int:
    try:
        return int(pg_query(f'SELECT count(*) FROM "{table}"')[0][0])
    except psycopg.errors.UndefinedTable:
        return 0


def request(namespace: str, payload: dict[str, Any], **extra: Any) -> bytes:
    return orjson.dumps({"namespace": namespace, "payload": payload, **extra})


def header(record: Any, name: str) -> str | None:
    for key, value in record.headers or ():
        if key == name:
            return bytes(value).decode()
    return None


def insert_only(table: str, name: str = "orders") -> dict[str, Any]:
    """A namespace whose one target *inserts* each payload as a row of ``table``.

    With a table that has no unique key, only the target's ledger prevents a
    replayed message from being inserted twice: tests count doubles with it.
    """
    pg_query(f'CREATE TABLE "{table}" (seq integer NOT NULL, body text NOT NULL)')
    return {
        "name": name,
        "targets": [
            {
                "identifier": "pg",
                "type": "sql",
                # a ledger of its own: message ids derived from (time, partition, offset)
                # repeat across fleets, and tests run side by side must not share claims
                "config": {
                    "mode": "rows",
                    "table": table,
                    "operation": "insert",
                    "ledgerTable": f"{table}_ledger",
                },
            }
        ],
    }
