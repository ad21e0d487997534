"""``wal backfill``: fill a target from what the log still holds, through a worker.

The command asks a worker (``POST /wal/admin/backfill``, ``--url`` or
``WAL_ADMIN_URL``) with the admin key of ``WAL_ADMIN_API_KEY``: the worker checks
the key against its ``WAL_ADMIN_API_KEYS``, writes the audit line, and does the
work with its own Kafka credentials (:mod:`app.backfill` says what is read and
what is re-emitted). The operator needs an admin key and the worker's URL, not
Kafka credentials, and a key the workers do not know cannot start a backfill.
"""

from __future__ import annotations

from typing import Any

import click
import httpx
import orjson
from tqdm import tqdm

from app.ops.dlq import When
from app.settings import Settings

#: The longest the worker may stay silent (it reports every half second while it works).
SILENCE_S = 120.0


@click.command()
@click.option("--namespace", required=True, help="The namespace whose writes are delivered again.")
@click.option("--target", required=True, help="The one target (identifier) to deliver them to.")
@click.option(
    "--since",
    type=When(),
    help="Writes admitted at or after: ISO-8601 (UTC unless zoned) or ago (15m, 2h, 3d).",
)
@click.option("--until", type=When(), help="Writes admitted before this: like --since.")
@click.option("--dry-run", is_flag=True, help="Count what would be re-delivered; emit nothing.")
@click.option(
    "--rate",
    type=click.FloatRange(min=0, min_open=True),
    help="At most N re-delivered writes a second (default: unlimited).",
)
@click.option("--url", help="A worker's web server (default: WAL_ADMIN_URL, else the local one).")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
def backfill(
    namespace: str,
    target: str,
    since: int | None,
    until: int | None,
    dry_run: bool,
    rate: float | None,
    url: str | None,
    progress: bool,
) -> None:
    """Deliver a namespace's writes that the log still holds again, to one target only.

    Reads wal-deliver within its retention (every admitted write passes through it),
    keeps the namespace's writes admitted in [--since, --until), and re-emits each
    one, with its message id, to that target alone, through the normal delivery path.
    The target's ledger applies a write once: running it twice changes nothing the
    second time, and the namespace's other targets see nothing. Needs an admin key
    (WAL_ADMIN_API_KEY). Exits 1 when the worker refuses or fails.
    """
    s = Settings()
    key = s.admin_api_key.get_secret_value()
    if not key:
        raise click.ClickException("wal backfill needs an admin key: set WAL_ADMIN_API_KEY")
    namespace = namespace.strip().lower()
    body = {
        "namespace": namespace,
        "target": target,
        "since": since,
        "until": until,
        "dryRun": dry_run,
        "rate": rate,
    }
    where = (url or s.worker_url).rstrip("/")
    done = _run(f"{where}/wal/admin/backfill", key, body, progress)
    click.echo(summary(namespace, target, done))


def _run(url: str, key: str, body: dict[str, Any], progress: bool) -> dict[str, Any]:
    timeout = httpx.Timeout(10.0, read=SILENCE_S)
    bar: tqdm[Any] | None = None
    try:
        with httpx.stream(
            "POST", url, json=body, headers={"X-API-Key": key}, timeout=timeout
        ) as answer:
            if answer.status_code != 200:
                answer.read()
                raise click.ClickException(refusal(answer))
            for line in answer.iter_lines():
                if not line.strip():
                    continue
                event = orjson.loads(line)
                if event["event"] == "start":
                    bar = tqdm(total=event["total"], unit="rec", disable=not progress)
                elif event["event"] == "error":
                    raise click.ClickException(f"the backfill failed: {event['message']}")
                if bar is not None:
                    bar.update(event["read"] - bar.n)
                    bar.set_postfix(matched=event["matched"], re_emitted=event["reEmitted"])
                if event["event"] == "done":
                    return dict(event)
    except httpx.HTTPError as exc:
        raise click.ClickException(f"{url}: {type(exc).__name__}: {exc}") from None
    finally:
        if bar is not None:
            bar.close()
    raise click.ClickException(f"{url}: the worker stopped answering before the end")


def refusal(answer: httpx.Response) -> str:
    try:
        error = answer.json()["error"]
        return f"refused ({answer.status_code} {error['code']}): {error['message']}"
    except (ValueError, KeyError, TypeError):
        return f"refused ({answer.status_code}): {answer.text[:300]}"


def summary(namespace: str, target: str, done: dict[str, Any]) -> str:
    """The closing line: read, matched, re-emitted (or would be), skipped and why."""
    why = ", ".join(f"{n} {reason}" for reason, n in sorted(done["skippedBy"].items()))
    emitted = "would re-emit" if done["dryRun"] else "re-emitted"
    return (
        f"backfill {namespace} -> {target}: read {done['read']}, matched {done['matched']}, "
        f"{emitted} {done['reEmitted']}, skipped {done['skipped']}"
        + (f" ({why})" if why else "")
        + (" (dry run: nothing emitted)" if done["dryRun"] else "")
    )
