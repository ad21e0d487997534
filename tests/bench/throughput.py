"""Throughput: raw consume, a hand-written pipeline and the WAL fleet on the same 1 KB requests.

    .venv/bin/python -m tests.bench.throughput [--quick] [--out PATH] [-n N]

N write requests of 1 KB are pre-loaded into a fresh ingest topic (own topic
prefix, 8 partitions), then:

a. raw consume - a plain aiokafka ``getmany`` loop reads them (msgs/s);
b. hand-written - aiokafka consume → orjson parse + check → produce to a second
   topic (acks=all) → consume it → COPY into a staging table and INSERT … ON
   CONFLICT DO NOTHING into a table keyed by message id, committing offsets
   after each write; one process, one event loop, like one worker;
   it runs twice: first as ``warm_up`` (not ranked: a broker's first pipeline
   after a start ran ~1.5x slower), then for the record;
b2. hand-written (confluent-kafka) - the same pipeline on confluent-kafka
   (librdkafka), in tests/bench/hand_confluent.py; the fleet's ratios are taken
   against the faster of b and b2 (``ratios.hand_written_faster`` says which);
c. the fleet - ``wal worker`` processes (one, then two) deliver them into a
   ``sql`` journal table on the default producer client, each run followed by the same
   on the other (``WAL_PRODUCER_CLIENT``, the ``_aiokafka`` or ``_librdkafka`` parts,
   :data:`OTHER_CLIENT`); the rate counts from
   the moment every worker is ready to the last row's ``delivered_at_ms``, over the
   rows written in that window;
d. latency - one worker, then two, a producer at a fixed rate stamping ``sentAtMs`` in
   each payload; ``delivered_at_ms - sentAtMs`` per row → p50/p99, over the whole
   run and over the run without its first ``WARM_UP_S`` seconds (start-up).

Parts b, b2 and c also report the CPU they took per message (``cpu_us_per_msg``): the
whole machine's busy time (every core: the broker's, PostgreSQL's and the kernel's
too) and the pipeline's own (this process for b and b2, the workers for c). Broker,
database and pipelines share the machine's cores, so a part that keeps them busy runs
at (cores / machine µs per message): the budget any change has to fit in.

Every part has its own topic prefix and table, dropped afterwards, and a
deadline: a part that runs out reports how far it got instead of hanging.
Nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import psutil
import psycopg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from confluent_kafka import KafkaException

from app.settings import Settings
from tests.integration.harness import (
    BOOTSTRAP,
    PG_DSN,
    ROOT,
    Fleet,
    delete_topics,
    group_lag,
    pg_query,
)

NAMESPACE = "bench"
PARTITIONS = 8
REQUEST_BYTES = 1024
#: Product defaults where the test harness differs (it commits every 0.5 s).
FLEET_ENV = {"WAL_COMMIT_INTERVAL_S": "1.0", "WAL_LOG_LEVEL": "warning"}
SIZES = {"full": {"n": 200_000, "latency_s": 30}, "quick": {"n": 20_000, "latency_s": 20}}
LATENCY_RATE = 5_000
#: The latency part also reports its run without this many first seconds.
WARM_UP_S = 5
#: No new row for this long while some are missing: the run is reported as stalled.
STALL_S = 30.0
#: The producer client the fleet runs on by default (``WAL_PRODUCER_CLIENT``), and the
#: other one, which each fleet part is run again on.
DEFAULT_CLIENT: str = Settings.model_fields["producer_client"].default
OTHER_CLIENT = "aiokafka" if DEFAULT_CLIENT == "librdkafka" else "librdkafka"
#: Record batch size of the pre-loaders: the Kafka clients' default (aiokafka, Java).
#: With 512 KiB batches the fleet stalls on a backlog (see --batch-bytes).
BATCH_BYTES = 16 * 1024


class TimedOut(Exception):
    """A bounded wait ran out; the message says after how long and how much was done."""

    def __init__(self, what: str, seconds: float, done: int, total: int) -> None:
        super().__init__(f"{what}: timed out after {seconds:.0f} s with {done} of {total} done")
        self.done = done


# -- data ------------------------------------------------------------------------------------


def write_request(
    prefix: str,
    seq: int,
    size: int = REQUEST_BYTES,
    *,
    lifecycle: dict[str, Any] | None = None,
    **fields: Any,
) -> bytes:
    """A write request of ``size`` bytes (padded), with a message id unique to the run;
    ``fields`` go into the payload."""
    payload: dict[str, Any] = {"seq": seq, **fields, "pad": ""}
    body = {"namespace": NAMESPACE, "messageId": f"{prefix}-{seq}", "payload": payload}
    if lifecycle:
        body["lifecycle"] = lifecycle
    raw = orjson.dumps(body)
    if len(raw) < size:
        payload["pad"] = "x" * (size - len(raw))
        raw = orjson.dumps(body)
    return raw


def requests(prefix: str, n: int, size: int = REQUEST_BYTES) -> Iterator[bytes]:
    return (write_request(prefix, i, size) for i in range(n))


def journal_namespace(table: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": NAMESPACE,
        "targets": [{"identifier": "pg", "type": "sql", "config": {"table": table}}],
        **extra,
    }


# -- Kafka -----------------------------------------------------------------------------------


async def create_topics(*names: str, partitions: int = PARTITIONS) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=BOOTSTRAP)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(n, partitions, 1) for n in names])
    finally:
        await admin.close()


async def preload(
    topic: str,
    values: Iterable[bytes],
    *,
    partitions: int = PARTITIONS,
    batch_bytes: int = BATCH_BYTES,
    timeout: float = 300,
) -> dict[str, Any]:
    """Produce ``values`` as fast as a plain producer can: explicit batches, round robin."""
    producer = AIOKafkaProducer(bootstrap_servers=BOOTSTRAP, acks="all", max_batch_size=batch_bytes)
    await producer.start()
    sent, started = 0, time.perf_counter()
    try:
        async with asyncio.timeout(timeout):
            pending: list[asyncio.Future[Any]] = []
            batch, partition = producer.create_batch(), 0
            for value in values:
                if batch.append(key=None, value=value, timestamp=None) is None:
                    pending.append(await producer.send_batch(batch, topic, partition=partition))
                    batch, partition = producer.create_batch(), (partition + 1) % partitions
                    batch.append(key=None, value=value, timestamp=None)
                    if len(pending) >= 16:
                        await asyncio.gather(*pending)
                        pending.clear()
                sent += 1
            if batch.record_count():
                pending.append(await producer.send_batch(batch, topic, partition=partition))
            await asyncio.gather(*pending)
    except TimeoutError:
        raise TimedOut(f"preload of {topic}", timeout, sent, sent) from None
    finally:
        await producer.stop()
    seconds = time.perf_counter() - started
    return {
        "messages": sent,
        "batch_bytes": batch_bytes,
        "seconds": round(seconds, 2),
        "msgs_per_s": round(sent / seconds),
    }


async def paced(topic: str, prefix: str, rate: float, seconds: float) -> dict[str, Any]:
    """Produce 1 KB requests at ``rate``/s for ``seconds``, each stamped with ``sentAtMs``."""
    producer = AIOKafkaProducer(bootstrap_servers=BOOTSTRAP, acks="all", linger_ms=5)
    await producer.start()
    sent, started = 0, time.monotonic()
    try:
        pending: list[asyncio.Future[Any]] = []
        while (elapsed := time.monotonic() - started) < seconds:
            while sent < int(elapsed * rate):
                stamp = int(time.time() * 1000)
                value = write_request(prefix, sent, sentAtMs=stamp)
                pending.append(await producer.send(topic, value))
                sent += 1
            if len(pending) >= 2_000:
                await asyncio.wait_for(asyncio.gather(*pending), 60)
                pending.clear()
            await asyncio.sleep(0.005)
        await asyncio.wait_for(asyncio.gather(*pending), 60)
    except TimeoutError:
        raise TimedOut(f"acks from {topic}", 60, sent, int(rate * seconds)) from None
    finally:
        await producer.stop()
    took = time.monotonic() - started
    return {"sent": sent, "seconds": round(took, 2), "achieved_msgs_per_s": round(sent / took)}


# -- PostgreSQL ------------------------------------------------------------------------------


def journal_progress(table: str) -> tuple[int, int | None]:
    """Rows in a journal table and the latest ``delivered_at_ms`` (0, None before it exists)."""
    try:
        count, last = pg_query(f'SELECT count(*), max(delivered_at_ms) FROM "{table}"')[0]
    except psycopg.errors.UndefinedTable:
        return 0, None
    return int(count), last


def drop_table(table: str) -> None:
    pg_query(f'DROP TABLE IF EXISTS "{table}"')


async def wait_rows(
    fleet: Fleet, table: str, n: int, timeout: float
) -> tuple[int, int, dict[str, Any]]:
    """Poll until ``table`` holds ``n`` rows: (rows, last ``delivered_at_ms``, ``{}``).

    When rows were arriving and then none came for STALL_S seconds: the rows so
    far and ``{"incomplete": why, "where": …}``, where the missing ones are (the
    figures then cover what arrived). :class:`TimedOut` at the deadline.
    """
    started = time.monotonic()
    count, moved = 0, started
    while time.monotonic() - started < timeout:
        now_count, last = await asyncio.to_thread(journal_progress, table)
        if last is not None and now_count >= n:
            return now_count, last, {}
        if now_count > count:
            count, moved = now_count, time.monotonic()
        elif last is not None and count and time.monotonic() - moved > STALL_S:
            why = f"stalled at {count} of {n} rows in {table}: none new for {STALL_S:.0f} s"
            print(f"[bench] {why}", file=sys.stderr, flush=True)
            return count, last, {"incomplete": why, "where": await whereabouts(fleet)}
        for worker in fleet.workers:
            worker.assert_alive()
        await asyncio.sleep(1.0)
    raise TimedOut(f"waiting for {n} rows in {table}", timeout, count, n)


async def whereabouts(fleet: Fleet) -> dict[str, Any]:
    """Records on each of the run's topics, and what the group has not committed on ingest."""
    consumer = AIOKafkaConsumer(bootstrap_servers=BOOTSTRAP)
    await consumer.start()
    try:
        await consumer._client.force_metadata_update()
        topics = sorted(t for t in await consumer.topics() if t.startswith(f"{fleet.prefix}-"))
        records = {}
        for topic in topics:
            tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
            records[topic.removeprefix(f"{fleet.prefix}-")] = sum(
                (await consumer.end_offsets(tps)).values()
            )
    finally:
        await consumer.stop()
    lag = await group_lag(fleet.prefix, [fleet.topic("ingest")])
    return {"records": records, "ingest_not_committed": lag[fleet.topic("ingest")]}


# -- a fleet of the run's own ----------------------------------------------------------------


@contextlib.asynccontextmanager
async def bench_fleet(name: str, **namespace: Any) -> AsyncIterator[tuple[Fleet, str]]:
    """A fresh prefix, group and journal table with the bench namespace applied (``namespace``:
    settings of it beyond the defaults); all removed afterwards (worker logs are kept under
    var/bench-runs/ when something failed)."""
    tmp = ROOT / "var" / "bench-runs" / f"{name}-{uuid.uuid4().hex[:6]}"
    tmp.mkdir(parents=True)
    fleet = Fleet(tmp, partitions=PARTITIONS, extra_env=dict(FLEET_ENV))
    table = f"bench_{fleet.prefix}"
    failed = True
    try:
        await asyncio.to_thread(fleet.apply, journal_namespace(table, **namespace))
        yield fleet, table
        failed = False
    finally:
        fleet.stop_all()
        if failed:
            for w in fleet.workers:
                tail = "\n".join(line[:300] for line in w.tail(8).splitlines())
                print(f"--- {w.log} (kept) ---\n{tail}", file=sys.stderr)
        await asyncio.to_thread(drop_table, table)
        await delete_topics(fleet.prefix)
        if not failed:
            shutil.rmtree(tmp, ignore_errors=True)


# -- a. raw consume --------------------------------------------------------------------------


async def raw_consume(topic: str, n: int, timeout: float) -> dict[str, Any]:
    consumer = AIOKafkaConsumer(bootstrap_servers=BOOTSTRAP, enable_auto_commit=False)
    await consumer.start()
    count = 0
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        started = time.perf_counter()
        while count < n:
            if time.perf_counter() - started > timeout:
                raise TimedOut("raw consume", timeout, count, n)
            batches = await consumer.getmany(timeout_ms=100)
            count += sum(len(records) for records in batches.values())
        seconds = time.perf_counter() - started
    finally:
        await consumer.stop()
    return {"messages": count, "seconds": round(seconds, 2), "msgs_per_s": round(count / seconds)}


# -- b. hand-written pipeline ----------------------------------------------------------------


@dataclass
class Progress:
    forwarded: int = 0
    written: int = 0


async def joined(consumer: AIOKafkaConsumer, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not consumer.assignment():
        if time.monotonic() > deadline:
            raise TimedOut("consumer group join", timeout, 0, 1)
        await asyncio.sleep(0.05)


def checked_id(value: bytes | None, fallback: str) -> bytes | None:
    """The minimal validation: a JSON object with a string namespace and an object payload."""
    try:
        data = orjson.loads(value or b"")
    except orjson.JSONDecodeError:
        return None
    if not (
        isinstance(data, dict)
        and isinstance(data.get("namespace"), str)
        and isinstance(data.get("payload"), dict)
    ):
        return None
    return str(data.get("messageId") or fallback).encode()


async def forward(
    consumer: AIOKafkaConsumer, producer: AIOKafkaProducer, out: str, n: int, p: Progress
) -> None:
    """Stage 1: ingest → checked → ``out`` (same partition), offsets committed once acked."""
    while p.forwarded < n:
        batches = await consumer.getmany(timeout_ms=100, max_records=2_000)
        pending, offsets = [], {}
        for tp, records in batches.items():
            batch = producer.create_batch()
            for r in records:
                key = checked_id(r.value, f"{tp.partition}-{r.offset}")
                if key is None:
                    continue  # a real pipeline would dead-letter it; the bench has none
                if batch.append(key=key, value=r.value, timestamp=None) is None:
                    pending.append(await producer.send_batch(batch, out, partition=tp.partition))
                    batch = producer.create_batch()
                    batch.append(key=key, value=r.value, timestamp=None)
            if batch.record_count():
                pending.append(await producer.send_batch(batch, out, partition=tp.partition))
            offsets[tp] = records[-1].offset + 1
            p.forwarded += len(records)
        await asyncio.gather(*pending)
        if offsets:
            await consumer.commit(offsets)


async def write(
    consumer: AIOKafkaConsumer,
    conn: psycopg.AsyncConnection[Any],
    table: str,
    n: int,
    p: Progress,
) -> None:
    """Stage 2: second topic → COPY into staging → INSERT … ON CONFLICT → commit, offsets."""
    while p.written < n:
        batches = await consumer.getmany(timeout_ms=100, max_records=2_000)
        if not batches:
            continue
        now = str(int(time.time() * 1000)).encode()
        lines, offsets = [], {}
        for tp, records in batches.items():
            for r in records:
                payload = orjson.dumps(orjson.loads(r.value)["payload"]).replace(b"\\", b"\\\\")
                lines.append(b"%s\t%s\t%s\n" % (r.key, payload, now))
            offsets[tp] = records[-1].offset + 1
        async with conn.cursor() as cur:
            async with cur.copy("COPY staging FROM STDIN") as copy:
                await copy.write(b"".join(lines))
            await cur.execute(f'INSERT INTO "{table}" SELECT * FROM staging ON CONFLICT DO NOTHING')
            inserted = cur.rowcount
        await conn.commit()
        await consumer.commit(offsets)
        p.written += inserted


async def hand_written(topic: str, prefix: str, n: int, timeout: float) -> dict[str, Any]:
    out, table = f"{prefix}-hand-out", f"bench_{prefix}_hand"
    await create_topics(out)
    columns = "id text PRIMARY KEY, payload jsonb NOT NULL, delivered_at_ms bigint NOT NULL"
    await asyncio.to_thread(pg_query, f'CREATE TABLE "{table}" ({columns})')
    common: dict[str, Any] = {
        "bootstrap_servers": BOOTSTRAP,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
    }
    source = AIOKafkaConsumer(topic, group_id=f"{prefix}-hand-1", **common)
    second = AIOKafkaConsumer(out, group_id=f"{prefix}-hand-2", **common)
    producer = AIOKafkaProducer(
        bootstrap_servers=BOOTSTRAP, acks="all", linger_ms=5, max_batch_size=512 * 1024
    )
    conn = await psycopg.AsyncConnection.connect(PG_DSN, connect_timeout=10)
    progress = Progress()
    try:
        await conn.execute(f'CREATE TEMP TABLE staging (LIKE "{table}") ON COMMIT DELETE ROWS')
        await conn.commit()
        for client in (source, second, producer):
            await client.start()
        await asyncio.gather(joined(source), joined(second))
        started = time.perf_counter()
        async with asyncio.timeout(timeout):
            await asyncio.gather(
                forward(source, producer, out, n, progress),
                write(second, conn, table, n, progress),
            )
        seconds = time.perf_counter() - started
    except TimeoutError:
        raise TimedOut("hand-written pipeline", timeout, progress.written, n) from None
    finally:
        for client in (source, second, producer):
            await client.stop()
        await conn.close()
        await asyncio.to_thread(drop_table, table)
    rows = progress.written
    return {"rows": rows, "seconds": round(seconds, 2), "msgs_per_s": round(rows / seconds)}


# -- CPU per message -------------------------------------------------------------------------


def machine_busy_s() -> float:
    """CPU seconds the machine's cores have been busy since boot, every process's and the
    kernel's (``guest`` time is already inside ``user`` on Linux)."""
    t = psutil.cpu_times()
    return sum(getattr(t, f, 0.0) for f in ("user", "nice", "system", "irq", "softirq", "steal"))


def family(proc: psutil.Process) -> list[psutil.Process]:
    with contextlib.suppress(psutil.NoSuchProcess):
        return [proc, *proc.children(recursive=True)]
    return []


def cpu_seconds(proc: psutil.Process) -> float:
    """CPU seconds (user + system) of the process, its reaped and its live children."""
    total = 0.0
    for p in family(proc):
        with contextlib.suppress(psutil.NoSuchProcess):
            t = p.cpu_times()
            total += t.user + t.system
            if p is proc:
                total += t.children_user + t.children_system
    return total


def per_msg(before: float | None, after: float | None, messages: int) -> float | None:
    """The CPU seconds from ``before`` to ``after`` as µs a message (None if either is)."""
    if before is None or after is None or messages <= 0:
        return None
    return round((after - before) * 1e6 / messages, 1)


async def metered(part: Coroutine[Any, Any, dict[str, Any]]) -> dict[str, Any]:
    """A hand-written part's result with the CPU it took per message, start-up included:
    the machine's and this process's (the pipeline runs here, librdkafka's threads too)."""
    this = psutil.Process()
    machine, own = machine_busy_s(), cpu_seconds(this)
    result = await part
    rows = result.get("rows", 0)
    result["cpu_us_per_msg"] = {
        "machine": per_msg(machine, machine_busy_s(), rows),
        "process": per_msg(own, cpu_seconds(this), rows),
    }
    return result


def workers_cpu_s(workers: Iterable[Any]) -> float | None:
    """CPU seconds of the workers' processes together; None if one has exited."""
    procs = [w.proc for w in workers]
    if any(p is None or p.poll() is not None for p in procs):
        return None
    return sum(cpu_seconds(psutil.Process(p.pid)) for p in procs)


# -- c. the fleet ----------------------------------------------------------------------------


async def fleet_run(
    n: int,
    workers: int,
    timeout: float,
    batch_bytes: int,
    producer_client: str | None = None,
    **namespace: Any,
) -> dict[str, Any]:
    """``workers`` workers drain a backlog of ``n``; ``producer_client`` sets
    ``WAL_PRODUCER_CLIENT`` (default: the product's)."""
    env = {"WAL_PRODUCER_CLIENT": producer_client} if producer_client else {}
    async with bench_fleet(f"fleet{workers}", **namespace) as (fleet, table):
        values = requests(fleet.prefix, n)
        loaded = await preload(fleet.topic("ingest"), values, batch_bytes=batch_bytes)
        spawned = time.time()
        procs = [fleet.worker(**env) for _ in range(workers)]
        await asyncio.gather(*(w.ready(timeout=90) for w in procs))
        ready = time.time()
        at_ready, _ = await asyncio.to_thread(journal_progress, table)
        cpu_at_ready = machine_busy_s(), workers_cpu_s(procs)
        rows, last_ms, stalled = await wait_rows(fleet, table, n, timeout)
        cpu_at_end = machine_busy_s(), workers_cpu_s(procs)
    window = last_ms / 1000 - ready
    counted = rows - at_ready
    return {
        "workers": workers,
        "rows": rows,
        **stalled,
        # from every worker ready to the last row seen (wait_rows looks every 0.2 s or so)
        "cpu_us_per_msg": {
            "machine": per_msg(cpu_at_ready[0], cpu_at_end[0], counted),
            "workers": per_msg(cpu_at_ready[1], cpu_at_end[1], counted),
        },
        "preload_msgs_per_s": loaded["msgs_per_s"],
        "startup_s": round(ready - spawned, 2),
        "rows_at_ready": at_ready,
        "seconds": round(window, 2),
        "msgs_per_s": round((rows - at_ready) / window),
        "spawn_to_last_row_s": round(last_ms / 1000 - spawned, 2),
    }


# -- d. latency ------------------------------------------------------------------------------


async def latency(
    rate: int, seconds: int, timeout: float, workers: int = 1, **env: str
) -> dict[str, Any]:
    async with bench_fleet(f"latency{workers}") as (fleet, table):
        procs = [fleet.worker(**env) for _ in range(workers)]
        await asyncio.gather(*(w.ready(timeout=90) for w in procs))
        producing = await paced(fleet.topic("ingest"), fleet.prefix, rate, seconds)
        _, _, stalled = await wait_rows(fleet, table, producing["sent"], timeout)
        lag = "delivered_at_ms - (payload->>'sentAtMs')::bigint"
        sent_at = "(payload->>'sentAtMs')::bigint"
        stats = (
            f"percentile_cont(0.5) WITHIN GROUP (ORDER BY {lag}),"
            f" percentile_cont(0.99) WITHIN GROUP (ORDER BY {lag}), max({lag})"
        )
        warm = f'(SELECT min({sent_at}) FROM "{table}") + {WARM_UP_S * 1000}'
        rows = await asyncio.to_thread(
            pg_query,
            f'SELECT 0, {stats} FROM "{table}"'
            f' UNION ALL SELECT 1, {stats} FROM "{table}" WHERE {sent_at} >= {warm}'
            " ORDER BY 1",
        )
    (_, p50, p99, worst), (_, s50, s99, s_worst) = rows
    return {
        "workers": workers,
        "target_msgs_per_s": rate,
        **producing,
        **stalled,
        "p50_ms": round(p50, 1),
        "p99_ms": round(p99, 1),
        "max_ms": int(worst),
        # the same run without its first WARM_UP_S seconds (start-up: joins, connections)
        "steady_p50_ms": round(s50, 1),
        "steady_p99_ms": round(s99, 1),
        "steady_max_ms": int(s_worst),
    }


# -- the whole benchmark ---------------------------------------------------------------------


def run_reported(coro: Coroutine[Any, Any, dict[str, Any]]) -> dict[str, Any]:
    """:func:`run_main`, with a timeout or a failed check reported in the result."""
    try:
        return run_main(coro)
    except TimedOut as exc:
        return {"timed_out": str(exc)}
    except AssertionError as exc:
        return {"failed": f"AssertionError: {str(exc)[-500:]}"}


def finish(
    result: dict[str, Any], started: str, out_path: str, summarize: Callable[[dict[str, Any]], str]
) -> int:
    """Stamp, write and print one benchmark's result; the exit status of its main."""
    result["at"] = started
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(summarize(result))
    print(f"written to {out}")
    return 0


def run_main(coro: Coroutine[Any, Any, dict[str, Any]]) -> dict[str, Any]:
    """``asyncio.run``, where SIGTERM (like Ctrl-C) cancels the run, so its clean-up
    (workers stopped, topics and tables dropped) still happens."""

    async def cancellable() -> dict[str, Any]:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await coro

    try:
        return asyncio.run(cancellable())
    except (asyncio.CancelledError, KeyboardInterrupt):
        return {"cancelled": "stopped by a signal before it finished; cleaned up"}


async def attempt(results: dict[str, Any], name: str, part: Any) -> None:
    """Run one part; a timeout or failure is recorded in its place and the next part runs."""
    print(f"[throughput] {name} …", file=sys.stderr, flush=True)
    try:
        results[name] = await part
    except TimedOut as exc:
        results[name] = {"timed_out": str(exc), "done": exc.done}
    except (AssertionError, OSError, psycopg.Error, KafkaException) as exc:
        results[name] = {"failed": f"{type(exc).__name__}: {str(exc)[-500:]}"}
    print(f"[throughput] {name}: {results[name]}", file=sys.stderr, flush=True)


async def run(n: int, latency_s: int, batch_bytes: int = BATCH_BYTES) -> dict[str, Any]:
    from tests.bench.hand_confluent import hand_written_confluent  # it imports this module

    prefix = f"b{uuid.uuid4().hex[:10]}"
    topic = f"{prefix}-ingest"
    results: dict[str, Any] = {"n": n, "request_bytes": REQUEST_BYTES, "partitions": PARTITIONS}
    per_part = max(120.0, n / 500)  # a part slower than 500 msgs/s is reported as timed out
    try:
        await create_topics(topic)
        values = requests(prefix, n)
        await attempt(results, "preload", preload(topic, values, batch_bytes=batch_bytes))
        await attempt(results, "raw_consume", raw_consume(topic, n, per_part))
        # Unranked: the broker's first pipeline after a start ran ~1.5x slower than the
        # next (a JVM warms up), so every ranked part now runs on a warm broker.
        await attempt(results, "warm_up", hand_written(topic, f"{prefix}w", n, per_part))
        await attempt(results, "hand_written", metered(hand_written(topic, prefix, n, per_part)))
        confluent = hand_written_confluent(topic, prefix, n, per_part)
        await attempt(results, "hand_written_confluent", metered(confluent))
    finally:
        await delete_topics(prefix)
    # The fleet on its default producer client, alternating with the fleet producing on the
    # other one (WAL_PRODUCER_CLIENT), same backlog: the client's share.
    other = {"producer_client": OTHER_CLIENT}
    for workers, name in ((1, "fleet_1_worker"), (2, "fleet_2_workers")):
        await attempt(results, name, fleet_run(n, workers, per_part, batch_bytes))
        again = fleet_run(n, workers, per_part, batch_bytes, **other)
        await attempt(results, f"{name}_{OTHER_CLIENT}", again)
    await attempt(results, "latency", latency(LATENCY_RATE, latency_s, per_part))
    await attempt(results, "latency_2_workers", latency(LATENCY_RATE, latency_s, per_part, 2))
    results["ratios"] = ratios(results)
    return results


def ratios(r: dict[str, Any]) -> dict[str, float | str | None]:
    """The fleet against the faster hand-written pipeline (named), then against each."""

    def rate(name: str) -> float | None:
        return r.get(name, {}).get("msgs_per_s")

    def over(a: str, b: str | None) -> float | None:
        x, y = rate(a), rate(b) if b else None
        return round(x / y, 3) if x and y else None

    hands = [h for h in ("hand_written", "hand_written_confluent") if rate(h)]
    faster = max(hands, key=lambda h: rate(h) or 0, default=None)
    return {
        "hand_written_faster": faster,
        "fleet_2_workers/hand_written_faster": over("fleet_2_workers", faster),
        "fleet_1_worker/hand_written_faster": over("fleet_1_worker", faster),
        "fleet_2_workers/hand_written": over("fleet_2_workers", "hand_written"),
        "fleet_1_worker/hand_written": over("fleet_1_worker", "hand_written"),
        "fleet_2_workers/hand_written_confluent": over("fleet_2_workers", "hand_written_confluent"),
        "fleet_1_worker/hand_written_confluent": over("fleet_1_worker", "hand_written_confluent"),
        f"fleet_2_workers/fleet_2_workers_{OTHER_CLIENT}": over(
            "fleet_2_workers", f"fleet_2_workers_{OTHER_CLIENT}"
        ),
        f"fleet_1_worker/fleet_1_worker_{OTHER_CLIENT}": over(
            "fleet_1_worker", f"fleet_1_worker_{OTHER_CLIENT}"
        ),
        "fleet_1_worker/raw_consume": over("fleet_1_worker", "raw_consume"),
        "fleet_2_workers/raw_consume": over("fleet_2_workers", "raw_consume"),
    }


def summarize(r: dict[str, Any]) -> str:
    def line(label: str, name: str) -> str:
        part = r.get(name, {})
        if "msgs_per_s" in part:
            note = f"  (INCOMPLETE: {part['incomplete']})" if "incomplete" in part else ""
            if name == (r.get("ratios") or {}).get("hand_written_faster"):
                note += "  (faster: the fleet's ratios use it)"
            return f"  {label:<34} {part['msgs_per_s']:>9,} msgs/s{note}"
        return f"  {label:<34} {part.get('timed_out') or part.get('failed') or 'not run'}"

    lines = [
        f"throughput ({r.get('n')} requests of {r.get('request_bytes')} B, "
        f"{r.get('partitions')} partitions)",
        line("preload (plain producer)", "preload"),
        line("a. raw consume", "raw_consume"),
        line("b0. warm-up (unranked)", "warm_up"),
        line("b. hand-written (aiokafka)", "hand_written"),
        line("b2. hand-written (confluent-kafka)", "hand_written_confluent"),
        line(f"c. fleet, 1 worker ({DEFAULT_CLIENT})", "fleet_1_worker"),
        line(f"c. fleet, 1 worker, {OTHER_CLIENT}", f"fleet_1_worker_{OTHER_CLIENT}"),
        line(f"c. fleet, 2 workers ({DEFAULT_CLIENT})", "fleet_2_workers"),
        line(f"c. fleet, 2 workers, {OTHER_CLIENT}", f"fleet_2_workers_{OTHER_CLIENT}"),
    ]
    for name, workers in (("latency", "1 worker"), ("latency_2_workers", "2 workers")):
        lat = r.get(name, {})
        label = f"d. latency @ {lat.get('target_msgs_per_s', LATENCY_RATE)}/s, {workers}"
        if "p50_ms" in lat:
            lines.append(
                f"  {label:<34} "
                f"p50 {lat['p50_ms']} ms, p99 {lat['p99_ms']} ms, max {lat['max_ms']} ms "
                f"(sent {lat['achieved_msgs_per_s']}/s for {lat['seconds']} s)"
                + (f"  (INCOMPLETE: {lat['incomplete']})" if "incomplete" in lat else "")
            )
            lines.append(
                f"  {'   without its first ' + str(WARM_UP_S) + ' s':<34} "
                f"p50 {lat['steady_p50_ms']} ms, p99 {lat['steady_p99_ms']} ms, "
                f"max {lat['steady_max_ms']} ms"
            )
        else:
            lines.append(f"  {label:<34} {lat.get('timed_out') or lat.get('failed') or 'not run'}")
    lines.append("  CPU per message, µs (machine: every core's busy time; own: the pipeline's)")
    for name in (
        "hand_written",
        "hand_written_confluent",
        "fleet_1_worker",
        f"fleet_1_worker_{OTHER_CLIENT}",
        "fleet_2_workers",
        f"fleet_2_workers_{OTHER_CLIENT}",
    ):
        cpu = r.get(name, {}).get("cpu_us_per_msg")
        if cpu:
            own = cpu.get("process", cpu.get("workers"))
            lines.append(f"    {name:<36} machine {cpu.get('machine')}, own {own}")
    for name, value in (r.get("ratios") or {}).items():
        lines.append(f"  {name:<38} {value if value is not None else 'n/a'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.throughput",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, for smoke runs")
    parser.add_argument("--out", default="var/bench-throughput.json")
    parser.add_argument("-n", type=int, default=None, help="requests (default 200000, quick 20000)")
    parser.add_argument(
        "--batch-bytes",
        type=int,
        default=BATCH_BYTES,
        help=f"record batch size of the pre-loads (default {BATCH_BYTES})",
    )
    args = parser.parse_args(argv)
    sizes = SIZES["quick" if args.quick else "full"]
    started = datetime.now(UTC).isoformat(timespec="seconds")
    result = run_reported(run(args.n or sizes["n"], sizes["latency_s"], args.batch_bytes))
    return finish(result, started, args.out, summarize)


if __name__ == "__main__":
    # Run the module under its own name, not this ``__main__`` copy: tests.bench.hand_confluent
    # imports tests.bench.throughput, and the TimedOut it raises must be the one caught here.
    from tests.bench import throughput

    sys.exit(throughput.main())
