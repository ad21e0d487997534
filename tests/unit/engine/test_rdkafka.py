"""The librdkafka produce path's own logic (:mod:`app.engine.rdkafka`): error mapping,
configuration, and counting a call's delivery reports across two threads. That records
reach Kafka through it, in order and durable before acked, is shown on a real broker by
the pipeline and fault tests, which run on it as the fleet's default producer client
(``WAL_PRODUCER_CLIENT``; ``tests/integration/pipeline/test_sizes.py`` runs on both)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from aiokafka.errors import KafkaError, KafkaTimeoutError, MessageSizeTooLargeError
from confluent_kafka import KafkaError as RdError

from app.engine.producing import RECORD_ERRORS
from app.engine.rdkafka import _Call, as_aiokafka, config
from app.settings import Settings


class Msg:
    def __init__(self, topic: str, partition: int, offset: int) -> None:
        self._tp, self._offset = (topic, partition), offset

    def topic(self) -> str:
        return self._tp[0]

    def partition(self) -> int:
        return self._tp[1]

    def offset(self) -> int:
        return self._offset


def test_a_record_kafka_refuses_for_good_is_told_from_a_transport_failure() -> None:
    too_large = as_aiokafka(RdError(RdError.MSG_SIZE_TOO_LARGE))
    assert isinstance(too_large, MessageSizeTooLargeError)
    assert isinstance(too_large, RECORD_ERRORS)  # dead-lettered, not retried
    timed_out = as_aiokafka(RdError(RdError._MSG_TIMED_OUT))
    assert isinstance(timed_out, KafkaTimeoutError)
    assert not isinstance(timed_out, RECORD_ERRORS)  # retried
    down = as_aiokafka(RdError(RdError._TRANSPORT))
    assert type(down) is KafkaError and "_TRANSPORT" in str(down)


def test_config_keeps_the_fleets_producer_promises() -> None:
    s = Settings(broker="kafka://a:9092;b:9093", producer_request_timeout_s=10)
    conf = config(s)
    assert conf["bootstrap.servers"] == "a:9092,b:9093"
    assert conf["acks"] == "all"
    assert conf["max.in.flight.requests.per.connection"] == 1  # no reordering on a retry
    assert conf["enable.idempotence"] is False
    assert conf["request.timeout.ms"] == 10_000
    # the client-side deadline of a produce request, and of a connection: a hung broker
    # holds a partition's records this long, not message.timeout.ms (cluster SIGSTOP test)
    assert conf["socket.timeout.ms"] == 10_000
    assert conf["socket.connection.setup.timeout.ms"] == 10_000
    assert conf["message.timeout.ms"] >= 30_000  # every wait has a deadline
    assert "security.protocol" not in conf


def test_config_carries_sasl_ssl() -> None:
    s = Settings(
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="wal",
        sasl_password="secret",
        ssl_cafile="/ca.pem",
    )
    conf = config(s)
    assert conf["security.protocol"] == "sasl_ssl"
    assert conf["sasl.mechanisms"] == "SCRAM-SHA-512"
    assert (conf["sasl.username"], conf["sasl.password"]) == ("wal", "secret")
    assert conf["ssl.ca.location"] == "/ca.pem"


async def test_a_call_ends_with_each_partitions_last_offset_once_every_report_is_in() -> None:
    loop = asyncio.get_running_loop()
    call = _Call(loop, loop.create_future())
    call.report(None, Msg("t", 0, 7))
    call.produced(3)
    assert not call.future.done()
    call.report(None, Msg("t", 1, 4))
    call.report(None, Msg("t", 0, 8))
    last = await asyncio.wait_for(call.future, 1)
    assert sorted((m.partition, m.offset) for m in last) == [(0, 8), (1, 4)]


async def test_a_failed_record_fails_the_call_but_only_after_every_report() -> None:
    loop = asyncio.get_running_loop()
    call = _Call(loop, loop.create_future())
    call.produced(2)
    call.report(RdError(RdError.MSG_SIZE_TOO_LARGE), None)
    await asyncio.sleep(0.01)
    assert not call.future.done()  # a record of the call is still in flight
    call.report(None, Msg("t", 0, 1))
    with pytest.raises(MessageSizeTooLargeError):
        await asyncio.wait_for(call.future, 1)


async def test_a_record_refused_before_it_left_fails_the_call_after_those_sent() -> None:
    loop = asyncio.get_running_loop()
    call = _Call(loop, loop.create_future())
    call.refused = RdError(RdError.MSG_SIZE_TOO_LARGE)
    call.produced(0)
    with pytest.raises(MessageSizeTooLargeError):
        await asyncio.wait_for(call.future, 1)


async def test_reports_from_another_thread_wake_the_caller_exactly_when_all_are_in() -> None:
    loop = asyncio.get_running_loop()
    n = 200
    for _ in range(50):  # the last report and produced() race either way
        call = _Call(loop, loop.create_future())

        def poll(c: Any = call) -> None:
            for i in range(n):
                c.report(None, Msg("t", i % 4, i))

        thread = threading.Thread(target=poll)
        thread.start()
        call.produced(n)
        last = await asyncio.wait_for(call.future, 2)
        thread.join()
        assert call.reported == n
        assert {m.partition: m.offset for m in last} == {0: 196, 1: 197, 2: 198, 3: 199}
