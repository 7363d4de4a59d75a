"""Following the jobs regeneration asked for, in the thumbnail queue's event stream.

Immich answers ``POST /api/assets/jobs`` with 204 whether or not it queued anything (v3.0.0 queued
nothing, immich-app/immich#29450), and removes a job's hash the moment it completes. So right after
each accepted request the watch reads the stream's new entries as they are written (``XREAD`` with a
short block): each ``added`` thumbnail job's hash is read at once, while the job still waits, to learn
the asset it names. An asset with a job is *confirmed*; one with none by the end of its window is
``not_queued`` unless a job whose data could not be read in time might be its own (counted, never
guessed). Later entries say when each confirmed job started and finished.

Memory is bounded: only jobs naming an asset the watch was told to expect are kept (at most
``MAX_JOBS``), and each read takes at most ``BATCH`` entries.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from immich_thumbnail_exporter.remediation import queue_view
from immich_thumbnail_exporter.sources.bullmq_events import read_streams, stream_ends
from immich_thumbnail_exporter.sources.redis import RedisSource
from immich_thumbnail_exporter.vocabulary import THUMBNAIL_JOB_NAMES, THUMBNAIL_QUEUE

BATCH = 1_000
MAX_JOBS = 50_000
MAX_READS_PER_POLL = 20


@dataclass
class JobSeen:
    """One job of an expected asset, as the event stream told it."""

    job_id: str
    asset_id: str
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


def _stamp(entry_id: str) -> float:
    try:
        return int(entry_id.split("-", 1)[0]) / 1000.0
    except ValueError:
        return time.time()


class JobWatch:
    def __init__(self, source: RedisSource, prefix: str) -> None:
        self.source = source
        self.prefix = prefix
        self.key = f"{prefix}:{THUMBNAIL_QUEUE}:events"
        self.cursor: str | None = None
        self._expected: dict[str, float] = {}  # asset -> monotonic deadline of its window
        self._jobs: OrderedDict[str, JobSeen] = OrderedDict()  # job id -> job, oldest first
        self._by_asset: dict[str, str] = {}  # asset -> its latest job id
        self._unreadable = 0  # added thumbnail jobs gone before their hash was read, while windows were open
        self._confirmed: dict[str, str] = {}  # confirmed since the last settle(): asset -> job id
        self.events_read = 0

    async def start(self) -> None:
        """Remember where the stream ends now: only later entries can answer a later request."""
        if self.cursor is None:
            self.cursor = (await stream_ends(self.source, [self.key]))[0]

    # -- expectations ------------------------------------------------------------------------------
    def expect(self, asset_ids: Iterable[str], window: float) -> None:
        """A request naming these assets was accepted now: a job for each should appear within ``window``."""
        deadline = time.monotonic() + window
        for a in asset_ids:
            self._expected[a] = deadline
            self._by_asset.pop(a, None)  # an earlier attempt's job says nothing about this one

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
        """Read what the stream gained since the last call; wait up to ``block`` seconds for a first entry."""
        await self.start()
        for _ in range(MAX_READS_PER_POLL):
            assert self.cursor is not None
            block_ms = max(1, int(block * 1000)) if block > 0 else 0
            read = await read_streams(self.source, {self.key: self.cursor}, BATCH, block_ms)
            entries = [(eid, f if isinstance(f, dict) else {}) for eid, f in read.get(self.key, [])]
            block = 0.0
            if not entries:
                return
            self.cursor = entries[-1][0]
            self.events_read += len(entries)
            await self._apply(entries)
            if len(entries) < BATCH:
                return

    async def _apply(self, entries: list[tuple[str, dict[str, Any]]]) -> None:
        added = [(eid, f["jobId"]) for eid, f in entries
                 if f.get("event") == "added" and f.get("name") in THUMBNAIL_JOB_NAMES and f.get("jobId")]
        if added and self._expected:
            assets = await queue_view.job_assets(self.source, self.prefix, [j for _, j in added])
            for eid, job_id in added:
                asset = assets.get(job_id)
                if asset is None:
                    self._unreadable += 1
                elif asset in self._expected:
                    self._remember(JobSeen(job_id, asset, _stamp(eid)))
                    self._confirmed[asset] = job_id
                    del self._expected[asset]
        for eid, f in entries:
            job = self._jobs.get(f.get("jobId", ""))
            if job is None:
                continue
            event = f.get("event")
            if event == "active":
                job.started_at = _stamp(eid)
            elif event in ("completed", "failed"):
                job.finished_at, job.outcome = _stamp(eid), event
                job.failed_reason = f.get("failedReason") if event == "failed" else None

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
        view = await queue_view.queued_assets(self.source, self.prefix)
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
