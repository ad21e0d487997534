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
import logging
import shutil
import subprocess
import time
import uuid
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


def _kafka_port(settings: Settings) -> int:
    host, port = settings.broker_host_port
    if host not in (HOST, "localhost"):
        raise StackError(f"kafka: WAL_BROKER points at {host}; the local stack runs on {HOST}")
    return port


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


def _kafka_configure(settings: Settings, kdir: Path, port: int) -> Path:
    template = Template((DEPLOY_DIR / "kafka" / "server.properties").read_text())
    props = kdir / "server.properties"
    props.write_text(
        template.substitute(host=HOST, port=port, controller_port=port + 1, data_dir=kdir / "data")
    )
    return props


def _cluster_id() -> str:
    """A Kafka cluster id: a random UUID, base64url, 22 characters, not starting with '-'."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cid.startswith("-"):
            return cid


def _java(libs: Path, main: str, *args: str, jvm: tuple[str, ...] = ()) -> list[str]:
    return ["java", *jvm, "-cp", f"{libs}/*", main, *args]


def _kafka_format(libs: Path, props: Path, data: Path) -> None:
    if (data / "meta.properties").exists():
        return
    cmd = _java(libs, "kafka.tools.StorageTool", "format", "-t", _cluster_id(), "-c", str(props))
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise StackError(f"kafka: formatting {data} failed:\n{done.stdout}{done.stderr}")


def _kafka_spawn(libs: Path, kdir: Path, props: Path) -> subprocess.Popen[bytes]:
    log4j = DEPLOY_DIR / "kafka" / "log4j2.yaml"
    jvm = ("-Xms256m", "-Xmx1g", f"-Dkafka.logs.dir={kdir}", f"-Dlog4j2.configurationFile={log4j}")
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
    port, kdir = _kafka_port(settings), stack_dir(settings) / "kafka"
    pid = read_pid(kdir / "kafka.pid")
    if "kafka" in state and alive(pid, "kafka.Kafka"):
        click.echo(f"kafka: already running on {HOST}:{port} (pid {pid})")
        return
    if port_open(port):
        click.echo(f"kafka: reusing what listens on {HOST}:{port} (external)")
        return
    if port_open(port + 1):
        raise StackError(f"kafka: the controller port {HOST}:{port + 1} is taken")
    started = time.monotonic()
    libs = _kafka_libs(settings)
    kdir.mkdir(parents=True, exist_ok=True)
    props = _kafka_configure(settings, kdir, port)
    _kafka_format(libs, props, kdir / "data")
    log = kdir / "server.log"
    offset = log.stat().st_size if log.exists() else 0
    proc = _kafka_spawn(libs, kdir, props)
    (kdir / "kafka.pid").write_text(f"{proc.pid}\n")
    state["kafka"] = {"pid_file": str(kdir / "kafka.pid")}
    save_state(settings, state)
    _kafka_wait(proc, port, kdir, offset)
    took = time.monotonic() - started
    click.echo(f"kafka: ready on {HOST}:{port} (pid {proc.pid}) in {took:.1f} s")


def _kafka_down(settings: Settings, state: State) -> None:
    if state.pop("kafka", None) is None:
        return
    pid_file = stack_dir(settings) / "kafka" / "kafka.pid"
    pid = read_pid(pid_file)
    if alive(pid, "kafka.Kafka"):
        assert pid is not None
        stop_pid(pid, "kafka.Kafka", KAFKA_STOP_S)
        click.echo(f"kafka: stopped (pid {pid})")
    pid_file.unlink(missing_ok=True)


def _kafka_status(settings: Settings, state: State) -> ServiceStatus:
    kdir = stack_dir(settings) / "kafka"
    pid = read_pid(kdir / "kafka.pid")
    ours = pid if "kafka" in state and alive(pid, "kafka.Kafka") else None
    return status_of("kafka", _kafka_port(settings), ours, kdir / "server.log")


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
    return [check(settings, state) for check in (_kafka_status, postgres_status, redis_status)]


@click.group("stack")
def stack() -> None:
    """The local Kafka, PostgreSQL and Redis on 127.0.0.1."""


@stack.command("up")
def up_command() -> None:
    """Start what is not running; reuse services already on their ports."""
    up(Settings())


@stack.command("down")
def down_command() -> None:
    """Stop the services `up` started."""
    down(Settings())
    click.echo("stack: down")


@stack.command("status")
def status_command() -> None:
    """Show what runs where; exit 1 when a service is down."""
    services = status(Settings())
    for service in services:
        click.echo(service.line())
    if not all(service.running for service in services):
        raise SystemExit(1)


if __name__ == "__main__":
    stack(prog_name="wal stack")
