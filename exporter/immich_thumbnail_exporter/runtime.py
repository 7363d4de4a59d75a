"""Run the collections in the background and keep the store current.

One loop per collection: run it under its deadline, publish the result, sleep until the next round.
A loop never overlaps itself, so a hung backend can delay one collection but never pile work up. After
a failure the loop retries sooner, with a backoff capped at its interval; when a source comes back,
every loop that depends on it is woken at once.

A small probe loop checks PostgreSQL and the media folder between the (possibly long) collection
rounds, so ``immich_exporter_source_up`` turns to 0 within seconds of an outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence

from immich_thumbnail_exporter.collectors.base import Collection, Outcome
from immich_thumbnail_exporter.scan.run import probe_filesystem
from immich_thumbnail_exporter.sources.postgres import PostgresSource, QueryError, SourceError, describe_error
from immich_thumbnail_exporter.sources.schema import SchemaError
from immich_thumbnail_exporter.store import Result, Store

log = logging.getLogger(__name__)

MAX_BACKOFF = 60.0


class Runner:
    def __init__(
        self,
        store: Store,
        collections: Sequence[Collection],
        pg: PostgresSource | None,
        media_root: str | None,
        probe_interval: float = 15.0,
    ) -> None:
        self.store = store
        self.collections = list(collections)
        self.pg = pg
        self.media_root = media_root
        self.probe_interval = probe_interval
        self._stop = asyncio.Event()
        self._wake: dict[str, asyncio.Event] = {c.name: asyncio.Event() for c in self.collections}
        self._tasks: list[asyncio.Task[None]] = []
        self._fs_probe: asyncio.Task[tuple[int, int]] | None = None
        store.on_recover(self._recovered)

    def _recovered(self, source: str) -> None:
        for collection in self.collections:
            if source in collection.sources:
                self._wake[collection.name].set()

    def start(self) -> None:
        for collection in self.collections:
            self._tasks.append(asyncio.create_task(self._loop(collection), name=f"collect-{collection.name}"))
        self._tasks.append(asyncio.create_task(self._probe_loop(), name="probe"))

    async def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=timeout)
        for collection in self.collections:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(collection.close(), 2)

    async def run_once(self, collection: Collection) -> Result:
        """One round of one collection, under its deadline; never raises for backend trouble."""
        started, t0 = time.time(), time.monotonic()
        outcome: Outcome | None = None
        sources: dict[str, bool | str | None] = {}
        error: str | None = None
        try:
            outcome = await asyncio.wait_for(collection.collect(), collection.timeout)
            sources.update(outcome.sources)
            error = outcome.error
        except QueryError as exc:
            # The server answered but failed the query (a missing GRANT, statement_timeout): the round
            # failed, the source is not down (the probe says whether it is).
            error = f"{exc.source}: {exc}"
        except SchemaError as exc:
            # Not an Immich schema we know (or one that changed under us): one line, no traceback.
            error = f"postgres: {exc}"
        except SourceError as exc:
            error = f"{exc.source}: {exc}"
            sources[exc.source] = str(exc)
        except TimeoutError:
            error = f"did not finish within its deadline of {collection.timeout:.0f}s"
            # A deadline hit means a backend stopped answering: say which one we were waiting on.
            if "postgres" in collection.sources and self.pg is not None:
                await self.pg.reset()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug, not a backend problem: keep serving, but say so loudly
            log.exception("collection %s failed unexpectedly", collection.name)
            error = f"internal error: {describe_error(exc)}"
        duration = time.monotonic() - t0
        result = Result(
            collection=collection.name,
            success=error is None,
            duration=duration,
            finished_at=time.time(),
            parts=outcome.parts if outcome else (),
            error=error,
        )
        if error:
            log.warning("collection %s failed after %.1fs: %s", collection.name, duration, error)
        else:
            log.debug("collection %s finished in %.2fs (started %.0f)", collection.name, duration, started)
        self.store.publish(result, sources)
        return result

    async def _loop(self, collection: Collection) -> None:
        backoff = 1.0
        wake = self._wake[collection.name]
        while not self._stop.is_set():
            wake.clear()
            result = await self.run_once(collection)
            if result.success:
                backoff, delay = 1.0, collection.interval
            else:
                delay = min(backoff, collection.interval, MAX_BACKOFF)
                backoff = min(backoff * 2, collection.interval, MAX_BACKOFF)
            delay = max(0.0, delay - result.duration) if result.success else delay
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), delay)

    async def probe(self) -> None:
        if self.pg is not None:
            try:
                await asyncio.wait_for(self.pg.probe(), self.pg.config.connect_timeout + 2)
                self.store.set_source("postgres", True)
            except SourceError as exc:
                self.store.set_source("postgres", False, str(exc))
            except TimeoutError:
                self.store.set_source("postgres", False, "did not answer in time")
                await self.pg.reset()
        if self.media_root is not None:
            # A hung mount keeps its probe thread stuck: never start a second one beside it.
            if self._fs_probe is not None and not self._fs_probe.done():
                self.store.set_source("filesystem", False, "media root does not answer (probe still running)")
                return
            self._fs_probe = asyncio.create_task(probe_filesystem(self.media_root, 3600))
            done, _ = await asyncio.wait({self._fs_probe}, timeout=5.0)
            if not done:
                self.store.set_source("filesystem", False, "media root did not answer within 5s")
                return
            try:
                self._fs_probe.result()
                self.store.set_source("filesystem", True)
            except SourceError as exc:
                self.store.set_source("filesystem", False, str(exc))

    async def _probe_loop(self) -> None:
        while not self._stop.is_set():
            try:
                await self.probe()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("source probe failed unexpectedly")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.probe_interval)
