"""The local stack: Apache Kafka, PostgreSQL and Redis on loopback (``wal stack``).

``up`` starts what is missing and reuses a service that already answers on its
port ("external"); ``down`` stops only what ``up`` started, as recorded in
``<stack_dir>/state.json``. Configs, data, logs and pid files live under the
stack dir; Kafka's jars are resolved once with Maven (``deploy/local/kafka``)
into ``<stack_cache_dir>/kafka-<version>/libs``, outside the repository.

As root (CI), PostgreSQL runs as the ``postgres`` OS user: it refuses root.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from string import Template

import click

from app.engine.clients import KafkaError, admin_client
from app.ops.databases import (
    postgres_down,
    postgres_status,
    postgres_up,
    redis_down,
    redis_status,
    redis_up,
)
from app.ops.services import (
    DEPLOY_DIR,
    HOST,
    LOG_TAIL_LINES,
    ServiceStatus,
    StackError,
    State,
    alive,
    errors_in,
    load_state,
    log_tail,
    port_open,
    read_pid,
    save_state,
    stack_dir,
    status_of,
    stop_pid,
)
from app.settings import Settings

KAFKA_READY_S = 60.0
KAFKA_STOP_S = 30.0


"""``state.json``: the services ``up`` started, with the paths ``down`` needs."""


# -- processes, ports, files ---------------------------------------------------------


# -- Kafka ---------------------------------------------------------------------------
#
# One broker (the default), or a cluster of ``WAL_STACK_BROKERS`` nodes on loopback.
# Every node is a combined broker+controller and every node is a voter of the KRaft
# quorum: three JVMs on two cores rather than four or six (one controller + three
# brokers would make that controller a single point of failure the fault tests would
# trip over; three controllers + three brokers do not fit the machine). A quorum of three
# keeps a majority with one node down, so killing, pausing or stopping any one node
# exercises what a production cluster does when a broker dies: leaders move, the ISR
# shrinks, the group coordinator moves - with the active controller moving too when the
# node killed held it.


@dataclass(frozen=True)
class KafkaNode:
    """One node of the local Kafka: its client port (the controller's is the next one)."""

    node_id: int
    port: int
    kdir: Path

    @property
    def name(self) -> str:
        return self.kdir.name

    @property
    def controller_port(self) -> int:
        return self.port + 1

    @property
    def pid_file(self) -> Path:
        return self.kdir / "kafka.pid"


def _kafka_port(settings: Settings) -> int:
    host, port = settings.broker_host_port
    if host not in (HOST, "localhost"):
        raise StackError(f"kafka: WAL_BROKER points at {host}; the local stack runs on {HOST}")
    return port


def kafka_nodes(settings: Settings) -> list[KafkaNode]:
    """The nodes ``WAL_STACK_BROKERS`` asks for: one in ``<stack_dir>/kafka`` on
    WAL_BROKER's port, or n in ``kafka-1`` … ``kafka-n`` on that port and every second
    one after it (each node's controller listens on the port after its own)."""
    port, root, n = _kafka_port(settings), stack_dir(settings), settings.stack_brokers
    if n == 1:
        return [KafkaNode(1, port, root / "kafka")]
    return [KafkaNode(i, port + 2 * (i - 1), root / f"kafka-{i}") for i in range(1, n + 1)]


def bootstrap(settings: Settings) -> str:
    """WAL_BROKER for the nodes of ``settings``: every node, so that a client started while
    one is down still finds the cluster."""
    return "kafka://" + ";".join(f"{HOST}:{node.port}" for node in kafka_nodes(settings))


def _kafka_libs(settings: Settings) -> Path:
    """The broker's jars, resolved with Maven unless a previous run completed."""
    version = settings.kafka_version
    home = settings.stack_cache_dir.expanduser().resolve() / f"kafka-{version}"
    libs, marker = home / "libs", home / "complete"
    if marker.exists():
        return libs
    shutil.rmtree(libs, ignore_errors=True)
    click.echo(f"kafka: resolving Apache Kafka {version} with Maven into {libs}")
    pom = DEPLOY_DIR / "kafka" / "pom.xml"
    mvn = ["mvn", "-q", "-B", "dependency:copy-dependencies", "-DincludeScope=runtime"]
    mvn += ["-f", str(pom), f"-DoutputDirectory={libs}", f"-Dkafka.version={version}"]
    done = subprocess.run(mvn, capture_output=True, text=True)
    if done.returncode != 0:
        out = (done.stdout + done.stderr).splitlines()[-LOG_TAIL_LINES:]
        raise StackError("kafka: Maven could not resolve the jars:\n" + "\n".join(out))
    marker.write_text(version + "\n")
    return libs


def _kafka_configure(node: KafkaNode, nodes: list[KafkaNode]) -> Path:
    """``server.properties`` of ``node``: internal topics replicated to at most three
    nodes, and at least two replicas in sync for a write wherever there are three."""
    replicas = min(3, len(nodes))
    template = Template((DEPLOY_DIR / "kafka" / "server.properties").read_text())
    voters = ",".join(f"{n.node_id}@{HOST}:{n.controller_port}" for n in nodes)
    props = node.kdir / "server.properties"
    props.write_text(
        template.substitute(
            host=HOST,
            node_id=node.node_id,
            voters=voters,
            port=node.port,
            controller_port=node.controller_port,
            data_dir=node.kdir / "data",
            replicas=replicas,
            min_insync=min(2, replicas),
        )
    )
    return props


def _cluster_id(nodes: list[KafkaNode]) -> str:
    """The id the nodes were formatted with, or a new one: a random UUID, base64url, 22
    characters, not starting with '-'. Every node of a cluster must have the same."""
    for node in nodes:
        with contextlib.suppress(OSError):
            for line in (node.kdir / "data" / "meta.properties").read_text().splitlines():
                if line.startswith("cluster.id="):
                    return line.split("=", 1)[1].strip()
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cid.startswith("-"):
            return cid


def _java(libs: Path, main: str, *args: str, jvm: tuple[str, ...] = ()) -> list[str]:
    return ["java", *jvm, "-cp", f"{libs}/*", main, *args]


def _kafka_format(libs: Path, props: Path, data: Path, cluster_id: str) -> None:
    if (data / "meta.properties").exists():
        return
    cmd = _java(libs, "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(props))
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise StackError(f"kafka: formatting {data} failed:\n{done.stdout}{done.stderr}")


#: Heap of a lone broker, and of each node of a cluster: three nodes share two cores and
#: the machine with PostgreSQL, Redis and the workers; a few hundred partitions need far
#: less than this.
SOLO_HEAP = ("-Xms256m", "-Xmx1g")
CLUSTER_HEAP = ("-Xms128m", "-Xmx384m")


def _kafka_spawn(
    libs: Path, kdir: Path, props: Path, heap: tuple[str, ...]
) -> subprocess.Popen[bytes]:
    log4j = DEPLOY_DIR / "kafka" / "log4j2.yaml"
    jvm = (*heap, f"-Dkafka.logs.dir={kdir}", f"-Dlog4j2.configurationFile={log4j}")
    cmd = _java(libs, "kafka.Kafka", str(props), jvm=jvm)
    with (kdir / "kafka.out").open("ab") as out:
        return subprocess.Popen(
            cmd,
            cwd=kdir,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _kafka_answers(port: int) -> bool:
    """A metadata round trip: the port opens before the broker serves requests."""

    async def probe() -> None:
        admin = admin_client(f"{HOST}:{port}", request_timeout_ms=5000)
        try:
            await admin.start()
            await admin.list_topics()
        finally:
            await admin.close()

    logger = logging.getLogger("aiokafka")
    level = logger.level
    logger.setLevel(logging.CRITICAL)  # refused connections are expected while it starts
    try:
        asyncio.run(probe())
        return True
    except (TimeoutError, KafkaError, OSError):
        return False
    finally:
        logger.setLevel(level)


def _kafka_wait(proc: subprocess.Popen[bytes], port: int, kdir: Path, offset: int) -> None:
    """Until a metadata round trip works; ``offset``: the server log's size at the start."""
    deadline = time.monotonic() + KAFKA_READY_S
    while time.monotonic() < deadline and proc.poll() is None:
        if port_open(port) and _kafka_answers(port):
            return
        time.sleep(0.5)
    if proc.poll() is None:
        stop_pid(proc.pid, "kafka.Kafka", 5.0)
        what = f"not ready within {KAFKA_READY_S:.0f} s; stopped it"
    else:
        what = f"exited with status {proc.returncode}"
    logs = errors_in(kdir / "server.log", offset) + log_tail(
        kdir / "server.log", kdir / "kafka.out"
    )
    raise StackError(f"kafka: {what}\n{logs}")


def _kafka_up(settings: Settings, state: State) -> None:
    """Start every node that does not run (all of them first: a quorum needs a majority
    before any node answers), then wait for each."""
    nodes = kafka_nodes(settings)
    other = sorted(k for k in state if k.startswith("kafka") and k not in {n.name for n in nodes})
    if other:
        raise StackError(
            f"kafka: this stack runs {', '.join(other)}, not the {len(nodes)} node(s) asked "
            "for (WAL_STACK_BROKERS, --brokers): `wal stack down` first"
        )
    started, spawned = time.monotonic(), []
    for node in nodes:
        pid = read_pid(node.pid_file)
        if node.name in state and alive(pid, "kafka.Kafka"):
            click.echo(f"{node.name}: already running on {HOST}:{node.port} (pid {pid})")
            continue
        if port_open(node.port):
            if len(nodes) > 1:
                raise StackError(f"{node.name}: {HOST}:{node.port} is taken")
            click.echo(f"kafka: reusing what listens on {HOST}:{node.port} (external)")
            return
        if port_open(node.controller_port):
            raise StackError(
                f"{node.name}: the controller port {HOST}:{node.controller_port} is taken"
            )
        spawned.append((node, _kafka_start(settings, state, node, nodes)))
    for node, (proc, offset) in spawned:
        _kafka_wait(proc, node.port, node.kdir, offset)
        took = time.monotonic() - started
        click.echo(f"{node.name}: ready on {HOST}:{node.port} (pid {proc.pid}) in {took:.1f} s")


def _kafka_start(
    settings: Settings, state: State, node: KafkaNode, nodes: list[KafkaNode]
) -> tuple[subprocess.Popen[bytes], int]:
    """Configure, format (once) and spawn ``node``; the process and its log's offset."""
    libs = _kafka_libs(settings)
    node.kdir.mkdir(parents=True, exist_ok=True)
    props = _kafka_configure(node, nodes)
    _kafka_format(libs, props, node.kdir / "data", _cluster_id(nodes))
    log = node.kdir / "server.log"
    offset = log.stat().st_size if log.exists() else 0
    heap = SOLO_HEAP if len(nodes) == 1 else CLUSTER_HEAP
    proc = _kafka_spawn(libs, node.kdir, props, heap)
    node.pid_file.write_text(f"{proc.pid}\n")
    state[node.name] = {"pid_file": str(node.pid_file), "port": str(node.port)}
    save_state(settings, state)
    return proc, offset


def _started_nodes(state: State) -> list[KafkaNode]:
    nodes = []
    for name, entry in sorted(state.items()):
        if name.startswith("kafka") and "port" in entry:
            pid_file = Path(entry["pid_file"])
            node_id = int(name.rpartition("-")[2]) if "-" in name else 1
            nodes.append(KafkaNode(node_id, int(entry["port"]), pid_file.parent))
    return nodes


def _kafka_down(settings: Settings, state: State) -> None:
    """Stop every node ``up`` started, whatever WAL_STACK_BROKERS says now: all told at
    once (a node told alone waits for the others to take its partitions; the last one
    for a quorum that has gone), then each waited for."""
    running = []
    for name in sorted(k for k in state if k.startswith("kafka")):
        pid_file = Path(state.pop(name)["pid_file"])
        pid = read_pid(pid_file)
        if pid is not None and alive(pid, "kafka.Kafka"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            running.append((name, pid))
        pid_file.unlink(missing_ok=True)
    for name, pid in running:
        stop_pid(pid, "kafka.Kafka", KAFKA_STOP_S)
        click.echo(f"{name}: stopped (pid {pid})")


def _kafka_status(settings: Settings, state: State) -> list[ServiceStatus]:
    """Each node ``up`` started (whatever WAL_STACK_BROKERS says now), else those it asks for."""
    out = []
    for node in _started_nodes(state) or kafka_nodes(settings):
        pid = read_pid(node.pid_file)
        ours = pid if node.name in state and alive(pid, "kafka.Kafka") else None
        out.append(status_of(node.name, node.port, ours, node.kdir / "server.log"))
    return out


# -- PostgreSQL ----------------------------------------------------------------------


# -- Redis ---------------------------------------------------------------------------


# -- the stack -----------------------------------------------------------------------


def up(settings: Settings) -> None:
    """Start (or reuse) Redis, PostgreSQL and Kafka; raise :class:`StackError` if one fails.

    Synchronous, and it runs an event loop of its own to probe Kafka: call it from
    a CLI or a sync fixture, not from inside a running loop.
    """
    stack_dir(settings).mkdir(parents=True, exist_ok=True)
    state = load_state(settings)
    for start in (redis_up, postgres_up, _kafka_up):
        start(settings, state)


def down(settings: Settings) -> None:
    """Stop what :func:`up` started; leave external services alone."""
    state = load_state(settings)
    for stop in (_kafka_down, postgres_down, redis_down):
        stop(settings, state)
        save_state(settings, state)


def status(settings: Settings) -> list[ServiceStatus]:
    state = load_state(settings)
    return [
        *_kafka_status(settings, state),
        postgres_status(settings, state),
        redis_status(settings, state),
    ]


@click.group("stack")
def stack() -> None:
    """The local Kafka, PostgreSQL and Redis on 127.0.0.1."""


@stack.command("up")
@click.option(
    "--brokers",
    type=click.IntRange(1, 5),
    default=None,
    help="Kafka nodes (default: WAL_STACK_BROKERS, 1); 3 for a cluster like production's.",
)
def up_command(brokers: int | None) -> None:
    """Start what is not running; reuse services already on their ports."""
    settings = Settings() if brokers is None else Settings(stack_brokers=brokers)
    up(settings)
    if settings.stack_brokers > 1:
        click.echo(f"kafka: cluster of {settings.stack_brokers}; WAL_BROKER={bootstrap(settings)}")


@stack.command("down")
def down_command() -> None:
    """Stop the services `up` started."""
    down(Settings())
    click.echo("stack: down")


@stack.command("status")
@click.option("--brokers", type=click.IntRange(1, 5), default=None, help="As for `up`.")
def status_command(brokers: int | None) -> None:
    """Show what runs where; exit 1 when a service is down."""
    services = status(Settings() if brokers is None else Settings(stack_brokers=brokers))
    for service in services:
        click.echo(service.line())
    if not all(service.running for service in services):
        raise SystemExit(1)


if __name__ == "__main__":
    stack(prog_name="wal stack")
