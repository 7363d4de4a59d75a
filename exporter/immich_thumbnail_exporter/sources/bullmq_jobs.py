"""What the event reader knows about each job, and the one parse of a batch of stream entries.

Pure (no I/O): ``sources/bullmq_reader.py`` reads the entries and the job hashes; here each entry becomes
a ``JobEvent`` for the subscribers, and the one bounded ``JobMap`` learns what the entry says about its
job (name, data, when it was added and started).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from immich_thumbnail_exporter.sources.bullmq import JobHash
from immich_thumbnail_exporter.sources.bullmq_events import Entry, parse_id

MAX_TRACKED = 50_000  # jobs remembered between their ``added`` and their end
EVENTS = frozenset({"added", "active", "completed", "failed", "removed"})


# -- what is known about a job, and what is delivered --------------------------------------------------


@dataclass(slots=True)
class JobInfo:
    """What the stream and the job's hash said about one job, while it exists."""

    name: str | None = None
    added_ms: int | None = None  # by the Redis server's clock (the ``added`` entry's id) or the hash
    active_ms: int | None = None  # the last ``active`` entry
    started: bool = False
    # From the hash when the events were not seen (ms, clocks of whoever wrote them).
    processed_on: int | None = None
    finished_on: int | None = None
    # ``data.id``: an asset id for per-asset jobs, a person id for ``PersonGenerateThumbnail``.
    entity: str | None = None
    read: bool = False  # the hash was read: ``entity`` is what its data says (None: no valid id)

    @classmethod
    def from_hash(cls, found: JobHash) -> JobInfo:
        return cls(name=found.name, added_ms=found.timestamp, processed_on=found.processed_on,
                   finished_on=found.finished_on, entity=found.asset_id, read=True)


@dataclass(frozen=True, slots=True)
class JobEvent:
    """One stream entry about one job. ``job``: what is known of the job with this entry's identity
    (name, data) learned, its times as they were *before* this entry; None when nothing is known."""

    queue: str
    job_id: str
    event: str  # added, active, completed, failed, removed
    at_ms: int  # the entry's id: the Redis server's clock
    fields: Any  # the entry's fields (``returnvalue``, ``failedReason``, ...)
    job: JobInfo | None


class JobMap:
    """The one bounded map of (queue, job id) -> JobInfo; the oldest jobs go first when it is full."""

    def __init__(self, limit: int = MAX_TRACKED) -> None:
        self.limit = limit
        self.evicted = 0
        self._jobs: OrderedDict[tuple[str, str], JobInfo] = OrderedDict()

    def __len__(self) -> int:
        return len(self._jobs)

    def get(self, key: tuple[str, str]) -> JobInfo | None:
        return self._jobs.get(key)

    def pop(self, key: tuple[str, str]) -> JobInfo | None:
        return self._jobs.pop(key, None)

    def put(self, key: tuple[str, str], job: JobInfo) -> None:
        self._jobs[key] = job
        self._jobs.move_to_end(key)
        while len(self._jobs) > self.limit:
            self._jobs.popitem(last=False)
            self.evicted += 1

    def forget(self, queue: str) -> None:
        for key in [k for k in self._jobs if k[0] == queue]:
            del self._jobs[key]


def _job_id(fields: Any) -> str | None:
    job_id = fields.get("jobId") if isinstance(fields, dict) else None
    return job_id if isinstance(job_id, str) and job_id else None


def needs_hash(queue: str, entries: Sequence[Entry], jobs: JobMap, wants: Callable[[str], bool]) -> list[str]:
    """The jobs of this batch whose hash should be read now: wanted jobs just added (their data), and
    jobs that start or end without their ``added`` seen (their name and times)."""
    out: list[str] = []
    seen: set[str] = set()
    added_here: set[str] = set()
    for _, fields in entries:
        job_id = _job_id(fields)
        if job_id is None or job_id in seen:
            continue
        event = fields.get("event")
        job = jobs.get((queue, job_id))
        if event == "added":
            added_here.add(job_id)
            name = fields.get("name")
            wanted = isinstance(name, str) and wants(name) and (job is None or not job.read)
        elif event in ("active", "completed", "failed"):
            unknown = job is None and job_id not in added_here
            pending = (event == "active" and job is not None and not job.read
                       and job.name is not None and wants(job.name))
            wanted = unknown or pending
        else:
            wanted = False
        if wanted:
            seen.add(job_id)
            out.append(job_id)
    return out


def job_events(
    queue: str, entries: Sequence[Entry], jobs: JobMap, hashes: dict[str, JobHash]
) -> tuple[list[JobEvent], int]:
    """The batch's entries as JobEvents, the map updated as they say; and how many were malformed."""
    events: list[JobEvent] = []
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
        if event not in EVENTS:
            continue
        job_id = _job_id(fields)
        if job_id is None:
            malformed += event != "removed"
            continue
        key = (queue, job_id)
        found = hashes.get(job_id)
        found = found if found is not None and not found.gone else None
        job = jobs.get(key)
        if event == "added":
            name = fields.get("name")
            new = JobInfo(name=name if isinstance(name, str) else None, added_ms=ms)
            source = job if job is not None and job.read else found
            if source is not None:
                new.entity, new.read = source.entity if isinstance(source, JobInfo) else source.asset_id, True
            jobs.put(key, new)
            events.append(JobEvent(queue, job_id, event, ms, fields, new))
        elif event == "active":
            if job is None:
                job = JobInfo.from_hash(found) if found is not None else JobInfo()
            elif not job.read and found is not None:
                job.entity, job.read, job.name = found.asset_id, True, job.name or found.name
            events.append(JobEvent(queue, job_id, event, ms, fields, replace(job)))
            job.started, job.active_ms = True, ms
            jobs.put(key, job)
        else:  # completed, failed (a retried attempt is "waiting"/"delayed", not "failed"), removed
            job = jobs.pop(key)
            if job is None and found is not None:
                job = JobInfo.from_hash(found)
            events.append(JobEvent(queue, job_id, event, ms, fields, job))
    return events, malformed
