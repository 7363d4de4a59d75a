"""Job counters and durations from BullMQ's per-queue event streams (``<prefix>:<queue>:events``).

BullMQ appends every state change to a Redis stream, trimmed to about 10,000 entries. The exporter
follows each stream from the last id it read (exclusive), in bounded batches, so every event is
counted exactly once in the life of the process:

* ``added`` (``jobId``, ``name``): ``immich_jobs_accepted_total{queue,job}``;
* ``completed`` (``returnvalue``): ``immich_jobs_finished_total{outcome}`` from the job's return value
  (see ``outcome_of``); ``failed`` (a thrown error, the job kept in the failed set): outcome ``error``;
* ``active``: the job started; its wait (added -> first active) and run (last active -> finished)
  times feed ``immich_job_wait_seconds`` and ``immich_job_run_seconds``.

Times come from the stream entries' ids, which are the Redis server's clock in milliseconds, so wait
and run times need no clock agreement with Immich. A job whose ``added`` event was not seen (it was
queued before the exporter started) is looked up in its job hash when it starts (``name``,
``timestamp``); a job whose hash is already gone when it finishes (``removeOnComplete``) and that was
never seen starting is counted with ``job_name="unknown"`` and no duration. The job names seen are kept in a
bounded LRU.

**First start**: reading begins at the stream's current end; the history already in the stream is not
counted (it would be counted again by every restart). A new process, or a new collection, starts its
counters at 0 (Prometheus treats that as a counter reset) and does not count events from before it
started; events that happen while no exporter runs are not counted by anyone.

**Trimmed streams**: when the oldest entry still in the stream is newer than the last one read, entries
were trimmed before the exporter read them. Valkey 7+/Redis 7+ report ``entries-added`` (every entry
ever added), so the gap is exact: ``immich_exporter_queue_events_lost_total{queue}``. Older servers do
not, and the loss is then logged but not counted. The first read and each batch are done as
``MULTI; XINFO STREAM; XRANGE; EXEC`` (reads only) so the stream's length and the entries agree.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from prometheus_client.core import HistogramMetricFamily, Metric
from redis.exceptions import ResponseError

from immich_thumbnail_exporter.exposition.metrics import counter, family
from immich_thumbnail_exporter.sources.postgres import SourceError
from immich_thumbnail_exporter.sources.redis import SOURCE, RedisSource, describe_redis_error, is_permission_error
from immich_thumbnail_exporter.vocabulary import JOB_STATUSES

log = logging.getLogger(__name__)

# Seconds to hours: a thumbnail normally takes well under a second to a few seconds to make, a video's
# preview longer; waits range from nothing to many hours behind a full "All" regeneration.
BUCKETS: tuple[float, ...] = (
    0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200, 86400,
)

BATCH = 1000  # entries per XRANGE
MAX_EVENTS_PER_ROUND = 20_000  # per queue; the rest is read next round
MAX_LOOKUPS_PER_ROUND = 1000  # job hashes read for jobs whose ``added`` event was not seen
MAX_TRACKED_JOBS = 50_000  # LRU of jobs seen added or started and not yet finished
MAX_JOB_NAMES = 200  # distinct ``job`` label values per queue; more become "unknown"
MAX_NAME_LENGTH = 100
UNKNOWN = "unknown"


def outcome_of(returnvalue: str | None) -> str:
    """``completed`` events carry the processor's return value as JSON.

    Immich's handlers return a ``JobStatus`` (``success``, ``skipped``, ``failed``); those map to the
    same outcome. Anything else, or nothing, counts as ``success``: BullMQ completed the job, no error
    reached it. In Immich's releases the worker's processor is the ``JobRun`` event emitter, which
    returns nothing, so the value is JSON ``null`` and every completed job is ``success``: handler
    errors are caught and logged by Immich ("Unable to run job handler") and never reach BullMQ. Only
    servers that pass the handler's status through (or rethrow, which is ``error``) tell them apart.
    """
    if returnvalue is None:
        return "success"
    value: Any = returnvalue
    try:
        value = loads(returnvalue)
    except ValueError:
        value = returnvalue.strip()[:64]
    if isinstance(value, str) and value.lower() in JOB_STATUSES:
        return value.lower()
    return "success"


def parse_id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def next_id(entry_id: str) -> str:
    """The smallest id after ``entry_id``: XRANGE from here is exclusive of it (works on Redis < 6.2)."""
    ms, seq = parse_id(entry_id)
    return f"{ms}-{seq + 1}"


class Histogram:
    __slots__ = ("count", "counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * len(BUCKETS)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        value = max(0.0, value)
        for i, bound in enumerate(BUCKETS):
            if value <= bound:
                self.counts[i] += 1
                break
        self.sum += value
        self.count += 1

    def buckets(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip(BUCKETS, self.counts, strict=True):
            running += n
            out.append((_le(bound), float(running)))
        out.append(("+Inf", float(self.count)))
        return out


def _le(bound: float) -> str:
    return str(float(bound))


@dataclass
class _Job:
    name: str | None = None
    added_ms: int | None = None
    active_ms: int | None = None
    started: bool = False
    # From the job hash when the events were not seen (ms, clocks of whoever wrote them).
    processed_on: int | None = None
    finished_on: int | None = None


@dataclass
class Cursor:
    last_id: str
    # Entries ever added to the stream up to and including ``last_id`` (None: the server does not say).
    seq: int | None


@dataclass
class PollStats:
    read: int = 0
    lost: int = 0
    malformed: int = 0
    behind: list[str] = field(default_factory=list)


class EventTracker:
    """Counters and histograms for the life of the collection, fed from the event streams."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.cursors: dict[str, Cursor] = {}
        self.accepted: dict[tuple[str, str], int] = {}
        self.finished: dict[tuple[str, str, str], int] = {}
        self.lost: dict[str, int] = {}
        self.wait: dict[tuple[str, str], Histogram] = {}
        self.run: dict[tuple[str, str], Histogram] = {}
        self.malformed = 0
        self._jobs: OrderedDict[tuple[str, str], _Job] = OrderedDict()
        self._names: dict[str, set[str]] = {}
        self._transaction = True
        self._warned_no_entries_added: set[str] = set()
        self._warned_wrong_type: set[str] = set()

    # -- reading -------------------------------------------------------------------------------------
    def key(self, queue: str) -> str:
        return f"{self.prefix}:{queue}:events"

    async def poll(self, source: RedisSource, queues: Sequence[str], deadline: float) -> PollStats:
        """Read new entries of every queue's stream, up to the per-round caps and the deadline."""
        stats = PollStats()
        lookups_left = MAX_LOOKUPS_PER_ROUND
        for queue in queues:
            if time.monotonic() >= deadline:
                stats.behind.append(queue)
                continue
            self.lost.setdefault(queue, 0)
            cursor = self.cursors.get(queue)
            if cursor is None:
                self.cursors[queue] = await self._start(source, queue, deadline)
                continue
            lookups_left = await self._read_queue(source, queue, cursor, deadline, stats, lookups_left)
        return stats

    def begin_at_start(self, queue: str) -> None:
        """Count this queue's stream from its first entry (a queue created while we were watching)."""
        if queue not in self.cursors:
            self.cursors[queue] = Cursor("0-0", 0)

    async def _start(self, source: RedisSource, queue: str, deadline: float) -> Cursor:
        """Begin at the stream's current end: history is not counted."""
        info = await self._info(source, queue, deadline)
        if info is None:
            # No stream yet: everything that appears in it from now on is new.
            return Cursor("0-0", 0)
        added = info.get("entries-added")
        return Cursor(str(info.get("last-generated-id") or "0-0"), int(added) if added is not None else None)

    async def _info(self, source: RedisSource, queue: str, deadline: float) -> dict[str, Any] | None:
        key = self.key(queue)

        async def _xinfo(client: aioredis.Redis) -> dict[str, Any] | None:
            try:
                return dict(await client.xinfo_stream(key))
            except ResponseError as exc:
                if "no such key" in str(exc).lower():
                    return None
                raise

        return await source.run(f"XINFO STREAM {key}", _xinfo, _left(deadline))

    async def _batch(
        self, source: RedisSource, queue: str, start: str, deadline: float
    ) -> tuple[dict[str, Any] | None, list[tuple[str, dict[str, str]]]]:
        key = self.key(queue)

        async def _read(client: aioredis.Redis) -> list[Any]:
            async with client.pipeline(transaction=self._transaction) as pipe:
                pipe.xinfo_stream(key)
                pipe.xrange(key, min=start, max="+", count=BATCH)
                return list(await pipe.execute(raise_on_error=False))

        try:
            info_res, entries_res = await source.run(f"XRANGE {key}", _read, _left(deadline))
        except ResponseError as exc:
            if self._transaction and is_permission_error(exc):
                log.warning("the Redis server refuses MULTI/EXEC (%s): reading event streams without it", exc)
                self._transaction = False
                return await self._batch(source, queue, start, deadline)
            raise SourceError(SOURCE, f"reading {key}: {describe_redis_error(exc)}") from None
        if isinstance(info_res, ResponseError):
            text = str(info_res).lower()
            if "no such key" in text:
                return None, []
            if "wrongtype" in text:
                if queue not in self._warned_wrong_type:
                    self._warned_wrong_type.add(queue)
                    log.warning("%s is not a stream: no job events for queue %s", key, queue)
                return None, []
            raise SourceError(SOURCE, f"XINFO STREAM {key}: {describe_redis_error(info_res)}")
        if isinstance(entries_res, Exception):
            raise SourceError(SOURCE, f"XRANGE {key}: {describe_redis_error(entries_res)}")
        return dict(info_res), list(entries_res or [])

    async def _read_queue(
        self, source: RedisSource, queue: str, cursor: Cursor, deadline: float, stats: PollStats, lookups_left: int
    ) -> int:
        read = 0
        rereads = 0
        while read < MAX_EVENTS_PER_ROUND:
            if time.monotonic() >= deadline:
                stats.behind.append(queue)
                break
            info, entries = await self._batch(source, queue, next_id(cursor.last_id), deadline)
            if info is None:
                if cursor.last_id != "0-0":
                    # The stream is gone (queue obliterated, server flushed or restarted without
                    # persistence): anything written to a new stream is new.
                    log.info("event stream %s disappeared: following it again from its start", self.key(queue))
                    self._forget(queue)
                    cursor.last_id, cursor.seq = "0-0", 0
                break
            verdict = self._check_continuity(queue, cursor, info, stats)
            if verdict == "stop":
                break
            if verdict == "reread":
                rereads += 1
                if rereads > 1:
                    break
                continue
            if entries:
                lookups = self._unknown_jobs(queue, entries)[:lookups_left]
                lookups_left -= len(lookups)
                looked_up = await self._lookup(source, queue, lookups, deadline) if lookups else {}
                stats.malformed += self._apply(queue, entries, looked_up)
                cursor.last_id = str(entries[-1][0])
                if cursor.seq is not None:
                    cursor.seq += len(entries)
                read += len(entries)
                stats.read += len(entries)
            if len(entries) < BATCH:
                break
        else:
            stats.behind.append(queue)
        return lookups_left

    def _check_continuity(self, queue: str, cursor: Cursor, info: dict[str, Any], stats: PollStats) -> str:
        """Count entries trimmed before we read them; detect a stream that was replaced.

        Returns "ok" (use the entries read with this info), "reread" (the cursor moved: read again) or
        "stop" (nothing more to read this round)."""
        added_raw = info.get("entries-added")
        added = int(added_raw) if added_raw is not None else None
        length = int(info.get("length") or 0)
        last_generated = str(info.get("last-generated-id") or "0-0")
        first = info.get("first-entry")
        first_id = str(first[0]) if first else None
        last = parse_id(cursor.last_id)

        if added is not None and cursor.seq is not None and added < cursor.seq:
            self._forget(queue)
            if parse_id(last_generated) < last:
                log.warning(
                    "event stream %s went back in time (restored from an older copy?): continuing from its "
                    "current end; events in between are not counted", self.key(queue),
                )
                cursor.last_id, cursor.seq = last_generated, added
                return "stop"
            log.info("event stream %s was recreated: following it from its start", self.key(queue))
            cursor.last_id, cursor.seq = "0-0", 0
            return "reread"
        if added is None and parse_id(last_generated) < last:
            self._forget(queue)
            log.warning("event stream %s went back in time: continuing from its current end", self.key(queue))
            cursor.last_id = last_generated
            return "stop"

        # Everything before ``first_id`` is gone; were some of those entries unread?
        gone_past_us = (first_id is None and parse_id(last_generated) > last) or (
            first_id is not None and parse_id(first_id) > last
        )
        if not gone_past_us:
            return "ok"
        if added is not None and cursor.seq is not None:
            before_first = added - length
            lost = before_first - cursor.seq
            if lost > 0:
                self.lost[queue] = self.lost.get(queue, 0) + lost
                stats.lost += lost
                log.warning(
                    "%d events on queue %s were trimmed from %s before the exporter read them: job "
                    "counters undercount", lost, queue, self.key(queue),
                )
            cursor.seq = before_first
        elif cursor.last_id != "0-0" and queue not in self._warned_no_entries_added:
            self._warned_no_entries_added.add(queue)
            log.warning(
                "event stream %s was trimmed past the last entry read; this server does not report "
                "entries-added (Redis < 7), so lost events cannot be counted", self.key(queue),
            )
        if first_id is None:
            cursor.last_id = last_generated
        return "ok"

    def _forget(self, queue: str) -> None:
        """Job ids restart when a queue's keys are recreated: drop what we remember about its jobs."""
        for key in [k for k in self._jobs if k[0] == queue]:
            del self._jobs[key]

    def _unknown_jobs(self, queue: str, entries: list[tuple[str, dict[str, str]]]) -> list[str]:
        """Jobs that start or finish in this batch without an ``added`` event seen for them."""
        known: set[str] = set()
        unknown: list[str] = []
        for _, fields in entries:
            if not isinstance(fields, dict):
                continue
            event, job_id = fields.get("event"), fields.get("jobId")
            if not job_id:
                continue
            if event == "added":
                known.add(job_id)
            elif event in ("active", "completed", "failed") and job_id not in known:
                if (queue, job_id) not in self._jobs:
                    unknown.append(job_id)
                known.add(job_id)
        return unknown

    async def _lookup(self, source: RedisSource, queue: str, job_ids: list[str], deadline: float) -> dict[str, _Job]:
        keys = [f"{self.prefix}:{queue}:{job_id}" for job_id in job_ids]

        async def _hmget(client: aioredis.Redis) -> list[Any]:
            async with client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.hmget(key, ["name", "timestamp", "processedOn", "finishedOn"])
                return list(await pipe.execute(raise_on_error=False))

        results = await source.run(f"HMGET {len(keys)} job hashes", _hmget, _left(deadline))
        out: dict[str, _Job] = {}
        for job_id, res in zip(job_ids, results, strict=True):
            if isinstance(res, Exception) or not isinstance(res, list) or all(v is None for v in res):
                continue
            name, timestamp, processed_on, finished_on = res
            out[job_id] = _Job(
                name=name, added_ms=to_int(timestamp), processed_on=to_int(processed_on),
                finished_on=to_int(finished_on),
            )
        return out

    # -- counting ------------------------------------------------------------------------------------
    def _label(self, queue: str, name: str | None) -> str:
        if not name or len(name) > MAX_NAME_LENGTH:
            return UNKNOWN
        names = self._names.setdefault(queue, set())
        if name in names:
            return name
        if len(names) >= MAX_JOB_NAMES:
            return UNKNOWN
        names.add(name)
        return name

    def _track(self, queue: str, job_id: str, job: _Job) -> None:
        self._jobs[(queue, job_id)] = job
        self._jobs.move_to_end((queue, job_id))
        while len(self._jobs) > MAX_TRACKED_JOBS:
            self._jobs.popitem(last=False)

    def _apply(self, queue: str, entries: list[tuple[str, dict[str, str]]], looked_up: dict[str, _Job]) -> int:
        malformed = 0
        for entry_id, fields in entries:
            try:
                ms, _ = parse_id(str(entry_id))
            except ValueError:
                malformed += 1
                continue
            if not isinstance(fields, dict) or not isinstance(fields.get("event"), str):
                malformed += 1
                continue
            event = fields["event"]
            if event not in ("added", "active", "completed", "failed"):
                continue
            job_id = fields.get("jobId")
            if not job_id:
                malformed += 1
                continue
            key = (queue, job_id)
            if event == "added":
                name = fields.get("name")
                label = self._label(queue, name)
                self.accepted[(queue, label)] = self.accepted.get((queue, label), 0) + 1
                self._track(queue, job_id, _Job(name=label, added_ms=ms))
                continue
            job = self._jobs.get(key) or looked_up.pop(job_id, None)
            if event == "active":
                if job is None:
                    job = _Job()
                if not job.started and job.added_ms is not None:
                    self._observe(self.wait, queue, job, (ms - job.added_ms) / 1000.0)
                job.started = True
                job.active_ms = ms
                self._track(queue, job_id, job)
                continue
            # completed / failed: the job is done (a retried attempt is "waiting"/"delayed", not "failed").
            self._jobs.pop(key, None)
            outcome = "error" if event == "failed" else outcome_of(fields.get("returnvalue"))
            label = self._label(queue, job.name) if job is not None else UNKNOWN
            fkey = (queue, label, outcome)
            self.finished[fkey] = self.finished.get(fkey, 0) + 1
            if job is not None:
                if job.active_ms is not None:
                    self._observe(self.run, queue, job, (ms - job.active_ms) / 1000.0)
                elif job.processed_on is not None:
                    end = job.finished_on if job.finished_on is not None else ms
                    self._observe(self.run, queue, job, (end - job.processed_on) / 1000.0)
        self.malformed += malformed
        if malformed:
            log.debug("skipped %d malformed entries in %s", malformed, self.key(queue))
        return malformed

    def _observe(self, hists: dict[tuple[str, str], Histogram], queue: str, job: _Job, seconds: float) -> None:
        key = (queue, self._label(queue, job.name))
        hist = hists.get(key)
        if hist is None:
            hist = hists[key] = Histogram()
        hist.observe(seconds)

    # -- exposition ----------------------------------------------------------------------------------
    def families(self) -> list[Metric]:
        fams: list[Metric] = [
            counter("immich_jobs_accepted", [((q, j), float(n)) for (q, j), n in sorted(self.accepted.items())]),
            counter("immich_jobs_finished", [((q, j, o), float(n)) for (q, j, o), n in sorted(self.finished.items())]),
            counter("immich_exporter_queue_events_lost", [((q,), float(n)) for q, n in sorted(self.lost.items())]),
        ]
        for name, hists in (("immich_job_wait_seconds", self.wait), ("immich_job_run_seconds", self.run)):
            fam = family(name)
            assert isinstance(fam, HistogramMetricFamily)
            for (q, j), hist in sorted(hists.items()):
                fam.add_metric([q, j], hist.buckets(), hist.sum)
            fams.append(fam)
        return fams

    @property
    def tracked_jobs(self) -> int:
        return len(self._jobs)


# BullMQ's own values are small: a job's data and return value are a few hundred bytes. Anything far
# larger is not Immich's, and parsing it whole would cost memory (or recursion, for deeply nested JSON).
MAX_JSON = 64 * 1024


def to_int(value: Any) -> int | None:
    """A BullMQ number field (``timestamp``, ``processedOn``...) or None when it is not a sane one."""
    if value is None or isinstance(value, Exception):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    if not math.isfinite(number) or abs(number) > 2**53:
        return None
    return int(number)


def loads(text: str | bytes) -> Any:
    """JSON from a job field, or raise ValueError when it is not JSON, too large or too deeply nested."""
    if len(text) > MAX_JSON:
        raise ValueError("field too large")
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None



def _left(deadline: float) -> float:
    return max(0.05, deadline - time.monotonic())
