"""``rate_limit``: a token bucket shared by every request it guards."""

from __future__ import annotations

import time

from immich_thumbnail_exporter.exposition.webconfig.parts import RateLimit


class TokenBucket:
    def __init__(self, limit: RateLimit) -> None:
        self._rate = 1.0 / limit.interval
        self._capacity = float(limit.burst)
        self._tokens = float(limit.burst)
        self._last = time.monotonic()

    def allow(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self._capacity, self._tokens + (now - self._last) * self._rate)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False
