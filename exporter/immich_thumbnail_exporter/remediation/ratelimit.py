"""At most ``per_second`` requests to Immich per second, spaced evenly (no bursts)."""

from __future__ import annotations

import asyncio
import time


class RateLimiter:
    def __init__(self, per_second: float) -> None:
        self.interval = 1.0 / per_second
        self._next = 0.0

    def delay(self) -> float:
        """Seconds until the next request may go (0 when it may go now): time to do something else."""
        return max(0.0, self._next - time.monotonic())

    async def acquire(self) -> None:
        now = time.monotonic()
        delay = self._next - now
        if delay > 0:
            await asyncio.sleep(delay)
        self._next = max(now, self._next) + self.interval
