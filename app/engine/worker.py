"""The fleet's Faust worker: Faust's, with a deadline on shutdown.

Faust's shutdown waits for streams and lanes to finish, commits, flushes the
producer and leaves the group; with the broker away every one of those waits,
and SIGTERM never finished (Kubernetes then SIGKILLs every pod of a rolling
restart). Here SIGTERM (or SIGINT) arms a watchdog: if the worker has not exited
``WAL_SHUTDOWN_TIMEOUT_S`` later, it logs what it abandons and exits with
:data:`EXIT_ABANDONED`. Nothing is lost by that: what was not made durable was
not acked, and whoever gets the partitions reads it again. A drain that
completes exits 0.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import faust

from app.engine.lanes import lanes_of

log = logging.getLogger("wal.worker")

#: Exit status of a worker whose shutdown passed its deadline with work in flight.
EXIT_ABANDONED = 3


class FleetWorker(faust.Worker):
    def __init__(self, app: Any, *args: Any, shutdown_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(app, *args, **kwargs)
        self.shutdown_timeout_s = shutdown_timeout_s
        self._watchdog: threading.Timer | None = None

    # mode's handlers for the two signals that stop a worker
    def _on_sigterm(self) -> None:
        self.arm_deadline()
        super()._on_sigterm()

    def _on_sigint(self) -> None:
        self.arm_deadline()
        super()._on_sigint()

    def arm_deadline(self) -> None:
        """From now on, the worker exits within ``shutdown_timeout_s`` whatever happens."""
        if self._watchdog is None:
            self._watchdog = threading.Timer(self.shutdown_timeout_s, self._abandon)
            self._watchdog.daemon = True  # a worker that exits in time is not held up by it
            self._watchdog.start()

    def _abandon(self) -> None:
        log.error(
            "shutdown passed its deadline of %.0f s (WAL_SHUTDOWN_TIMEOUT_S): abandoning %s; "
            "not acked, so read again by whoever takes the partitions; exiting %d",
            self.shutdown_timeout_s,
            in_flight(self.app),
            EXIT_ABANDONED,
        )
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(EXIT_ABANDONED)


def in_flight(app: Any) -> str:
    """What a worker is still working on, in words (read from the watchdog's thread)."""
    try:
        lanes = list(lanes_of(app).values())
        queued = sum(lane.queued for lane in lanes)
        taken = sum(lane.taken for lane in lanes)
        events = len(app.consumer.unacked)  # Faust's: stream events not acked yet
    except Exception as exc:  # a count is not worth a shutdown that hangs
        return f"work that could not be counted ({exc!r})"
    return f"{taken} records in batches, {queued} queued, {events} stream events"
