"""``python -m bench.webauth``: what bcrypt basic auth costs a scrape, and whether it tells users apart.

    python -m bench.webauth                 # cost 13 for the cache figures, cost 11 for the timing ones
    python -m bench.webauth --runs 9 --cost 12

Prints figures, asserts nothing (the tests in ``tests/test_webconfig.py`` assert what can be counted:
one bcrypt run per password, off the event loop, an unknown user hashed at the configured cost). On an
app with the ``--web.config.file`` middleware, on 127.0.0.1:

* **first / cached**: the first scrape with a right password pays for bcrypt; the next ones are
  answered from the cache (their time should be a small fraction of the first);
* **/healthz during bcrypt**: the slowest /healthz answer, polled from another thread while the first
  check runs (a blocked event loop would make it as slow as the check);
* **unknown / wrong**: median time of a refused scrape for an unknown user and for a wrong password, and
  their ratio (near 1: the name cannot be guessed from the timing);
* **503**: how long a check that outlives ``auth_timeout`` takes to be answered 503.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import statistics
import tempfile
import threading
import time
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import bcrypt
import yaml
from aiohttp import web

from immich_thumbnail_exporter.exposition.webconfig import WebConfig, load_web_config


async def _hello(request: web.Request) -> web.Response:
    return web.Response(text="hello")


@asynccontextmanager
async def serving(users: dict[str, str], auth_timeout: float | None = None) -> AsyncIterator[int]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "web.yml"
        path.write_text(yaml.safe_dump({"basic_auth_users": users}))
        cfg: WebConfig = load_web_config(str(path))
    kwargs = {} if auth_timeout is None else {"auth_timeout": auth_timeout}
    app = web.Application(middlewares=[cfg.middleware(**kwargs)])
    for route in ("/metrics", "/healthz"):
        app.router.add_get(route, _hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


async def timed_get(port: int, user: str, password: str) -> tuple[int, float]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    t0 = time.perf_counter()
    async with aiohttp.ClientSession() as session, session.get(
        f"http://127.0.0.1:{port}/metrics", headers={"Authorization": f"Basic {token}"}
    ) as resp:
        await resp.read()
        return resp.status, time.perf_counter() - t0


def _hash(password: bytes, cost: int) -> str:
    return bcrypt.hashpw(password, bcrypt.gensalt(cost)).decode()


async def cache_figures(cost: int, runs: int) -> None:
    async with serving({"prometheus": _hash(b"correct horse", cost)}) as port:
        stop = threading.Event()
        healthz: list[float] = []

        def poll() -> None:
            while not stop.is_set():
                t = time.perf_counter()
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=30):
                    pass
                healthz.append(time.perf_counter() - t)

        poller = asyncio.create_task(asyncio.to_thread(poll))
        await asyncio.sleep(0.1)
        _, first = await timed_get(port, "prometheus", "correct horse")
        stop.set()
        await poller
        cached = [(await timed_get(port, "prometheus", "correct horse"))[1] for _ in range(runs)]
    print(f"bcrypt cost {cost}: first scrape {first * 1000:.1f} ms, cached scrapes max "
          f"{max(cached) * 1000:.1f} ms (ratio {max(cached) / first:.3f})")
    print(f"  /healthz while bcrypt ran: {len(healthz)} answers, slowest {max(healthz, default=0) * 1000:.1f} ms "
          f"(ratio to the first scrape {max(healthz, default=0) / first:.3f})")


async def user_figures(cost: int, runs: int) -> None:
    async with serving({"prometheus": _hash(b"pw", cost)}) as port:
        wrong, unknown = [], []
        for i in range(runs):
            wrong.append((await timed_get(port, "prometheus", f"nope{i}"))[1])
            unknown.append((await timed_get(port, f"nobody{i}", f"nope{i}"))[1])
    w, u = statistics.median(wrong), statistics.median(unknown)
    print(f"bcrypt cost {cost}: refused scrape, median wrong password {w * 1000:.1f} ms, unknown user "
          f"{u * 1000:.1f} ms (ratio {u / w:.2f})")


async def timeout_figures(auth_timeout: float) -> None:
    async with serving({"prometheus": _hash(b"pw", 14)}, auth_timeout=auth_timeout) as port:
        status, took = await timed_get(port, "prometheus", "pw")
    print(f"bcrypt cost 14, auth_timeout {auth_timeout}s: HTTP {status} after {took * 1000:.1f} ms")


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.webauth", description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="scrapes per figure (default 5)")
    parser.add_argument("--cost", type=int, default=11, help="bcrypt cost for the user-timing figures")
    args = parser.parse_args(argv)
    await cache_figures(13, args.runs)
    await user_figures(args.cost, args.runs)
    await timeout_figures(0.2)


if __name__ == "__main__":
    asyncio.run(main())
