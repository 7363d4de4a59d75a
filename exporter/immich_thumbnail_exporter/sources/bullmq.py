"""Immich's BullMQ queues as plain data: queue names, counts and heads of the lists, job hashes, workers.

Every read is a bounded, pipelined read command on ``RedisSource`` (LLEN, ZCARD, LRANGE, ZRANGE, HGET,
HMGET, EXISTS, SCAN, CLIENT LIST): nothing here writes, and nothing here knows about Prometheus. The
parsing of BullMQ's fields (numbers written as strings, job data as JSON, the asset id in ``data``) is
done here once, for every user.

Key layout (BullMQ 5, prefix ``immich_bull``): ``<prefix>:<queue>:{wait,active,paused,delayed,
prioritized,completed,failed,meta,events}`` and one hash per job, ``<prefix>:<queue>:<jobId>``, with
``name``, ``data``, ``timestamp`` (ms, when added), ``processedOn``, ``finishedOn``; ``<jobId>:lock``
exists while a live worker holds the job.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from immich_thumbnail_exporter.sources.redis import RedisSource, describe_redis_error, is_permission_error
from immich_thumbnail_exporter.timing import left
from immich_thumbnail_exporter.vocabulary import KNOWN_QUEUES, is_asset_job

log = logging.getLogger(__name__)

DISCOVERY_SCAN_COUNT = 1000
MAX_SCAN_CALLS = 500  # at most ~500k keys examined per discovery
MAX_QUEUES = 64
FLOOR = 0.05  # seconds: a last read still gets a chance (and its own timeout) near the deadline
AGE_SAMPLE = 5  # ids at the head of wait / paused / prioritized checked for the oldest waiting job
ACTIVE_SAMPLE = 100  # active jobs checked for locks (stalled) and the oldest active job
JOB_FIELDS = ("timestamp", "processedOn", "finishedOn", "name", "data")

# BullMQ's own values are small: a job's data and return value are a few hundred bytes. Anything far
# larger is not Immich's, and parsing it whole would cost memory (or recursion, for deeply nested JSON).
MAX_JSON = 64 * 1024

UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


# -- BullMQ's fields -----------------------------------------------------------------------------------


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


def asset_id_of(data: Any) -> str | None:
    """The asset id a per-asset job's ``data`` names (``{"id": "<uuid>"}``), lower-case; else None."""
    if not isinstance(data, str | bytes):
        return None
    try:
        doc = loads(data)
    except ValueError:
        return None
    value = doc.get("id") if isinstance(doc, dict) else None
    if isinstance(value, str) and UUID_RE.match(value):
        return value.lower()
    return None


def paused_flag(value: Any) -> bool:
    """A queue's ``meta`` hash ``paused`` field, as read: "1" or "true" while the queue is paused."""
    return not isinstance(value, Exception) and str(value) in ("1", "true")


def glob_escape(text: str) -> str:
    return re.sub(r"([\\*?\[\]])", r"\\\1", text)


def worker_queue(name: str, prefix: str, by_base64: dict[str, str], queues: set[str]) -> str | None:
    """The queue a BullMQ worker connection serves, from its client name, or None.

    Node BullMQ (Immich) names a worker's connection ``<prefix>:<base64(queue)>`` and, when the worker
    has a name (Immich v3 names them), appends ``:w:<name>``; the Python package uses the plain queue
    name instead.
    """
    if not name.startswith(prefix + ":"):
        return None
    base = name[len(prefix) + 1:].split(":w:", 1)[0]
    if base in by_base64:
        return by_base64[base]
    if base in queues:
        return base
    return None


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0



# -- BullMQ's key layout: the one table of which state is a list and which a sorted set ----------------

LIST, ZSET = "list", "zset"
# Key suffix -> kind. Workers take from the right end of a list (BullMQ pushes on the left) and from the
# lowest score of a sorted set.
LAYOUT: dict[str, str] = {
    "wait": LIST, "active": LIST, "paused": LIST,
    "delayed": ZSET, "prioritized": ZSET, "completed": ZSET, "failed": ZSET,
}
# The ``state`` label of each key (only ``wait`` is spelled differently).
STATE_OF = {suffix: ("waiting" if suffix == "wait" else suffix) for suffix in LAYOUT}


def size(pipe: Any, key: str, suffix: str) -> None:
    """Queue the length of a state's key (LLEN or ZCARD) on a pipeline."""
    if LAYOUT[suffix] == LIST:
        pipe.llen(key)
    else:
        pipe.zcard(key)


def head(pipe: Any, key: str, suffix: str, n: int) -> None:
    """Queue the ``n`` next jobs of a state's key on a pipeline; ``head_ids`` puts the answer in order."""
    if LAYOUT[suffix] == LIST:
        pipe.lrange(key, -n, -1)
    else:
        pipe.zrange(key, 0, n - 1)


def member(pipe: Any, key: str, suffix: str, job_id: str) -> None:
    """Queue where a job is in a state's key (LPOS from the left, ZRANK from the lowest score; None when
    it is not there) on a pipeline."""
    if LAYOUT[suffix] == LIST:
        pipe.lpos(key, job_id)
    else:
        pipe.zrank(key, job_id)


def head_ids(suffix: str, answer: Any) -> list[str]:
    """The ids ``head`` read, the next job to be taken first."""
    ids = _ids(answer)
    return ids[::-1] if LAYOUT[suffix] == LIST else ids


# The states counted for ``immich_queue_jobs``, in the order they are read.
COUNTED = tuple(LAYOUT)


# -- plain data ----------------------------------------------------------------------------------------


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


@dataclass(frozen=True, slots=True)
class JobHash:
    """The fields of one job hash that the exporter reads; all None when the hash is gone."""

    name: str | None
    asset_id: str | None
    timestamp: int | None = None
    processed_on: int | None = None
    finished_on: int | None = None

    @property
    def gone(self) -> bool:
        return self.name is None and self.timestamp is None


# -- the reader ----------------------------------------------------------------------------------------


class BullMQ:
    """Read-only access to the queues under one prefix."""

    def __init__(self, source: RedisSource, prefix: str) -> None:
        self.source = source
        self.prefix = prefix
        self._client_list_refused = False

    def key(self, queue: str, suffix: str) -> str:
        return f"{self.prefix}:{queue}:{suffix}"

    async def discover(self, deadline: float) -> tuple[tuple[str, ...], bool]:
        """Queue names from ``<prefix>:<queue>:meta`` keys (a bounded SCAN) plus Immich's known names that
        have any of their keys; and whether the SCAN saw the whole keyspace. A server that refuses SCAN
        leaves the known names only."""
        prefix = self.prefix
        complete = False
        pattern = f"{glob_escape(prefix)}:*:meta"
        found: set[str] = set()

        async def _scan(client: aioredis.Redis) -> tuple[set[str], bool]:
            names: set[str] = set()
            cursor: int = 0
            for _ in range(MAX_SCAN_CALLS):
                cursor, keys = await client.scan(cursor=cursor, match=pattern, count=DISCOVERY_SCAN_COUNT)
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
            scanned, complete = await self.source.run(
                f"SCAN MATCH {pattern}", _scan, max(0.5, left(deadline, FLOOR) / 2)
            )
            found |= scanned
            if not complete:
                log.info("queue discovery stopped after %d SCAN calls; using the queues found so far", MAX_SCAN_CALLS)
        except ResponseError as exc:
            log.warning("the Redis server refuses SCAN (%s): following Immich's known queues only",
                        describe_redis_error(exc))
        known = await self.source.run("EXISTS", _known, left(deadline, FLOOR))
        found |= {name for name, n in zip(KNOWN_QUEUES, known, strict=True) if _count(n) > 0}
        if len(found) > MAX_QUEUES:
            log.warning("%d queues found under %s:, following the first %d", len(found), prefix, MAX_QUEUES)
        return tuple(sorted(found)[:MAX_QUEUES]), complete and len(found) <= MAX_QUEUES

    async def sample(self, queues: Sequence[str], deadline: float, orphan_sample: int) -> dict[str, QueueSample]:
        """Counts, pause state, the oldest waiting and active jobs, stalled jobs and (up to
        ``orphan_sample`` per queue) the asset ids of waiting and active per-asset jobs: two pipelines."""
        prefix = self.prefix
        orphan_sample = max(0, orphan_sample)
        wait_n = max(AGE_SAMPLE, orphan_sample)
        per_queue = len(COUNTED) + 5

        async def _first(client: aioredis.Redis) -> list[Any]:
            async with client.pipeline(transaction=False) as pipe:
                for q in queues:
                    b = f"{prefix}:{q}"
                    for suffix in COUNTED:
                        size(pipe, f"{b}:{suffix}", suffix)
                    pipe.hget(f"{b}:meta", "paused")
                    head(pipe, f"{b}:wait", "wait", wait_n)
                    head(pipe, f"{b}:paused", "paused", wait_n)
                    head(pipe, f"{b}:prioritized", "prioritized", AGE_SAMPLE)
                    head(pipe, f"{b}:active", "active", ACTIVE_SAMPLE)
                return list(await pipe.execute(raise_on_error=False))

        first = await self.source.run("queue counts", _first, left(deadline, FLOOR)) if queues else []
        samples: dict[str, QueueSample] = {}
        wanted: dict[str, dict[str, set[str]]] = {}
        for i, q in enumerate(queues):
            row = first[i * per_queue:(i + 1) * per_queue]
            counts, (paused, wait_ids, paused_ids, prio_ids, active_ids) = row[:len(COUNTED)], row[len(COUNTED):]
            s = QueueSample()
            s.counts = {STATE_OF[suffix]: _count(n) for suffix, n in zip(COUNTED, counts, strict=True)}
            s.paused = paused_flag(paused)
            samples[q] = s
            w_ids = head_ids("wait", wait_ids)
            p_ids = head_ids("paused", paused_ids)
            pr_ids = head_ids("prioritized", prio_ids)
            a_ids = head_ids("active", active_ids)
            first_ids = w_ids[:AGE_SAMPLE] + p_ids[:AGE_SAMPLE] + pr_ids
            orphans = (a_ids + w_ids + p_ids + pr_ids)[:orphan_sample]
            total = s.counts["waiting"] + s.counts["paused"] + s.counts["prioritized"] + s.counts["active"]
            s.checked = len(orphans)
            s.truncated = total > len(orphans)
            wanted[q] = {"head": set(first_ids), "active": set(a_ids), "orphan": set(orphans)}

        if not any(w["head"] or w["active"] or w["orphan"] for w in wanted.values()):
            return samples

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

        second = await self.source.run("job hashes", _second, left(deadline, FLOOR))
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
                asset_id = asset_id_of(h[4])
                if asset_id is not None:
                    s.asset_jobs.append((job_id, asset_id))
        return samples

    async def workers(self, queues: Sequence[str], deadline: float) -> dict[str, int] | None:
        """Live workers per queue from ``CLIENT LIST`` (as BullMQ's ``getWorkers()`` counts them), or None
        when the server refuses the command (logged once, and once again when it works again)."""
        if not queues:
            return {}
        try:
            counts = await self.live_workers(queues, deadline)
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
        return counts

    async def live_workers(self, queues: Sequence[str], deadline: float) -> dict[str, int]:
        """Live workers per queue from ``CLIENT LIST``, without ``workers``' logging: a server that refuses
        the command raises ResponseError (the caller says what that means for it)."""

        async def _list(client: aioredis.Redis) -> list[dict[str, Any]]:
            return list(await client.client_list())

        clients = await self.source.run("CLIENT LIST", _list, left(deadline, FLOOR))
        return count_workers((str(c.get("name") or "") for c in clients), self.prefix, queues)

    async def jobs(
        self, queue: str, job_ids: Sequence[str], deadline: float, times: bool = True
    ) -> dict[str, JobHash]:
        """The hashes of these jobs (one pipeline); jobs whose hash is gone map to a ``gone`` JobHash.
        ``times=False`` reads ``name`` and ``data`` only (``timestamp`` then stands in as "not gone")."""
        if not job_ids:
            return {}
        keys = [self.key(queue, job_id) for job_id in job_ids]
        fields = ["name", "data", "timestamp", "processedOn", "finishedOn"] if times else ["name", "data"]

        async def _hmget(client: aioredis.Redis) -> list[Any]:
            async with client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.hmget(key, fields)
                return list(await pipe.execute(raise_on_error=False))

        results = await self.source.run(f"HMGET {len(keys)} job hashes", _hmget, left(deadline, FLOOR))
        return dict(zip(job_ids, (job_hash(r) for r in results), strict=True))


def job_hash(res: Any) -> JobHash:
    """One ``HMGET name data [timestamp processedOn finishedOn]`` answer as a JobHash."""
    if isinstance(res, list) and len(res) == 2:
        name, data = res
        if name is None and data is None:
            return JobHash(None, None)
        return JobHash(name if isinstance(name, str) else None, asset_id_of(data), timestamp=0)
    if isinstance(res, Exception) or not isinstance(res, list) or len(res) != 5:
        return JobHash(None, None)
    name, data, timestamp, processed_on, finished_on = res
    return JobHash(
        name=name if isinstance(name, str) else None,
        asset_id=asset_id_of(data),
        timestamp=to_int(timestamp),
        processed_on=to_int(processed_on),
        finished_on=to_int(finished_on),
    )


def count_workers(names: Iterable[str], prefix: str, queues: Sequence[str]) -> dict[str, int]:
    """Worker connections per queue, from client names (see ``worker_queue``)."""
    by_base64 = {base64.b64encode(q.encode()).decode(): q for q in queues}
    known = set(queues)
    counts: dict[str, int] = {}
    for name in names:
        if not name:
            continue
        queue = worker_queue(name, prefix, by_base64, known)
        if queue is not None:
            counts[queue] = counts.get(queue, 0) + 1
    return counts


def _ids(value: Any) -> list[str]:
    return [str(x) for x in value] if isinstance(value, list) else []
