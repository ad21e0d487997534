"""PostgreSQL and Redis of the local stack: started on loopback when nothing answers on
their ports (reused, "external", when something does), stopped only when this stack
started them. As root (CI), PostgreSQL runs as the ``postgres`` OS user: it refuses root."""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import subprocess
import time
from pathlib import Path

import click
import psycopg
import redis

from app.ops.services import (
    HOST,
    ServiceStatus,
    StackError,
    State,
    alive,
    log_tail,
    port_open,
    read_pid,
    save_state,
    stack_dir,
    status_of,
    stop_pid,
)
from app.settings import Settings

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


REDIS_READY_S = 20.0


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
    stack = stack_dir(settings)
    reach = subprocess.run(_as_postgres(["test", "-x", str(stack)]), capture_output=True)
    if reach.returncode == 0:
        return stack / "postgres"
    digest = hashlib.sha256(str(stack).encode()).hexdigest()[:12]
    return Path(f"/var/tmp/wal-stack-{digest}/postgres")


def _pg_run(cmd: list[str], what: str, log: Path | None = None) -> str:
    done = subprocess.run(_as_postgres(cmd), capture_output=True, text=True)
    if done.returncode != 0:
        logs = f"\n{log_tail(log)}" if log else ""
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
    pid = read_pid(Path(state["postgres"]["root"]) / "data" / "postmaster.pid")
    return pid if alive(pid, "postgres") else None


def postgres_up(settings: Settings, state: State) -> None:
    port = settings.postgres_port
    if (pid := _pg_pid(state)) is not None:
        click.echo(f"postgres: already running on {HOST}:{port} (pid {pid})")
        return
    if port_open(port):
        _pg_external(port)
        return
    started = time.monotonic()
    root = _pg_root(settings, state)
    data, log = root / "data", root / "postgres.log"
    _pg_init(root, data, port)
    state["postgres"] = {"root": str(root)}
    save_state(settings, state)
    bindir = _pg_bin(data)
    pg_ctl = [str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60"]
    _pg_run([*pg_ctl, "start"], "pg_ctl start", log)
    _pg_ensure_role(bindir / "psql", data, port)
    if not _pg_wal_login(port):
        raise StackError(f"postgres: started, but wal/wal cannot log in\n{log_tail(log)}")
    took = time.monotonic() - started
    click.echo(f"postgres: ready on {HOST}:{port} (pid {_pg_pid(state)}) in {took:.1f} s")
    if root.parent != stack_dir(settings):
        click.echo(f"postgres: data in {root}: the postgres user cannot reach the stack dir")


def postgres_down(settings: Settings, state: State) -> None:
    pid = _pg_pid(state)
    entry = state.pop("postgres", None)
    if entry is None or pid is None:
        return
    data = Path(entry["root"]) / "data"
    _pg_run([str(_pg_bin(data) / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"], "stop")
    click.echo(f"postgres: stopped (pid {pid})")


def postgres_status(settings: Settings, state: State) -> ServiceStatus:
    root = Path(state["postgres"]["root"]) if "postgres" in state else None
    note = f"data in {root}" if root and root.parent != stack_dir(settings) else ""
    log = root / "postgres.log" if root else None
    return status_of("postgres", settings.postgres_port, _pg_pid(state), log, note)


def _redis_ping(port: int) -> bool:
    client = redis.Redis(host=HOST, port=port, socket_timeout=1, socket_connect_timeout=1)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def _redis_pid(settings: Settings, state: State) -> int | None:
    pid = read_pid(stack_dir(settings) / "redis" / "redis.pid")
    return pid if "redis" in state and alive(pid, "redis-server") else None


def redis_up(settings: Settings, state: State) -> None:
    port, rdir = settings.redis_port, stack_dir(settings) / "redis"
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
    save_state(settings, state)
    while not _redis_ping(port):
        if done.returncode != 0 or time.monotonic() - started > REDIS_READY_S:
            raise StackError(f"redis: did not answer PING\n{done.stderr}{log_tail(log)}")
        time.sleep(0.1)
    took = time.monotonic() - started
    click.echo(f"redis: ready on {HOST}:{port} (pid {_redis_pid(settings, state)}) in {took:.1f} s")


def redis_down(settings: Settings, state: State) -> None:
    pid = _redis_pid(settings, state)
    if state.pop("redis", None) is None or pid is None:
        return
    stop_pid(pid, "redis-server", 10.0)  # SIGTERM: Redis flushes its AOF and exits
    click.echo(f"redis: stopped (pid {pid})")


def redis_status(settings: Settings, state: State) -> ServiceStatus:
    log = stack_dir(settings) / "redis" / "redis.log"
    return status_of("redis", settings.redis_port, _redis_pid(settings, state), log)
