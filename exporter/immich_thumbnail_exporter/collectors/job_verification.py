"""The ``job_verification`` collection: what every per-asset (and face) thumbnail job really left behind.

On a real Immich every thumbnail job completes with no status (its processor catches the handler's
errors), so BullMQ cannot say whether the files were made. This collection can: shortly after each job
finishes, it checks the job's asset with the same rule as the file check (the rows in ``asset_file``,
the files on disk: missing, empty, corrupt, refused path) and counts
``immich_thumbnail_jobs_verified_total{queue, job_name, result}``:

* ``written``: every thumbnail-type file the asset should have is there and sound;
* ``no_effect``: the job finished and a file is still missing or broken;
* ``asset_missing``: the job named an asset that is not in the database (the "not found" noise after a
  restore), or one Immich makes no thumbnails for (deleted, or the hidden half of a live photo); for a
  face job, a person that is not in the database;
* ``not_checked``: the job's asset could not be learned while the job existed, the check was shed
  because more jobs finished than ``Limits.checks_per_second`` allows (the bounded queue was full), it
  waited longer than ``Limits.max_age`` behind a busy or absent database, or a path was refused.

The work runs in the background, so a scrape or a round never waits on it: the follower
(``sources/bullmq_follow.py``, a subscriber of the process's one event reader, ``sources/bullmq_reader.py``)
hands each finished job to the verifier as it is read, and the checker task
(``scan.targeted.check_assets``: batches of at most ``Limits.batch`` assets, one query for their rows,
no walk of the tree; ``check_people`` likewise for the people of face jobs) checks them. Both survive
outages: the reader and the checker report the source down, back off (capped) and carry on. ``collect``
only publishes the counters and the sources' states.

Face thumbnail jobs (``PersonGenerateThumbnail``, data ``{"id": personId}``): the follower hands them
over with ``kind="person"``; the person's face thumbnail is checked by the same file rule
(``check_people``: ``person."thumbnailPath"``, the file present, not empty, a real image) and counted
under the same family with the job's own name: written, no_effect, asset_missing (no such person),
not_checked.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from math import floor

from immich_thumbnail_exporter.collectors.base import Outcome
from immich_thumbnail_exporter.config import Config
from immich_thumbnail_exporter.metrics import counter
from immich_thumbnail_exporter.scan.targeted import (
    AssetVerdict,
    PersonVerdict,
    check_assets,
    check_people,
    media_mapper,
)
from immich_thumbnail_exporter.sources.bullmq_follow import ASSET, PERSON, FinishedJob, JobFollower
from immich_thumbnail_exporter.sources.bullmq_reader import EventReader
from immich_thumbnail_exporter.sources.health import SourceStates
from immich_thumbnail_exporter.sources.media import probe_filesystem
from immich_thumbnail_exporter.sources.paths import PathMapper
from immich_thumbnail_exporter.sources.postgres import PostgresSource
from immich_thumbnail_exporter.sources.schema import Schema
from immich_thumbnail_exporter.store import Part
from immich_thumbnail_exporter.timing import Backoff, RateLimiter
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


def verdict(check: AssetVerdict | PersonVerdict) -> str:
    """The result for one checked asset, or person (the file check's rule, ``scan.targeted``), read for a
    finished job. A person has no eligibility rule: there is one, or there is not."""
    if not check.exists or not check.eligible:
        return ASSET_MISSING
    problems = check.broken()
    if not problems:
        return WRITTEN
    if all(reason == "path_refused" for _, reason, _ in problems):
        return NOT_CHECKED  # a path the exporter refuses to open: it cannot say
    return NO_EFFECT


def verified_samples(
    names: Iterable[tuple[str, str]], counts: Mapping[tuple[str, str, str], int]
) -> list[tuple[tuple[str, str, str], float]]:
    """Every result of every (queue, job name) seen, 0 until counted: a series exists from the first job."""
    pairs = set(names) | {(q, j) for q, j, _ in counts}
    return [((q, j, r), float(counts.get((q, j, r), 0))) for q, j in sorted(pairs) for r in VERIFY_RESULTS]


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
        self.waits = 0  # times the checker waited for a busy database: a counter tests can wait on
        # At most one second's worth of checks at once: an idle minute does not save up a minute's worth.
        rate = max(limits.checks_per_second, 1e-3)
        self._limiter = RateLimiter(rate, burst=floor(max(rate, 1.0)))

    def count(self, job: FinishedJob, result: str) -> None:
        key = (job.queue, job.name, result)
        self.counts[key] = self.counts.get(key, 0) + 1

    def add(self, job: FinishedJob, now: float) -> None:
        if job.entity_id is None:
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
        batch: list[_Pending] = []
        while (self.pending and len(batch) < self.limits.batch and self.pending[0].due <= now
               and self._limiter.allow()):
            batch.append(self.pending.popleft())
        return batch

    def put_back(self, batch: list[_Pending]) -> None:
        self.pending.extendleft(reversed(batch))

    def next_due(self, now: float) -> float:
        """Seconds until something may be taken."""
        if not self.pending:
            return 0.25
        return min(0.25, max(0.01, self.pending[0].due - now, self._limiter.delay()))

    def record(self, batch: list[_Pending], results: Mapping[tuple[str, str], str]) -> None:
        """Count each job's result: ``results`` by (kind, asset or person id)."""
        self.batches += 1
        for item in batch:
            assert item.job.entity_id is not None
            self.count(item.job, results.get((item.job.kind, item.job.entity_id), ASSET_MISSING))
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
        self.verifier = Verifier(self.limits)
        # The process's one event reader (shared with the queue counters and regeneration).
        self.events = EventReader.attach(config.redis)
        self.follower = JobFollower(self.events, THUMBNAIL_JOBS_BY_QUEUE, frozenset({ASSET, PERSON}),
                                    sink=self._finished)
        self._mapping: tuple[Schema, PathMapper] | None = None
        self.root = config.media.root
        self._task: asyncio.Task[None] | None = None
        # Each source's state as the checker saw it (None: not used since the last round).
        self._states: dict[str, bool | str | None] = {"postgres": None, "filesystem": None}
        self._errors: dict[str, str] = {}
        self.health = SourceStates(log, "thumbnail job verification")

    def _finished(self, job: FinishedJob) -> None:
        self.verifier.add(job, time.monotonic())

    # -- the round: publish only ---------------------------------------------------------------------
    def start(self) -> None:
        """The checker task and the event reader (each once); ``collect`` calls it."""
        if self._task is None:
            self._task = asyncio.create_task(self._check_loop(), name="job-verification-check")
        self.events.start()

    async def collect(self) -> Outcome:
        self.start()
        sources = {s: v for s, v in self._states.items() if v is not None}
        self._states = dict.fromkeys(self._states)
        errors = dict(self._errors)
        redis = self.events.state
        if redis is not None:
            sources["redis"] = redis
            if isinstance(redis, str):
                errors["redis"] = redis
        fams = (counter("immich_thumbnail_jobs_verified", self._samples()),)
        error = "; ".join(f"{s}: {e}" for s, e in sorted(errors.items())) or None
        return Outcome((Part(self.sources, fams),), sources, error)

    def _samples(self) -> list[tuple[tuple[str, str, str], float]]:
        return verified_samples(self.follower.names, self.verifier.counts)

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task], timeout=5)
        self.follower.close()
        await self.events.release()

    # -- checking ------------------------------------------------------------------------------------
    async def _check_loop(self) -> None:
        backoff = Backoff(1.0, MAX_BACKOFF)
        while True:
            now = time.monotonic()
            if self.pg.saturated():
                # The file check holds every connection: wait for one instead of queueing behind it.
                self.verifier.expire(now)
                self.verifier.waits += 1
                await asyncio.sleep(1.0)
                continue
            batch = self.verifier.take(now)
            if not batch:
                await asyncio.sleep(self.verifier.next_due(now))
                continue
            try:
                results = await self._check([p.job for p in batch])
            except asyncio.CancelledError:
                self.verifier.put_back(batch)
                raise
            except Exception as exc:
                self.verifier.put_back(batch)
                self._mapping = None  # a schema change or a moved media location is looked up again
                self._failed(exc)
                await asyncio.sleep(backoff.failed())
                continue
            backoff.succeeded()
            self._errors.pop("internal", None)
            self.verifier.record(batch, results)

    async def _check(self, jobs: Iterable[FinishedJob]) -> dict[tuple[str, str], str]:
        """One batch: the media folder must answer first (an unmounted volume would make every file look
        missing), then the rows of every asset (and person) in one go and the files they name. Returns
        each result by (kind, id)."""
        await probe_filesystem(self.root, FS_PROBE_TIMEOUT)
        self._set("filesystem", True)
        ids: dict[str, set[str]] = {ASSET: set(), PERSON: set()}
        for job in jobs:
            if job.entity_id is not None:
                ids[job.kind].add(job.entity_id)
        timeout = float(self.config.database.statement_timeout)
        schema, mapper = await asyncio.wait_for(self.prepare(), timeout + 30)
        out: dict[tuple[str, str], str] = {}
        for kind, check in ((ASSET, check_assets), (PERSON, check_people)):
            if not ids[kind]:
                continue
            checks: Mapping[str, AssetVerdict | PersonVerdict] = await asyncio.wait_for(
                check(self.pg, schema, mapper, sorted(ids[kind]), batch_size=self.limits.batch, timeout=timeout),
                timeout + 30)
            out.update(((kind, i), verdict(c)) for i, c in checks.items())
        self._set("postgres", True)
        return out

    async def prepare(self) -> tuple[Schema, PathMapper]:
        """The schema and the media mapping, looked up once (again after a failed batch)."""
        if self._mapping is None:
            self._mapping = (await self.pg.schema(), await media_mapper(self.pg, self.config.media))
        return self._mapping

    def _failed(self, exc: BaseException) -> None:
        failure = self.health.failed(exc, "a verification batch did not finish in time")
        if failure.source is not None and failure.state is not None:
            self._set(failure.source, failure.state)
        elif failure.unexpected:
            self._errors["internal"] = failure.error.removeprefix("internal error: ")
        else:
            # Answered but refused (a missing GRANT), an unsupported schema, a timeout: the round fails
            # with that line, but the database is not called down (its probe says whether it is).
            self._errors["postgres"] = failure.error.removeprefix("postgres: ")

    def _set(self, source: str, state: bool | str) -> None:
        self._states[source] = self.health.set(source, state)
        if state is True:
            self._errors.pop(source, None)
        else:
            assert isinstance(state, str)
            self._errors[source] = state
