"""Run the collections in the background and keep the store current.

One loop per collection: run it under its deadline, publish the result, sleep until the next round.
A loop never overlaps itself, so a hung backend can delay one collection but never pile work up. After
a failure the loop retries sooner, with a backoff (``timing.Backoff``) capped at its interval; when a
source comes back, every loop that depends on it is woken at once.

A small probe loop checks PostgreSQL and the media folder between the (possibly long) collection
rounds, so ``immich_exporter_source_up`` turns to 0 within seconds of an outage. The media folder is
probed through its own pool (``sources/media.py``): while a call there is stuck, or a file walker will not
exit, the filesystem source is down and every call fails at once, so a hung mount never holds more than
one thread, and nothing else (name resolution, bcrypt, the database, Redis) waits behind it.

Every duration and freshness decision here is monotonic; the wall clock only stamps results.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence

from immich_thumbnail_exporter.collectors.base import Collection, Outcome
from immich_thumbnail_exporter.sources.health import classify
from immich_thumbnail_exporter.sources.media import media_stuck, media_suspects, probe_filesystem
from immich_thumbnail_exporter.sources.postgres import PostgresSource, SourceError
from immich_thumbnail_exporter.store import Result, Store
from immich_thumbnail_exporter.timing import Backoff

log = logging.getLogger(__name__)

MAX_BACKOFF = 60.0
# How long the media folder gets to answer the probe (a stat and a listing of thumbs/).
FS_PROBE_TIMEOUT = 5.0


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
        closing = [asyncio.create_task(c.close()) for c in self.collections]
        if closing:
            # Together, not one after the other: stopping is bounded however many there are.
            _, late = await asyncio.wait(closing, timeout=2)
            for task in late:
                task.cancel()
            for task in closing:
                if task.done() and not task.cancelled() and task.exception() is not None:
                    log.debug("closing a collection failed: %s", task.exception())

    async def run_once(self, collection: Collection) -> Result:
        """One round of one collection, under its deadline; never raises for backend trouble."""
        t0 = time.monotonic()
        suspects = set(media_suspects())
        outcome: Outcome | None = None
        sources: dict[str, bool | str | None] = {}
        error: str | None = None
        try:
            outcome = await asyncio.wait_for(collection.collect(), collection.timeout)
            sources.update(outcome.sources)
            error = outcome.error
        except TimeoutError:
            error = f"did not finish within its deadline of {collection.timeout:.0f}s"
            # A deadline hit means a backend stopped answering: say which one we were waiting on.
            # The media folder, when its work is stuck or the walk was left waiting on a folder (which the
            # probe now looks into): then the database is not to blame, and its pool is kept.
            on_media = "filesystem" in collection.sources
            stuck = media_stuck() if on_media else None
            waited = sorted(set(media_suspects()) - suspects) if on_media else []
            if stuck is not None:
                error += f" (filesystem: {stuck})"
                sources["filesystem"] = stuck
            elif waited:
                error += f" (the file walk was waiting on {waited[0]})"
            elif "postgres" in collection.sources and self.pg is not None:
                await self.pg.reset()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # QueryError: the server answered but failed the query (a missing GRANT): the round failed,
            # the source is not down (the probe says whether it is). A SourceError names its source.
            failure = classify(exc)
            error = failure.error
            if failure.unexpected:  # a bug, not a backend problem: keep serving, but say so loudly
                log.exception("collection %s failed unexpectedly", collection.name)
            if failure.source is not None:
                sources[failure.source] = failure.state
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
            log.debug("collection %s finished in %.2fs", collection.name, duration)
        self.store.publish(result, sources)
        return result

    async def _loop(self, collection: Collection) -> None:
        backoff = Backoff(1.0, min(collection.interval, MAX_BACKOFF))
        wake = self._wake[collection.name]
        while not self._stop.is_set():
            wake.clear()
            result = await self.run_once(collection)
            if result.success:
                backoff.succeeded()
                delay = max(0.0, collection.interval - result.duration)
            else:
                delay = backoff.failed()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), delay)

    async def _probe_postgres(self) -> None:
        assert self.pg is not None
        try:
            await asyncio.wait_for(self.pg.probe(), self.pg.config.connect_timeout + 2)
            self.store.set_source("postgres", True)
        except SourceError as exc:
            self.store.set_source("postgres", False, str(exc))
        except TimeoutError:
            self.store.set_source("postgres", False, "did not answer in time")
            await self.pg.reset()

    async def _probe_filesystem(self) -> None:
        assert self.media_root is not None
        try:
            # Fails at once while earlier media work is stuck: no second thread, no second walker.
            await probe_filesystem(self.media_root, FS_PROBE_TIMEOUT)
            self.store.set_source("filesystem", True)
        except SourceError as exc:
            self.store.set_source("filesystem", False, str(exc))

    async def probe(self) -> None:
        # Side by side: a hung mount must not delay the database's probe, nor the other way round.
        probes = []
        if self.pg is not None:
            probes.append(self._probe_postgres())
        if self.media_root is not None:
            probes.append(self._probe_filesystem())
        for outcome in await asyncio.gather(*probes, return_exceptions=True):
            if isinstance(outcome, BaseException) and not isinstance(outcome, asyncio.CancelledError):
                log.error("source probe failed unexpectedly: %s", outcome, exc_info=outcome)

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
