"""Following the thumbnail queues' event streams live, so each job's asset is read while the job exists.

Immich removes a completed job's hash at once (``removeOnComplete``), and a thumbnail job often lives
one or two seconds: a poll every 15 s sees its ``completed`` event long after its ``data`` is gone.
``JobFollower`` reads the streams of the queues carrying per-asset thumbnail jobs with a blocking
``XREAD`` (a read command; a short block, on one connection of its own) and reads a job's hash
(``name``, ``data``) as soon as its ``added`` or ``active`` event arrives, while the job is waiting or
running. Jobs queued before it started (a backlog after a restore) are read ahead: the next ``HEAD``
jobs of each queue (``wait``, ``prioritized``) and the active ones, twice a second. It keeps a bounded
map of job id -> asset id and hands back one ``FinishedJob`` per per-asset thumbnail job that completed
or failed.

Nothing is guessed: a job whose data could not be read in time (its hash already gone, its events read
after an outage, more jobs than the map holds) is handed back with ``asset_id=None``; a job whose name
was never learned is named ``unknown``. Face (``PersonGenerate*``) and queue-all jobs are left out.
Times are the Redis server's (stream ids, milliseconds).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from immich_thumbnail_exporter.sources.bullmq import BullMQ, JobHash
from immich_thumbnail_exporter.sources.bullmq_events import Entry, parse_id, read_streams, stream_ends
from immich_thumbnail_exporter.sources.redis import RedisSource

log = logging.getLogger(__name__)

UNKNOWN = "unknown"
READ_COUNT = 1000  # entries per XREAD
MAX_HASH_READS = 2000  # job hashes read per step; jobs beyond are read when they start
MAX_TRACKED = 20_000  # jobs remembered between their ``added`` and their end
CONTINUITY_CHECK = 10.0  # seconds between checks that a stream was not replaced (only while idle)
HEAD = 100  # jobs at the head of each queue (next to run) whose hashes are read ahead of time
HEAD_INTERVAL = 0.5  # seconds between looks at the heads

# What the map knows about a job.
_PENDING = "pending"  # a thumbnail job whose hash was not read yet
_KNOWN = "known"  # a thumbnail job whose asset id was read
_NO_DATA = "no_data"  # a thumbnail job whose hash was read but names no valid asset
_OTHER = "other"  # not a per-asset thumbnail job (face, queue-all, ...): its end is not reported


@dataclass(frozen=True, slots=True)
class FinishedJob:
    """A per-asset thumbnail job that completed (or failed), and the asset it named if that was learned."""

    queue: str
    job_id: str
    name: str  # the job's name, or ``unknown``
    asset_id: str | None  # None: not learned while the job existed
    failed: bool  # a ``failed`` event (thrown error) rather than ``completed``
    at_ms: int  # when it finished, by the Redis server's clock


@dataclass(slots=True)
class _Tracked:
    state: str
    name: str | None = None
    asset_id: str | None = None


@dataclass
class FollowStats:
    """Totals for the life of the follower, for the collection's detail and the soak test."""

    entries: int = 0
    hash_reads: int = 0
    hashes_gone: int = 0  # read too late: the job had already finished and been removed
    evicted: int = 0  # jobs dropped from the map to keep it bounded
    restarts: int = 0  # streams found replaced (FLUSHALL, a restart without persistence)


class JobFollower:
    """Live reader of the given queues' event streams (``jobs``: queue -> the per-asset job names)."""

    def __init__(
        self,
        source: RedisSource,
        prefix: str,
        jobs: Mapping[str, frozenset[str]],
        *,
        block: float = 1.0,
        max_tracked: int = MAX_TRACKED,
    ) -> None:
        self.source = source
        self.bullmq = BullMQ(source, prefix)
        self.prefix = prefix
        self.jobs = dict(jobs)
        # The block must end well before the socket timeout, or a quiet stream would look like a dead server.
        self.block_ms = max(50, int(min(block, source.timeout / 2) * 1000))
        self.max_tracked = max_tracked
        self.stats = FollowStats()
        # (queue, name) of every thumbnail job seen: the verified counters exist from the first one on.
        self.names: set[tuple[str, str]] = set()
        self._cursors: dict[str, str] | None = None
        self._tracked: OrderedDict[tuple[str, str], _Tracked] = OrderedDict()
        self._next_check = 0.0
        self._next_head = 0.0

    @property
    def following(self) -> bool:
        """True once the streams' current ends are known: every job added from then on is seen."""
        return self._cursors is not None

    @property
    def tracked(self) -> int:
        return len(self._tracked)

    def key(self, queue: str) -> str:
        return f"{self.prefix}:{queue}:events"

    async def step(self) -> list[FinishedJob]:
        """One blocking read (at most ``block`` seconds) and what it finished. Raises SourceError."""
        if self._cursors is None:
            self._cursors = await self._ends()
            return []
        cursors = self._cursors
        if time.monotonic() >= self._next_head:
            self._next_head = time.monotonic() + HEAD_INTERVAL
            await self._read_heads()
        by_key = await read_streams(self.source, {self.key(q): cursors[q] for q in self.jobs}, READ_COUNT,
                                    self.block_ms)
        batches = {q: by_key[self.key(q)] for q in self.jobs if self.key(q) in by_key}
        if not batches:
            if time.monotonic() >= self._next_check:
                await self._check_continuity()
            return []
        finished: list[FinishedJob] = []
        for queue, entries in batches.items():
            self.stats.entries += len(entries)
            finished.extend(await self._apply(queue, entries))
            cursors[queue] = str(entries[-1][0])
        return finished

    async def _ends(self) -> dict[str, str]:
        """Each stream's last id now ("0-0" for a stream that does not exist yet: all of it will be new)."""
        ends = await stream_ends(self.source, [self.key(q) for q in self.jobs])
        self._next_check = time.monotonic() + CONTINUITY_CHECK
        return dict(zip(self.jobs, ends, strict=True))

    async def _check_continuity(self) -> None:
        """A stream whose newest id is below our cursor was replaced: follow the new one from its start."""
        assert self._cursors is not None
        ends = await self._ends()
        for queue, end in ends.items():
            ours = self._cursors[queue]
            if _id(end) < _id(ours):
                log.info("event stream %s was replaced: following it from its start", self.key(queue))
                self.stats.restarts += 1
                self._cursors[queue] = "0-0"
                for key in [k for k in self._tracked if k[0] == queue]:
                    del self._tracked[key]

    async def _read_heads(self) -> None:
        """Read the hashes of the next jobs to run and of the running ones that we know nothing of yet."""
        queues = list(self.jobs)
        prefix = self.prefix

        async def _heads(client: aioredis.Redis) -> list[Any]:
            async with client.pipeline(transaction=False) as pipe:
                for q in queues:
                    pipe.lrange(f"{prefix}:{q}:wait", -HEAD, -1)
                    pipe.zrange(f"{prefix}:{q}:prioritized", 0, HEAD - 1)
                    pipe.lrange(f"{prefix}:{q}:active", 0, HEAD - 1)
                return list(await pipe.execute(raise_on_error=False))

        answer = await self.source.run("LRANGE heads", _heads)
        for i, queue in enumerate(queues):
            ids: list[str] = []
            for listed in answer[i * 3:(i + 1) * 3]:
                if isinstance(listed, list):
                    ids.extend(str(j) for j in listed)
            unknown = [j for j in dict.fromkeys(ids) if self._unread((queue, j))][:MAX_HASH_READS]
            if not unknown:
                continue
            hashes = await self._hmget(queue, unknown)
            wanted = self.jobs[queue]
            for job_id, found in hashes.items():
                if found.gone:
                    continue  # finished meanwhile: its event says so
                if found.name in wanted:
                    self.names.add((queue, found.name))
                    self._track((queue, job_id), self._learned(found.name, found))
                else:
                    self._track((queue, job_id), _Tracked(_OTHER))

    def _unread(self, key: tuple[str, str]) -> bool:
        job = self._tracked.get(key)
        return job is None or job.state == _PENDING

    async def _hmget(self, queue: str, ids: list[str]) -> dict[str, JobHash]:
        hashes = await self.bullmq.jobs(queue, ids, time.monotonic() + self.source.timeout, times=False)
        self.stats.hash_reads += len(ids)
        return hashes

    async def _apply(self, queue: str, entries: list[Entry]) -> list[FinishedJob]:
        wanted = self.jobs[queue]
        hashes = await self._read_hashes(queue, entries, wanted)
        finished: list[FinishedJob] = []
        for entry_id, fields in entries:
            if not isinstance(fields, dict):
                continue
            event, job_id = fields.get("event"), fields.get("jobId")
            if not isinstance(job_id, str) or not job_id:
                continue
            key = (queue, job_id)
            if event == "added":
                name = fields.get("name")
                if not isinstance(name, str) or name not in wanted:
                    self._track(key, _Tracked(_OTHER))
                    continue
                self.names.add((queue, name))
                if self._unread(key):  # else read ahead already, from the head of the queue
                    self._track(key, self._learned(name, hashes.get(job_id)))
            elif event == "active":
                job = self._tracked.get(key)
                if job is None or job.state == _PENDING:
                    found = hashes.get(job_id)
                    if found is not None and not found.gone:
                        name = found.name or (job.name if job else None)
                        job = self._learned(name, found) if name in wanted else _Tracked(_OTHER)
                        if job.name:
                            self.names.add((queue, job.name))
                if job is not None:
                    self._track(key, job)
            elif event in ("completed", "failed"):
                job = self._tracked.pop(key, None)
                if job is None and event == "failed":
                    # Failed jobs keep their hash (removeOnFail: false): it can still name the asset.
                    found = hashes.get(job_id)
                    if found is not None and not found.gone:
                        job = self._learned(found.name, found) if found.name in wanted else _Tracked(_OTHER)
                if job is not None and job.state == _OTHER:
                    continue
                name = job.name if job is not None and job.name else UNKNOWN
                asset = job.asset_id if job is not None and job.state == _KNOWN else None
                finished.append(FinishedJob(queue, job_id, name, asset, event == "failed", _ms(entry_id)))
            elif event == "removed":
                self._tracked.pop(key, None)
        return finished

    async def _read_hashes(self, queue: str, entries: list[Entry], wanted: frozenset[str]) -> dict[str, JobHash]:
        """The hashes of the jobs in this batch whose asset is not known yet, read right away."""
        ids: list[str] = []
        seen: set[str] = set()
        for _, fields in entries:
            if not isinstance(fields, dict):
                continue
            event, job_id = fields.get("event"), fields.get("jobId")
            if not isinstance(job_id, str) or not job_id or job_id in seen:
                continue
            job = self._tracked.get((queue, job_id))
            unread = job is None or job.state == _PENDING
            needed = (
                (event == "added" and fields.get("name") in wanted and unread)
                or (event == "active" and unread)
                or (event == "failed" and job is None)
            )
            if not needed:
                continue
            seen.add(job_id)
            ids.append(job_id)
        ids = ids[:MAX_HASH_READS]
        if not ids:
            return {}
        hashes = await self._hmget(queue, ids)
        self.stats.hashes_gone += sum(1 for h in hashes.values() if h.gone)
        return hashes

    def _learned(self, name: str | None, found: JobHash | None) -> _Tracked:
        if found is None or found.gone:
            return _Tracked(_PENDING, name)
        return _Tracked(_KNOWN if found.asset_id else _NO_DATA, name, found.asset_id)

    def _track(self, key: tuple[str, str], job: _Tracked) -> None:
        self._tracked[key] = job
        self._tracked.move_to_end(key)
        while len(self._tracked) > self.max_tracked:
            self._tracked.popitem(last=False)
            self.stats.evicted += 1


def _id(entry_id: str) -> tuple[int, int]:
    return parse_id(entry_id)


def _ms(entry_id: str) -> int:
    return parse_id(entry_id)[0]
