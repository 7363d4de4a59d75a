"""Following the jobs regeneration asked for, in the thumbnail queue's event stream.

Immich answers ``POST /api/assets/jobs`` with 204 whether or not it queued anything (v3.0.0 queued
nothing, immich-app/immich#29450), and removes a job's hash the moment it completes. ``JobWatch`` is a
subscriber of the process's one event reader (``sources/bullmq_reader.py``: one connection, one XREAD
loop, shared with the job counters and job verification). While confirmation windows are open, the
reader reads each ``added`` thumbnail job's hash at once, while the job still waits, to learn the asset
it names. An asset with a job is *confirmed*; one with none by the end of its window is ``not_queued``
unless a job whose data could not be read in time might be its own (counted, never guessed). Later
entries say when each confirmed job started and finished.

The same watch confirms face thumbnails: built with ``names=PERSON_THUMBNAIL_JOB_NAMES`` it follows
``PersonGenerateThumbnail`` jobs, whose ``data.id`` is the person's (``remediation/people.py``). Each
watch is one more subscriber of the one reader, never a connection of its own.

Memory is bounded: only jobs naming an asset (or person) the watch was told to expect are kept (at most
``MAX_JOBS``).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from immich_thumbnail_exporter.sources.bullmq_jobs import JobEvent
from immich_thumbnail_exporter.sources.bullmq_queue import queued_assets
from immich_thumbnail_exporter.sources.bullmq_reader import EventReader
from immich_thumbnail_exporter.sources.postgres import SourceError
from immich_thumbnail_exporter.sources.redis import SOURCE, RedisSource
from immich_thumbnail_exporter.timing import deadline_in
from immich_thumbnail_exporter.vocabulary import THUMBNAIL_JOB_NAMES, THUMBNAIL_QUEUE

MAX_JOBS = 50_000
MAX_RECENT = 5_000  # thumbnail jobs read before any request named their asset (kept for ``expect``)
LOOKBACK = 10.0  # seconds before ``expect`` in which a job read for that asset is the request's own


@dataclass
class JobSeen:
    """One job of an expected asset (or person), as the event stream told it."""

    job_id: str
    asset_id: str  # what the job's data names: the asset, or the person of a face-thumbnail job
    added_at: float  # unix seconds, from the stream entry's id
    started_at: float | None = None
    finished_at: float | None = None
    outcome: str | None = None  # completed, failed
    failed_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.finished_at is not None


@dataclass
class Confirmation:
    """What the windows that ended say about the assets they covered."""

    confirmed: dict[str, str] = field(default_factory=dict)  # asset -> job id
    not_queued: set[str] = field(default_factory=set)
    # No job seen, but jobs whose data could not be read in time might be theirs.
    unconfirmed: set[str] = field(default_factory=set)
    unreadable_jobs: int = 0


class JobWatch:
    """Regeneration's confirmations: a subscriber of the process's event reader for the thumbnail queue.

    ``source``: the caller's Redis (its pooled connection reads the queue itself, in ``settle``); the
    watch ends with it (``source.close()``). ``names``: the jobs it follows (per-asset thumbnail jobs by
    default; ``PERSON_THUMBNAIL_JOB_NAMES`` for face thumbnails)."""

    queues = frozenset({THUMBNAIL_QUEUE})
    reads_ahead = False

    def __init__(self, source: RedisSource, prefix: str, names: frozenset[str] = THUMBNAIL_JOB_NAMES) -> None:
        self.source = source
        self.prefix = prefix
        self.names = names
        self._closed = False
        self.reader = EventReader.attach(source.config)
        self._expected: dict[str, float] = {}  # asset -> monotonic deadline of its window
        self._jobs: OrderedDict[str, JobSeen] = OrderedDict()  # job id -> job, oldest first
        self._by_asset: dict[str, str] = {}  # asset -> its latest job id
        self._unreadable = 0  # added thumbnail jobs gone before their hash was read, while windows were open
        self._confirmed: dict[str, str] = {}  # confirmed since the last settle(): asset -> job id
        self._delivered = asyncio.Event()
        # Once started (requests are about to be sent), thumbnail jobs are read as they are added: the
        # reader may see a request's jobs before its answer (and ``expect``) arrives.
        self._armed = False
        self._recent: OrderedDict[str, tuple[JobSeen, float]] = OrderedDict()  # asset -> job, when read
        self._recent_jobs: dict[str, JobSeen] = {}  # the same jobs by id, for their later events
        self._recent_unreadable: deque[float] = deque(maxlen=MAX_RECENT)
        self.events_read = 0
        self.reader.subscribe(self)
        source.on_close(self.close)

    async def close(self) -> None:
        if self._closed:  # once: the reader counts its users
            return
        self._closed = True
        self.reader.unsubscribe(self)
        await self.reader.release()

    async def start(self) -> None:
        """Follow the stream from where it ends now: only later entries can answer a later request."""
        self._armed = True
        if not await self.reader.wait_following(sorted(self.queues), deadline_in(self.source.timeout)):
            raise SourceError(SOURCE, f"event stream not readable: {self.reader.state or 'no answer in time'}")

    # -- expectations ------------------------------------------------------------------------------
    def expect(self, asset_ids: Iterable[str], window: float) -> None:
        """A request naming these assets was accepted now: a job for each should appear within ``window``.

        Immich queues the jobs while it answers, and the reader runs on its own: a job added in the last
        ``LOOKBACK`` seconds (the request's own) may already have been read. It counts; older ones do not."""
        now = time.monotonic()
        for a in asset_ids:
            self._expected[a] = now + window
            self._by_asset.pop(a, None)  # an earlier attempt's job says nothing about this one
            recent = self._recent.get(a)
            if recent is not None and recent[1] >= now - LOOKBACK:
                self._confirm(recent[0])
        self._unreadable += sum(1 for t in self._recent_unreadable if t >= now - LOOKBACK)
        self._recent_unreadable.clear()

    def adopt(self, asset_id: str, job_id: str) -> None:
        """A job known from elsewhere (the ledger, the queue) is this asset's latest."""
        if asset_id not in self._by_asset:
            self._remember(JobSeen(job_id, asset_id, time.time()))

    def forget_expected(self) -> None:
        """Drop the open windows (the stream could not be read through them)."""
        self._expected.clear()
        self._confirmed.clear()
        self._unreadable = 0

    @property
    def pending(self) -> bool:
        return bool(self._expected)

    def last_deadline(self) -> float | None:
        return max(self._expected.values()) if self._expected else None

    def job_of(self, asset_id: str) -> JobSeen | None:
        job_id = self._by_asset.get(asset_id)
        return self._jobs.get(job_id) if job_id is not None else None

    # -- reading the stream ------------------------------------------------------------------------
    async def poll(self, block: float = 0.0) -> None:
        """Take in everything the stream gained so far; wait up to ``block`` seconds for more. Raises
        SourceError when the stream cannot be read."""
        await self.start()
        self._delivered.clear()
        deadline = deadline_in(self.source.timeout + block)
        if not await self.reader.catch_up(self.source, sorted(self.queues), deadline):
            raise SourceError(SOURCE, f"event stream not read in time: {self.reader.state}")
        if block > 0 and not self._delivered.is_set():
            try:
                await asyncio.wait_for(self._delivered.wait(), block)
            except TimeoutError:
                return

    # -- Subscriber ------------------------------------------------------------------------------------
    def takes(self, queue: str) -> bool:
        return queue in self.queues

    def wants(self, queue: str, name: str) -> bool:
        return (self._armed or bool(self._expected)) and name in self.names

    def forget(self, queue: str) -> None:
        """A replaced stream restarts job ids: the jobs remembered by id say nothing any more."""
        self._jobs.clear()
        self._by_asset.clear()
        self._recent.clear()
        self._recent_jobs.clear()

    def deliver(self, events: Sequence[JobEvent]) -> None:
        self.events_read += len(events)
        for e in events:
            if e.event == "added":
                self._added(e)
                continue
            job = self._jobs.get(e.job_id) or self._recent_jobs.get(e.job_id)
            if job is None:
                continue
            if e.event == "active":
                job.started_at = e.at_ms / 1000.0
            elif e.event in ("completed", "failed"):
                job.finished_at, job.outcome = e.at_ms / 1000.0, e.event
                reason = e.fields.get("failedReason") if e.event == "failed" else None
                job.failed_reason = reason if isinstance(reason, str) else None
        if events:
            self._delivered.set()

    def _added(self, e: JobEvent) -> None:
        if not (self._armed or self._expected) or e.job is None or e.job.name not in self.names:
            return
        asset = e.job.entity if e.job.read else None
        now = time.monotonic()
        if asset is None:
            if self._expected:
                self._unreadable += 1
            else:
                self._recent_unreadable.append(now)
            return
        job = JobSeen(e.job_id, asset, e.at_ms / 1000.0)
        if asset in self._expected:
            self._confirm(job)
            return
        # Maybe the job of a request whose answer is still on its way: kept for ``expect``, bounded.
        self._recent[asset] = (job, now)
        self._recent.move_to_end(asset)
        self._recent_jobs[job.job_id] = job
        while len(self._recent) > MAX_RECENT:
            _, (old, _) = self._recent.popitem(last=False)
            self._recent_jobs.pop(old.job_id, None)

    def _confirm(self, job: JobSeen) -> None:
        self._remember(job)
        self._confirmed[job.asset_id] = job.job_id
        self._expected.pop(job.asset_id, None)
        self._recent.pop(job.asset_id, None)
        self._recent_jobs.pop(job.job_id, None)

    def _remember(self, job: JobSeen) -> None:
        self._jobs[job.job_id] = job
        self._by_asset[job.asset_id] = job.job_id
        while len(self._jobs) > MAX_JOBS:
            old_id, old = self._jobs.popitem(last=False)
            if self._by_asset.get(old.asset_id) == old_id:
                del self._by_asset[old.asset_id]

    # -- settling windows --------------------------------------------------------------------------
    async def settle(self) -> Confirmation:
        """Report the assets confirmed since the last call, and close the windows that ended.

        Before calling an asset ``not_queued`` the queue itself is searched once for a job naming it: the
        stream may have been trimmed, or the job's data read too late.
        """
        out = Confirmation(confirmed=self._confirmed)
        self._confirmed = {}
        now = time.monotonic()
        ended = [a for a, deadline in self._expected.items() if deadline <= now]
        if not ended:
            return out
        view = await queued_assets(self.source, self.prefix, names=self.names)
        for a in ended:
            del self._expected[a]
            queued = view.assets.get(a)
            if queued is not None:
                self._remember(JobSeen(queued.job_id, a, time.time()))
                out.confirmed[a] = queued.job_id
            elif self._unreadable or not view.complete:
                out.unconfirmed.add(a)
            else:
                out.not_queued.add(a)
        out.unreadable_jobs = self._unreadable
        if not self._expected:
            self._unreadable = 0
        return out
