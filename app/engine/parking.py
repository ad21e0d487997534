"""Parking a delay tier's partition: paused while its head record sleeps, sought back to
that record and resumed a little before it wakes. What comes after the head is released
unread (read again from Kafka after the seek), so nothing waits in memory."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from faust.types import TP

log = logging.getLogger("wal.delay")


@dataclass(eq=False)
class _Parked:
    offset: int  #: the head record, read again at wake time
    rewound: bool = False  #: seeked back to ``offset``; what comes before it is stale
    timer: asyncio.TimerHandle | None = field(default=None, repr=False)


class Parking:
    """The partitions of one tier whose head record is not awake yet.

    ``consumer`` is Faust's consumer (:class:`app.engine.consumer.StrictConsumer`):
    ``pause_partitions``, ``resume_partitions``, ``seek``, ``assignment`` and
    ``release``.
    """

    def __init__(self, consumer: Any) -> None:
        self.consumer = consumer
        self._parked: dict[TP, _Parked] = {}
        self._wakers: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._parked)

    def passes(self, message: Any) -> bool:
        """Whether the agent should handle ``message`` (not behind a parked head).

        A message held back is released: it will be read again from Kafka.
        """
        tp = TP(message.topic, message.partition)
        parked = self._parked.get(tp)
        if parked is None:
            return True
        if parked.rewound and message.offset == parked.offset:
            del self._parked[tp]  # the head again, read after the seek
            return True
        self.consumer.release(message)
        return False

    def park(self, message: Any, wake_ms: int, lead_ms: int = 0) -> None:
        """Stop reading ``message``'s partition; ``lead_ms`` before ``wake_ms``, re-read it."""
        tp = TP(message.topic, message.partition)  # Faust's TP, not aiokafka's
        self.consumer.pause_partitions({tp})
        self.consumer.release(message)
        parked = _Parked(message.offset)
        self._parked[tp] = parked
        delay_s = max(0.0, (wake_ms - lead_ms) / 1000 - time.time())
        parked.timer = asyncio.get_running_loop().call_later(delay_s, self._wake, tp, parked)

    def _wake(self, tp: TP, parked: _Parked) -> None:
        task = asyncio.ensure_future(self._rewind(tp, parked))
        self._wakers.add(task)
        task.add_done_callback(self._wakers.discard)

    async def _rewind(self, tp: TP, parked: _Parked) -> None:
        if self._parked.get(tp) is not parked:
            return  # forgotten by a rebalance
        if tp not in self.consumer.assignment():
            del self._parked[tp]
            return
        try:
            await self.consumer.seek(tp, parked.offset)
        except Exception:  # a seek that fails leaves the partition to the rebalance or heal
            log.exception("delay: seeking %s back to %s failed", tp, parked.offset)
            del self._parked[tp]
            return
        parked.rewound = True
        self.consumer.resume_partitions({tp})

    def forget(self, tps: Any = None) -> None:
        """Drop parked partitions (all by default): a rebalance re-reads them from the commit."""
        for tp in list(self._parked) if tps is None else list(tps):
            parked = self._parked.pop(tp, None)
            if parked is not None and parked.timer is not None:
                parked.timer.cancel()
