"""The fleet's Kafka consumer: Faust's, made strict about what it commits.

Faust commits the highest run of consecutive acked offsets of a partition. When
the offset right after the last commit was never acked (the record was not
delivered to the stream, or is still being worked on) and later ones were,
``Consumer._new_offset`` commits past it anyway - it only refuses gaps wider
than one offset (faust-streaming #312 and its fix). A record lost that way is
never processed: exactly the loss a write-ahead log must not allow.

:class:`StrictConsumer` refuses to commit while the head of a partition's acked
offsets does not follow the committed offset, unless Faust knows of a real gap
there (compaction, transaction markers: ``_gap``). The partition's commits then
wait for that record; the worker's readiness reports commits stalling, and a
restart or rebalance re-reads from the committed offset - late, never lost.
"""

from __future__ import annotations

from typing import Any

from faust.transport.drivers import aiokafka as driver
from faust.types import TP


class StrictConsumer(driver.Consumer):
    def _new_offset(self, tp: TP) -> int | None:
        acked = self._acked[tp]
        committed = self._committed_offset[tp]
        if acked and committed is not None and not self._gap[tp] and min(acked) > committed:
            return None  # the record at `committed` was not acked: do not pass it
        return super()._new_offset(tp)


class StrictTransport(driver.Transport):
    Consumer = StrictConsumer


def install(app: Any) -> None:
    """Give ``app`` the strict transport (before anything has created its consumer)."""
    app.transport = StrictTransport(app.conf.broker_consumer, app)
