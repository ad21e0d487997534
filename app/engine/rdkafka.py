"""The fleet's produce path on librdkafka (confluent-kafka), behind ``producing.emit``.

The default, ``WAL_PRODUCER_CLIENT=librdkafka`` (issue 19); ``aiokafka`` keeps the agents'
records on Faust's producer.

aiokafka builds every record batch and every produce request in Python, about 13 µs a
record; librdkafka does it in C threads of its own. Only the agents' records go this way
(:func:`emit`); Faust's own producer (aiokafka) still writes what Faust writes.

What stays as with aiokafka:

- **Durable before acked.** :meth:`RdProducer.send` returns once the broker acknowledged
  every record with ``acks=all``, or raises; callers ack their source records only after.
- **Partitions** are chosen by the caller, with the fleet's partitioner, and passed
  explicitly: librdkafka's own would pick the same for a key, but nothing relies on it.
- **Order within a partition.** One produce request in flight per broker connection,
  as aiokafka has one batch in flight per partition: a request retried after a timeout
  cannot be overtaken by the next one.
- **Errors** arrive as aiokafka's exception types (:data:`ERRORS`), so that
  :func:`emit_until_durable` tells a record Kafka refuses for good (too large,
  invalid, not allowed: dead-lettered) from a transport failure (retried).
- **Every wait has a deadline.** A produce request unanswered for
  ``WAL_PRODUCER_REQUEST_TIMEOUT_S`` is dropped with its connection and sent again,
  to whichever broker then leads the partition (``socket.timeout.ms``; a connection
  must be made within as long). A record not acknowledged within ``message.timeout.ms``
  (three request timeouts, at least 30 s) fails with ``KafkaTimeoutError``: the caller
  retries, and a copy written meanwhile makes the record at least once, which the
  targets' ledgers absorb.

Delivery reports are served by a daemon thread polling librdkafka. It counts a call's
records down and wakes the caller's event loop once per call, not per record.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka.errors import (
    CorruptRecordException,
    InvalidTopicError,
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    PolicyViolationError,
    RecordListTooLargeError,
    TopicAuthorizationFailedError,
)
from aiokafka.structs import RecordMetadata

from app.models import TOPIC_MAX_MESSAGE_BYTES
from app.settings import Settings

log = logging.getLogger("wal.kafka")


#: One produce item: topic, partition, key, value, headers.
Item = tuple[str, int, bytes | None, bytes | None, list[tuple[str, bytes]]]


@functools.cache
def _errors() -> dict[int, type[KafkaError]]:
    from confluent_kafka import KafkaError as Rd

    return {
        Rd.MSG_SIZE_TOO_LARGE: MessageSizeTooLargeError,
        Rd._MSG_TIMED_OUT: KafkaTimeoutError,
        Rd.RECORD_LIST_TOO_LARGE: RecordListTooLargeError,
        Rd.INVALID_RECORD: CorruptRecordException,
        Rd.INVALID_MSG: CorruptRecordException,
        Rd.TOPIC_EXCEPTION: InvalidTopicError,
        Rd.POLICY_VIOLATION: PolicyViolationError,
        Rd.TOPIC_AUTHORIZATION_FAILED: TopicAuthorizationFailedError,
    }


def as_aiokafka(err: Any) -> KafkaError:
    """librdkafka's error as the aiokafka exception the fleet classifies; else a KafkaError
    (a transport failure, retried)."""
    kind = _errors().get(err.code(), KafkaError)
    return kind(f"librdkafka: {err.name()}: {err.str()}")


def config(s: Settings) -> dict[str, Any]:
    """The producer's librdkafka configuration, from the fleet's settings."""
    timeout_ms = int(s.producer_request_timeout_s * 1000)
    conf: dict[str, Any] = {
        "bootstrap.servers": ",".join(s.bootstrap_servers),
        "client.id": f"{s.app_id}-rdproducer",
        "acks": "all",
        "enable.idempotence": False,  # as the aiokafka producer (README: no idempotence)
        "max.in.flight.requests.per.connection": 1,
        "linger.ms": s.producer_linger_ms,
        "compression.type": s.producer_compression,
        "message.max.bytes": TOPIC_MAX_MESSAGE_BYTES + 65_536,  # a whole request's batch
        "request.timeout.ms": timeout_ms,  # the broker's: how long it waits for the ISR
        # The client's: a produce request waits min(this, the message's time left), not
        # request.timeout.ms; at 60 s (the default) a request to a hung broker (SIGSTOP)
        # waited out message.timeout.ms, 30 s, before it went to the new leader.
        "socket.timeout.ms": timeout_ms,
        "socket.connection.setup.timeout.ms": timeout_ms,
        "message.timeout.ms": max(30_000, 3 * timeout_ms),
        "retry.backoff.ms": 100,
        "socket.keepalive.enable": True,
    }
    if s.security_protocol != "PLAINTEXT":
        conf["security.protocol"] = s.security_protocol.lower()
    if s.security_protocol.startswith("SASL"):
        conf.update(
            {
                "sasl.mechanisms": s.sasl_mechanism,
                "sasl.username": s.sasl_username,
                "sasl.password": s.sasl_password.get_secret_value(),
            }
        )
    for key, value in (
        ("ssl.ca.location", s.ssl_cafile),
        ("ssl.certificate.location", s.ssl_certfile),
        ("ssl.key.location", s.ssl_keyfile),
    ):
        if value and s.security_protocol in ("SSL", "SASL_SSL"):
            conf[key] = value
    return conf


@dataclass(slots=True)
class _Call:
    """One :meth:`RdProducer.send`: its records' reports counted as they arrive.

    Only the poll thread counts (``reported``) and records failures; the caller's loop
    sets ``expected`` once it has produced all it could. Whichever of the two sees
    them meet wakes the caller (both may: :meth:`_done` runs once).
    """

    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[list[RecordMetadata]]
    expected: int | None = None
    reported: int = 0
    error: Any = None
    refused: Any = None  # refused by produce() itself, before it left
    last: dict[tuple[str, int], int] = field(default_factory=dict)

    def report(self, err: Any, msg: Any) -> None:  # librdkafka's poll thread
        if err is not None:
            if self.error is None:
                self.error = err
        else:
            tp = (msg.topic(), msg.partition())
            offset = msg.offset()
            if offset > self.last.get(tp, -1):
                self.last[tp] = offset
        self.reported += 1
        if self.reported == self.expected:
            self.loop.call_soon_threadsafe(self._done)

    def produced(self, count: int) -> None:  # the caller's loop, once
        self.expected = count
        if self.reported == count:
            self._done()

    def _done(self) -> None:  # the caller's event loop
        if self.future.done():  # woken twice, or cancelled (the caller's records unacked)
            return
        error = self.refused if self.refused is not None else self.error
        if error is not None:
            self.future.set_exception(as_aiokafka(error))
            return
        self.future.set_result(
            [RecordMetadata(t, p, None, o, -1, 0, -1) for (t, p), o in self.last.items()]  # type: ignore[arg-type]
        )


class RdProducer:
    """A librdkafka producer for the fleet's records, made on first use (:func:`producer`)."""

    def __init__(self, conf: dict[str, Any]) -> None:
        from confluent_kafka import Producer

        self._producer = Producer(conf, logger=log)  # its log lines as wal.kafka's
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="wal-rdkafka", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        poll, stopping = self._producer.poll, self._stopping.is_set
        while not stopping():
            poll(0.2)

    async def send(self, items: Sequence[Item]) -> list[RecordMetadata]:
        """Produce ``items`` and wait until Kafka has every one (acks=all).

        Returns, per partition written, its last offset (``RecordMetadata``). The first
        failed record's error raises, as its aiokafka type (:func:`as_aiokafka`): the
        call is then retried whole by the caller, or one by one.
        """
        if not items:
            return []
        loop = asyncio.get_running_loop()
        call = _Call(loop, loop.create_future())
        produce: Any = self._producer.produce
        report = call.report
        count = 0
        for topic, partition, key, value, headers in items:
            try:
                produce(topic, value, key, partition, report, headers=headers or None)
            except BufferError:  # librdkafka's queue is full: let it drain, then once more
                await asyncio.sleep(0.01)
                try:
                    produce(topic, value, key, partition, report, headers=headers or None)
                except BufferError:  # a transport condition: the caller retries
                    from confluent_kafka import KafkaError as RdError

                    call.refused = RdError(RdError._QUEUE_FULL)
                    break
            except Exception as exc:  # refused before it left: too large, unknown topic
                if not (exc.args and hasattr(exc.args[0], "code")):
                    raise
                call.refused = exc.args[0]
                break
            count += 1
        call.produced(count)  # the records produced still report: wait for them too
        return await call.future

    def close(self, timeout: float = 1.0) -> None:
        """Stop serving reports; what is still queued is dropped (it was never acked)."""
        self._stopping.set()
        try:
            self._producer.purge()
            self._producer.flush(timeout)
        except Exception as exc:  # exiting anyway
            log.debug("closing the librdkafka producer: %r", exc)


_producer: RdProducer | None = None


def producer(s: Settings) -> RdProducer:
    """The worker's librdkafka producer, made on first use and closed at exit."""
    global _producer
    if _producer is None:
        _producer = RdProducer(config(s))
        atexit.register(_producer.close)
        log.info("producing the fleet's records with librdkafka (WAL_PRODUCER_CLIENT)")
    return _producer
