"""Job counters and durations from BullMQ's per-queue event streams.

``sources/bullmq_events.py`` delivers every new stream entry once; this module counts them:

* ``added`` (``jobId``, ``name``): ``immich_jobs_accepted_total{queue,job_name}``;
* ``completed`` (``returnvalue``): ``immich_jobs_finished_total{outcome}`` from the job's return value
  (``completed`` when it reports no status, as on every Immich; see ``outcome_of``); ``failed`` (a
  thrown error, the job kept in the failed set): outcome ``error``;
* ``active``: the job started; its wait (added -> first active) and run (last active -> finished)
  times feed ``immich_job_wait_seconds`` and ``immich_job_run_seconds``.

Times come from the stream entries' ids, which are the Redis server's clock in milliseconds, so wait
and run times need no clock agreement with Immich. A job whose ``added`` event was not seen (it was
queued before the exporter started) is looked up in its job hash when it starts (``name``,
``timestamp``); a job whose hash is already gone when it finishes (``removeOnComplete``) and that was
never seen starting is counted with ``job_name="unknown"`` and no duration. The job names seen are kept
in a bounded LRU.

A new process, or a new collection, starts its counters at 0 (Prometheus treats that as a counter
reset) and does not count events from before it started; events that happen while no exporter runs
are not counted by anyone.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import HistogramMetricFamily, Metric

from immich_thumbnail_exporter.metrics import counter, family
from immich_thumbnail_exporter.sources.bullmq import BullMQ, JobHash, loads
from immich_thumbnail_exporter.sources.bullmq_events import Entry, parse_id
from immich_thumbnail_exporter.vocabulary import COMPLETED, ERROR, JOB_STATUSES

log = logging.getLogger(__name__)

# Seconds to hours: a thumbnail normally takes well under a second to a few seconds to make, a video's
# preview longer; waits range from nothing to many hours behind a full "All" regeneration.
BUCKETS: tuple[float, ...] = (
    0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200, 86400,
)

MAX_LOOKUPS_PER_ROUND = 1000  # job hashes read for jobs whose ``added`` event was not seen
MAX_TRACKED_JOBS = 50_000  # LRU of jobs seen added or started and not yet finished
MAX_JOB_NAMES = 200  # distinct ``job_name`` label values per queue; more become "unknown"
MAX_NAME_LENGTH = 100
UNKNOWN = "unknown"


def outcome_of(returnvalue: str | None) -> str:
    """The outcome of a ``completed`` event, from the processor's return value (JSON).

    Immich's BullMQ processor is its ``JobRun`` event emitter: it catches the handler's errors and
    returns nothing, so on a real Immich every job completes with ``null`` and the outcome is
    ``completed`` (no status reported), whether the thumbnail was made or not: only a check of the
    asset can tell (``collectors/job_verification.py``). Servers that pass the handler's ``JobStatus``
    through get ``success``, ``skipped`` or ``failed``; a thrown error is a ``failed`` event (``error``).
    """
    if returnvalue is None:
        return COMPLETED
    value: Any = returnvalue
    try:
        value = loads(returnvalue)
    except ValueError:
        value = returnvalue.strip()[:64]
    if isinstance(value, str) and value.lower() in JOB_STATUSES:
        return value.lower()
    return COMPLETED


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


class JobCounters:
    """Counters and histograms for the life of the collection, fed entry by entry (an ``EventSink``)."""

    def __init__(self, bullmq: BullMQ) -> None:
        self.bullmq = bullmq
        self.accepted: dict[tuple[str, str], int] = {}
        self.finished: dict[tuple[str, str, str], int] = {}
        self.wait: dict[tuple[str, str], Histogram] = {}
        self.run: dict[tuple[str, str], Histogram] = {}
        self.malformed = 0
        self.lookups_left = MAX_LOOKUPS_PER_ROUND
        self._jobs: OrderedDict[tuple[str, str], _Job] = OrderedDict()
        self._names: dict[str, set[str]] = {}

    def new_round(self) -> None:
        self.lookups_left = MAX_LOOKUPS_PER_ROUND

    # -- EventSink -----------------------------------------------------------------------------------
    async def entries(self, queue: str, entries: list[Entry], deadline: float) -> int:
        lookups = self._unknown_jobs(queue, entries)[: self.lookups_left]
        self.lookups_left -= len(lookups)
        looked_up: dict[str, _Job] = {}
        if lookups and time.monotonic() < deadline:
            found = await self.bullmq.jobs(queue, lookups, deadline)
            looked_up = {job_id: _from_hash(h) for job_id, h in found.items() if not h.gone}
        return self._apply(queue, entries, looked_up)

    def forget(self, queue: str) -> None:
        for key in [k for k in self._jobs if k[0] == queue]:
            del self._jobs[key]

    def _unknown_jobs(self, queue: str, entries: list[Entry]) -> list[str]:
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

    def _apply(self, queue: str, entries: list[Entry], looked_up: dict[str, _Job]) -> int:
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
            outcome = ERROR if event == "failed" else outcome_of(fields.get("returnvalue"))
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
            log.debug("skipped %d malformed entries in the event stream of %s", malformed, queue)
        return malformed

    def _observe(self, hists: dict[tuple[str, str], Histogram], queue: str, job: _Job, seconds: float) -> None:
        key = (queue, self._label(queue, job.name))
        hist = hists.get(key)
        if hist is None:
            hist = hists[key] = Histogram()
        hist.observe(seconds)

    # -- exposition ----------------------------------------------------------------------------------
    def families(self, lost: dict[str, int]) -> list[Metric]:
        """The counters and histograms; ``lost``: entries per queue trimmed before they were read."""
        fams: list[Metric] = [
            counter("immich_jobs_accepted", [((q, j), float(n)) for (q, j), n in sorted(self.accepted.items())]),
            counter("immich_jobs_finished", [((q, j, o), float(n)) for (q, j, o), n in sorted(self.finished.items())]),
            counter("immich_exporter_queue_events_lost", [((q,), float(n)) for q, n in sorted(lost.items())]),
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


def _from_hash(h: JobHash) -> _Job:
    return _Job(name=h.name, added_ms=h.timestamp, processed_on=h.processed_on, finished_on=h.finished_on)
