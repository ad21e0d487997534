"""The ``wal`` command line: worker, local stack, namespaces, produce.

Commands import the Faust app lazily, so ``wal stack`` works without Kafka.
"""

from __future__ import annotations

import asyncio
import copy
import gc
import hashlib
import logging.config
import sys
from pathlib import Path
from typing import IO, Any

import click
import orjson
import yaml
from pydantic import ValidationError

from app.audit import audit
from app.settings import Settings


@click.group()
def main() -> None:
    """WAL fleet: a Kafka-native write-ahead-log worker fleet."""


@main.command()
@click.option("--loglevel", "-l", default=None, help="Log level (default: WAL_LOG_LEVEL).")
def worker(loglevel: str | None) -> None:
    """Run a worker of the fleet (a Faust worker) in the foreground."""
    from app.engine.admin import ensure_topics
    from app.engine.worker import FleetWorker
    from app.fleet import discover, fleet, settings
    from app.logs import logging_config

    level = loglevel or settings.log_level
    config = logging_config(settings.log_format, level)
    if config:  # until the worker applies it again (dictConfig consumes its argument)
        logging.config.dictConfig(copy.deepcopy(config))
    else:
        logging.basicConfig(level=level.upper())
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    created = asyncio.run(ensure_topics(settings))
    if created:
        logging.getLogger("wal.worker").info("created topics: %s", ", ".join(created))
    discover()
    runner = FleetWorker(
        fleet,
        shutdown_timeout_s=settings.shutdown_timeout_s,
        loglevel=level,
        logging_config=config,
        quiet=settings.log_format == "json",  # no banner among the JSON lines
    )
    # Faust's terminal spinner, at WARNING and above, sets the root logger to DEBUG
    # so that every record spins it: aiokafka's per-fetch debug records then cost a
    # fifth of a busy worker's CPU (py-spy), and the handler drops them anyway.
    runner.spinner = None
    # A batch allocates thousands of short-lived dicts and records; at Python's default
    # thresholds (700, 10, 10) the cyclic collector ran every few hundred of them and
    # walked the long-lived startup objects too. Those are frozen out of collection,
    # and a collection waits for 20 000 allocations: ~10 % less CPU per message on a
    # backlog (113 → 97-103 µs, tests/bench). Reference counting frees the rest at once.
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    runner.execute_from_commandline()


#: The worker's cyclic garbage collector thresholds (see ``worker``).
GC_THRESHOLDS = (20_000, 20, 20)


# -- namespaces ----------------------------------------------------------------------------


@main.group()
def namespaces() -> None:
    """Apply, list and delete namespace configs (the compacted namespaces topic)."""


@namespaces.command("apply")
@click.option(
    "-f",
    "--file",
    "path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="YAML or JSON: one namespace, a list, or {namespaces: [...]}.",
)
@click.option("--dry-run", is_flag=True, help="Validate and show the changes; write nothing.")
def namespaces_apply(path: Path, dry_run: bool) -> None:
    """Validate every namespace in FILE, print what changes, then write them."""
    from app.ops import client

    docs = _load_namespaces(path)
    try:
        parsed = [client.validate(doc) for doc in docs]
    except ValidationError as exc:
        raise click.ClickException(f"{path}: invalid namespace config:\n{exc}") from None
    s = Settings()
    caller = None if dry_run else client.admin_caller(s, "namespaces.apply")
    changes = asyncio.run(client.apply(s, parsed, dry_run=dry_run))
    for name, change in changes:
        click.echo(f"{change:>9}  {name}")
    if dry_run:
        click.echo("(dry run: nothing written)")
    elif caller is not None:
        changed = [f"{name}:{change}" for name, change in changes if change != "unchanged"]
        audit(caller, "namespaces.apply", namespaces=",".join(changed) or "(none)")


@namespaces.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the configs as JSON.")
def namespaces_list(as_json: bool) -> None:
    """List the namespaces on the namespaces topic."""
    from app.ops import client

    current = asyncio.run(client.read_all(Settings()))
    if as_json:
        click.echo(
            orjson.dumps(
                [ns.model_dump(mode="json") for ns in current.values()], option=orjson.OPT_INDENT_2
            ).decode()
        )
        return
    for name, ns in sorted(current.items()):
        targets = ",".join(f"{t.identifier}:{t.type}" for t in ns.targets) or "journal:sql"
        state = "enabled" if ns.enabled else "disabled"
        click.echo(f"{name:<30} {state:<8} targets={targets}")


@namespaces.command("delete")
@click.argument("names", nargs=-1, required=True)
def namespaces_delete(names: tuple[str, ...]) -> None:
    """Delete namespaces (a tombstone on the namespaces topic)."""
    from app.ops import client

    s = Settings()
    caller = client.admin_caller(s, "namespaces.delete")
    deleted = [n.strip().lower() for n in names]
    asyncio.run(client.delete(s, deleted))
    audit(caller, "namespaces.delete", namespaces=",".join(deleted))
    for name in names:
        click.echo(f"  deleted  {name}")


@namespaces.command("pause")
@click.argument("name")
@click.option("--target", default=None, help="Pause this target only (default: every one).")
@click.option("--reason", default="", help="Why (shown in the views and the dashboard).")
def namespaces_pause(name: str, target: str | None, reason: str) -> None:
    """Pause deliveries of namespace NAME (or of one target): writes are accepted and
    wait in Kafka until `wal namespaces resume`."""
    import time

    from app.models import Pause
    from app.ops import client

    s = Settings()
    caller = client.admin_caller(s, "namespaces.pause")
    name = name.strip().lower()
    pause = Pause(reason=reason, since_ms=int(time.time() * 1000), by=str(caller))
    _, changed = asyncio.run(client.set_pause(s, name, target, pause))
    audit(caller, "namespaces.pause", namespace=name, target=target, reason=reason or None)
    what = f"{name}/{target}" if target else name
    click.echo(f"   paused  {what}" if changed else f"  already paused  {what}")


@namespaces.command("resume")
@click.argument("name")
@click.option("--target", default=None, help="Resume this target only.")
def namespaces_resume(name: str, target: str | None) -> None:
    """Resume deliveries of namespace NAME (or of one target) paused by `pause`: what
    waited goes, an ``ordering: key`` namespace's in each key's order."""
    from app.ops import client

    s = Settings()
    caller = client.admin_caller(s, "namespaces.resume")
    name = name.strip().lower()
    _, changed = asyncio.run(client.set_pause(s, name, target, None))
    audit(caller, "namespaces.resume", namespace=name, target=target)
    what = f"{name}/{target}" if target else name
    click.echo(f"  resumed  {what}" if changed else f"  not paused  {what}")


@namespaces.command("hash-key")
@click.argument("api_key", required=False)
def namespaces_hash_key(api_key: str | None) -> None:
    """Print the hash of an API key for accessControl.allowedApiKeys (reads stdin if omitted)."""
    key = api_key if api_key is not None else sys.stdin.readline().strip()
    if not key:
        raise click.ClickException("no API key given")
    click.echo(f"sha256:{hashlib.sha256(key.encode()).hexdigest()}")


def _load_namespaces(path: Path) -> list[dict[str, Any]]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise click.ClickException(f"{path}: not YAML/JSON: {exc}") from None
    if isinstance(data, dict) and "namespaces" in data:
        data = data["namespaces"]
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
        raise click.ClickException(
            f"{path}: expected a namespace, a list of them, or {{namespaces: [...]}}"
        )
    return data


# -- schemas -------------------------------------------------------------------------------


@main.command()
@click.option("--check", is_flag=True, help="Exit 1 if the files differ from the models.")
def schemas(check: bool) -> None:
    """Write (or check) the JSON Schema files in app/schemas/ from the wire models."""
    from app.models import SCHEMA_FILES, json_schema

    folder = Path(__file__).resolve().parent.parent / "schemas"
    folder.mkdir(exist_ok=True)
    stale = []
    for name, model in SCHEMA_FILES.items():
        text = orjson.dumps(json_schema(model), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
        path = folder / name
        if check:
            if not path.exists() or path.read_bytes() != text + b"\n":
                stale.append(name)
        else:
            path.write_bytes(text + b"\n")
            click.echo(f"wrote {path}")
    if stale:
        raise click.ClickException(f"stale schema files: {', '.join(stale)}; run `wal schemas`")


# -- messages ------------------------------------------------------------------------------


@main.group()
def messages() -> None:
    """Messages by id: cancel one before it is delivered."""


@messages.command("cancel")
@click.argument("message_id")
@click.option("--url", help="A worker's web server (default: WAL_ADMIN_URL, else the local one).")
def messages_cancel(message_id: str, url: str | None) -> None:
    """Cancel MESSAGE_ID if it has not been delivered (pending, delayed or retrying): it is
    then never delivered. Prints the outcome - cancelled, delivered (cancellation lost
    the race), partially cancelled, or pending - and exits 1 unless it is cancelled.
    Needs WAL_ADMIN_API_KEY."""
    import httpx

    from app.ops.backfill import refusal

    s = Settings()
    key = s.admin_api_key.get_secret_value()
    if not key:
        raise click.ClickException("wal messages cancel needs an admin key: set WAL_ADMIN_API_KEY")
    where = f"{(url or s.worker_url).rstrip('/')}/wal/messages/{message_id}"
    try:
        answer = httpx.delete(where, headers={"X-API-Key": key}, timeout=60.0)
    except httpx.HTTPError as exc:
        raise click.ClickException(f"{where}: {type(exc).__name__}: {exc}") from None
    if answer.status_code != 200:
        raise click.ClickException(refusal(answer))
    word = answer.json()["outcome"]
    click.echo(f"{message_id}: {word}")
    if word != "cancelled":
        sys.exit(1)


# -- produce -------------------------------------------------------------------------------


@main.command()
@click.argument("source", type=click.File("rb"), default="-")
@click.option("--topic", default=None, help="Topic (default: the ingest topic).")
@click.option(
    "--key",
    "key_field",
    default=None,
    help="Dotted path in each request whose value becomes the record key.",
)
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
def produce(source: IO[bytes], topic: str | None, key_field: str | None, progress: bool) -> None:
    """Produce JSON write requests, one per line, from SOURCE (a file, or - for stdin)."""
    from app.ops import client

    settings = Settings()
    sent = asyncio.run(
        client.produce_lines(
            settings, source, topic or settings.topic("ingest"), key_field, progress
        )
    )
    click.echo(f"produced {sent} records", err=True)


def _mount_optional_groups() -> None:
    from app.ops.backfill import backfill
    from app.ops.dlq import dlq
    from app.ops.stack import stack

    main.add_command(stack)
    main.add_command(dlq)
    main.add_command(backfill)


_mount_optional_groups()
