"""Helpers shared by tests: run the CLI, run an in-process exporter, parse expositions."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from immich_thumbnail_exporter.app import Exporter
from immich_thumbnail_exporter.config import load_config
from immich_thumbnail_exporter.exposition.webconfig import load_web_config
from immich_thumbnail_exporter.store import Result, Store


def run_cli(*args: str, env: Mapping[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``python -m immich_thumbnail_exporter`` with a clean environment plus ``env``."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DB_", "REDIS_", "IMMICH_"))}
    base.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "immich_thumbnail_exporter", *args],
        env=base, capture_output=True, text=True, timeout=timeout,
    )


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Exposition text -> {(sample name, sorted labels): value}."""
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(parsed: Mapping[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float | None:
    return parsed.get((name, tuple(sorted(labels.items()))))


def names(parsed: Mapping[tuple[str, tuple[tuple[str, str], ...]], float]) -> set[str]:
    return {k[0] for k in parsed}


@contextlib.asynccontextmanager
async def running_exporter(
    config_overrides: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    web_config_file: str | None = None,
    config_file: str | None = None,
) -> AsyncIterator[tuple[Exporter, str]]:
    """An Exporter on 127.0.0.1 with a free port; yields it and its base URL."""
    config = load_config(config_file, environ=dict(env or {}), overrides=dict(config_overrides or {}))
    exporter = Exporter(config, load_web_config(web_config_file), "127.0.0.1", 0)
    await exporter.start()
    scheme = "https" if web_config_file and exporter.web_config.ssl_context() else "http"
    try:
        yield exporter, f"{scheme}://127.0.0.1:{exporter.bound_port}"
    finally:
        await exporter.stop()


async def fetch(url: str, **kwargs: Any) -> tuple[int, str, Mapping[str, str]]:
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url, **kwargs) as resp:
        return resp.status, await resp.text(), dict(resp.headers)


async def rounds(store: Store, collection: str, n: int = 1, timeout: float = 30.0) -> Result:
    """Wait until ``collection`` has published ``n`` more results after this call, and return the last.

    What a test waits on instead of sleeping "a few rounds" before asserting that something did not
    happen: each round replaces the store's result object, so the rounds are counted, not guessed.
    """
    seen = store.result(collection)
    left = n
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        now = store.result(collection)
        if now is not seen:
            seen, left = now, left - 1
            if left == 0:
                assert now is not None
                return now
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{collection}: {n - left} of {n} rounds within {timeout}s")
        await asyncio.sleep(0.01)


class Calls:
    """Counts the calls of one method of one object (a runner's ``probe``, a collection's ``collect``).

    ``async with Calls(exporter.runner, "probe") as probes: await probes.wait(2)`` waits for two probe
    rounds that started after the ``with``.
    """

    def __init__(self, obj: Any, method: str) -> None:
        self.obj, self.method, self.count = obj, method, 0
        self._event = asyncio.Event()

    async def __aenter__(self) -> Calls:
        real = getattr(self.obj, self.method)
        self._own = vars(self.obj).get(self.method)

        async def counted(*args: Any, **kwargs: Any) -> Any:
            try:
                return await real(*args, **kwargs)
            finally:
                self.count += 1
                self._event.set()

        setattr(self.obj, self.method, counted)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._own is not None:
            setattr(self.obj, self.method, self._own)
        else:
            delattr(self.obj, self.method)  # the class's method shows again

    async def wait(self, n: int, timeout: float = 30.0) -> None:
        """Until ``n`` calls have finished since the ``with``."""
        async with asyncio.timeout(timeout):
            while self.count < n:
                self._event.clear()
                await self._event.wait()
