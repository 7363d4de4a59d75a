"""Job verification's view of the event streams: every per-asset (and face) thumbnail job that finished,
and the asset (or person) it named.

``JobFollower`` is a subscriber of the process's one ``EventReader`` (``sources/bullmq_reader.py``) for
the queues carrying per-asset thumbnail jobs. The reader reads a wanted job's hash (``name``, ``data``)
as soon as its ``added`` (or ``active``) entry arrives, while the job still exists (Immich removes a
completed job's hash at once), and reads ahead the jobs queued before it started. The follower turns
each ``completed`` or ``failed`` entry of such a job into one ``FinishedJob``, collected until
``take()`` or handed to ``sink`` as it comes.

Nothing is guessed: a job whose data could not be read in time (its hash already gone, its events read
after an outage, more jobs than the reader's map holds) is handed back with ``entity_id=None``; a job
whose name was never learned is named ``unknown``. Queue-all jobs are left out. Times are the Redis
server's (stream ids, milliseconds).

**Face thumbnails**: ``PersonGenerateThumbnail`` jobs (``PERSON_THUMBNAIL_JOB_NAMES``, data
``{"id": personId}``) are handed back with ``kind="person"`` and the person id in ``entity_id`` to a
follower built with ``kinds`` including ``PERSON`` (job verification's, which checks them with the person
file check); such a follower's ``names`` then hold the face jobs' names too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from immich_thumbnail_exporter.sources.bullmq_jobs import JobEvent
from immich_thumbnail_exporter.sources.bullmq_reader import EventReader
from immich_thumbnail_exporter.vocabulary import PERSON_THUMBNAIL_JOB_NAMES, THUMBNAIL_QUEUE

UNKNOWN = "unknown"
ASSET, PERSON = "asset", "person"
MAX_FINISHED = 100_000  # finished jobs held between two ``take()`` calls; more are dropped and counted


@dataclass(frozen=True, slots=True)
class FinishedJob:
    """A per-asset (or face) thumbnail job that completed or failed, and what it named if that was learned."""

    queue: str
    job_id: str
    name: str  # the job's name, or ``unknown``
    entity_id: str | None  # the asset (or, kind person, the person) id; None: not learned in time
    failed: bool  # a ``failed`` event (thrown error) rather than ``completed``
    at_ms: int  # when it finished, by the Redis server's clock
    kind: str = ASSET  # ASSET or PERSON

    @property
    def asset_id(self) -> str | None:
        return self.entity_id if self.kind == ASSET else None


@dataclass
class FollowStats:
    finished: int = 0
    dropped: int = 0  # finished jobs not taken in time (more than MAX_FINISHED between two takes)


class JobFollower:
    """A subscriber for the given queues (``jobs``: queue -> the per-asset job names)."""

    reads_ahead = True

    def __init__(
        self,
        reader: EventReader,
        jobs: Mapping[str, frozenset[str]],
        kinds: frozenset[str] = frozenset({ASSET}),
        sink: Callable[[FinishedJob], None] | None = None,
    ) -> None:
        self.reader = reader
        self.sink = sink
        self.jobs = dict(jobs)
        self.kinds = kinds
        self.people = {THUMBNAIL_QUEUE: PERSON_THUMBNAIL_JOB_NAMES}
        self.queues = frozenset(self.jobs) | frozenset(self.people)
        self.stats = FollowStats()
        # (queue, name) of every thumbnail job of ``kinds`` seen: the verified counters exist from the first on.
        self.names: set[tuple[str, str]] = set()
        self._finished: list[FinishedJob] = []
        reader.subscribe(self)

    @property
    def following(self) -> bool:
        """True once the streams' starting points are known: every job added from then on is seen."""
        return self.reader.following(self.queues)

    def close(self) -> None:
        self.reader.unsubscribe(self)

    def _kind(self, queue: str, name: str | None) -> str | None:
        if name is None:
            return None
        if name in self.jobs.get(queue, ()):
            return ASSET
        if name in self.people.get(queue, ()):
            return PERSON
        return None

    # -- Subscriber ----------------------------------------------------------------------------------
    def takes(self, queue: str) -> bool:
        return queue in self.queues

    def wants(self, queue: str, name: str) -> bool:
        return self._kind(queue, name) in self.kinds

    def forget(self, queue: str) -> None:
        """Nothing of its own to forget: what it knows of jobs is the reader's map."""

    def deliver(self, events: Sequence[JobEvent]) -> None:
        for e in events:
            job = e.job
            kind = self._kind(e.queue, job.name if job is not None else None)
            if e.event == "added" and kind in self.kinds and job is not None and job.name:
                self.names.add((e.queue, job.name))
            if e.event not in ("completed", "failed"):
                continue
            if job is not None and job.name is not None and kind is None:
                continue  # a job of another kind (queue-all, metadata, ...): not ours
            kind = kind or ASSET
            if kind not in self.kinds:
                continue
            name = job.name if job is not None and job.name else UNKNOWN
            if name != UNKNOWN:
                self.names.add((e.queue, name))
            entity = job.entity if job is not None and job.read else None
            self._add(FinishedJob(e.queue, e.job_id, name, entity, e.event == "failed", e.at_ms, kind))

    def _add(self, job: FinishedJob) -> None:
        if self.sink is not None:
            self.stats.finished += 1
            self.sink(job)
            return
        if len(self._finished) >= MAX_FINISHED:
            self.stats.dropped += 1
            return
        self._finished.append(job)
        self.stats.finished += 1

    def take(self) -> list[FinishedJob]:
        """The jobs finished since the last call."""
        out, self._finished = self._finished, []
        return out
