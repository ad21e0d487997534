"""The production table store, ``WAL_STORE=rocksdb://``, against the real stack.

Workers keep their tables in RocksDB under their own ``WAL_DATA_DIR``. Each test
sends requests (rows-mode SQL *inserts*: only the target's ledger keeps a replay
from doubling a row) and money transfers (transactions: the ``transactions``
table), counts what arrived against what was sent, and snapshots what the
tables answer - transaction states, the namespace's stats totals - and the
message statuses, before and after what it does to the workers' state:

* a restart that keeps the state directory (timed against ``memory://``, which
  reads the whole changelog again; the figures are printed, never asserted);
* a restart with the state directory deleted, and one with its files corrupted;
* two workers with a standby replica each, one SIGKILLed (and back on its directory).
"""

from __future__ import annotations

import json
import random
import shutil
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from rocksdict import AccessType, Options, Rdict

from app.engine.store import UNCLEAN
from tests.integration.harness import (
    BOOTSTRAP,
    Fleet,
    Worker,
    eventually,
    group_lag,
    insert_only,
    pg_query,
    produce,
    read_all,
    request,
)
from tests.integration.ops.conftest import Settled
from tests.integration.transactions.test_transfers import ACCOUNTS, bank, create_ledger, transfer

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.slow]

ROCKSDB = "rocksdb://"
TABLES = ("transactions", "stats", "ordering", "namespaces")
#: Where Faust keeps a table partition's database: ``<WAL_DATA_DIR>/faust/v1/tables/``.
DB_GLOB = "faust/*/tables/*.db"
OFFSET_KEY = b"__faust\0offset__"
#: How many times test b writes each transaction's value again to its changelog.
COPIES = 50
#: The topics the fleet's group consumes; zero lag on all of them: nothing left to fold.
CONSUMED = ("ingest", "deliver", "txn-events", "stats", "delay-1s")


@dataclass
class Load:
    """What a test sent: request ids, transfer ids, and the tables it counts them in."""

    run: str
    rows: str
    ledger: str
    requests: list[str]
    transfers: list[str]
    frozen: set[str]

    @property
    def txn_ids(self) -> list[str]:
        return [f"txn_{t}" for t in self.transfers]


def prepare(fleet: Fleet, requests: int, transfers: int) -> Load:
    """The namespaces, and the ids of what :func:`send` will send."""
    run = uuid.uuid4().hex[:8]
    load = Load(
        run=run,
        rows=f"r_{fleet.prefix}",
        ledger=f"l_{fleet.prefix}",
        requests=[f"{run}-m{i}" for i in range(requests)],
        transfers=[f"{run}-t{n}" for n in range(transfers)],
        frozen={f"{run}-t{n}" for n in range(transfers) if n % 10 == 3},
    )
    create_ledger(load.ledger)
    fleet.apply(insert_only(load.rows), bank(load.ledger))
    return load


async def send(
    fleet: Fleet, load: Load, requests: slice = slice(None), transfers: slice = slice(None)
) -> None:
    """Produce these requests and transfers (to a frozen account: the credit fails for good
    and the debit is compensated)."""
    await produce(
        fleet.topic("ingest"),
        [
            request("orders", {"seq": int(i.rsplit("m", 1)[1]), "body": "x" * 100}, messageId=i)
            for i in load.requests[requests]
        ],
    )
    plans, keys = [], []
    for t in load.transfers[transfers]:
        n = int(t.rsplit("t", 1)[1])
        src, dst = random.Random(n).sample(ACCOUNTS, 2)
        plans.append(transfer(load.run, n, src, "frozen" if t in load.frozen else dst, 10))
        keys.append(t.encode())
    await produce(fleet.topic("ingest"), plans, keys=keys)


async def settled_load(fleet: Fleet, load: Load, timeout: float = 240.0) -> None:
    """Every request a row, every transfer two ledger entries, and nothing left unfolded."""

    last: list[Any] = []

    async def done() -> bool:
        rows = pg_query(f'SELECT count(*) FROM "{load.rows}"')[0][0]
        entries = pg_query(f'SELECT count(*) FROM "{load.ledger}"')[0][0]
        lag = await group_lag(fleet.prefix, [fleet.topic(r) for r in CONSUMED])
        last[:] = [f"{rows} rows of {len(load.requests)}", f"{entries} ledger entries", lag]
        return (rows, entries) == (len(load.requests), 2 * len(load.transfers)) and not any(
            lag.values()
        )

    try:
        await eventually(done, timeout=timeout, interval=1.0, what="every request and transfer")
    except AssertionError:
        raise AssertionError(f"not everything done: {last}") from None
    assert_exactly_once(load)


def assert_exactly_once(load: Load) -> None:
    count, distinct, low, high = pg_query(
        f'SELECT count(*), count(DISTINCT seq), min(seq), max(seq) FROM "{load.rows}"'
    )[0]
    n = len(load.requests)
    assert (count, distinct) == (n, n), f"{count} rows, {distinct} distinct, {n} sent"
    assert (low, high) == (0, n - 1)
    entries, distinct_entries, balance = pg_query(
        f'SELECT count(*), count(DISTINCT entry_id), coalesce(sum(amount), 0) FROM "{load.ledger}"'
    )[0]
    assert entries == distinct_entries == 2 * len(load.transfers), "a mutation applied twice"
    assert balance == 0, "money was created or destroyed"


async def snapshot(worker: Worker, load: Load, every: int = 1) -> dict[str, Any]:
    """What the worker answers for every ``every``-th transaction and message id, and the
    namespace's stats totals (the ``stats`` table)."""
    out: dict[str, Any] = {}
    async with httpx.AsyncClient(timeout=10.0, base_url=worker.url) as client:
        for txn in load.txn_ids[::every]:
            r = await client.get(f"/wal/transactions/{txn}")
            body = r.json()
            out[txn] = (r.status_code, body.get("status"), body.get("completedMutations"))
        for message_id in [*load.requests[::every], *load.transfers[::every]]:
            r = await client.get(f"/wal/messages/{message_id}")
            out[message_id] = (r.status_code, r.json().get("status"))
        for ns in ("orders", "bank"):
            r = await client.get(f"/wal/namespaces/{ns}/metrics", follow_redirects=True)
            out[f"stats:{ns}"] = (r.status_code, r.json().get("totals"))
    return out


def expected_snapshot(load: Load, every: int = 1) -> dict[str, Any]:
    """The answers a snapshot must hold once :func:`settled_load` returned."""
    out: dict[str, Any] = {}
    for t in load.transfers[::every]:
        final = ("compensated", 1) if t in load.frozen else ("completed", 2)
        out[f"txn_{t}"] = (200, *final)
    for message_id in load.requests[::every]:
        out[message_id] = (200, "completed")
    return out


def assert_snapshot(seen: dict[str, Any], load: Load, every: int = 1) -> None:
    expected = expected_snapshot(load, every)
    wrong = {k: (seen.get(k), v) for k, v in expected.items() if seen.get(k) != v}
    assert not wrong, (
        f"{len(wrong)} of {len(expected)} answers wrong, e.g. {list(wrong.items())[:5]}"
    )
    # A transfer's own message: known (its outcome is the transaction's).
    unknown = [t for t in load.transfers[::every] if seen.get(t, (0,))[0] != 200]
    assert not unknown, f"{len(unknown)} transfer messages unknown, e.g. {unknown[:5]}"
    # Stats count deliveries at least once (a batch read again counts again): a floor only.
    orders = seen["stats:orders"]
    assert orders[0] == 200 and orders[1]["delivered"] >= len(load.requests), orders


def db_dirs(data_dir: Path) -> list[Path]:
    return sorted(data_dir.glob(DB_GLOB))


def persisted_offsets(data_dir: Path) -> dict[str, int | None]:
    """Each table partition database's changelog offset (read-only; the worker is stopped)."""
    out: dict[str, int | None] = {}
    for path in db_dirs(data_dir):
        db = Rdict(str(path), Options(raw_mode=True), access_type=AccessType.read_only())
        try:
            raw = db.get(OFFSET_KEY)
        finally:
            db.close()
        out[path.name] = int(raw) if raw is not None else None
    return out


async def changelog_ends(fleet: Fleet) -> dict[str, int]:
    """``<table>-<partition>.db`` -> the end offset of that changelog partition."""
    topics = {t: fleet.topic(f"{t}-changelog") for t in TABLES if t != "namespaces"}
    topics["namespaces"] = fleet.topic("namespaces")
    consumer = AIOKafkaConsumer(bootstrap_servers=BOOTSTRAP, enable_auto_commit=False)
    await consumer.start()
    try:
        out = {}
        for table, topic in topics.items():
            partitions = consumer.partitions_for_topic(topic) or set()
            if not partitions:
                await consumer._client.force_metadata_update()
                partitions = consumer.partitions_for_topic(topic) or set()
            tps = [TopicPartition(topic, p) for p in partitions]
            for tp, end in (await consumer.end_offsets(tps)).items():
                out[f"{table}-{tp.partition}.db"] = end
        return out
    finally:
        await consumer.stop()


def recovery_span(worker: Worker) -> float | None:
    """Seconds between Faust's "Restoring state" and "Recovery complete" log lines."""
    start = end = None
    for line in worker.log.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        message = str(entry.get("message", ""))
        stamp = entry.get("time")
        if "Restoring state from changelog topics" in message and start is None:
            start = stamp
        elif "Recovery complete" in message and start is not None:
            end = stamp
            break
    if start is None or end is None:
        return None
    return _seconds(end) - _seconds(start)


def _seconds(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


async def timed_start(fleet: Fleet, **env: str) -> tuple[Worker, float]:
    """A worker started and ready; the seconds from its start to ``/health/ready`` 200."""
    began = time.monotonic()
    worker = fleet.worker(**env)
    await worker.ready(timeout=180)
    return worker, time.monotonic() - began


def stop(worker: Worker) -> None:
    """SIGTERM, and the worker must drain and exit 0 (a store that fails its close does not)."""
    worker.stop()
    assert worker.proc is not None and worker.proc.returncode == 0, worker.tail()


# -- a. the pipeline and a transaction, exactly once ------------------------------------------


async def test_pipeline_and_transactions_deliver_exactly_once_on_rocksdb(fleet: Fleet) -> None:
    load = prepare(fleet, requests=5_000, transfers=100)
    data = fleet.tmp / "rocks"
    worker = await fleet.worker(WAL_STORE=ROCKSDB, WAL_DATA_DIR=str(data)).ready()
    await send(fleet, load)
    await settled_load(fleet, load)
    assert_snapshot(await snapshot(worker, load), load)
    dirs = {p.name for p in db_dirs(data)}
    assert {"transactions-0.db", "stats-0.db", "ordering-0.db", "namespaces-0.db"} <= dirs, dirs
    stop(worker)
    print(f"rocksdb: {len(load.requests)} rows once, {len(load.transfers)} transactions final")


# -- b. a restart that keeps its state reads only the changelog's tail ------------------------


async def test_restart_with_kept_state_reads_only_the_changelog_tail(fleet: Fleet) -> None:
    load = prepare(fleet, requests=20_000, transfers=600)
    rocks = fleet.tmp / "rocks"
    worker = await fleet.worker(WAL_STORE=ROCKSDB, WAL_DATA_DIR=str(rocks)).ready()
    await send(fleet, load)
    await settled_load(fleet, load)
    before = await snapshot(worker, load, every=10)
    assert_snapshot(before, load, every=10)
    stop(worker)

    # Every database holds its changelog partition to the end: nothing is left to read.
    ends = await changelog_ends(fleet)
    held = persisted_offsets(rocks)
    behind = {
        name: (offset, ends[name])
        for name, offset in held.items()
        if ends.get(name) and (offset is None or offset != ends[name] - 1)
    }
    assert not behind, f"databases behind their changelog (offset held, end): {behind}"

    # A long-running fleet's changelog holds many records per key until compaction: write
    # each transaction's last value again COPIES times (the table's contents stay the same).
    # memory:// reads all of it at every start; the kept RocksDB store reads it once (the
    # tail it had not seen), then nothing.
    transactions = await inflate(fleet)
    records = sum((await changelog_ends(fleet)).values())

    figures: list[tuple[str, float, float | None, float]] = []
    for store, env in (
        ("memory://", {"WAL_STORE": "memory://", "WAL_DATA_DIR": str(fleet.tmp / "m1")}),
        ("rocksdb, kept, new tail", {"WAL_STORE": ROCKSDB, "WAL_DATA_DIR": str(rocks)}),
        ("rocksdb, kept", {"WAL_STORE": ROCKSDB, "WAL_DATA_DIR": str(rocks)}),
        ("memory://", {"WAL_STORE": "memory://", "WAL_DATA_DIR": str(fleet.tmp / "m2")}),
        ("rocksdb, kept", {"WAL_STORE": ROCKSDB, "WAL_DATA_DIR": str(rocks)}),
    ):
        worker, took = await timed_start(fleet, **env)
        assert await snapshot(worker, load, every=10) == before, store
        assert worker.proc is not None
        rss = psutil.Process(worker.proc.pid).memory_info().rss / 2**20
        figures.append((store, took, recovery_span(worker), rss))
        stop(worker)
    print(
        f"\nchangelogs: {records} records ({transactions} transactions, each {COPIES + 1}+ times)"
    )
    for store, took, span, rss in figures:
        read = "nothing to read" if span is None else f"recovery {span:.2f} s"
        print(f"  {store:24s} ready in {took:.2f} s ({read}), RSS {rss:.0f} MiB")


async def inflate(fleet: Fleet) -> int:
    """Write each transaction's last value to its changelog again, :data:`COPIES` times, as
    a long-running fleet's changelog holds a key many times until compaction; the table's
    contents stay the same. Returns how many transactions."""
    last = {r.key: r.value for r in await read_all(fleet.topic("transactions-changelog"))}
    keys = [k for k in last for _ in range(COPIES)]
    await produce(fleet.topic("transactions-changelog"), [last[k] for k in keys], keys=keys)
    return len(last)


# -- c. a deleted or corrupted state directory is rebuilt from the changelogs -----------------


def corrupt(data_dir: Path) -> int:
    """Damage every table database as a full disk or a bad block would; return how many."""
    dirs = db_dirs(data_dir)
    for path in dirs:
        (path / "CURRENT").write_bytes(b"\x00\xde\xad\xbe\xef")
        for f in path.iterdir():
            if f.suffix in (".sst", ".log") and f.stat().st_size:
                with f.open("r+b") as handle:
                    handle.truncate(f.stat().st_size // 2)
    return len(dirs)


async def test_deleted_or_corrupted_state_is_rebuilt_from_the_changelogs(fleet: Fleet) -> None:
    load = prepare(fleet, requests=3_000, transfers=600)
    rocks = fleet.tmp / "rocks"
    env = {"WAL_STORE": ROCKSDB, "WAL_DATA_DIR": str(rocks)}
    worker = await fleet.worker(**env).ready()
    await send(fleet, load)
    await settled_load(fleet, load)
    before = await snapshot(worker, load)
    assert_snapshot(before, load)
    stop(worker)
    tables = rocks / "faust"
    assert db_dirs(rocks), "no RocksDB databases were written"
    await inflate(fleet)  # the kept state has not seen these: a rebuild reads them all
    records = sum((await changelog_ends(fleet)).values())

    shutil.rmtree(tables)
    worker, rebuilt = await timed_start(fleet, **env)
    assert await snapshot(worker, load) == before, "tables differ after a rebuild"
    rebuilt_span = recovery_span(worker)
    stop(worker)

    damaged = corrupt(rocks)
    worker, repaired = await timed_start(fleet, **env)  # fails if the worker exits
    assert await snapshot(worker, load) == before, "tables differ after a corrupted store"
    moved = [line for line in worker.log.read_text().splitlines() if "does not open" in line]
    assert len(moved) == damaged, f"{len(moved)} databases moved aside of {damaged} damaged"
    aside = sorted(p.name for p in (rocks / "faust").glob("*/tables/*.broken-*"))
    assert len(aside) == damaged, aside
    repaired_span = recovery_span(worker)
    stop(worker)
    assert_exactly_once(load)
    print(
        f"\nchangelogs: {records} records. State deleted: ready in {rebuilt:.2f} s"
        f" (recovery {rebuilt_span or 0:.2f} s); {damaged} databases corrupted: ready in"
        f" {repaired:.2f} s (recovery {repaired_span or 0:.2f} s)"
    )


# -- d. standby replicas: a SIGKILLed worker's tables are taken over ---------------------------


async def test_standby_takes_over_the_tables_of_a_killed_worker(
    fleet: Fleet, settled: Settled
) -> None:
    load = prepare(fleet, requests=6_000, transfers=400)
    env = {"WAL_STORE": ROCKSDB, "WAL_STANDBY_REPLICAS": "1"}
    one = await fleet.worker(**env, WAL_DATA_DIR=str(fleet.tmp / "one")).ready()
    two = await fleet.worker(**env, WAL_DATA_DIR=str(fleet.tmp / "two")).ready()
    await settled(one, 2)

    # Each worker holds every partition of the transactions table: its own, and the
    # other's as a standby.
    async def standbys_open() -> bool:
        return all(
            {f"transactions-{p}.db" for p in range(fleet.partitions)}
            <= {d.name for d in db_dirs(fleet.tmp / name)}
            for name in ("one", "two")
        )

    await eventually(standbys_open, timeout=60, what="standby databases on both workers")

    await send(fleet, load, slice(0, len(load.requests) // 2), slice(0, len(load.transfers) // 2))

    async def some_done() -> bool:
        return int(pg_query(f'SELECT count(*) FROM "{load.ledger}"')[0][0]) >= 100

    await eventually(some_done, timeout=90, what="first ledger entries")
    one.kill9()
    killed = time.monotonic()
    killed_at = pg_query(f'SELECT count(*) FROM "{load.ledger}"')[0][0]
    await send(
        fleet, load, slice(len(load.requests) // 2, None), slice(len(load.transfers) // 2, None)
    )

    await settled(two, 1)
    took_over = time.monotonic() - killed
    await settled_load(fleet, load)
    seen = await snapshot(two, load)
    assert_snapshot(seen, load)

    # The killed worker comes back on its directory: what it had written (perhaps ahead
    # of the changelog) is rebuilt, and the two answer the same.
    unclean = [d.name for d in db_dirs(fleet.tmp / "one") if (d / UNCLEAN).exists()]
    assert unclean, "the killed worker left no database marked as written"
    back = await fleet.worker(**env, WAL_DATA_DIR=str(fleet.tmp / "one")).ready()
    await settled(two, 2)
    rebuilt = [line for line in back.log.read_text().splitlines() if "not closed cleanly" in line]
    assert len(rebuilt) == len(unclean), (unclean, rebuilt)
    assert await snapshot(back, load) == seen
    assert_exactly_once(load)
    print(
        f"\nkilled at {killed_at} of {2 * len(load.transfers)} ledger entries; the survivor held"
        f" every partition {took_over:.1f} s later (WAL_SESSION_TIMEOUT_S 10) and answers for"
        f" all {len(load.transfers)} transactions and {len(load.requests)} messages; back on"
        f" its directory, the killed worker rebuilt {len(unclean)} databases it had written"
    )
