"""``serve``: wire sources, collections, the store and the HTTP server, and stop cleanly on SIGTERM.

Stopping is bounded whatever the backends do: a thread stuck in the kernel on a hung mount is a daemon
thread of the media pool (``sources/media.py``), which nothing joins, so ``serve`` exits within seconds of
SIGTERM even while the mount hangs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Sequence
from typing import Any

from aiohttp import web

from immich_thumbnail_exporter import __version__
from immich_thumbnail_exporter.collectors.base import Collection
from immich_thumbnail_exporter.collectors.capacity import CapacityCollection
from immich_thumbnail_exporter.collectors.files import FilesCollection
from immich_thumbnail_exporter.collectors.inventory import InventoryCollection
from immich_thumbnail_exporter.collectors.job_verification import JobVerificationCollection
from immich_thumbnail_exporter.collectors.queues import QueueCollection
from immich_thumbnail_exporter.collectors.remediation import RemediationCollection
from immich_thumbnail_exporter.config import Config
from immich_thumbnail_exporter.exposition.http import build_app
from immich_thumbnail_exporter.exposition.webconfig import WebConfig
from immich_thumbnail_exporter.findings import ProblemFeed
from immich_thumbnail_exporter.runtime import Runner
from immich_thumbnail_exporter.sources.postgres import PostgresSource
from immich_thumbnail_exporter.store import SOURCES, Store

log = logging.getLogger(__name__)

# Seconds the collection loops get to end on SIGTERM (a file check closes its walkers in that time).
STOP_COLLECTIONS = 3.0
# The whole stop: well inside the 10 s a container runtime waits between SIGTERM and SIGKILL.
STOP_TIMEOUT = 8.0


def build_collections(config: Config, pg: PostgresSource, feed: ProblemFeed) -> list[Collection]:
    """The enabled collections; the files collection publishes its problems to ``feed``."""
    collections: list[Collection] = []
    if config.collectors.inventory:
        collections.append(InventoryCollection(config, pg))
    files_on = bool(config.collectors.files and config.media.root)
    if config.collectors.files and not files_on:
        log.info("media.root is not set: the files collection is off (database checks only)")
    if files_on:
        collections.append(FilesCollection(config, pg, feed))
        collections.append(CapacityCollection(config))
    if config.collectors.queues and (config.redis.enabled or config.immich.enabled):
        collections.append(QueueCollection(config, pg))
    if config.collectors.queues and config.redis.enabled and config.media.root:
        # What every thumbnail job left behind: needs the jobs (Redis), the rows and the files.
        collections.append(JobVerificationCollection(config, pg))
    if config.remediation.enabled:
        # Without the files collection, remediation runs its own scan (at most once per intervals.files).
        collections.append(RemediationCollection(config, pg, feed if files_on else None))
    return collections


def sources_of(collections: Sequence[Collection]) -> list[str]:
    """The sources the collections read, PostgreSQL always (the probe watches it), in display order."""
    used = {"postgres"}.union(*(c.sources for c in collections))
    return [s for s in SOURCES if s in used]


class Exporter:
    """Everything ``serve`` runs, startable and stoppable from tests without signals."""

    def __init__(self, config: Config, web_config: WebConfig, host: str | None, port: int) -> None:
        self.config = config
        self.web_config = web_config
        self.host = host
        self.port = port
        self.pg = PostgresSource(config.database)
        self.problems = ProblemFeed()
        collections = build_collections(config, self.pg, self.problems)
        sources = sources_of(collections)
        self.store = Store([c.name for c in collections], sources)
        self.runner = Runner(
            self.store, collections, self.pg, config.media.root if "filesystem" in sources else None,
            probe_interval=min(15.0, config.intervals.queues),
        )
        self._web: web.AppRunner | None = None
        self.bound_port: int | None = None

    async def start(self) -> None:
        files_on = "files" in self.store.collections
        app = build_app(self.store, self.web_config, self.problems if files_on else None)
        access: dict[str, Any] = {} if self.config.log.level == "debug" else {"access_log": None}
        # Open scrapes get two seconds to finish on SIGTERM; nothing we serve takes longer.
        self._web = web.AppRunner(app, shutdown_timeout=2.0, **access)
        await self._web.setup()
        site = web.TCPSite(
            self._web, self.host, self.port, ssl_context=self.web_config.ssl_context()
        )
        await site.start()
        server = getattr(site, "_server", None)
        sockets = getattr(server, "sockets", None) or []
        self.bound_port = sockets[0].getsockname()[1] if sockets else self.port
        self.runner.start()
        scheme = "https" if self.web_config.tls_enabled else "http"
        log.info("listening on %s://%s:%s/ (version %s)", scheme, self.host or "0.0.0.0", self.bound_port, __version__)

    async def stop(self) -> None:
        await self.runner.stop(timeout=STOP_COLLECTIONS)
        if self._web is not None:
            await self._web.cleanup()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.pg.close(), 2)


async def until_stopped() -> None:
    """Return on SIGTERM or SIGINT (Ctrl-C), for a clean stop instead of a KeyboardInterrupt traceback."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def serve(config: Config, web_config: WebConfig, host: str | None, port: int) -> int:
    exporter = Exporter(config, web_config, host, port)
    try:
        await exporter.start()
    except OSError as exc:
        log.error("cannot listen on %s: %s", config.web.listen_address, exc.strerror or exc)
        await exporter.stop()
        return 2
    await until_stopped()
    log.info("shutting down")
    try:
        await asyncio.wait_for(exporter.stop(), STOP_TIMEOUT)
    except TimeoutError:
        log.warning("shutdown took too long; exiting anyway")
    return 0
