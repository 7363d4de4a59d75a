"""The one reader of BullMQ's event streams in a process: one Redis connection, one XREAD loop.

Three parts of the exporter follow the queues' events: the job counters (``collectors/job_events.py``),
job verification (``sources/bullmq_follow.py``) and regeneration's confirmations
(``remediation/jobwatch.py``). They subscribe to one ``EventReader``, which reads every entry once and
delivers it, as a ``JobEvent``, to each subscriber of its queue. So there is one connection (named
``EVENTS_CLIENT_NAME`` in ``CLIENT LIST``), one cursor per stream, one continuity check (a replaced
stream is detected once, for everyone; trimmed entries are counted in ``lost``) and one bounded map of
what is known about each job (``JobMap``, ``sources/bullmq_jobs.py``).

The loop (``step``): streams with something new are read as ``MULTI; XINFO STREAM; XRANGE; EXEC`` per
batch (reads only; the info and the entries agree); when nothing is new it waits in a blocking
``XREAD`` (``COUNT 1``, a block well under the socket timeout) whose answer only says which streams
gained entries. Every stream is checked at least every ``CONTINUITY_CHECK`` seconds, which catches a
stream that went back in time (its new entries are below our cursor, so XREAD never wakes for them).

A job's hash (``name``, ``data``, times) is read right away, on the same connection, when a subscriber
wants the job's data (``Subscriber.wants``: per-asset thumbnail jobs, face thumbnail jobs) or when a job
starts or ends without its ``added`` event seen. Immich removes a completed job's hash at once, so the
data is only there while the job waits or runs; jobs queued before the reader started are read ahead
from the head of their queues (``Subscriber.reads_ahead``).

**First start**: a stream is followed from its current end (history already in it is not delivered:
it would be counted again by every restart), or from its first entry for a queue created while the
exporter watched (``follow(..., from_start=...)``).

There is one reader per Redis configuration in a process (``EventReader.attach``): every collection
built from the same configuration shares it, and the last one to ``release`` it closes it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from immich_thumbnail_exporter.config import RedisConfig
from immich_thumbnail_exporter.sources.bullmq import BullMQ, JobHash, head, head_ids
from immich_thumbnail_exporter.sources.bullmq_events import (
    OK,
    REREAD,
    START,
    Cursor,
    Entry,
    at_or_after,
    by_stream,
    continuity,
    cursor_at_end,
    next_id,
)
from immich_thumbnail_exporter.sources.bullmq_jobs import MAX_TRACKED, JobEvent, JobInfo, JobMap, job_events, needs_hash
from immich_thumbnail_exporter.sources.health import SourceStates
from immich_thumbnail_exporter.sources.postgres import SourceError
from immich_thumbnail_exporter.sources.redis import (
    EVENTS_CLIENT_NAME,
    SOURCE,
    RedisSource,
    describe_redis_error,
    is_permission_error,
)
from immich_thumbnail_exporter.timing import Backoff, deadline_in, left

log = logging.getLogger(__name__)
T = TypeVar("T")

BATCH = 1000  # entries per XRANGE
MAX_HASH_READS = 2000  # job hashes read per step; later jobs are read when they start
BLOCK = 1.0  # seconds one XREAD may block (kept under half the socket timeout)
CONTINUITY_CHECK = 10.0  # seconds between checks of every stream, new entries or not
HEAD = 100  # jobs at the head of a queue (next to run) whose hashes are read ahead of time
HEAD_INTERVAL = 0.5  # seconds between looks at the heads
FLOOR = 0.05
GRACE = 0.1  # seconds a round lets the loop find new entries itself before it cuts the wait short


# -- subscribers ---------------------------------------------------------------------------------------


class Subscriber(Protocol):
    """What the reader delivers to. ``deliver`` and ``forget`` must not block: no I/O there."""

    @property
    def queues(self) -> frozenset[str]:
        """The queues the reader is to follow for this subscriber."""
        ...

    def takes(self, queue: str) -> bool:
        """Deliver this queue's events (the counters take every queue any part of the exporter follows)."""
        ...

    @property
    def reads_ahead(self) -> bool:
        """Read the data of the jobs at the head of these queues (queued before the reader started)."""
        ...

    def wants(self, queue: str, name: str) -> bool:
        """Read this job's data (its hash) as soon as it is added."""
        ...

    def deliver(self, events: Sequence[JobEvent]) -> None: ...

    def forget(self, queue: str) -> None:
        """The queue's stream was replaced: job ids restart, anything remembered about its jobs is void."""
        ...


@dataclass
class ReaderStats:
    """Totals for the life of the reader."""

    steps: int = 0
    entries: int = 0
    malformed: int = 0
    hash_reads: int = 0
    hashes_gone: int = 0  # read too late: the job had already finished and been removed
    restarts: int = 0  # streams found replaced (FLUSHALL, a restart without persistence, a restore)
    failures: int = 0
    lost: int = 0
    behind: list[str] = field(default_factory=list)


async def stream_ends(source: RedisSource, keys: Sequence[str], timeout: float | None = None) -> list[Cursor]:
    """Where each stream ends now (one pipeline of XINFO STREAM; a missing key: at its start)."""
    if not keys:
        return []

    async def _info(client: aioredis.Redis) -> list[Any]:
        async with client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.xinfo_stream(key)
            return list(await pipe.execute(raise_on_error=False))

    return [cursor_at_end(info) for info in await source.run("XINFO STREAM", _info, timeout)]


# -- the reader ----------------------------------------------------------------------------------------


class EventReader:
    _shared: ClassVar[dict[int, tuple[RedisConfig, EventReader]]] = {}

    def __init__(self, config: RedisConfig, *, block: float = BLOCK, max_tracked: int = MAX_TRACKED) -> None:
        self.config = config
        self.source = RedisSource(config, connections=1, name=EVENTS_CLIENT_NAME)
        self.prefix = config.prefix
        self.bullmq = BullMQ(self.source, self.prefix)
        self.block_ms = max(50, int(min(block, self.source.timeout / 2) * 1000))
        self.jobs = JobMap(max_tracked)
        self.stats = ReaderStats()
        self.lost: dict[str, int] = {}  # entries per queue trimmed before they were read
        self.state: bool | str | None = None  # True, or why the streams cannot be read
        self._states = SourceStates(log, "following BullMQ's event streams")
        self._subscribers: list[Subscriber] = []
        self._wanted: set[str] = set()
        self._from_start: set[str] = set()
        self._cursors: dict[str, Cursor] = {}
        self._dirty: set[str] = set()
        # Job hashes read as soon as XREAD showed their ``added`` entry, for the drain that follows.
        self._prefetched: dict[str, dict[str, JobHash]] = {}
        self._transaction = True
        self._warned: set[str] = set()
        self._wrong_type: set[str] = set()
        self._next_check = 0.0
        self._next_head = 0.0
        self._task: asyncio.Task[None] | None = None
        self._stepped = asyncio.Event()
        self._changed = asyncio.Event()  # a queue to follow was added: stop waiting, start its stream
        self._users = 0

    # -- one per process -------------------------------------------------------------------------------
    @classmethod
    def attach(cls, config: RedisConfig) -> EventReader:
        """The process's reader for this Redis configuration (built on first use); ``release`` it after."""
        entry = cls._shared.get(id(config))
        if entry is None:
            entry = cls._shared[id(config)] = (config, cls(config))
        reader = entry[1]
        reader._users += 1
        return reader

    async def release(self) -> None:
        """One user less; the last one closes the reader."""
        self._users -= 1
        if self._users > 0:
            return
        entry = self._shared.get(id(self.config))
        if entry is not None and entry[1] is self:
            del self._shared[id(self.config)]
        await self.close()

    # -- subscriptions ---------------------------------------------------------------------------------
    def key(self, queue: str) -> str:
        return f"{self.prefix}:{queue}:events"

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def subscribe(self, subscriber: Subscriber) -> None:
        if subscriber not in self._subscribers:
            self._subscribers.append(subscriber)
        self.follow(subscriber.queues)

    def unsubscribe(self, subscriber: Subscriber) -> None:
        if subscriber in self._subscribers:
            self._subscribers.remove(subscriber)

    def follow(self, queues: Iterable[str], from_start: Iterable[str] = ()) -> None:
        """Follow these queues' streams: from their current end, or (``from_start``: queues created while
        the exporter watched) from their first entry."""
        for queue in from_start:
            if queue not in self._cursors:
                self._from_start.add(queue)
        before = len(self._wanted)
        self._wanted.update(queues)
        self._wanted.update(from_start)
        if len(self._wanted) > before:
            self._changed.set()

    def following(self, queues: Iterable[str]) -> bool:
        """True once these streams' starting points are known: every entry from then on is delivered."""
        return all(q in self._cursors for q in queues)

    # -- running ---------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="bullmq-event-reader")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task], timeout=5)
        await self.source.close()

    async def _run(self) -> None:
        backoff = Backoff(0.5, 30.0)
        while True:
            try:
                await asyncio.wait_for(self.step(), self.source.timeout * 4 + self.block_ms / 1000)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failure = self._states.failed(exc, "no answer from Redis in time")
                if not failure.unexpected:
                    self._states.set(SOURCE, failure.state or failure.error)
                self.state = failure.state or failure.error
                self.stats.failures += 1
                self._notify()
                await asyncio.sleep(backoff.failed())
                continue
            backoff.succeeded()
            if self.state is not True:
                self._states.set(SOURCE, True)
                self.state = True
            self._notify()

    def _notify(self) -> None:
        stepped, self._stepped = self._stepped, asyncio.Event()
        stepped.set()

    async def next_step(self, timeout: float) -> bool:
        """Wait for the loop to finish a step (or fail one); False when ``timeout`` passed first."""
        self.start()
        stepped = self._stepped
        try:
            await asyncio.wait_for(stepped.wait(), max(0.0, timeout))
        except TimeoutError:
            return False
        return True

    async def wait_following(self, queues: Sequence[str], deadline: float) -> bool:
        """Wait until these streams are followed (their starting points read); False at the deadline."""
        self.follow(queues)
        while not self.following(queues):
            if not await self.next_step(left(deadline)) and time.monotonic() >= deadline:
                return False
        return True

    async def catch_up(self, source: RedisSource, queues: Sequence[str], deadline: float) -> bool:
        """Wait until every entry written to these streams before now has been delivered.

        ``source`` (the caller's pooled connection, not the reader's) reads where the streams end now.
        False when the deadline came first: the reader is behind or failing (``state`` says why).
        """
        self.follow(queues)
        self.start()
        ends = await stream_ends(source, [self.key(q) for q in queues], left(deadline, FLOOR))
        targets = {q: end.last_id for q, end in zip(queues, ends, strict=True)}
        behind = {q for q, end in targets.items() if q in self._cursors and not self._reached({q: end})}
        if behind:
            self._dirty.update(behind)
            # New entries wake the XREAD by themselves; entries it cannot see (trimmed away before they
            # were read, or below our cursor) only cut the wait short.
            if not await self.next_step(min(GRACE, left(deadline))):
                self._changed.set()
        while not self._reached(targets):
            if not await self.next_step(left(deadline)) and time.monotonic() >= deadline:
                return False
        return True

    def _reached(self, targets: dict[str, str]) -> bool:
        for queue, end in targets.items():
            cursor = self._cursors.get(queue)
            if cursor is None or not at_or_after(cursor.last_id, end):
                return False
        return True

    # -- one step --------------------------------------------------------------------------------------
    async def step(self) -> None:
        """Start new streams, read what is new (or wait for it), and deliver it. Raises SourceError."""
        self.stats.steps += 1
        self._changed.clear()
        new = sorted(q for q in self._wanted if q not in self._cursors)
        if new:
            await self._start_cursors(new)
        now = time.monotonic()
        if now >= self._next_check:
            self._next_check = now + CONTINUITY_CHECK
            self._dirty.update(self._cursors)
        if now >= self._next_head:
            self._next_head = now + HEAD_INTERVAL
            await self._read_heads()
        if self._dirty:
            self._dirty = set(await self._drain(sorted(self._dirty)))
        elif not self._changed.is_set():
            await self._wait_for_entries()

    async def _until_changed(self, work: Awaitable[T] | None) -> T | None:
        """``work`` (or, when None, nothing) until it ends or a new queue is to be followed, at most one
        block; returns what ``work`` returned, None when cut short (its command is then abandoned)."""
        changed = asyncio.ensure_future(self._changed.wait())
        task = asyncio.ensure_future(work) if work is not None else None
        waiting: set[asyncio.Future[Any]] = {changed} | ({task} if task is not None else set())
        try:
            await asyncio.wait(waiting, timeout=self.block_ms / 1000 + self.source.timeout,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            changed.cancel()
            if task is not None and not task.done():
                # Cut short, or the reader is closing: the command is abandoned (its connection dropped,
                # made again on the next read), never left running on its own.
                task.cancel()
                await asyncio.wait([task], timeout=1)
        if task is None or task.cancelled():
            return None
        return task.result()

    async def _start_cursors(self, queues: list[str]) -> None:
        ends = await stream_ends(self.source, [self.key(q) for q in queues])
        for queue, end in zip(queues, ends, strict=True):
            self._cursors[queue] = Cursor(START, 0) if queue in self._from_start else end
            self._from_start.discard(queue)
            self.lost.setdefault(queue, 0)
            if queue in self._cursors and self._cursors[queue].last_id == START:
                self._dirty.add(queue)

    async def _wait_for_entries(self) -> None:
        """A blocking XREAD. Its entries are read again with their stream's info (the next drain), but
        the data of the jobs they add is read now: a thumbnail job often lives a few milliseconds."""
        streams: dict[Any, Any] = {self.key(q): c.last_id for q, c in self._cursors.items()}
        block = self.block_ms

        async def _xread(client: aioredis.Redis) -> Any:
            return await client.xread(streams, count=BATCH, block=block)

        if not streams:
            await self._until_changed(None)  # nothing to follow yet
            return
        try:
            answer = await self._until_changed(self.source.run("XREAD", _xread, block / 1000 + self.source.timeout))
        except ResponseError as exc:
            raise SourceError(SOURCE, f"XREAD refused: {describe_redis_error(exc)}") from None
        by_key = by_stream(answer, streams)
        budget = MAX_HASH_READS
        for queue in self._cursors:
            entries = by_key.get(self.key(queue))
            if not entries:
                continue
            self._dirty.add(queue)
            ids = self._hash_ids(queue, entries)[:budget]
            budget -= len(ids)
            self._prefetched.setdefault(queue, {}).update(await self._hashes(queue, ids))

    async def _drain(self, queues: list[str]) -> list[str]:
        """Read one batch of each of these streams with its info; return the streams with more to read."""
        ranges = {q: next_id(self._cursors[q].last_id) for q in queues}

        async def _read(client: aioredis.Redis) -> list[Any]:
            async with client.pipeline(transaction=self._transaction) as pipe:
                for q in queues:
                    pipe.xinfo_stream(self.key(q))
                    pipe.xrange(self.key(q), min=ranges[q], max="+", count=BATCH)
                return list(await pipe.execute(raise_on_error=False))

        try:
            answer = await self.source.run(f"XRANGE {len(queues)} streams", _read)
        except ResponseError as exc:
            if self._transaction and is_permission_error(exc):
                log.warning("the Redis server refuses MULTI/EXEC (%s): reading event streams without it", exc)
                self._transaction = False
                return queues
            raise SourceError(SOURCE, f"reading event streams: {describe_redis_error(exc)}") from None
        more: list[str] = []
        budget = [MAX_HASH_READS]
        for i, queue in enumerate(queues):
            info, entries = answer[2 * i], answer[2 * i + 1]
            if await self._read_batch(queue, info, entries, budget):
                more.append(queue)
        return more

    async def _read_batch(self, queue: str, info: Any, entries: Any, budget: list[int]) -> bool:
        key, cursor = self.key(queue), self._cursors[queue]
        if isinstance(info, ResponseError):
            text = str(info).lower()
            if "no such key" in text:
                if cursor.last_id != START:
                    # Gone (queue obliterated, server flushed or restarted without persistence): anything
                    # written to a new stream is new.
                    log.info("event stream %s disappeared: following it again from its start", key)
                    self._replaced(queue)
                    cursor.last_id, cursor.seq = START, 0
                return False
            if "wrongtype" in text:
                if queue not in self._wrong_type:
                    self._wrong_type.add(queue)
                    log.warning("%s is not a stream: no job events for queue %s", key, queue)
                return False
            raise SourceError(SOURCE, f"XINFO STREAM {key}: {describe_redis_error(info)}")
        if isinstance(entries, Exception) or not isinstance(info, dict):
            raise SourceError(SOURCE, f"XRANGE {key}: {describe_redis_error(entries)}")
        verdict = continuity(key, cursor, info, self._warned)
        if verdict.lost:
            self.lost[queue] = self.lost.get(queue, 0) + verdict.lost
            self.stats.lost += verdict.lost
        if verdict.replaced:
            self._replaced(queue)
        if verdict.verdict == REREAD:
            return True
        if verdict.verdict != OK or not entries:
            return False
        batch = [(str(e[0]), e[1]) for e in entries]
        await self._deliver(queue, batch, budget)
        cursor.last_id = batch[-1][0]
        if cursor.seq is not None:
            cursor.seq += len(batch)
        return len(batch) >= BATCH

    def _replaced(self, queue: str) -> None:
        self.stats.restarts += 1
        self._prefetched.pop(queue, None)
        self.jobs.forget(queue)
        for subscriber in self._subscribers:
            if subscriber.takes(queue):
                subscriber.forget(queue)

    def _hash_ids(self, queue: str, entries: list[Entry]) -> list[str]:
        """The jobs of these entries whose hash is to be read (and was not read ahead already)."""
        subscribers = [s for s in self._subscribers if s.takes(queue)]

        def wants(name: str) -> bool:
            return any(s.wants(queue, name) for s in subscribers)

        done = self._prefetched.get(queue, {})
        return [j for j in needs_hash(queue, entries, self.jobs, wants) if j not in done]

    async def _deliver(self, queue: str, entries: list[Entry], budget: list[int]) -> None:
        subscribers = [s for s in self._subscribers if s.takes(queue)]
        ids = self._hash_ids(queue, entries)[: max(0, budget[0])]
        budget[0] -= len(ids)
        hashes = self._prefetched.pop(queue, {})
        hashes.update(await self._hashes(queue, ids))
        events, malformed = job_events(queue, entries, self.jobs, hashes)
        self.stats.entries += len(entries)
        self.stats.malformed += malformed
        if malformed:
            log.debug("skipped %d malformed entries in the event stream of %s", malformed, queue)
        for subscriber in subscribers:
            try:
                subscriber.deliver(events)
            except Exception:  # a bug in one subscriber must not stop the others (nor redeliver)
                log.exception("a subscriber of %s's events failed", queue)

    async def _hashes(self, queue: str, ids: list[str]) -> dict[str, JobHash]:
        if not ids:
            return {}
        found = await self.bullmq.jobs(queue, ids, deadline_in(self.source.timeout))
        self.stats.hash_reads += len(ids)
        self.stats.hashes_gone += sum(1 for h in found.values() if h.gone)
        return found

    async def _read_heads(self) -> None:
        """Read the data of the next jobs to run, and of running ones, that nothing is known of yet."""
        queues = sorted({q for s in self._subscribers if s.reads_ahead for q in s.queues} & set(self._cursors))
        if not queues:
            return
        suffixes = ("wait", "prioritized", "active")

        async def _heads(client: aioredis.Redis) -> list[Any]:
            async with client.pipeline(transaction=False) as pipe:
                for q in queues:
                    for suffix in suffixes:
                        head(pipe, f"{self.prefix}:{q}:{suffix}", suffix, HEAD)
                return list(await pipe.execute(raise_on_error=False))

        answer = await self.source.run("heads of the queues", _heads)
        budget = MAX_HASH_READS
        for i, queue in enumerate(queues):
            ids: list[str] = []
            for j, suffix in enumerate(suffixes):
                ids.extend(head_ids(suffix, answer[i * len(suffixes) + j]))
            unread = [j for j in dict.fromkeys(ids) if not self._known(queue, j)][:budget]
            budget -= len(unread)
            for job_id, found in (await self._hashes(queue, unread)).items():
                if not found.gone:  # else finished meanwhile: its event says so
                    self.jobs.put((queue, job_id), JobInfo.from_hash(found))

    def _known(self, queue: str, job_id: str) -> bool:
        job = self.jobs.get((queue, job_id))
        return job is not None and job.read
