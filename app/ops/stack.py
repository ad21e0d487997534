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
import hashlib
import itertools
import json
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from string import Template

import click
import psycopg
import redis
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from app.settings import Settings

HOST = "127.0.0.1"
DEPLOY_DIR = Path(__file__).resolve().parents[2] / "deploy" / "local"
KAFKA_READY_S = 60.0
KAFKA_STOP_S = 30.0
REDIS_READY_S = 20.0
LOG_TAIL_LINES = 30
PG_LIB = Path("/usr/lib/postgresql")
PG_DEBIAN_SOCKETS = Path("/var/run/postgresql")
PG_WAL_DSN = "host={host} port={port} user=wal password=wal dbname=wal connect_timeout=3"
PG_ROLE_SQL = """DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'wal') THEN
    CREATE ROLE wal LOGIN CREATEDB PASSWORD 'wal';
  END IF;
END $$;"""
PG_CONF = """# Written by app/ops/stack.py on every `wal stack up`.
listen_addresses = '{host}'
port = {port}
unix_socket_directories = '{sockets}'
max_connections = 200
shared_buffers = 256MB
synchronous_commit = on
"""

REDIS_CONF = """# Written by app/ops/stack.py on every `wal stack up`.
bind {host}
port {port}
daemonize yes
dir "{dir}"
pidfile "{dir}/redis.pid"
logfile "{dir}/redis.log"
save ""
appendonly yes
appendfsync everysec
"""

State = dict[str, dict[str, str]]
"""``state.json``: the services ``up`` started, with the paths ``down`` needs."""


class StackError(click.ClickException):
    """A service did not come up; the message ends with the tail of its log."""


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    pid: int | str
    """The pid of the process ``up`` started, ``"external"``, or ``"-"``."""
    address: str
    running: bool
    log: Path | None
    note: str = ""

    def line(self) -> str:
        state = "running" if self.running else "down"
        log = f"  log {self.log}" if self.log else ""
        note = f"  ({self.note})" if self.note else ""
        line = f"{self.name:<11}{state:<9}{self.address:<17}pid {self.pid!s:<10}{log}{note}"
        return line.rstrip()


# -- processes, ports, files ---------------------------------------------------------


def _stack_dir(settings: Settings) -> Path:
    return settings.stack_dir.expanduser().resolve()


def _load_state(settings: Settings) -> State:
    path = _stack_dir(settings) / "state.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _save_state(settings: Settings, state: State) -> None:
    path = _stack_dir(settings) / "state.json"
    if state:
        path.write_text(json.dumps(state, indent=2) + "\n")
    else:
        path.unlink(missing_ok=True)


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((HOST, port)) == 0


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int | None, marker: str) -> bool:
    """Whether ``pid`` runs a command line containing ``marker``.

    The marker guards against a reused pid; a zombie has an empty command line.
    """
    if pid is None:
        return False
    try:
        return marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _stop_pid(pid: int, marker: str, timeout: float) -> None:
    """SIGTERM, wait up to ``timeout`` seconds, then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        if not _alive(pid, marker):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while _alive(pid, marker) and time.monotonic() < deadline:
            time.sleep(0.2)


def _tail(*paths: Path) -> str:
    parts = []
    for path in paths:
        try:
            with path.open("rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - 65536))
                lines = f.read().decode(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        except OSError:
            continue
        if lines:
            parts.append(f"--- last lines of {path} ---\n" + "\n".join(lines))
    return "\n".join(parts) or "(no log output)"


def _is_error(prev: str, line: str) -> bool:
    """An ERROR line, a cause, or the exception message right below an ERROR line."""
    if " ERROR " in line or " FATAL " in line or line.startswith("Caused by"):
        return True
    return " ERROR " in prev and not line.startswith(("[", "\t", " "))


def _errors(path: Path, offset: int) -> str:
    """The ERROR lines and causes ``path`` gained past ``offset``: Kafka buries them fast."""
    try:
        with path.open("rb") as f:
            f.seek(offset)
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    hits = [line for prev, line in itertools.pairwise(["", *lines]) if _is_error(prev, line)]
    return "--- errors ---\n" + "\n".join(hits[:LOG_TAIL_LINES]) + "\n" if hits else ""


def _status(
    name: str, port: int, pid: int | None, log: Path | None, note: str = ""
) -> ServiceStatus:
    running = _port_open(port)
    shown: int | str = pid if pid is not None else ("external" if running else "-")
    return ServiceStatus(name, shown, f"{HOST}:{port}", running, log if pid else None, note)


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
        admin = AIOKafkaAdminClient(bootstrap_servers=f"{HOST}:{port}", request_timeout_ms=5000)
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
        if _port_open(port) and _kafka_answers(port):
            return
        time.sleep(0.5)
    if proc.poll() is None:
        _stop_pid(proc.pid, "kafka.Kafka", 5.0)
        what = f"not ready within {KAFKA_READY_S:.0f} s; stopped it"
    else:
        what = f"exited with status {proc.returncode}"
    logs = _errors(kdir / "server.log", offset) + _tail(kdir / "server.log", kdir / "kafka.out")
    raise StackError(f"kafka: {what}\n{logs}")


def _kafka_up(settings: Settings, state: State) -> None:
    port, kdir = _kafka_port(settings), _stack_dir(settings) / "kafka"
    pid = _read_pid(kdir / "kafka.pid")
    if "kafka" in state and _alive(pid, "kafka.Kafka"):
        click.echo(f"kafka: already running on {HOST}:{port} (pid {pid})")
        return
    if _port_open(port):
        click.echo(f"kafka: reusing what listens on {HOST}:{port} (external)")
        return
    if _port_open(port + 1):
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
    _save_state(settings, state)
    _kafka_wait(proc, port, kdir, offset)
    took = time.monotonic() - started
    click.echo(f"kafka: ready on {HOST}:{port} (pid {proc.pid}) in {took:.1f} s")


def _kafka_down(settings: Settings, state: State) -> None:
    if state.pop("kafka", None) is None:
        return
    pid_file = _stack_dir(settings) / "kafka" / "kafka.pid"
    pid = _read_pid(pid_file)
    if _alive(pid, "kafka.Kafka"):
        assert pid is not None
        _stop_pid(pid, "kafka.Kafka", KAFKA_STOP_S)
        click.echo(f"kafka: stopped (pid {pid})")
    pid_file.unlink(missing_ok=True)


def _kafka_status(settings: Settings, state: State) -> ServiceStatus:
    kdir = _stack_dir(settings) / "kafka"
    pid = _read_pid(kdir / "kafka.pid")
    ours = pid if "kafka" in state and _alive(pid, "kafka.Kafka") else None
    return _status("kafka", _kafka_port(settings), ours, kdir / "server.log")


# -- PostgreSQL ----------------------------------------------------------------------


def _as_postgres(cmd: list[str]) -> list[str]:
    """PostgreSQL's tools refuse to run as root: run them as the ``postgres`` user."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _chown_postgres(path: Path) -> None:
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(path, user.pw_uid, user.pw_gid)


def _pg_bin(data: Path | None = None) -> Path:
    """The server binaries: those matching ``data``'s cluster, else the newest installed."""
    if data is not None and (data / "PG_VERSION").exists():
        matching = PG_LIB / (data / "PG_VERSION").read_text().strip() / "bin"
        if matching.exists():
            return matching
    found = sorted(PG_LIB.glob("*/bin/initdb"), key=lambda p: float(p.parent.parent.name))
    if not found:
        raise StackError(f"postgres: no server under {PG_LIB}; run deploy/local/install-deps.sh")
    return found[-1].parent


def _pg_root(settings: Settings, state: State) -> Path:
    """``<stack_dir>/postgres``, or a /var/tmp dir when the ``postgres`` user cannot reach it."""
    if "postgres" in state:
        return Path(state["postgres"]["root"])
    stack = _stack_dir(settings)
    reach = subprocess.run(_as_postgres(["test", "-x", str(stack)]), capture_output=True)
    if reach.returncode == 0:
        return stack / "postgres"
    digest = hashlib.sha256(str(stack).encode()).hexdigest()[:12]
    return Path(f"/var/tmp/wal-stack-{digest}/postgres")


def _pg_run(cmd: list[str], what: str, log: Path | None = None) -> str:
    done = subprocess.run(_as_postgres(cmd), capture_output=True, text=True)
    if done.returncode != 0:
        logs = f"\n{_tail(log)}" if log else ""
        raise StackError(f"postgres: {what} failed:\n{done.stdout}{done.stderr}{logs}")
    return done.stdout


def _pg_wal_login(port: int) -> bool:
    try:
        with psycopg.connect(PG_WAL_DSN.format(host=HOST, port=port)):
            return True
    except psycopg.Error:
        return False


def _pg_ensure_role(psql: Path, sockets: Path, port: int) -> None:
    """Role ``wal`` (password ``wal``) and its database ``wal``, as superuser over the socket."""
    flags = ["-X", "-q", "-v", "ON_ERROR_STOP=1", "-U", "postgres", "-d", "postgres"]
    base = [str(psql), *flags, "-h", str(sockets), "-p", str(port)]
    _pg_run([*base, "-c", PG_ROLE_SQL], "creating role wal")
    exists = _pg_run([*base, "-tAc", "SELECT 1 FROM pg_database WHERE datname = 'wal'"], "psql")
    if exists.strip() != "1":
        _pg_run([*base, "-c", "CREATE DATABASE wal OWNER wal"], "creating database wal")


def _pg_external(port: int) -> None:
    click.echo(f"postgres: reusing what listens on {HOST}:{port} (external)")
    if _pg_wal_login(port):
        return
    if os.geteuid() == 0 and (PG_DEBIAN_SOCKETS / f".s.PGSQL.{port}").exists():
        _pg_ensure_role(_pg_bin() / "psql", PG_DEBIAN_SOCKETS, port)
        return
    click.echo(
        f"postgres: cannot log in as wal/wal on {HOST}:{port} and cannot fix it from here; "
        "as a superuser run: CREATE ROLE wal LOGIN CREATEDB PASSWORD 'wal'; "
        "CREATE DATABASE wal OWNER wal;",
        err=True,
    )


def _pg_init(root: Path, data: Path, port: int) -> None:
    """initdb once; rewrite ``wal.conf`` (included from postgresql.conf) on every start."""
    if not (data / "PG_VERSION").exists():
        root.mkdir(parents=True, exist_ok=True)
        _chown_postgres(root)
        initdb = [
            str(_pg_bin() / "initdb"),
            "-D",
            str(data),
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--locale=C",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
        ]
        _pg_run(initdb, "initdb")
        with (data / "postgresql.conf").open("a") as conf:
            conf.write("\ninclude_if_exists = 'wal.conf'\n")
    (data / "wal.conf").write_text(PG_CONF.format(host=HOST, port=port, sockets=data))
    _chown_postgres(data / "wal.conf")


def _pg_pid(state: State) -> int | None:
    if "postgres" not in state:
        return None
    pid = _read_pid(Path(state["postgres"]["root"]) / "data" / "postmaster.pid")
    return pid if _alive(pid, "postgres") else None


def _postgres_up(settings: Settings, state: State) -> None:
    port = settings.postgres_port
    if (pid := _pg_pid(state)) is not None:
        click.echo(f"postgres: already running on {HOST}:{port} (pid {pid})")
        return
    if _port_open(port):
        _pg_external(port)
        return
    started = time.monotonic()
    root = _pg_root(settings, state)
    data, log = root / "data", root / "postgres.log"
    _pg_init(root, data, port)
    state["postgres"] = {"root": str(root)}
    _save_state(settings, state)
    bindir = _pg_bin(data)
    pg_ctl = [str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60"]
    _pg_run([*pg_ctl, "start"], "pg_ctl start", log)
    _pg_ensure_role(bindir / "psql", data, port)
    if not _pg_wal_login(port):
        raise StackError(f"postgres: started, but wal/wal cannot log in\n{_tail(log)}")
    took = time.monotonic() - started
    click.echo(f"postgres: ready on {HOST}:{port} (pid {_pg_pid(state)}) in {took:.1f} s")
    if root.parent != _stack_dir(settings):
        click.echo(f"postgres: data in {root}: the postgres user cannot reach the stack dir")


def _postgres_down(settings: Settings, state: State) -> None:
    pid = _pg_pid(state)
    entry = state.pop("postgres", None)
    if entry is None or pid is None:
        return
    data = Path(entry["root"]) / "data"
    _pg_run([str(_pg_bin(data) / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"], "stop")
    click.echo(f"postgres: stopped (pid {pid})")


def _postgres_status(settings: Settings, state: State) -> ServiceStatus:
    root = Path(state["postgres"]["root"]) if "postgres" in state else None
    note = f"data in {root}" if root and root.parent != _stack_dir(settings) else ""
    log = root / "postgres.log" if root else None
    return _status("postgres", settings.postgres_port, _pg_pid(state), log, note)


# -- Redis ---------------------------------------------------------------------------


def _redis_ping(port: int) -> bool:
    client = redis.Redis(host=HOST, port=port, socket_timeout=1, socket_connect_timeout=1)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def _redis_pid(settings: Settings, state: State) -> int | None:
    pid = _read_pid(_stack_dir(settings) / "redis" / "redis.pid")
    return pid if "redis" in state and _alive(pid, "redis-server") else None


def _redis_up(settings: Settings, state: State) -> None:
    port, rdir = settings.redis_port, _stack_dir(settings) / "redis"
    if (pid := _redis_pid(settings, state)) is not None:
        click.echo(f"redis: already running on {HOST}:{port} (pid {pid})")
        return
    if _redis_ping(port):
        click.echo(f"redis: reusing what answers on {HOST}:{port} (external)")
        return
    server = shutil.which("redis-server")
    if server is None:
        raise StackError("redis: no redis-server; run deploy/local/install-deps.sh")
    rdir.mkdir(parents=True, exist_ok=True)
    log = rdir / "redis.log"
    conf = rdir / "redis.conf"
    conf.write_text(REDIS_CONF.format(host=HOST, port=port, dir=rdir))
    started = time.monotonic()
    done = subprocess.run([server, str(conf)], capture_output=True, text=True)
    state["redis"] = {"pid_file": str(rdir / "redis.pid")}
    _save_state(settings, state)
    while not _redis_ping(port):
        if done.returncode != 0 or time.monotonic() - started > REDIS_READY_S:
            raise StackError(f"redis: did not answer PING\n{done.stderr}{_tail(log)}")
        time.sleep(0.1)
    took = time.monotonic() - started
    click.echo(f"redis: ready on {HOST}:{port} (pid {_redis_pid(settings, state)}) in {took:.1f} s")


def _redis_down(settings: Settings, state: State) -> None:
    pid = _redis_pid(settings, state)
    if state.pop("redis", None) is None or pid is None:
        return
    _stop_pid(pid, "redis-server", 10.0)  # SIGTERM: Redis flushes its AOF and exits
    click.echo(f"redis: stopped (pid {pid})")


def _redis_status(settings: Settings, state: State) -> ServiceStatus:
    log = _stack_dir(settings) / "redis" / "redis.log"
    return _status("redis", settings.redis_port, _redis_pid(settings, state), log)


# -- the stack -----------------------------------------------------------------------


def up(settings: Settings) -> None:
    """Start (or reuse) Redis, PostgreSQL and Kafka; raise :class:`StackError` if one fails.

    Synchronous, and it runs an event loop of its own to probe Kafka: call it from
    a CLI or a sync fixture, not from inside a running loop.
    """
    _stack_dir(settings).mkdir(parents=True, exist_ok=True)
    state = _load_state(settings)
    for start in (_redis_up, _postgres_up, _kafka_up):
        start(settings, state)


def down(settings: Settings) -> None:
    """Stop what :func:`up` started; leave external services alone."""
    state = _load_state(settings)
    for stop in (_kafka_down, _postgres_down, _redis_down):
        stop(settings, state)
        _save_state(settings, state)


def status(settings: Settings) -> list[ServiceStatus]:
    state = _load_state(settings)
    return [check(settings, state) for check in (_kafka_status, _postgres_status, _redis_status)]


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
