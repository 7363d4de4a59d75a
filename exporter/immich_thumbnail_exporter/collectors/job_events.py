"""Job counters and durations from BullMQ's per-queue event streams.

``JobCounters`` subscribes to the process's one event reader (``sources/bullmq_reader.py``), which
delivers every new stream entry once, with what is known of its job; this module counts them:

* ``added`` (``jobId``, ``name``): ``immich_jobs_accepted_total{queue,job_name}``;
* ``completed`` (``returnvalue``): ``immich_jobs_finished_total{outcome}`` from the job's return value
  (``completed`` when it reports no status, as on every Immich; see ``outcome_of``); ``failed`` (a
  thrown error, the job kept in the failed set): outcome ``error``;
* ``active``: the job started; its wait (added -> first active) and run (last active -> finished)
  times feed ``immich_job_wait_seconds`` and ``immich_job_run_seconds``.

Times come from the stream entries' ids, which are the Redis server's clock in milliseconds, so wait
and run times need no clock agreement with Immich. A job whose ``added`` event was not seen (it was
queued before the exporter started) is known from its job hash, read by the reader when it starts
(``name``, ``timestamp``); a job whose hash is already gone when it finishes (``removeOnComplete``) and
that was never seen starting is counted with ``job_name="unknown"`` and no duration. Distinct job names
are bounded per queue.

A new process, or a new collection, starts its counters at 0 (Prometheus treats that as a counter
reset) and does not count events from before it started; events that happen while no exporter runs
are not counted by anyone. Counting does no I/O: the reader did it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from prometheus_client.core import HistogramMetricFamily, Metric

from immich_thumbnail_exporter.metrics import counter, family
from immich_thumbnail_exporter.sources.bullmq import loads
from immich_thumbnail_exporter.sources.bullmq_jobs import JobEvent, JobInfo
from immich_thumbnail_exporter.vocabulary import COMPLETED, ERROR, JOB_STATUSES

# Seconds to hours: a thumbnail normally takes well under a second to a few seconds to make, a video's
# preview longer; waits range from nothing to many hours behind a full "All" regeneration.
BUCKETS: tuple[float, ...] = (
    0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200, 86400,
)

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


class JobCounters:
    """Counters and histograms for the life of the collection: a subscriber of the event reader."""

    reads_ahead = False
    # The queue collection says which queues to follow (those it discovers); the counters count the
    # events of every queue followed, by whichever part of the exporter, from the moment it is followed.
    queues: frozenset[str] = frozenset()

    def __init__(self) -> None:
        self.accepted: dict[tuple[str, str], int] = {}
        self.finished: dict[tuple[str, str, str], int] = {}
        self.wait: dict[tuple[str, str], Histogram] = {}
        self.run: dict[tuple[str, str], Histogram] = {}
        self._names: dict[str, set[str]] = {}

    # -- Subscriber ----------------------------------------------------------------------------------
    def takes(self, queue: str) -> bool:
        return True

    def wants(self, queue: str, name: str) -> bool:
        return False  # an ``added`` entry names the job; its data says nothing the counters use

    def forget(self, queue: str) -> None:
        """Counters live on: what was counted happened."""

    def deliver(self, events: Sequence[JobEvent]) -> None:
        for e in events:
            self._count(e)

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

    def _count(self, e: JobEvent) -> None:
        queue, job, ms = e.queue, e.job, e.at_ms
        if e.event == "added":
            label = self._label(queue, job.name if job is not None else None)
            self.accepted[(queue, label)] = self.accepted.get((queue, label), 0) + 1
        elif e.event == "active":
            if job is not None and not job.started and job.added_ms is not None:
                self._observe(self.wait, queue, job, (ms - job.added_ms) / 1000.0)
        elif e.event in ("completed", "failed"):
            outcome = ERROR if e.event == "failed" else outcome_of(e.fields.get("returnvalue"))
            label = self._label(queue, job.name) if job is not None else UNKNOWN
            key = (queue, label, outcome)
            self.finished[key] = self.finished.get(key, 0) + 1
            if job is None:
                return
            if job.active_ms is not None:
                self._observe(self.run, queue, job, (ms - job.active_ms) / 1000.0)
            elif job.processed_on is not None:
                end = job.finished_on if job.finished_on is not None else ms
                self._observe(self.run, queue, job, (end - job.processed_on) / 1000.0)

    def _observe(self, hists: dict[tuple[str, str], Histogram], queue: str, job: JobInfo, seconds: float) -> None:
        key = (queue, self._label(queue, job.name))
        hist = hists.get(key)
        if hist is None:
            hist = hists[key] = Histogram()
        hist.observe(seconds)

    # -- exposition ----------------------------------------------------------------------------------
    def families(self, lost: Mapping[str, int]) -> list[Metric]:
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
