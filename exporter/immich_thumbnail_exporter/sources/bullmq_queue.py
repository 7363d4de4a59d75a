"""The thumbnail queue, job by job: bounded, read-only lookups for regeneration and ``scan``'s review.

Where each waiting job is (positions), how fast the queue moves (throughput), whether it can move
(queue health) and where given jobs are (job states). Every read goes through ``RedisSource`` (the one
client policy: timeouts, reconnects, secrets re-read) and uses read commands only (LLEN, ZCARD, LRANGE,
ZRANGE, LPOS, ZRANK, ZSCORE, HMGET, HGET, EXISTS, XREVRANGE, CLIENT LIST): nothing here writes to
Redis, to Immich's database or to its files. Job hashes, live workers and the key layout (which state
is a list, which a sorted set) are ``sources/bullmq.py``'s.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from immich_thumbnail_exporter.config import RedisConfig
from immich_thumbnail_exporter.findings import Throughput
from immich_thumbnail_exporter.sources.bullmq import STATE_OF, BullMQ, JobHash, head, member, paused_flag, size, to_int
from immich_thumbnail_exporter.sources.bullmq_events import parse_id
from immich_thumbnail_exporter.sources.redis import RedisSource
from immich_thumbnail_exporter.timing import deadline_in, left
from immich_thumbnail_exporter.vocabulary import THUMBNAIL_JOB_NAMES, THUMBNAIL_QUEUE

# Job ids read from the queue per lookup: bounded whatever the queue's length.
QUEUE_LOOKUP_LIMIT = 20_000
EVENTS_SAMPLE = 5_000
HASH_CHUNK = 500
# Jobs whose state is looked up in one call (each costs a handful of pipelined commands).
STATE_LOOKUP_LIMIT = 1_000
FLOOR = 0.05
# Where a waiting job can be, in the order BullMQ's workers take from them.
_WAITING = ("active", "prioritized", "wait", "paused", "delayed")
# What counts as the backlog: jobs waiting for a worker, or on one.
_BACKLOG = ("wait", "prioritized", "paused", "active")


def _asset(job: JobHash, names: frozenset[str] = THUMBNAIL_JOB_NAMES) -> str | None:
    """What a job of one of ``names`` names (``data.id``: the asset of a per-asset thumbnail job, the
    person of a face-thumbnail job), from its hash; else None."""
    return job.asset_id if job.name in names else None


@dataclass(frozen=True)
class QueuedJob:
    job_id: str
    state: str  # waiting, prioritized, active, paused, delayed


@dataclass
class QueueView:
    """Assets named by per-asset jobs waiting or running in the thumbnail queue."""

    assets: dict[str, QueuedJob]
    jobs: int  # jobs in those states
    checked: int  # job ids actually looked at (bounded)

    @property
    def complete(self) -> bool:
        return self.checked >= self.jobs


def _key(prefix: str, *parts: str) -> str:
    return ":".join((prefix, THUMBNAIL_QUEUE, *parts))


async def queued_assets(
    source: RedisSource, prefix: str, limit: int = QUEUE_LOOKUP_LIMIT, names: frozenset[str] = THUMBNAIL_JOB_NAMES
) -> QueueView:
    """The thumbnail queue's jobs of ``names`` (per-asset ones by default) waiting or running now, by the id
    their data names. Raises SourceError("redis") when unreachable."""

    # The lookup as a whole stays under the one timeout a single read gets.
    deadline = deadline_in(source.timeout)

    async def _listed(client: aioredis.Redis) -> tuple[list[int], list[tuple[str, str]]]:
        pipe = client.pipeline(transaction=False)
        for name in _WAITING:
            size(pipe, _key(prefix, name), name)
        sizes = [int(n or 0) for n in await pipe.execute()]
        pipe = client.pipeline(transaction=False)
        budget = limit
        wanted: list[str] = []
        for name, length in zip(_WAITING, sizes, strict=True):
            n = min(length, budget)
            if n <= 0:
                continue
            budget -= n
            wanted.append(name)
            head(pipe, _key(prefix, name), name, n)
        id_lists = await pipe.execute() if wanted else []
        job_state: list[tuple[str, str]] = []
        for name, ids in zip(wanted, id_lists, strict=True):
            job_state.extend((str(j), STATE_OF[name]) for j in ids)
        return sizes, job_state

    sizes, job_state = await source.run("thumbnail queue lookup", _listed, left(deadline, FLOOR))
    bullmq = BullMQ(source, prefix)
    assets: dict[str, QueuedJob] = {}
    for i in range(0, len(job_state), HASH_CHUNK):
        chunk = job_state[i : i + HASH_CHUNK]
        hashes = await bullmq.jobs(THUMBNAIL_QUEUE, [job_id for job_id, _ in chunk], deadline, times=False)
        for job_id, state in chunk:
            asset = _asset(hashes[job_id], names)
            if asset is not None:
                assets.setdefault(asset, QueuedJob(job_id, state))
    return QueueView(assets, sum(sizes), len(job_state))


# -- how fast the queue moves ----------------------------------------------------------------------


async def throughput(source: RedisSource, prefix: str, sample: int = EVENTS_SAMPLE) -> Throughput:
    async def _read(client: aioredis.Redis) -> Throughput:
        entries: Any = await client.xrevrange(_key(prefix, "events"), "+", "-", count=sample)
        stamps = []
        for entry_id, fields in entries or []:
            if fields and fields.get("event") == "completed":
                stamps.append(parse_id(str(entry_id))[0])
        pipe = client.pipeline(transaction=False)
        for name in _BACKLOG:
            size(pipe, _key(prefix, name), name)
        backlog = sum(int(n or 0) for n in await pipe.execute())
        if not stamps:
            return Throughput(0, 0.0, None, backlog)
        newest, oldest = max(stamps), min(stamps)
        return Throughput(len(stamps), (newest - oldest) / 1000.0, max(0.0, time.time() - newest / 1000.0), backlog)

    return await source.run("thumbnail queue events", _read, source.timeout * 2 + 5)


async def thumbnail_throughput(cfg: RedisConfig, sample: int = EVENTS_SAMPLE) -> Throughput:
    """``throughput`` on a client of its own, for one-shot commands (``scan``'s review)."""
    source = RedisSource(cfg)
    try:
        return await throughput(source, cfg.prefix, sample)
    finally:
        await source.close()


# -- the jobs behind stream entries ----------------------------------------------------------------


async def job_assets(source: RedisSource, prefix: str, job_ids: Sequence[str]) -> dict[str, str | None]:
    """Each job's asset, read from its hash now; None when the hash is gone or names no asset."""
    hashes = await BullMQ(source, prefix).jobs(THUMBNAIL_QUEUE, job_ids, deadline_in(source.timeout), times=False)
    return {j: _asset(h) for j, h in hashes.items()}


# -- the state of a job, and of its queue ------------------------------------------------------------


@dataclass(frozen=True)
class QueueHealth:
    paused: bool
    workers: int | None  # live workers attached to the queue; None when CLIENT LIST is refused


@dataclass(frozen=True)
class JobState:
    """Where one job is now. ``state`` is ``gone`` once BullMQ removed it (Immich removes finished jobs)."""

    job_id: str
    state: str  # waiting, prioritized, paused, delayed, active, failed, completed, gone
    added_ms: int | None = None
    started_ms: int | None = None
    finished_ms: int | None = None
    position: int | None = None  # 1 = the next job a worker takes from its list
    of: int | None = None  # jobs in that list
    locked: bool | None = None  # active jobs: a worker holds its lock
    failed_reason: str | None = None


async def queue_health(source: RedisSource, prefix: str) -> QueueHealth:
    async def _meta(client: aioredis.Redis) -> list[Any]:
        pipe = client.pipeline(transaction=False)
        pipe.hget(_key(prefix, "meta"), "paused")
        size(pipe, _key(prefix, "paused"), "paused")
        return list(await pipe.execute())

    flag, paused_jobs = await source.run("queue meta", _meta)
    paused = paused_flag(flag) or int(paused_jobs or 0) > 0

    try:
        counts = await BullMQ(source, prefix).live_workers([THUMBNAIL_QUEUE], deadline_in(source.timeout))
    except ResponseError:
        return QueueHealth(paused, None)  # refused (ACL, managed Redis): the count is unknown, not 0
    return QueueHealth(paused, counts.get(THUMBNAIL_QUEUE, 0))


_FIELDS = ("timestamp", "processedOn", "finishedOn", "failedReason")
_PER_JOB = 8


async def job_states(source: RedisSource, prefix: str, job_ids: Iterable[str]) -> dict[str, JobState]:
    """Where each job is: its list or set, its position there, its lock; at most STATE_LOOKUP_LIMIT jobs."""
    ids = list(dict.fromkeys(job_ids))[:STATE_LOOKUP_LIMIT]
    if not ids:
        return {}

    async def _read(client: aioredis.Redis) -> list[Any]:
        pipe = client.pipeline(transaction=False)
        for name in ("wait", "paused", "prioritized"):
            size(pipe, _key(prefix, name), name)
        for job_id in ids:
            pipe.hmget(_key(prefix, job_id), list(_FIELDS))
            for name in ("wait", "paused", "prioritized", "delayed", "active"):
                member(pipe, _key(prefix, name), name, job_id)
            pipe.exists(_key(prefix, job_id, "lock"))
            member(pipe, _key(prefix, "failed"), "failed", job_id)
        return list(await pipe.execute(raise_on_error=False))

    rows = await source.run("job states", _read, source.timeout * 2 + 5)
    wait_n, paused_n, prio_n = (_int(v) for v in rows[:3])
    out: dict[str, JobState] = {}
    for i, job_id in enumerate(ids):
        at = 3 + i * _PER_JOB
        h, in_wait, in_paused, prio_rank, delayed, in_active, lock, failed = rows[at : at + _PER_JOB]
        fields = h if isinstance(h, list) else [None] * len(_FIELDS)
        added, started, finished = (to_int(v) for v in fields[:3])
        reason = fields[3] if isinstance(fields[3], str) else None
        common: dict[str, Any] = {"added_ms": added, "started_ms": started, "finished_ms": finished}
        if all(v is None for v in fields):
            out[job_id] = JobState(job_id, "gone")
        elif _is_index(in_active):
            out[job_id] = JobState(job_id, "active", locked=_int(lock) > 0, **common)
        elif _is_index(in_wait):
            # LPOS counts from the left, where BullMQ pushes new jobs; workers take from the right.
            out[job_id] = JobState(job_id, "waiting", position=wait_n - int(in_wait), of=wait_n, **common)
        elif _is_index(prio_rank):
            out[job_id] = JobState(job_id, "prioritized", position=int(prio_rank) + 1, of=prio_n, **common)
        elif _is_index(in_paused):
            out[job_id] = JobState(job_id, "paused", position=paused_n - int(in_paused), of=paused_n, **common)
        elif delayed is not None and not isinstance(delayed, Exception):
            out[job_id] = JobState(job_id, "delayed", **common)
        elif failed is not None and not isinstance(failed, Exception):
            out[job_id] = JobState(job_id, "failed", failed_reason=reason, **common)
        else:
            out[job_id] = JobState(job_id, "completed" if finished is not None else "gone", **common)
    return out


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(value: Any) -> int:
    return value if _is_index(value) else 0

