"""One token bucket, for every rate the fleet keeps: API requests per namespace
(:mod:`app.web.access`), the pace of a dead-letter replay (:mod:`app.ops.dlq`) and a
target's pace (:mod:`agents.deliver.pace`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


class TokenBucket:
    """``rate`` tokens a second, holding at most ``capacity``; starts full.

    :meth:`take` refuses when there is no token (an API request answered 429);
    :meth:`owe` always takes one, going into debt, and says how long the caller must
    wait before acting on it (a replay paced to its rate); :meth:`wait` does that wait.
    """

    def __init__(
        self, rate: float, capacity: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate, self.capacity, self.clock = rate, capacity, clock
        self.tokens, self._at = capacity, clock()

    def _refill(self) -> None:
        now = self.clock()
        self.tokens = min(self.capacity, self.tokens + (now - self._at) * self.rate)
        self._at = now

    def take(self) -> float:
        """Take a token: 0.0 if granted, else the seconds until one is there (none taken)."""
        wait = self.due()
        if not wait:
            self.tokens -= 1.0
        return wait

    def due(self) -> float:
        """Seconds until a token taken now could be acted on (nothing taken)."""
        self._refill()
        return 0.0 if self.tokens >= 1.0 else (1.0 - self.tokens) / self.rate

    def owe(self) -> float:
        """Take a token, in debt if need be: the seconds to wait before acting on it."""
        self._refill()
        self.tokens -= 1.0
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate

    def retune(self, rate: float, capacity: float) -> None:
        """A new rate and capacity from now on (tokens and debt so far are kept)."""
        if rate <= 0:
            raise ValueError("rate must be positive")
        self._refill()
        self.rate, self.capacity = rate, capacity
        self.tokens = min(self.tokens, capacity)

    async def wait(self) -> None:
        """Take a token and sleep until it is due."""
        delay = self.owe()
        if delay > 0:
            await asyncio.sleep(delay)
