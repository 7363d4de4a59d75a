"""A bounded load generator for the soak test: N concurrent scrapers of one URL, loopback only.

Run as a separate process (``python tests/loadgen.py URL CONCURRENCY SECONDS``) so its sockets and tasks
are not counted as the exporter's. Prints one JSON document: requests, errors, latency percentiles.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from urllib.parse import urlsplit

import aiohttp


async def main(url: str, concurrency: int, seconds: float) -> dict[str, object]:
    host = urlsplit(url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit("loadgen only talks to loopback addresses")
    latencies: list[float] = []
    errors: list[str] = []
    statuses: dict[int, int] = {}
    deadline = time.monotonic() + seconds
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def scraper() -> None:
            while time.monotonic() < deadline:
                t0 = time.monotonic()
                try:
                    async with session.get(url, headers={"Accept-Encoding": "gzip"}) as resp:
                        await resp.read()
                        statuses[resp.status] = statuses.get(resp.status, 0) + 1
                except Exception as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
                    await asyncio.sleep(0.05)
                    continue
                latencies.append(time.monotonic() - t0)

        await asyncio.gather(*(scraper() for _ in range(concurrency)))
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else 0.0

    return {
        "requests": len(latencies), "errors": len(errors), "first_errors": errors[:5],
        "statuses": {str(k): v for k, v in statuses.items()},
        "p50": pct(0.5), "p99": pct(0.99), "max": latencies[-1] if latencies else 0.0,
    }


if __name__ == "__main__":
    result = asyncio.run(main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3])))
    print(json.dumps(result))
