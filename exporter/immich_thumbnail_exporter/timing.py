"""The one of each timing mechanism: deadlines, capped backoff, rate limits.

Every clock here is ``time.monotonic()``: a wall clock stepped back or forward by NTP must never make a
deadline expire early, a backoff skip, or a rate limit burst.
"""

from __future__ import annotations

import asyncio
import time


def deadline_in(seconds: float) -> float:
    """The monotonic instant ``seconds`` from now."""
    return time.monotonic() + seconds


def left(deadline: float, floor: float = 0.0) -> float:
    """Seconds left until ``deadline`` (a ``time.monotonic()`` instant), never below ``floor``.

    A small floor lets a last call still be made (and fail on its own timeout) rather than be skipped.
    """
    return max(floor, deadline - time.monotonic())


class Backoff:
    """Capped exponential backoff: ``initial``, doubling after each failure, never above ``cap``.

    ``failed()`` returns the delay before the next try; ``succeeded()`` starts over.
    """

    def __init__(self, initial: float = 1.0, cap: float = 60.0) -> None:
        self.initial = initial
        self.cap = cap
        self._next = min(initial, cap)

    def failed(self) -> float:
        delay = self._next
        self._next = min(self._next * 2, self.cap)
        return delay

    def succeeded(self) -> None:
        self._next = min(self.initial, self.cap)


class RateLimiter:
    """A token bucket: ``rate`` per second on average, at most ``burst`` at once.

    With ``burst=1`` (the default) requests are spaced evenly, never bunched: what Immich's API is
    asked with. The web configuration's ``rate_limit`` uses a larger burst.
    """

    def __init__(self, rate: float, burst: int = 1) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self._interval = 1.0 / rate
        self._capacity = float(max(1, burst))
        self._tokens = self._capacity
        self._last = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self._tokens = min(self._capacity, self._tokens + (now - self._last) / self._interval)
        self._last = now

    def allow(self) -> bool:
        """Take a token if one is there now; never waits."""
        self._refill()
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def delay(self) -> float:
        """Seconds until a token is there (0 when one is there now): time to do something else."""
        self._refill()
        return max(0.0, (1.0 - self._tokens) * self._interval)

    async def acquire(self) -> None:
        """Take a token, waiting for it when there is none.

        The token is reserved before the wait (the balance may go below zero), so concurrent callers
        queue up one interval apart instead of all waking for the same token.
        """
        self._refill()
        self._tokens -= 1.0
        if self._tokens < 0:
            await asyncio.sleep(-self._tokens * self._interval)
