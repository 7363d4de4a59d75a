"""The ``job_verification`` collection: what every per-asset thumbnail job really left behind.

On a real Immich every thumbnail job completes with no status (its processor catches the handler's
errors), so BullMQ cannot say whether the files were made. This collection can: shortly after each job
finishes, it checks the job's asset with the same rule as the file check (the rows in ``asset_file``,
the files on disk: missing, empty, corrupt, refused path) and counts
``immich_thumbnail_jobs_verified_total{queue, job_name, result}``:

* ``written``: every thumbnail-type file the asset should have is there and sound;
* ``no_effect``: the job finished and a file is still missing or broken;
* ``asset_missing``: the job named an asset that is not in the database (the "not found" noise after a
  restore), or one Immich makes no thumbnails for (deleted, or the hidden half of a live photo);
* ``not_checked``: the job's asset could not be learned while the job existed, the check was shed
  because more jobs finished than ``Limits.checks_per_second`` allows (the bounded queue was full), it
  waited longer than ``Limits.max_age`` behind a busy or absent database, or a path was refused.

Two background tasks do the work, so a scrape or a round never waits on them: the follower
(``sources/bullmq_follow.py``: a blocking XREAD on one Redis connection of its own) and the checker
(``scan.targeted.check_assets``: batches of at most ``Limits.batch`` assets, one query for their rows,
no walk of the tree). Both
survive outages: they report the source down, back off (capped) and carry on. ``collect`` only
publishes the counters and the sources' states.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from immich_thumbnail_exporter.collectors.base import Outcome
from immich_thumbnail_exporter.config import Config
from immich_thumbnail_exporter.metrics import counter
from immich_thumbnail_exporter.scan.targeted import AssetVerdict, check_assets, media_mapper
from immich_thumbnail_exporter.sources.bullmq_follow import FinishedJob, JobFollower
from immich_thumbnail_exporter.sources.media import probe_filesystem
from immich_thumbnail_exporter.sources.paths import PathMapper
from immich_thumbnail_exporter.sources.postgres import PostgresSource, QueryError, SourceError, describe_error
from immich_thumbnail_exporter.sources.redis import RedisSource
from immich_thumbnail_exporter.sources.schema import Schema, SchemaError
from immich_thumbnail_exporter.store import Part
from immich_thumbnail_exporter.vocabulary import (
    ASSET_MISSING,
    NO_EFFECT,
    NOT_CHECKED,
    THUMBNAIL_JOBS_BY_QUEUE,
    VERIFY_RESULTS,
    WRITTEN,
)

log = logging.getLogger(__name__)

MAX_BACKOFF = 30.0
FS_PROBE_TIMEOUT = 5.0


@dataclass(frozen=True)
class Limits:
    """How much verification work the exporter takes on."""

    checks_per_second: float = 50.0
    max_pending: int = 5_000  # finished jobs waiting for their check; more are counted not_checked
    batch: int = 200  # assets per check (one query for their rows)
    settle: float = 1.0  # seconds after the finish event before the asset is checked
    max_age: float = 600.0  # a job still unchecked this long after it finished is counted not_checked
    block: float = 1.0  # seconds one XREAD may block


def verdict(check: AssetVerdict) -> str:
    """The result for one checked asset (the file check's rule, ``scan.targeted``), read for a finished job."""
    if not check.exists or not check.eligible:
        return ASSET_MISSING
    problems = check.broken()
    if not problems:
        return WRITTEN
    if all(reason == "path_refused" for _, reason, _ in problems):
        return NOT_CHECKED  # a path the exporter refuses to open: it cannot say
    return NO_EFFECT


@dataclass(slots=True)
class _Pending:
    job: FinishedJob
    due: float  # monotonic time from which it may be checked
    expires: float


class Verifier:
    """Finished jobs waiting for their check, the rate limit, and the counters."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.pending: deque[_Pending] = deque()
        self.counts: dict[tuple[str, str, str], int] = {}
        self.shed = 0  # not_checked because the queue was full or the job waited too long
        self.checked = 0
        self.batches = 0
        self._tokens = max(limits.checks_per_second, 1.0)
        self._refilled = time.monotonic()

    def count(self, job: FinishedJob, result: str) -> None:
        key = (job.queue, job.name, result)
        self.counts[key] = self.counts.get(key, 0) + 1

    def add(self, job: FinishedJob, now: float) -> None:
        if job.asset_id is None:
            self.count(job, NOT_CHECKED)
        elif len(self.pending) >= self.limits.max_pending:
            self.shed += 1
            self.count(job, NOT_CHECKED)
        else:
            self.pending.append(_Pending(job, now + self.limits.settle, now + self.limits.max_age))

    def expire(self, now: float) -> None:
        """Jobs that waited longer than ``max_age`` are counted not_checked."""
        while self.pending and self.pending[0].expires <= now:
            self.shed += 1
            self.count(self.pending.popleft().job, NOT_CHECKED)

    def take(self, now: float) -> list[_Pending]:
        """The jobs due now, as many as the rate allows (expired ones are counted not_checked)."""
        self.expire(now)
        rate = self.limits.checks_per_second
        self._tokens = min(max(rate, 1.0), self._tokens + max(0.0, now - self._refilled) * rate)
        self._refilled = now
        n = min(int(self._tokens), self.limits.batch)
        batch: list[_Pending] = []
        while self.pending and len(batch) < n and self.pending[0].due <= now:
            batch.append(self.pending.popleft())
        self._tokens -= len(batch)
        return batch

    def put_back(self, batch: list[_Pending]) -> None:
        self.pending.extendleft(reversed(batch))

    def next_due(self, now: float) -> float:
        """Seconds until something may be taken."""
        if not self.pending:
            return 0.25
        wait_rate = 0.0 if self._tokens >= 1 else (1 - self._tokens) / max(self.limits.checks_per_second, 1e-3)
        return min(0.25, max(0.01, self.pending[0].due - now, wait_rate))

    def record(self, batch: list[_Pending], results: dict[str, str]) -> None:
        self.batches += 1
        for item in batch:
            assert item.job.asset_id is not None
            self.count(item.job, results.get(item.job.asset_id, ASSET_MISSING))
            self.checked += 1


class JobVerificationCollection:
    name = "job_verification"
    # Redis (the jobs), PostgreSQL (the rows) and the media folder (the files): a series needs all three.
    sources = frozenset({"redis", "postgres", "filesystem"})

    def __init__(self, config: Config, pg: PostgresSource, limits: Limits | None = None) -> None:
        if not config.media.root or not config.redis.enabled:
            raise ValueError("job verification needs media.root and redis")
        self.config = config
        self.pg = pg
        self.limits = limits or Limits()
        self.interval = float(config.intervals.queues)
        self.timeout = max(1.0, min(self.interval * 0.8, 10.0))
        self.redis = RedisSource(config.redis, connections=1)
        self.follower = JobFollower(self.redis, config.redis.prefix, THUMBNAIL_JOBS_BY_QUEUE, block=self.limits.block)
        self.verifier = Verifier(self.limits)
        self._mapping: tuple[Schema, PathMapper] | None = None
        self.root = config.media.root
        self._tasks: list[asyncio.Task[None]] = []
        # Latest state per source, as the tasks saw it (None: not used since the last round).
        self._states: dict[str, bool | str | None] = {"redis": None, "postgres": None, "filesystem": None}
        self._errors: dict[str, str] = {}
        self._logged: dict[str, bool | str] = {}

    # -- the round: publish only ---------------------------------------------------------------------
    async def collect(self) -> Outcome:
        if not self._tasks:
            self._start()
        sources = {s: v for s, v in self._states.items() if v is not None}
        self._states = {s: None for s in self._states}
        fams = (counter("immich_thumbnail_jobs_verified", self._samples()),)
        error = "; ".join(f"{s}: {e}" for s, e in sorted(self._errors.items())) or None
        return Outcome((Part(self.sources, fams),), sources, error)

    def _samples(self) -> list[tuple[tuple[str, str, str], float]]:
        pairs = set(self.follower.names) | {(q, j) for q, j, _ in self.verifier.counts}
        return [
            ((q, j, r), float(self.verifier.counts.get((q, j, r), 0)))
            for q, j in sorted(pairs) for r in VERIFY_RESULTS
        ]

    def _start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._follow_loop(), name="job-verification-follow"),
            asyncio.create_task(self._check_loop(), name="job-verification-check"),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        self._tasks = []
        await self.redis.close()

    # -- following -----------------------------------------------------------------------------------
    async def _follow_loop(self) -> None:
        backoff = 1.0
        while True:
            try:
                finished = await asyncio.wait_for(self.follower.step(), self.limits.block + self.redis.timeout + 1)
            except asyncio.CancelledError:
                raise
            except (SourceError, TimeoutError) as exc:
                message = str(exc) if isinstance(exc, SourceError) else "no answer to XREAD in time"
                self._set("redis", message)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
                continue
            except Exception:  # a bug: say so, keep following
                log.exception("following the thumbnail queues failed unexpectedly")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
                continue
            backoff = 1.0
            self._set("redis", True)
            now = time.monotonic()
            for job in finished:
                self.verifier.add(job, now)

    # -- checking ------------------------------------------------------------------------------------
    async def _check_loop(self) -> None:
        backoff = 1.0
        while True:
            now = time.monotonic()
            if self.pg.saturated():
                # The file check holds every connection: wait for one instead of queueing behind it.
                self.verifier.expire(now)
                await asyncio.sleep(1.0)
                continue
            batch = self.verifier.take(now)
            if not batch:
                await asyncio.sleep(self.verifier.next_due(now))
                continue
            try:
                results = await self._check([p.job.asset_id for p in batch if p.job.asset_id])
            except asyncio.CancelledError:
                self.verifier.put_back(batch)
                raise
            except Exception as exc:
                self.verifier.put_back(batch)
                self._mapping = None  # a schema change or a moved media location is looked up again
                self._failed(exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
                continue
            backoff = 1.0
            self._errors.pop("internal", None)
            self.verifier.record(batch, results)

    async def _check(self, asset_ids: Iterable[str]) -> dict[str, str]:
        """One batch: the media folder must answer first (an unmounted volume would make every file look
        missing), then the rows of every asset in one go and the files they name."""
        await probe_filesystem(self.root, FS_PROBE_TIMEOUT)
        self._set("filesystem", True)
        ids = sorted(set(asset_ids))
        timeout = float(self.config.database.statement_timeout)
        schema, mapper = await asyncio.wait_for(self.prepare(), timeout + 30)
        checks = await asyncio.wait_for(
            check_assets(self.pg, schema, mapper, ids, batch_size=self.limits.batch, timeout=timeout), timeout + 30
        )
        self._set("postgres", True)
        return {a: verdict(c) for a, c in checks.items()}

    async def prepare(self) -> tuple[Schema, PathMapper]:
        """The schema and the media mapping, looked up once (again after a failed batch)."""
        if self._mapping is None:
            self._mapping = (await self.pg.schema(), await media_mapper(self.pg, self.config.media))
        return self._mapping

    def _failed(self, exc: BaseException) -> None:
        if isinstance(exc, QueryError):
            # The server answered but refused (a missing GRANT): not an outage; the probe says whether it is.
            self._errors["postgres"] = f"verification query failed: {exc}"
            log.warning("thumbnail job verification: %s", exc)
        elif isinstance(exc, SourceError):
            self._set(exc.source, str(exc))
        elif isinstance(exc, SchemaError):
            self._errors["postgres"] = f"unsupported schema: {exc}"
        elif isinstance(exc, TimeoutError):
            self._errors["postgres"] = "a verification batch did not finish in time"
        else:
            log.error("thumbnail job verification failed unexpectedly: %s", describe_error(exc))
            self._errors["internal"] = describe_error(exc)

    def _set(self, source: str, state: bool | str) -> None:
        previous = self._logged.get(source)
        self._states[source] = self._logged[source] = state
        if state is True:
            self._errors.pop(source, None)
            if previous not in (None, True):
                log.info("thumbnail job verification: %s is back", source)
            return
        assert isinstance(state, str)
        if previous != state:
            log.warning("thumbnail job verification: %s not usable: %s", source, state)
        self._errors[source] = state

