"""Failed deliveries go round the delay tiers with backoff, then to the DLQ with every header."""

from __future__ import annotations

import pytest

from tests.integration.harness import Fleet, eventually, header, produce, read_all, request

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]

SECRET = "S3cr3t-Pa55w0rd-do-not-leak"


async def test_exhausted_retries_are_dead_lettered_with_every_header(fleet: Fleet) -> None:
    fleet.apply(
        {
            "name": "flaky",
            "retryPolicy": {
                "maxAttempts": 3,
                "backoffStrategy": "constant",
                "initialDelayMs": 300,
                "jitterMs": 0,
            },
            "targets": [
                {
                    "identifier": "down-db",
                    "type": "sql",
                    # Nothing listens on port 1: every attempt fails with a connection error.
                    "config": {"url": f"postgresql+psycopg://wal:{SECRET}@127.0.0.1:1/wal"},
                }
            ],
        }
    )
    worker = await fleet.worker().ready()
    original = request("flaky", {"n": 1}, messageId="m-flaky-1")
    await produce(fleet.topic("ingest"), [original], keys=[b"client-key"])

    async def dead() -> list[object] | None:
        records = await read_all(fleet.topic("dlq"))
        return records or None

    (record,) = await eventually(dead, timeout=60, what="dead letter")
    assert record.value == original and record.key == b"client-key"
    assert header(record, "wal-error-code") == "RETRIES_EXHAUSTED"
    assert header(record, "wal-attempt") == "3"
    assert header(record, "wal-target") == "down-db"
    assert header(record, "wal-message-id") == "m-flaky-1"
    assert header(record, "wal-namespace") == "flaky"
    assert (header(record, "wal-source") or "").startswith(fleet.topic("ingest") + "/")
    first, last = (
        int(header(record, "wal-first-failed-at") or 0),
        int(header(record, "wal-last-failed-at") or 0),
    )
    assert last - first >= 2 * 300, (first, last)  # two backoffs of 300 ms between three attempts
    assert "TARGET_UNAVAILABLE" in (header(record, "wal-error-message") or "")
    everything = b"".join(bytes(v) for _, v in record.headers) + worker.log.read_bytes()
    assert SECRET.encode() not in everything
