"""Immich's job queues, read straight from BullMQ's keys in Redis/Valkey (or, failing that, the API).

Every round (``intervals.queues``), for each queue, a bounded number of pipelined read commands:

* ``immich_queue_jobs{state}``: LLEN ``wait``/``active``/``paused``, ZCARD ``delayed``/``prioritized``/
  ``completed``/``failed``; ``immich_queue_paused``: the ``paused`` field of ``meta``;
* ``immich_queue_oldest_job_age_seconds``: the job hashes' ``timestamp`` (waiting: the next jobs in
  ``wait``, ``paused`` and ``prioritized``) and ``processedOn`` (active), turned into an age when
  Prometheus scrapes;
* ``immich_queue_stalled_jobs``: active jobs (up to ``ACTIVE_SAMPLE``) whose ``<jobId>:lock`` key is gone
  and that have not finished;
* ``immich_queue_orphaned_jobs``: waiting and active jobs (up to ``redis.orphan_sample`` per queue) of
  per-asset job types whose ``data.id`` is not an asset in the database (one PostgreSQL query per round);
* ``immich_queue_workers``: ``CLIENT LIST`` connections named like BullMQ workers of the queue;
* the job counters and histograms from the event streams (``immich_thumbnail_exporter/collectors/job_events.py``).

Queues are discovered with a bounded ``SCAN MATCH <prefix>:*:meta`` (never ``KEYS``) plus a direct check
of Immich's known queue names, at most every ``DISCOVERY_INTERVAL`` seconds.

When Redis is not configured or is down and ``immich.url`` is set, queue depth and pause state come from
Immich's API instead (``GET /api/queues``, or ``GET /api/jobs`` before v2.4), with the same labels.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from prometheus_client.core import Metric
from redis.exceptions import ResponseError

from immich_thumbnail_exporter.collectors.base import Outcome
from immich_thumbnail_exporter.collectors.job_events import EventTracker, loads, to_int
from immich_thumbnail_exporter.config import Config
from immich_thumbnail_exporter.exposition.metrics import gauge
from immich_thumbnail_exporter.exposition.store import Part
from immich_thumbnail_exporter.sources.immich_api import ApiAuthError, ApiError, ImmichApi, QueueStats
from immich_thumbnail_exporter.sources.postgres import PostgresSource, QueryError, SourceError, describe_error
from immich_thumbnail_exporter.sources.redis import RedisSource, describe_redis_error, is_permission_error
from immich_thumbnail_exporter.sources.schema import SchemaError
from immich_thumbnail_exporter.vocabulary import KNOWN_QUEUES, QUEUE_STATES, is_asset_job

log = logging.getLogger(__name__)


DISCOVERY_INTERVAL = 300.0  # seconds between SCANs for queues
DISCOVERY_RETRY = 60.0  # ... while none has been found
SCAN_COUNT = 1000
MAX_SCAN_CALLS = 500  # at most ~500k keys examined per discovery
MAX_QUEUES = 64
AGE_SAMPLE = 5  # ids at the head of wait / paused / prioritized checked for the oldest waiting job
ACTIVE_SAMPLE = 100  # active jobs checked for locks (stalled) and the oldest active job
JOB_FIELDS = ("timestamp", "processedOn", "finishedOn", "name", "data")
API_SLOW_POLL = 300.0  # API re-check after an auth error, and auth check while Redis serves the data
VERSION_INTERVAL = 300.0
ORPHAN_MAX_AGE = 600.0  # seconds the last orphan counts stand in while PostgreSQL's pool is busy
NOT_CHECKED = "not checked yet"

UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


def glob_escape(text: str) -> str:
    return re.sub(r"([\\*?\[\]])", r"\\\1", text)


def worker_queue(name: str, prefix: str, by_base64: dict[str, str], queues: set[str]) -> str | None:
    """The queue a BullMQ worker connection serves, from its client name, or None.

    Node BullMQ (Immich) names a worker's connection ``<prefix>:<base64(queue)>`` and, when the worker
    has a name, appends ``:w:<name>``; the Python package uses the plain queue name instead.
    """
    if not name.startswith(prefix + ":"):
        return None
    base = name[len(prefix) + 1:].split(":w:", 1)[0]
    if base in by_base64:
        return by_base64[base]
    if base in queues:
        return base
    return None


@dataclass
class QueueSample:
    """What one round read about one queue."""

    counts: dict[str, int] = field(default_factory=dict)
    paused: bool = False
    oldest_waiting_ms: int | None = None
    oldest_active_ms: int | None = None
    stalled: int = 0
    # (job id, asset id) of sampled per-asset jobs
    asset_jobs: list[tuple[str, str]] = field(default_factory=list)
    checked: int = 0  # waiting/active jobs looked at for orphans
    truncated: bool = False  # more waiting/active jobs than were looked at


class _AgeFamilies:
    """``Part.dynamic``: oldest-job ages computed at scrape time from the jobs' timestamps."""

    def __init__(self, oldest: Sequence[tuple[str, str, int | None]]) -> None:
        self.oldest = tuple(oldest)

    def __call__(self, now: float) -> Iterable[Metric]:
        samples = []
        for queue, state, ms in self.oldest:
            age = 0.0 if ms is None else max(0.0, now - ms / 1000.0)
            samples.append(((queue, state), age))
        return [gauge("immich_queue_oldest_job_age_seconds", samples)]





def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


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
        self.api = ImmichApi(config.immich) if config.immich.enabled else None
        self.events = EventTracker(self.prefix)
        self.queues: tuple[str, ...] = ()
        self.discovery_interval = DISCOVERY_INTERVAL
        self._next_discovery = 0.0
        self._discovered_once = False
        self._baseline_complete = False
        self._client_list_refused = False
        self._last_orphans: tuple[float, dict[str, int]] | None = None
        self._orphans_error: str | None = None
        self._redis_state: bool | str | None = None
        # Immich API bookkeeping
        self._api_state: bool | str = NOT_CHECKED
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
                state = str(exc)
                sources["redis"] = state
                errors.append(f"redis: {exc}")
                if self._redis_state != state:
                    log.warning("Redis is not usable: %s", exc)
            else:
                redis_ok = True
                sources["redis"] = True
                if self._redis_state not in (None, True):
                    log.info("Redis %s is back", self.redis.target)
                parts.extend(redis_parts)
                if pg_state is not None:
                    sources["postgres"] = pg_state
                    if pg_state is not True:
                        errors.append(f"postgres: {pg_state}")
                if self._orphans_error:
                    errors.append(f"postgres: {self._orphans_error}")
            self._redis_state = sources["redis"]
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
        assert self.redis is not None
        source = self.redis
        if time.monotonic() >= self._next_discovery or not self.queues:
            await self._discover(source, deadline)
        queues = self.queues
        samples = await self._sample(source, queues, deadline)
        workers = await self._workers(source, queues, deadline)
        stats = await self.events.poll(source, queues, deadline)
        if stats.behind:
            log.debug("event streams not fully read this round: %s", ", ".join(stats.behind))

        jobs = gauge("immich_queue_jobs", [
            ((q, state), float(samples[q].counts.get(state, 0))) for q in queues for state in QUEUE_STATES
        ])
        paused = gauge("immich_queue_paused", [((q,), 1.0 if samples[q].paused else 0.0) for q in queues])
        stalled = gauge("immich_queue_stalled_jobs", [((q,), float(samples[q].stalled)) for q in queues])
        fams: list[Metric] = [jobs, paused, stalled]
        if workers is not None:
            fams.append(gauge("immich_queue_workers", [((q,), float(workers.get(q, 0))) for q in queues]))
        oldest = [(q, "waiting", samples[q].oldest_waiting_ms) for q in queues]
        oldest += [(q, "active", samples[q].oldest_active_ms) for q in queues]
        parts = [
            Part(frozenset({"redis"}), tuple(fams), dynamic=_AgeFamilies(oldest)),
            Part(frozenset({"redis"}), tuple(self.events.families())),
        ]
        orphaned, pg_state = await self._orphans(samples, deadline)
        if orphaned is not None:
            truncated = any(samples[q].truncated for q in queues)
            suffix = (
                f" Sampled: at most {self.config.redis.orphan_sample} waiting or active jobs per queue are "
                "checked each round, so this can undercount." if truncated else ""
            )
            parts.append(Part(
                frozenset({"redis", "postgres"}),
                (gauge("immich_queue_orphaned_jobs", [((q,), float(orphaned.get(q, 0))) for q in queues],
                       help_suffix=suffix),),
            ))
        return parts, pg_state

    async def _discover(self, source: RedisSource, deadline: float) -> None:
        queues, complete = await discover_queues(source, self.prefix, deadline)
        if queues != self.queues:
            log.info("BullMQ queues under %s: %s", self.prefix, ", ".join(queues) or "none yet")
        if self._discovered_once:
            # A queue that did not exist at the first (complete) discovery has existed only while we
            # were watching: its whole event stream is new, so it is read from its start.
            for queue in set(queues) - set(self.queues):
                if self._baseline_complete:
                    self.events.begin_at_start(queue)
        else:
            self._discovered_once = True
            self._baseline_complete = complete
        self.queues = queues
        self._next_discovery = time.monotonic() + (self.discovery_interval if queues else DISCOVERY_RETRY)

    async def _sample(self, source: RedisSource, queues: Sequence[str], deadline: float) -> dict[str, QueueSample]:
        prefix = self.prefix
        orphan_sample = max(0, self.config.redis.orphan_sample)
        wait_n = max(AGE_SAMPLE, orphan_sample)
        per_queue = 12

        async def _first(client: aioredis.Redis) -> list[Any]:
            async with client.pipeline(transaction=False) as pipe:
                for q in queues:
                    b = f"{prefix}:{q}"
                    pipe.llen(f"{b}:wait")
                    pipe.llen(f"{b}:active")
                    pipe.llen(f"{b}:paused")
                    pipe.zcard(f"{b}:delayed")
                    pipe.zcard(f"{b}:prioritized")
                    pipe.zcard(f"{b}:completed")
                    pipe.zcard(f"{b}:failed")
                    pipe.hget(f"{b}:meta", "paused")
                    # BullMQ pushes new jobs on the left and takes them from the right: the right end
                    # holds the next (normally oldest) jobs.
                    pipe.lrange(f"{b}:wait", -wait_n, -1)
                    pipe.lrange(f"{b}:paused", -wait_n, -1)
                    pipe.zrange(f"{b}:prioritized", 0, AGE_SAMPLE - 1)
                    pipe.lrange(f"{b}:active", -ACTIVE_SAMPLE, -1)
                return list(await pipe.execute(raise_on_error=False))

        first = await source.run("queue counts", _first, _left(deadline)) if queues else []
        samples: dict[str, QueueSample] = {}
        # (queue, job id) -> what to read about it
        wanted: dict[str, dict[str, set[str]]] = {}
        for i, q in enumerate(queues):
            row = first[i * per_queue:(i + 1) * per_queue]
            (wait, active, paused_n, delayed, prioritized, completed, failed, paused_flag,
             wait_ids, paused_ids, prio_ids, active_ids) = row
            s = QueueSample()
            s.counts = {
                "waiting": _count(wait), "active": _count(active), "paused": _count(paused_n),
                "delayed": _count(delayed), "prioritized": _count(prioritized),
                "completed": _count(completed), "failed": _count(failed),
            }
            s.paused = str(paused_flag) in ("1", "true") if not isinstance(paused_flag, Exception) else False
            samples[q] = s
            w_ids = [str(x) for x in (wait_ids if isinstance(wait_ids, list) else [])][::-1]
            p_ids = [str(x) for x in (paused_ids if isinstance(paused_ids, list) else [])][::-1]
            pr_ids = [str(x) for x in (prio_ids if isinstance(prio_ids, list) else [])]
            a_ids = [str(x) for x in (active_ids if isinstance(active_ids, list) else [])][::-1]
            head = w_ids[:AGE_SAMPLE] + p_ids[:AGE_SAMPLE] + pr_ids
            orphans = (a_ids + w_ids + p_ids + pr_ids)[:orphan_sample]
            total = s.counts["waiting"] + s.counts["paused"] + s.counts["prioritized"] + s.counts["active"]
            s.checked = len(orphans)
            s.truncated = total > len(orphans)
            wanted[q] = {"head": set(head), "active": set(a_ids), "orphan": set(orphans)}

        async def _second(client: aioredis.Redis) -> list[Any]:
            async with client.pipeline(transaction=False) as pipe:
                for q in queues:
                    w = wanted[q]
                    for job_id in sorted(w["head"] | w["active"] | w["orphan"]):
                        fields = JOB_FIELDS if job_id in w["orphan"] else JOB_FIELDS[:3]
                        pipe.hmget(f"{prefix}:{q}:{job_id}", list(fields))
                    for job_id in sorted(w["active"]):
                        pipe.exists(f"{prefix}:{q}:{job_id}:lock")
                return list(await pipe.execute(raise_on_error=False))

        if not any(wanted[q]["head"] or wanted[q]["active"] or wanted[q]["orphan"] for q in queues):
            return samples
        second = await source.run("job hashes", _second, _left(deadline))
        pos = 0
        for q in queues:
            w, s = wanted[q], samples[q]
            hashes: dict[str, list[Any]] = {}
            for job_id in sorted(w["head"] | w["active"] | w["orphan"]):
                res = second[pos]
                pos += 1
                hashes[job_id] = res if isinstance(res, list) else []
            locks: dict[str, bool] = {}
            for job_id in sorted(w["active"]):
                res = second[pos]
                pos += 1
                locks[job_id] = isinstance(res, Exception) or _count(res) > 0
            for job_id in w["head"]:
                ts = to_int(hashes[job_id][0]) if hashes[job_id] else None
                if ts is not None and (s.oldest_waiting_ms is None or ts < s.oldest_waiting_ms):
                    s.oldest_waiting_ms = ts
            for job_id in w["active"]:
                h = hashes[job_id]
                if not h or all(v is None for v in h):
                    continue  # finished and removed since we listed it
                started = to_int(h[1]) if to_int(h[1]) is not None else to_int(h[0])
                if started is not None and (s.oldest_active_ms is None or started < s.oldest_active_ms):
                    s.oldest_active_ms = started
                if not locks[job_id] and to_int(h[2]) is None:
                    s.stalled += 1
            for job_id in w["orphan"]:
                h = hashes[job_id]
                if len(h) < 5 or not is_asset_job(h[3]):
                    continue
                asset_id = _asset_id(h[4])
                if asset_id is not None:
                    s.asset_jobs.append((job_id, asset_id))
        return samples

    async def _workers(self, source: RedisSource, queues: Sequence[str], deadline: float) -> dict[str, int] | None:
        if not queues:
            return {}

        async def _list(client: aioredis.Redis) -> list[dict[str, Any]]:
            return list(await client.client_list())

        try:
            clients = await source.run("CLIENT LIST", _list, _left(deadline))
        except ResponseError as exc:
            if not self._client_list_refused:
                log.warning(
                    "the Redis server refuses CLIENT LIST (%s): immich_queue_workers is left out",
                    describe_redis_error(exc),
                )
            self._client_list_refused = True
            if not is_permission_error(exc):
                log.debug("CLIENT LIST failed: %s", exc)
            return None
        if self._client_list_refused:
            log.info("CLIENT LIST works again: immich_queue_workers is back")
            self._client_list_refused = False
        by_base64 = {base64.b64encode(q.encode()).decode(): q for q in queues}
        names = set(queues)
        counts: dict[str, int] = {}
        for client in clients:
            name = str(client.get("name") or "")
            if not name:
                continue
            queue = worker_queue(name, self.prefix, by_base64, names)
            if queue is not None:
                counts[queue] = counts.get(queue, 0) + 1
        return counts

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
            pool = await asyncio.wait_for(self.pg.pool(), _left(deadline))
            if pool.get_size() >= self.pg.config.pool_size and pool.get_idle_size() == 0:
                return self._previous_orphans(queues, "every PostgreSQL connection is busy"), None
            limit = min(float(self.config.database.statement_timeout), max(0.2, _left(deadline) - 0.3))
            present = await asyncio.wait_for(self._assets_present(wanted, limit), _left(deadline))
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

    async def _assets_present(self, asset_ids: list[str], timeout: float) -> set[str]:
        schema = await self.pg.schema()
        table = schema.assets.replace('"', '""')
        async with self.pg.connection() as conn:
            rows = await conn.fetch(
                f'SELECT id::text AS id FROM "{table}" WHERE id = ANY($1::uuid[])', asset_ids, timeout=timeout
            )
        return {str(r["id"]) for r in rows}

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
        if self._api_state is not True and self._api_state != NOT_CHECKED:
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
        rows = sorted(stats, key=lambda s: s.name)
        jobs = gauge("immich_queue_jobs", [
            ((s.name, state), float(s.counts[state])) for s in rows for state in QUEUE_STATES if state in s.counts
        ])
        paused = gauge("immich_queue_paused", [((s.name,), 1.0 if s.paused else 0.0) for s in rows])
        return Part(frozenset({"immich_api"}), (jobs, paused))

    async def close(self) -> None:
        if self.redis is not None:
            await self.redis.close()
        if self.api is not None:
            await self.api.close()


async def discover_queues(source: RedisSource, prefix: str, deadline: float) -> tuple[tuple[str, ...], bool]:
    """Queue names from ``<prefix>:<queue>:meta`` keys (a bounded SCAN) plus Immich's known names that
    have any of their keys; and whether the SCAN saw the whole keyspace. A server that refuses SCAN
    leaves the known names only."""
    complete = False
    pattern = f"{glob_escape(prefix)}:*:meta"
    found: set[str] = set()

    async def _scan(client: aioredis.Redis) -> tuple[set[str], bool]:
        names: set[str] = set()
        cursor: int = 0
        for _ in range(MAX_SCAN_CALLS):
            cursor, keys = await client.scan(cursor=cursor, match=pattern, count=SCAN_COUNT)
            for key in keys:
                name = str(key)[len(prefix) + 1: -len(":meta")]
                if name and ":" not in name:
                    names.add(name)
            if cursor == 0:
                return names, True
        return names, False

    async def _known(client: aioredis.Redis) -> list[Any]:
        async with client.pipeline(transaction=False) as pipe:
            for name in KNOWN_QUEUES:
                base = f"{prefix}:{name}"
                pipe.exists(f"{base}:meta", f"{base}:id", f"{base}:wait", f"{base}:events")
            return list(await pipe.execute(raise_on_error=False))

    try:
        scanned, complete = await source.run(f"SCAN MATCH {pattern}", _scan, max(0.5, _left(deadline) / 2))
        found |= scanned
        if not complete:
            log.info("queue discovery stopped after %d SCAN calls; using the queues found so far", MAX_SCAN_CALLS)
    except ResponseError as exc:
        log.warning("the Redis server refuses SCAN (%s): following Immich's known queues only",
                    describe_redis_error(exc))
    known = await source.run("EXISTS", _known, _left(deadline))
    found |= {name for name, n in zip(KNOWN_QUEUES, known, strict=True) if _count(n) > 0}
    if len(found) > MAX_QUEUES:
        log.warning("%d queues found under %s:, following the first %d", len(found), prefix, MAX_QUEUES)
    return tuple(sorted(found)[:MAX_QUEUES]), complete and len(found) <= MAX_QUEUES


def _asset_id(data: Any) -> str | None:
    if not isinstance(data, str):
        return None
    try:
        doc = loads(data)
    except ValueError:
        return None
    value = doc.get("id") if isinstance(doc, dict) else None
    if isinstance(value, str) and UUID_RE.match(value):
        return value.lower()
    return None


def _left(deadline: float) -> float:
    return max(0.05, deadline - time.monotonic())


# -- check-config ------------------------------------------------------------------------------------


async def check_connections(config: Config) -> list[str]:
    """Try Redis and Immich's API as configured; print ``ok: ...`` lines, return one line per problem."""
    problems: list[str] = []
    if config.redis.enabled:
        source = RedisSource(config.redis)
        try:
            await source.ping()
            version = await source.server_version()
            queues, _ = await discover_queues(source, config.redis.prefix, time.monotonic() + source.timeout * 2)
            prefix = config.redis.prefix
            what = f"{len(queues)} BullMQ queues under {prefix}:" if queues else (
                f"no BullMQ queues under {prefix}: yet (is this Immich's Redis, and the right database?)"
            )
            print(f"ok: redis {source.target}: {version}, {what}")
        except SourceError as exc:
            problems.append(f"redis: {exc}")
        except ResponseError as exc:
            problems.append(f"redis: {describe_redis_error(exc)}")
        finally:
            await source.close()
    if config.immich.enabled:
        api = ImmichApi(config.immich)
        limit = float(config.immich.timeout) + 2
        try:
            await asyncio.wait_for(api.ping(), limit)
            version = await asyncio.wait_for(api.version(), limit)
            stats = await asyncio.wait_for(api.queues(), limit)
            endpoint = "/api/queues" if api.queues_endpoint == "queues" else "/api/jobs"
            print(f"ok: immich API {api.base}: Immich {version}, {len(stats)} queues readable ({endpoint})")
        except ApiError as exc:
            problems.append(f"immich: {exc}")
        except TimeoutError:
            problems.append(f"immich: {api.base}: no answer within {limit:.0f}s")
        finally:
            await api.close()
    return problems
