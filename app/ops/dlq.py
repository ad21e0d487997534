"""Dead-letter redrive: ``wal dlq list|show|replay``.

A dead letter is a record on the DLQ topic: the original key, the original
value bytes unchanged, and the reason in ``wal-*`` headers (ARCHITECTURE.md
§3). These commands read the DLQ with a plain consumer from the beginning to
the end it had when the command started: no consumer group, nothing
committed, so reading never changes what the next reader sees.

``replay`` produces each chosen dead letter to the ingest topic again, with
its key, value and message id, without the failure headers, and with
``wal-replayed-from`` naming where it came from.

This module is mounted into every ``wal`` invocation: it uses header and topic
names from :mod:`app.names`, which builds no Faust app, so ``wal stack`` and
``wal --help`` stay free of Faust.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sys
import time
from collections.abc import AsyncGenerator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import click
import orjson
from tqdm import tqdm

from app import names
from app.audit import audit
from app.engine.clients import Consumer, KafkaError, Producer, TopicPartition, plain_consumer
from app.engine.reading import partitions_of, read_to_end
from app.errors import CODES
from app.ops.client import admin_caller, producer
from app.ops.letters import Filter, Letter, RawHeaders, Scope, parse_when, render
from app.rates import TokenBucket
from app.settings import Settings

#: A partition read that brings no record for this long means the broker is gone.
IDLE_TIMEOUT_S = 30.0
#: Most produced records awaiting their acknowledgement at once.
WINDOW = 500


def replay_headers(raw: Iterable[tuple[str, bytes]], replayed_from: str) -> RawHeaders:
    """The letter's headers minus the failure ones, plus ``wal-replayed-from``.

    Everything else (message id, namespace, source, traceparent …) is kept
    byte for byte, so ingest keeps the message id and targets dedupe on it.
    """

    dropped = {
        names.ERROR_CODE,
        names.ERROR_MESSAGE,
        names.ATTEMPT,
        names.FIRST_FAILED_AT,
        names.LAST_FAILED_AT,
        names.TARGET,
        names.DUE_AT,
        names.REPLAYED_FROM,
    }
    kept = [(k, v) for k, v in raw if k not in dropped]
    return [*kept, (names.REPLAYED_FROM, replayed_from.encode())]


# -- reading -------------------------------------------------------------------------


async def _ranges(
    consumer: Consumer, topic: str, at: tuple[int, int] | None
) -> dict[TopicPartition, tuple[int, int]]:
    """Offsets to read per partition: [beginning, current end), or just ``at``."""
    tps = await partitions_of(consumer, topic, refresh=True)
    if not tps:
        raise click.ClickException(f"topic {topic} does not exist")
    first, end = await consumer.beginning_offsets(tps), await consumer.end_offsets(tps)
    ranges = {tp: (first[tp], end[tp]) for tp in tps}
    if at is None:
        return ranges
    tp = TopicPartition(topic, at[0])
    lo, hi = ranges.get(tp, (0, 0))
    return {tp: (at[1], at[1] + 1)} if lo <= at[1] < hi else {}


async def _read(
    consumer: Consumer, tp: TopicPartition, start: int, end: int
) -> AsyncGenerator[Any, None]:
    try:
        async for batch in read_to_end(
            consumer, [tp], starts={tp: start}, ends={tp: end}, idle_timeout=IDLE_TIMEOUT_S
        ):
            for record in batch:
                yield record
    except TimeoutError:
        raise click.ClickException(f"no record from {tp.topic}/{tp.partition} in time") from None


async def scan(
    s: Settings, scope: Scope, at: tuple[int, int] | None = None
) -> AsyncGenerator[Letter, None]:
    """The dead letters of ``scope`` in partition/offset order (``at``: just that one).

    Close it (``contextlib.aclosing``) when leaving early: that stops the consumer.
    """
    consumer = plain_consumer(s)
    await consumer.start()
    try:
        found = 0
        for tp, (start, end) in (await _ranges(consumer, scope.topic, at)).items():
            async with contextlib.aclosing(_read(consumer, tp, start, end)) as records:
                async for record in records:
                    letter = Letter.of(record)
                    if not scope.filter.matches(letter):
                        continue
                    yield letter
                    found += 1
                    if scope.limit is not None and found >= scope.limit:
                        return
    finally:
        await consumer.stop()


async def collect(s: Settings, scope: Scope, at: tuple[int, int] | None = None) -> list[Letter]:
    async with contextlib.aclosing(scan(s, scope, at)) as letters:
        return [letter async for letter in letters]


# -- replay --------------------------------------------------------------------------


@dataclass
class Replayed:
    """How a replay went: produced and acknowledged, and what failed (coordinates, error)."""

    replayed: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)


async def replay(
    s: Settings, scope: Scope, to: str, *, rate: float | None, progress: bool
) -> Replayed:
    """Produce every letter of ``scope`` to ``to`` (acks=all, idempotent), paced by ``rate``.

    A failed record does not stop the others; it is counted in the result.
    """

    outcome = Replayed()
    bucket = TokenBucket(rate) if rate else None
    p = producer(s, linger_ms=5)
    await p.start()
    bar = tqdm(unit="msg", desc="replayed", disable=not progress)
    try:
        async with contextlib.aclosing(scan(s, scope)) as letters:
            pending: list[tuple[Letter, asyncio.Future[Any]]] = []
            async for letter in letters:
                if bucket is not None:
                    await bucket.wait()
                await _send(p, to, letter, pending, outcome, bar)
                if len(pending) >= WINDOW:
                    await _settle(pending, outcome)
            await _settle(pending, outcome)
    finally:
        bar.close()
        await p.stop()
    return outcome


async def _send(
    p: Producer,
    to: str,
    letter: Letter,
    pending: list[tuple[Letter, asyncio.Future[Any]]],
    outcome: Replayed,
    bar: tqdm[Any],
) -> None:
    origin = f"{letter.topic}/{letter.coordinates}"
    headers = replay_headers(letter.raw_headers, origin)
    try:
        future = await p.send(to, letter.value, key=letter.key, headers=headers)
    except KafkaError as exc:
        outcome.failed.append((origin, repr(exc)))
        return
    future.add_done_callback(lambda f: None if f.cancelled() or f.exception() else bar.update())
    pending.append((letter, future))


async def _settle(pending: list[tuple[Letter, asyncio.Future[Any]]], outcome: Replayed) -> None:
    results = await asyncio.gather(*(f for _, f in pending), return_exceptions=True)
    for (letter, _), result in zip(pending, results, strict=True):
        if isinstance(result, BaseException):
            outcome.failed.append((f"{letter.topic}/{letter.coordinates}", repr(result)))
        else:
            outcome.replayed += 1
    pending.clear()


# -- show ----------------------------------------------------------------------------


# -- command line --------------------------------------------------------------------


class When(click.ParamType):
    name = "TIME"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_when(str(value), int(time.time() * 1000))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def _codes(_ctx: click.Context, _param: click.Parameter, values: Sequence[str]) -> frozenset[str]:
    codes = frozenset(v.strip().upper() for v in values)
    unknown = sorted(codes - CODES.keys())
    if unknown:
        raise click.BadParameter(f"unknown {', '.join(unknown)}; codes: {', '.join(CODES)}")
    return codes


_SCOPE_OPTIONS = (
    click.option("--namespace", help="Only this namespace (wal-namespace)."),
    click.option(
        "--code",
        "codes",
        multiple=True,
        callback=_codes,
        metavar="CODE",
        help="Only this error code (wal-error-code); repeat for several.",
    ),
    click.option("--target", help="Only this target identifier (wal-target)."),
    click.option(
        "--since",
        type=When(),
        help="Failed at or after: ISO-8601 (UTC unless zoned) or ago (15m, 2h, 3d).",
    ),
    click.option("--until", type=When(), help="Failed before this: like --since."),
    click.option("--message-id", help="Only this message id (wal-message-id)."),
    click.option("--limit", type=click.IntRange(min=1), help="At most N dead letters."),
    click.option("--topic", help="The DLQ topic (default: <prefix>-dlq), or a namespace's own."),
)


def _scoped(command: Callable[..., None]) -> Callable[..., None]:
    """Add the filter options to ``command``, which gets them as ``s`` and ``scope``."""

    @functools.wraps(command)
    def wrapper(**kw: Any) -> None:
        namespace = kw.pop("namespace")
        flt = Filter(
            namespace=namespace.strip().lower() if namespace else None,
            codes=kw.pop("codes"),
            target=kw.pop("target"),
            since_ms=kw.pop("since"),
            until_ms=kw.pop("until"),
            message_id=kw.pop("message_id"),
        )
        s = Settings()
        topic, limit = kw.pop("topic"), kw.pop("limit")
        command(s=s, scope=Scope(topic or s.topic("dlq"), flt, limit), **kw)

    for option in reversed(_SCOPE_OPTIONS):
        wrapper = option(wrapper)
    return wrapper


@click.group()
def dlq() -> None:
    """List, inspect and replay dead letters (the DLQ topic; nothing is committed)."""


@dlq.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@_scoped
def list_(s: Settings, scope: Scope, as_json: bool) -> None:
    """One line per dead letter: partition/offset, time, code, namespace, target, id, error."""
    for letter in asyncio.run(collect(s, scope)):
        click.echo(orjson.dumps(letter.summary()).decode() if as_json else letter.line())


@dlq.command()
@click.argument("coordinates", metavar="[TOPIC/]PARTITION/OFFSET", required=False)
@_scoped
def show(s: Settings, scope: Scope, coordinates: str | None) -> None:
    """Print the headers and value of a dead letter (or of each one --message-id finds)."""
    if coordinates is None and scope.filter.message_id is None:
        raise click.UsageError("give PARTITION/OFFSET or --message-id")
    at = None
    if coordinates is not None:
        topic, at = _coordinates(coordinates)
        scope = Scope(topic or scope.topic, scope.filter, scope.limit)
    letters = asyncio.run(collect(s, scope, at))
    if not letters:
        raise click.ClickException(f"no matching dead letter on {scope.topic}")
    click.echo("\n\n".join(render(letter) for letter in letters))


def _coordinates(text: str) -> tuple[str | None, tuple[int, int]]:
    parts = text.split("/")
    if len(parts) not in (2, 3) or not all(p.isdigit() for p in parts[-2:]):
        raise click.BadParameter(f"{text!r} is not [TOPIC/]PARTITION/OFFSET")
    return (parts[0] if len(parts) == 3 else None), (int(parts[-2]), int(parts[-1]))


@dlq.command("replay")
@click.option("--to", "to", help="Topic to replay to (default: the ingest topic).")
@click.option("--dry-run", is_flag=True, help="Print what would be replayed; produce nothing.")
@click.option(
    "--rate",
    type=click.FloatRange(min=0, min_open=True),
    help="At most N messages a second (default: unlimited).",
)
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
@click.option("--yes", is_flag=True, help="Do not ask before replaying every dead letter.")
@_scoped
def replay_(
    s: Settings,
    scope: Scope,
    to: str | None,
    dry_run: bool,
    rate: float | None,
    progress: bool,
    yes: bool,
) -> None:
    """Produce the chosen dead letters to the ingest topic again, as they were.

    Same key and value bytes; the headers without the failure ones
    (wal-error-*, wal-attempt, wal-*-failed-at, wal-target, wal-due-at), plus
    wal-replayed-from: TOPIC/PARTITION/OFFSET. The message id is kept.

    At-least-once: the dead letters stay on the DLQ, so running replay twice
    replays them twice. Targets dedupe by message id; a dead letter without
    one (rejected before ingest gave it an id) may be applied twice.
    Exits 1 if any record could not be produced.
    """
    to = to or s.topic("ingest")
    if dry_run:
        letters = asyncio.run(collect(s, scope))
        for letter in letters:
            click.echo(letter.line())
        click.echo(f"dry run: would replay {len(letters)} dead letters to {to}", err=True)
        return
    if scope.filter.empty and scope.limit is None and not yes:
        _confirm(f"replay every dead letter on {scope.topic} to {to}?")
    caller = admin_caller(s, "dlq.replay")
    done = asyncio.run(replay(s, scope, to, rate=rate, progress=progress))
    audit(
        caller,
        "dlq.replay",
        "ok" if not done.failed else "failed",
        topic=scope.topic,
        to=to,
        replayed=done.replayed,
        failed=len(done.failed),
        **scope.filter.described(),
    )
    for origin, error in done.failed[:20]:
        click.echo(f"failed: {origin}: {error}", err=True)
    click.echo(f"replayed {done.replayed} dead letters from {scope.topic} to {to}")
    if done.failed:
        raise click.ClickException(f"{len(done.failed)} dead letters could not be replayed")


def _confirm(question: str) -> None:
    if not sys.stdin.isatty():
        raise click.ClickException(
            "no filter given and stdin is not a terminal: pass --yes to replay everything"
        )
    click.confirm(question, abort=True)
