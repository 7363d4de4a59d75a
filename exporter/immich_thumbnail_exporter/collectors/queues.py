"""The ``queues`` collection: Immich's job queues as metric families, from BullMQ in Redis/Valkey or,
failing that, from Immich's API.

Every round (``intervals.queues``) it reads, through ``sources/bullmq.py`` (a bounded number of
pipelined read commands per queue), and waits until the process's one event reader
(``sources/bullmq_reader.py``) has delivered every event written so far:

* ``immich_queue_jobs{state}``, ``immich_queue_paused``: the lists' lengths and the ``paused`` field of
  ``meta``;
* ``immich_queue_oldest_job_age_seconds``: from the next jobs' ``timestamp`` (waiting) and the active
  jobs' ``processedOn``, turned into an age when Prometheus scrapes;
* ``immich_queue_stalled_jobs``: active jobs (up to ``ACTIVE_SAMPLE``) whose lock is gone and that have
  not finished;
* ``immich_queue_orphaned_jobs``: waiting and active jobs (up to ``redis.orphan_sample`` per queue) of
  per-asset job types whose ``data.id`` is not an asset in the database (one PostgreSQL query per round,
  ``sources/bullmq_orphans.py``);
* ``immich_queue_workers``: ``CLIENT LIST`` connections named like BullMQ workers of the queue;
* the job counters and histograms (``collectors/job_events.py``).

Queues are discovered with a bounded ``SCAN MATCH <prefix>:*:meta`` (never ``KEYS``) plus a direct check
of Immich's known queue names, at most every ``DISCOVERY_INTERVAL`` seconds.

When Redis is not configured or is down and ``immich.url`` is set, queue depth and pause state come from
Immich's API instead (``GET /api/queues``, or ``GET /api/jobs`` before v2.4), with the same labels.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping, Sequence

from prometheus_client.core import Metric
from redis.exceptions import ResponseError

from immich_thumbnail_exporter.collectors.base import Outcome
from immich_thumbnail_exporter.collectors.job_events import JobCounters
from immich_thumbnail_exporter.config import Config
from immich_thumbnail_exporter.metrics import gauge
from immich_thumbnail_exporter.sources.bullmq import BullMQ, QueueSample
from immich_thumbnail_exporter.sources.bullmq_orphans import assets_present
from immich_thumbnail_exporter.sources.bullmq_reader import EventReader
from immich_thumbnail_exporter.sources.health import SourceStates
from immich_thumbnail_exporter.sources.immich_api import ApiAuthError, ApiError, ImmichApi, QueueStats
from immich_thumbnail_exporter.sources.postgres import PostgresSource, QueryError, SourceError, describe_error
from immich_thumbnail_exporter.sources.redis import RedisSource, describe_redis_error
from immich_thumbnail_exporter.sources.schema import SchemaError
from immich_thumbnail_exporter.store import Part
from immich_thumbnail_exporter.timing import left
from immich_thumbnail_exporter.vocabulary import QUEUE_STATES

log = logging.getLogger(__name__)


DISCOVERY_INTERVAL = 300.0  # seconds between SCANs for queues
DISCOVERY_RETRY = 60.0  # ... while none has been found
API_SLOW_POLL = 300.0  # API re-check after an auth error, and auth check while Redis serves the data
VERSION_INTERVAL = 300.0
ORPHAN_MAX_AGE = 600.0  # seconds the last orphan counts stand in while PostgreSQL's pool is busy
FLOOR = 0.05
API_NOT_CHECKED = "not checked yet"


class AgeFamilies:
    """``Part.dynamic``: oldest-job ages computed at scrape time from the jobs' timestamps."""

    def __init__(self, oldest: Sequence[tuple[str, str, int | None]]) -> None:
        self.oldest = tuple(oldest)

    def __call__(self, now: float) -> Iterable[Metric]:
        return [gauge("immich_queue_oldest_job_age_seconds",
                      [((queue, state), age_seconds(ms, now)) for queue, state, ms in self.oldest])]


def age_seconds(ms: int | None, now: float) -> float:
    """A job's age from BullMQ's wall-clock ms timestamp; never negative (a clock stepped back, or one
    host's clock ahead of the other's, must not make a job younger than new)."""
    return 0.0 if ms is None else max(0.0, now - ms / 1000.0)


def queue_families(
    queues: Sequence[str], samples: Mapping[str, QueueSample], workers: Mapping[str, int] | None
) -> list[Metric]:
    """Depth, pause state, stalled jobs and (when CLIENT LIST answered) workers, from one round's samples."""
    fams = [
        gauge("immich_queue_jobs", [
            ((q, state), float(samples[q].counts.get(state, 0))) for q in queues for state in QUEUE_STATES
        ]),
        gauge("immich_queue_paused", [((q,), 1.0 if samples[q].paused else 0.0) for q in queues]),
        gauge("immich_queue_stalled_jobs", [((q,), float(samples[q].stalled)) for q in queues]),
    ]
    if workers is not None:
        fams.append(gauge("immich_queue_workers", [((q,), float(workers.get(q, 0))) for q in queues]))
    return fams


def oldest_jobs(queues: Sequence[str], samples: Mapping[str, QueueSample]) -> list[tuple[str, str, int | None]]:
    """(queue, state, ms timestamp) of the oldest waiting and active jobs, turned into ages at scrape time."""
    return [(q, "waiting", samples[q].oldest_waiting_ms) for q in queues] + [
        (q, "active", samples[q].oldest_active_ms) for q in queues
    ]


def orphans_family(queues: Sequence[str], orphaned: Mapping[str, int], sampled: int | None) -> Metric:
    """``sampled``: the per-queue sample size when some queue had more jobs than were checked."""
    suffix = (
        f" Sampled: at most {sampled} waiting or active jobs per queue are checked each round, so this can "
        "undercount." if sampled is not None else ""
    )
    return gauge("immich_queue_orphaned_jobs", [((q,), float(orphaned.get(q, 0))) for q in queues],
                 help_suffix=suffix)


def api_families(stats: Sequence[QueueStats]) -> list[Metric]:
    """Depth and pause state from Immich's API, with the same labels as from Redis."""
    rows = sorted(stats, key=lambda s: s.name)
    return [
        gauge("immich_queue_jobs", [
            ((s.name, state), float(s.counts[state])) for s in rows for state in QUEUE_STATES if state in s.counts
        ]),
        gauge("immich_queue_paused", [((s.name,), 1.0 if s.paused else 0.0) for s in rows]),
    ]


class QueueCollection:
    name = "queues"

    def __init__(self, config: Config, pg: PostgresSource) -> None:
        self.config = config
        # PostgreSQL only for the orphaned-jobs lookup.
        self.sources = frozenset(
            {"postgres"} | ({"redis"} if config.redis.enabled else set())
            | ({"immich_api"} if config.immich.enabled else set())
        )
        self.pg = pg
        self.interval = float(config.intervals.queues)
        # Below the interval, so a round never runs into the next one.
        self.timeout = max(1.0, min(self.interval * 0.8, self.interval - 1.0))
        self.prefix = config.redis.prefix
        self.redis = RedisSource(config.redis) if config.redis.enabled else None
        self.bullmq = BullMQ(self.redis, self.prefix) if self.redis is not None else None
        # The process's one event reader (shared with job verification and regeneration).
        self.events = EventReader.attach(config.redis) if self.redis is not None else None
        self.counters = JobCounters() if self.events is not None else None
        if self.events is not None and self.counters is not None:
            self.events.subscribe(self.counters)
        self.states = SourceStates(log, "queues")
        self.api = ImmichApi(config.immich) if config.immich.enabled else None
        self.queues: tuple[str, ...] = ()
        self.discovery_interval = DISCOVERY_INTERVAL
        self._next_discovery = 0.0
        self._discovered_once = False
        self._baseline_complete = False
        self._last_orphans: tuple[float, dict[str, int]] | None = None
        self._orphans_error: str | None = None
        # Immich API bookkeeping (its own wording and levels: an auth error is an error, said once)
        self._api_state: bool | str = API_NOT_CHECKED
        self._api_auth_error: str | None = None
        self._api_next_poll = 0.0
        self._api_next_auth_check = 0.0
        self._api_depth_logged = False
        self._api_version: str | None = None
        self._api_next_version = 0.0

    # -- the round -----------------------------------------------------------------------------------
    async def collect(self) -> Outcome:
        start = time.monotonic()
        deadline = start + self.timeout - min(1.0, self.timeout * 0.1)
        parts: list[Part] = []
        sources: dict[str, bool | str] = {}
        errors: list[str] = []
        redis_ok = False
        if self.redis is not None:
            try:
                try:
                    redis_parts, pg_state = await self._collect_redis(deadline)
                except ResponseError as exc:
                    raise SourceError("redis", f"{self.redis.target}: {describe_redis_error(exc)}") from None
            except SourceError as exc:
                sources["redis"] = self.states.set("redis", str(exc))
                errors.append(f"redis: {exc}")
            else:
                redis_ok = True
                sources["redis"] = self.states.set("redis", True)
                parts.extend(redis_parts)
                if pg_state is not None:
                    sources["postgres"] = pg_state
                    if pg_state is not True:
                        errors.append(f"postgres: {pg_state}")
                if self._orphans_error:
                    errors.append(f"postgres: {self._orphans_error}")
        if self.api is not None:
            api_deadline = min(deadline + 0.5, start + self.timeout - 0.05)
            api_parts, api_state = await self._collect_api(depth=not redis_ok, deadline=api_deadline)
            sources["immich_api"] = api_state
            parts.extend(api_parts)
            if not redis_ok and api_state is not True:
                errors.append(f"immich_api: {api_state}")
        return Outcome(tuple(parts), sources, "; ".join(errors) or None)

    # -- Redis ---------------------------------------------------------------------------------------
    async def _collect_redis(self, deadline: float) -> tuple[list[Part], bool | str | None]:
        assert self.bullmq is not None and self.events is not None and self.counters is not None
        assert self.redis is not None
        if time.monotonic() >= self._next_discovery or not self.queues:
            await self._discover(self.bullmq, deadline)
        queues = self.queues
        samples = await self.bullmq.sample(queues, deadline, self.config.redis.orphan_sample)
        workers = await self.bullmq.workers(queues, deadline)
        # The counters show every event written before this round, unless the reader is behind (or down:
        # it says so itself); a counter that lags a round is still true.
        if not await self.events.catch_up(self.redis, queues, deadline):
            log.debug("the event reader has not caught up this round (%s)", self.events.state)

        lost = {q: self.events.lost.get(q, 0) for q in queues}
        parts = [
            Part(frozenset({"redis"}), tuple(queue_families(queues, samples, workers)),
                 dynamic=AgeFamilies(oldest_jobs(queues, samples))),
            Part(frozenset({"redis"}), tuple(self.counters.families(lost))),
        ]
        orphaned, pg_state = await self._orphans(samples, deadline)
        if orphaned is not None:
            truncated = any(samples[q].truncated for q in queues)
            parts.append(Part(frozenset({"redis", "postgres"}), (
                orphans_family(queues, orphaned, self.config.redis.orphan_sample if truncated else None),
            )))
        return parts, pg_state

    async def _discover(self, bullmq: BullMQ, deadline: float) -> None:
        assert self.events is not None
        queues, complete = await bullmq.discover(deadline)
        if queues != self.queues:
            log.info("BullMQ queues under %s: %s", self.prefix, ", ".join(queues) or "none yet")
        new: set[str] = set()
        if self._discovered_once:
            # A queue that did not exist at the first (complete) discovery has existed only while we
            # were watching: its whole event stream is new, so it is read from its start.
            if self._baseline_complete:
                new = set(queues) - set(self.queues)
        else:
            self._discovered_once = True
            self._baseline_complete = complete
        self.queues = queues
        # Followed for good: a queue missing from one discovery (its keys gone for a moment, after a
        # FLUSHALL) still has its events counted when they come back, before the next discovery sees it.
        self.events.follow(queues, from_start=new)
        self._next_discovery = time.monotonic() + (self.discovery_interval if queues else DISCOVERY_RETRY)

    async def _orphans(
        self, samples: dict[str, QueueSample], deadline: float
    ) -> tuple[dict[str, int] | None, bool | str | None]:
        """Orphaned jobs per queue, and the PostgreSQL state to report (None: not asked this round).

        PostgreSQL's pool is shared with the inventory and file checks, which may hold every connection
        for minutes. A busy pool is not an outage: the round then reuses the counts of the last check
        (if at most ``ORPHAN_MAX_AGE`` old) and reports nothing about PostgreSQL; its probe does that."""
        queues = list(samples)
        self._orphans_error = None
        wanted = sorted({asset for s in samples.values() for _, asset in s.asset_jobs})
        if not wanted:
            counts = dict.fromkeys(queues, 0)
            self._last_orphans = (time.monotonic(), counts)
            return counts, None
        try:
            if self.pg.saturated():
                return self._previous_orphans(queues, "every PostgreSQL connection is busy"), None
            limit = min(float(self.config.database.statement_timeout), max(0.2, left(deadline) - 0.3))
            present = await asyncio.wait_for(assets_present(self.pg, wanted, limit), left(deadline, FLOOR))
        except QueryError as exc:
            # The server answered but refused (a missing GRANT on the asset table): no orphan counts this
            # round, and the round fails with that line, but PostgreSQL is not down (its probe says so).
            self._orphans_error = f"orphaned-jobs query failed: {exc}"
            return None, None
        except SourceError as exc:
            return None, str(exc)
        except SchemaError as exc:
            return None, f"unsupported schema: {exc}"
        except TimeoutError:
            return self._previous_orphans(queues, "the orphaned-jobs query did not finish in time"), None
        except Exception as exc:  # asyncpg errors (permissions, ...): a problem of that source
            return None, f"orphaned-jobs query failed: {describe_error(exc)}"
        counts = {q: sum(1 for _, asset in s.asset_jobs if asset not in present) for q, s in samples.items()}
        self._last_orphans = (time.monotonic(), counts)
        return counts, True

    def _previous_orphans(self, queues: list[str], why: str) -> dict[str, int] | None:
        last = self._last_orphans
        if last is None or time.monotonic() - last[0] > ORPHAN_MAX_AGE:
            log.debug("orphaned jobs not checked this round: %s", why)
            return None
        log.debug("orphaned jobs not checked this round (%s): showing the last check's counts", why)
        return {q: last[1].get(q, 0) for q in queues}

    # -- Immich API ----------------------------------------------------------------------------------
    async def _collect_api(self, depth: bool, deadline: float) -> tuple[list[Part], bool | str]:
        """Depth and pause state from the API when Redis cannot give them; otherwise a light check.

        An auth error (401/403) is logged once and the API is then asked again only every
        ``API_SLOW_POLL`` seconds: the key will not fix itself, and a retry storm helps nobody."""
        assert self.api is not None
        api = self.api
        now = time.monotonic()

        def limit() -> float:
            return max(0.2, min(float(self.config.immich.timeout), deadline - time.monotonic()))

        if self._api_auth_error is not None and now < self._api_next_poll:
            return [], self._api_auth_error
        if now >= self._api_next_version:
            self._api_next_version = now + VERSION_INTERVAL
            try:
                version = await asyncio.wait_for(api.version(), limit())
                if version != self._api_version:
                    log.info("Immich server version (from its API): %s", version)
                self._api_version = version
            except (ApiError, TimeoutError) as exc:
                log.debug("GET /api/server/version failed: %s", exc)
        parts: list[Part] = []
        try:
            if depth or now >= self._api_next_auth_check or self._api_auth_error is not None:
                # The queue endpoint needs an admin key: it also proves the key still works.
                stats = await asyncio.wait_for(api.queues(), limit())
                self._api_next_auth_check = now + API_SLOW_POLL
                if depth:
                    parts.append(self._api_part(stats))
            else:
                await asyncio.wait_for(api.ping(), limit())
        except ApiAuthError as exc:
            # The key will not fix itself: an error, said once, and asked again only every API_SLOW_POLL s.
            if self._api_auth_error is None:
                log.error("Immich API: %s; asking again every %.0fs", exc, API_SLOW_POLL)
            self._api_auth_error = str(exc)
            self._api_next_poll = now + API_SLOW_POLL
            self._api_state = str(exc)
            return [], str(exc)
        except (ApiError, TimeoutError) as exc:
            message = str(exc) if isinstance(exc, ApiError) else f"{api.base}: no answer in time"
            if self._api_state != message:
                log.warning("Immich API not usable: %s", message)
            self._api_state = message
            return [], message
        if self._api_state is not True and self._api_state != API_NOT_CHECKED:
            log.info("Immich API %s works again", api.base)
        self._api_state = True
        self._api_auth_error = None
        if depth and not self._api_depth_logged:
            why = "Redis is not configured" if self.redis is None else "Redis is not usable"
            log.warning(
                "queue depth and pause state come from Immich's API (%s): no workers, job ages, stalled or "
                "orphaned jobs and no job counters until Redis is available", why,
            )
            self._api_depth_logged = True
        elif not depth and self._api_depth_logged:
            log.info("queue metrics come from Redis again")
            self._api_depth_logged = False
        return parts, True

    def _api_part(self, stats: list[QueueStats]) -> Part:
        return Part(frozenset({"immich_api"}), tuple(api_families(stats)))

    async def close(self) -> None:
        if self.events is not None:
            if self.counters is not None:
                self.events.unsubscribe(self.counters)
            await self.events.release()
        if self.redis is not None:
            await self.redis.close()
        if self.api is not None:
            await self.api.close()

