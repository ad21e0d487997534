"""Memory a busy spell took, given back once it is over.

A worker under load holds fetched records, lane chunks, produce batches and the
bytes of every request in flight; CPython frees them, but glibc's allocator keeps
the freed pages (anything between live blocks, and every large block's arena) and
the process's RSS stays at its busiest for good: ``make bench``'s delay run showed
119 MiB at start, 203 MiB after 1 000 000 delayed requests were parked, flat from
10 % to 100 % (1 MiB per 100 000: nothing per parked request) and still 203 MiB
when idle. :func:`trim` asks glibc to return free pages (``malloc_trim(0)``) every
:data:`TRIM_EVERY_S`, when the worker used a lot of CPU since the last look and
little in the last one - after a busy spell, not during one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import time
from typing import Any

log = logging.getLogger("wal.memory")

#: How often the worker looks.
TRIM_EVERY_S = 10.0
#: CPU seconds a second: above this a look finds the worker busy, below it quiet.
BUSY, QUIET = 0.2, 0.05


def _malloc_trim() -> Any:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc: nothing to do
        return None


_trim = _malloc_trim()


class Trimmer:
    """Trims once after each busy spell (see the module)."""

    def __init__(self, clock: Any = time.monotonic, cpu: Any = time.process_time) -> None:
        self.clock, self.cpu = clock, cpu
        self._at, self._used = clock(), cpu()
        self._busy = False

    def look(self) -> bool:
        """One look; whether it trimmed."""
        now, used = self.clock(), self.cpu()
        load = (used - self._used) / max(now - self._at, 1e-6)
        self._at, self._used = now, used
        if load >= BUSY:
            self._busy = True
            return False
        if self._busy and load < QUIET:
            self._busy = False
            return trim()
        return False


def trim() -> bool:
    """Return free heap pages to the system; whether glibc could be asked."""
    if _trim is None:
        return False
    started = time.monotonic()
    _trim(0)
    log.debug("malloc_trim took %.1f ms", (time.monotonic() - started) * 1000)
    return True
