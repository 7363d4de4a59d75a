"""Face (person) thumbnails remade through Immich's API: ``regenerate --kind person``.

Immich's "Missing" job queues only people whose ``thumbnailPath`` is ``''``, so a face thumbnail lost in
a restore while its path remains is never remade. What does remake one is ``PUT /api/people/{id}`` with
``featureFaceAssetId``: Immich's ``PersonService.update`` looks up that person's face in that asset, sets
it as the feature face and queues ``PersonGenerateThumbnail {"id": personId}`` on the thumbnail queue
whenever ``featureFaceAssetId`` is given, the same face or not (read in ``server/src/services/
person.service.ts``; see docs/face-thumbnails.md for the releases read). So the request names the asset
of the person's *current* feature face (``person."faceAssetId"`` -> ``asset_face.id`` -> ``"assetId"``):
nothing the user chose changes.

One run, ``regenerate_people``:

1. select: the people the scan listed (``Problem`` rows of kind ``person``) and the ids asked for, plus
   the people an earlier run submitted and has not settled (the ledger), each checked again now
   (``scan.targeted.check_people``: the one file rule);
2. decide (``decide``, pure): skip what a request cannot fix (no feature face, its original gone, a file
   the exporter cannot read, a path outside the media location), wait for an attempt still open, or ask;
3. ask, one person per request, at ``rate`` per second: each claimed in the ledger *before* it is sent
   (``Ledger.claim``, kinds ``{"person"}``: the ledger row's id is the person's), rolled back when Immich
   refuses or fails;
4. confirm that a ``PersonGenerateThumbnail`` job naming the person appeared (``PersonJobs``: the thumbnail
   queue's event stream, read through ``sources.bullmq_events``), else ``not_queued``;
5. with ``wait``: wait for each job to finish, check the file again and settle the attempt in the ledger
   (fixed, still_missing, gave_up), saying why it is still broken: the job ran without effect, failed,
   is still waiting, and, from its feature face's original (``remediation.original``), whether that
   original is missing, unreadable, not an image or not the file Immich stored.

Every row goes into the engine's ``RunReport`` as an asset's does (``Row``, ``kinds=("person",)``, the
person's id in ``asset_id``), with the same results: would_submit, skipped, submitted, waiting, fixed,
still_missing, not_queued, gave_up, not_submitted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from immich_thumbnail_exporter.config import Config
from immich_thumbnail_exporter.findings import Problem
from immich_thumbnail_exporter.remediation.ledger import AWAITING, PENDING, RETRYABLE, Entry, Ledger
from immich_thumbnail_exporter.remediation.original import check_originals
from immich_thumbnail_exporter.remediation.report import Row, RunReport
from immich_thumbnail_exporter.remediation.submit import request_result
from immich_thumbnail_exporter.remediation.why import Why
from immich_thumbnail_exporter.scan.targeted import check_people, media_mapper
from immich_thumbnail_exporter.scan.verdict import PATH_REFUSED, PersonVerdict
from immich_thumbnail_exporter.sources.bullmq import BullMQ
from immich_thumbnail_exporter.sources.bullmq_events import read_streams, stream_ends
from immich_thumbnail_exporter.sources.immich_api import ApiError, ImmichApi
from immich_thumbnail_exporter.sources.postgres import PostgresSource, SourceError
from immich_thumbnail_exporter.sources.redis import RedisSource
from immich_thumbnail_exporter.timing import RateLimiter
from immich_thumbnail_exporter.vocabulary import (
    FILE_REASONS,
    PERSON_KIND,
    PERSON_THUMBNAIL_JOB_NAMES,
    THUMBNAIL_QUEUE,
)

log = logging.getLogger(__name__)

KINDS = frozenset({PERSON_KIND})
# How often the event stream is read while waiting.
POLL = 0.25
# Entries per read of the event stream.
BATCH = 1_000

SKIP_TEXT = {
    "not_a_person": "not a person in the database",
    "present": "its face thumbnail is there and sound",
    "no_face": "the person has no feature face: Immich has nothing to crop its thumbnail from",
    "original_missing": "its feature face's original is missing: Immich cannot crop the face from it; "
    "restore it from a backup",
    "file_unreadable": "the exporter cannot read the file (permissions, or a symlink out of the media "
    "folder): regeneration would not change that",
    "path_refused": "its thumbnailPath is outside the media location: not checked",
    "no_record": "its thumbnailPath is empty: Immich's own \"Missing\" job makes it",
    "reason": "not one of the reasons asked for",
    "other_owner": "owned by another Immich user: Immich lets an API key change only its own user's people "
    "(run again with that user's key)",
}


@dataclass(frozen=True)
class PeopleOptions:
    """What a run may do (mapped from ``regenerate``'s options by the engine)."""

    apply: bool = False
    people: tuple[str, ...] = ()  # person ids asked for by name, besides the scan's
    reasons: tuple[str, ...] = tuple(r for r in FILE_REASONS if r != "file_unreadable")
    rate: float = 2.0
    wait: bool = False
    retry_after: float = 300.0
    max_attempts: int = 3
    confirm_within: float = 10.0
    # How long ``wait`` waits for the jobs to finish (then the attempt is checked as it is).
    wait_seconds: float = 120.0
    # The API key's user when known (``GET /api/users/me``): another user's people are not asked for.
    key_owner: str | None = None


@dataclass(frozen=True)
class Decision:
    """What to do with one person now: ``ask``, ``skip`` (``code`` says why), ``wait`` (an attempt is
    still open), ``settle`` (a pending attempt to check)."""

    action: str
    code: str = ""
    detail: str = ""


def decide(verdict: PersonVerdict, entry: Entry | None, reasons: Iterable[str], now: float,
           retry_after: float, max_attempts: int, key_owner: str | None = None) -> Decision:
    """The rule for one person, from its targeted check and its ledger row. Pure."""
    if not verdict.exists:
        return Decision("skip", "not_a_person", SKIP_TEXT["not_a_person"])
    if entry is not None and entry.state in PENDING and (verdict.written or entry.state in AWAITING):
        return Decision("settle")  # an earlier attempt to check: fixed since, or not verified yet
    if verdict.written:
        return Decision("skip", "present", SKIP_TEXT["present"])
    reason = verdict.problems[0][1]
    if reason in (PATH_REFUSED, "no_record", "file_unreadable") and reason not in reasons:
        return Decision("skip", reason, SKIP_TEXT[reason])
    if reason not in reasons:
        return Decision("skip", "reason", f"{reason}: {SKIP_TEXT['reason']}")
    if verdict.face_asset_id is None:
        return Decision("skip", "no_face", SKIP_TEXT["no_face"])
    if verdict.original_exists is False:
        return Decision("skip", "original_missing", SKIP_TEXT["original_missing"])
    if key_owner is not None and verdict.owner_id is not None and verdict.owner_id != key_owner:
        return Decision("skip", "other_owner", SKIP_TEXT["other_owner"])
    if entry is not None:
        if entry.state == "gave_up":
            return Decision("skip", "gave_up", f"given up earlier: {entry.gave_up_reason or entry.detail or ''}")
        if entry.state in RETRYABLE and entry.attempts >= max_attempts:
            return Decision("skip", "gave_up", f"no attempt left after {entry.attempts}")
        if entry.state in RETRYABLE and now < entry.due_at(retry_after):
            return Decision("wait", "", f"asked {entry.attempts} time(s); next attempt once its window has passed")
        if entry.state == "fixed":
            return Decision("ask", "reset", "fixed before and broken again: its attempts start over")
    return Decision("ask")


@dataclass
class PersonJob:
    job_id: str
    person_id: str
    finished_at: float | None = None
    outcome: str | None = None  # completed, failed
    failed_reason: str | None = None


@dataclass
class PersonJobs:
    """The ``PersonGenerateThumbnail`` jobs of the people asked for, from the thumbnail queue's event
    stream: each ``added`` job's hash is read at once (Immich removes it when the job completes) to learn
    the person it names; later entries say when it finished. Bounded to the people expected."""

    source: RedisSource
    prefix: str
    cursor: str | None = None
    expected: dict[str, float] = field(default_factory=dict)  # person -> monotonic end of its window
    jobs: dict[str, PersonJob] = field(default_factory=dict)  # person -> its latest job
    unreadable: int = 0  # added person jobs whose hash was gone before it was read

    @property
    def key(self) -> str:
        return f"{self.prefix}:{THUMBNAIL_QUEUE}:events"

    async def start(self) -> None:
        if self.cursor is None:
            self.cursor = (await stream_ends(self.source, [self.key]))[0]

    def expect(self, person_id: str, window: float) -> None:
        self.expected[person_id] = time.monotonic() + window
        self.jobs.pop(person_id, None)

    async def poll(self, block: float = 0.0) -> None:
        await self.start()
        assert self.cursor is not None
        block_ms = max(1, int(block * 1000)) if block > 0 else 0
        while True:
            read = await read_streams(self.source, {self.key: self.cursor}, BATCH, block_ms)
            entries = [(eid, f if isinstance(f, dict) else {}) for eid, f in read.get(self.key, [])]
            if not entries:
                return
            self.cursor = entries[-1][0]
            await self._apply(entries)
            if len(entries) < BATCH:
                return
            block_ms = 0

    async def _apply(self, entries: list[tuple[str, dict[str, Any]]]) -> None:
        added = [f["jobId"] for _, f in entries
                 if f.get("event") == "added" and f.get("name") in PERSON_THUMBNAIL_JOB_NAMES and f.get("jobId")]
        if added and self.expected:
            hashes = await BullMQ(self.source, self.prefix).jobs(
                THUMBNAIL_QUEUE, added, time.monotonic() + self.source.timeout, times=False)
            for job_id in added:
                person = hashes[job_id].asset_id if job_id in hashes else None  # data.id: the person's
                if person is None:
                    self.unreadable += 1
                elif person in self.expected:
                    del self.expected[person]
                    self.jobs[person] = PersonJob(job_id, person)
        by_id = {j.job_id: j for j in self.jobs.values()}
        for eid, f in entries:
            job = by_id.get(f.get("jobId", ""))
            if job is not None and f.get("event") in ("completed", "failed"):
                job.finished_at = int(eid.split("-", 1)[0]) / 1000.0 if eid.split("-", 1)[0].isdigit() else time.time()
                job.outcome = str(f.get("event"))
                job.failed_reason = f.get("failedReason") if job.outcome == "failed" else None

    def ended(self) -> list[str]:
        """People whose window ended with no job seen; their windows are closed."""
        now = time.monotonic()
        out = [p for p, deadline in self.expected.items() if deadline <= now]
        for p in out:
            del self.expected[p]
        return out


def _row(person_id: str, result: str, problems: str = "", attempts: int = 0, detail: str = "",
         why: str | None = None) -> Row:
    return Row(person_id, result, problems, (PERSON_KIND,), attempts, detail, why)


async def regenerate_people(
    config: Config,
    pg: PostgresSource,
    report: RunReport,
    opts: PeopleOptions,
    *,
    problems: Iterable[Problem] = (),
    ledger: Ledger | None = None,
    api: ImmichApi | None = None,
    redis: RedisSource | None = None,
) -> None:
    """One ``regenerate --kind person`` run; its rows go into ``report``.

    ``problems``: the scan's rows (those of kind ``person`` are taken); ``opts.people`` adds ids asked for
    by name. With ``opts.apply`` it needs ``ledger`` and ``api``; ``redis`` (the Immich Redis, read only)
    confirms each request queued a job, and without it nothing is called ``not_queued``. Raises what the
    sources raise when the database or the media folder fails (the engine reports those as for assets).
    """
    selected = list(dict.fromkeys([*(p.asset_id for p in problems if p.kind == PERSON_KIND), *opts.people]))
    earlier = [e.asset_id for e in (ledger.entries(PENDING) if ledger is not None else [])
               if PERSON_KIND in e.kinds and e.asset_id not in selected]
    if not selected and not earlier:
        return
    schema = await pg.schema()
    mapper = await media_mapper(pg, config.media)
    verdicts = await check_people(pg, schema, mapper, [*selected, *earlier])
    entries = ledger.get([*selected, *earlier]) if ledger is not None else {}
    now = time.time()
    ask: list[tuple[PersonVerdict, bool]] = []
    settle: list[str] = []
    for pid in [*selected, *earlier]:
        v, entry = verdicts[pid], entries.get(pid)
        d = decide(v, entry, opts.reasons, now, opts.retry_after, opts.max_attempts, opts.key_owner)
        attempts = entry.attempts if entry is not None else 0
        if d.action == "skip":
            if pid in selected:
                report.set(_row(pid, "skipped", v.describe(), attempts, d.detail,
                                d.code if d.code in ("no_face", "original_missing") else None))
        elif d.action == "wait":
            report.set(_row(pid, "waiting", v.describe(), attempts, d.detail))
        elif d.action == "settle":
            settle.append(pid)
        elif not opts.apply:
            report.set(_row(pid, "would_submit", v.describe(), attempts,
                            f"PUT /api/people/{pid} with its feature face's asset {v.face_asset_id}"))
        else:
            ask.append((v, d.code == "reset"))
    if not opts.apply or ledger is None or api is None:
        return
    watch = PersonJobs(redis, config.redis.prefix) if redis is not None else None
    watch_error: str | None = None
    if watch is not None:
        try:
            await watch.start()
        except SourceError as exc:
            watch, watch_error = None, str(exc)
    submitted = await _ask(api, ledger, report, ask, opts, watch)
    tracked = [*settle, *submitted]
    if watch is not None:
        try:
            tracked = await _confirm(watch, ledger, report, tracked, opts)
        except SourceError as exc:
            watch, watch_error = None, str(exc)
    if watch_error is not None:
        report.notes.append(f"face thumbnail jobs not confirmed: {watch_error}")
    if opts.wait and tracked:
        await _settle(pg, schema, mapper, ledger, report, tracked, opts, watch)


async def _ask(api: ImmichApi, ledger: Ledger, report: RunReport, ask: list[tuple[PersonVerdict, bool]],
               opts: PeopleOptions, watch: PersonJobs | None) -> list[str]:
    """One request per person, each in the ledger before it is sent. Returns the people Immich accepted."""
    limiter = RateLimiter(opts.rate)
    accepted: list[str] = []
    for v, reset in ask:
        claims = ledger.claim({v.person_id: KINDS}, time.time(), opts.retry_after, opts.max_attempts,
                              [v.person_id] if reset else ())
        if not claims:
            continue  # another process holds it, or its attempt is still open
        await limiter.acquire()
        assert v.face_asset_id is not None
        try:
            await asyncio.wait_for(api.set_feature_face(v.person_id, v.face_asset_id), api.config.timeout + 5)
        except (ApiError, TimeoutError) as exc:
            err = exc if isinstance(exc, ApiError) else ApiError(
                f"PUT /api/people/{v.person_id}: no answer within {api.config.timeout:.0f}s")
            result = request_result(err)
            ledger.release(claims, result, str(err), time.time())
            report.requests[result] += 1
            report.set(_row(v.person_id, "not_submitted", v.describe(), claims[0].prev_attempts, str(err)))
            continue
        ledger.accepted([v.person_id], time.time())
        report.requests["accepted"] += 1
        accepted.append(v.person_id)
        if watch is not None:
            watch.expect(v.person_id, opts.confirm_within)
            await watch.poll()
        report.set(_row(v.person_id, "submitted", v.describe(), claims[0].prev_attempts + 1,
                        f"PUT /api/people/{v.person_id} accepted"))
    return accepted


async def _confirm(watch: PersonJobs, ledger: Ledger, report: RunReport, tracked: list[str],
                   opts: PeopleOptions) -> list[str]:
    """Wait until each person asked for has its job or its window has ended; record both. Returns the
    people still to verify (those with a job, or not known to have none)."""
    not_queued: list[str] = []
    while watch.expected:
        await watch.poll(block=POLL)
        not_queued += watch.ended()
    queued = {p: j.job_id for p, j in watch.jobs.items()}
    if queued:
        ledger.queued(queued, time.time())
    if watch.unreadable:
        # A job whose data was gone before it was read may be one of theirs: say nothing on no evidence.
        return tracked
    outcomes = ledger.not_queued(not_queued, time.time(), opts.max_attempts)
    for p, outcome in outcomes.items():
        row = report.rows.get(p)
        report.set(_row(p, outcome, row.problems if row else "", row.attempts if row else 0,
                        "Immich answered but queued no PersonGenerateThumbnail job", "not_queued"))
    return [p for p in tracked if p not in outcomes]


async def _settle(pg: PostgresSource, schema: Any, mapper: Any, ledger: Ledger, report: RunReport,
                  tracked: list[str], opts: PeopleOptions, watch: PersonJobs | None) -> None:
    """Wait for the jobs to finish (or ``wait_seconds``), check each face thumbnail again and settle its
    attempt, saying why one is still broken."""
    deadline = time.monotonic() + opts.wait_seconds
    if watch is not None:
        def unfinished() -> list[str]:
            return [p for p in tracked if p in watch.jobs and watch.jobs[p].finished_at is None]

        while unfinished() and time.monotonic() < deadline:
            await watch.poll(block=POLL)
    verdicts = await check_people(pg, schema, mapper, tracked)
    broken = [p for p in tracked if not verdicts[p].written]
    faces = {verdicts[p].face_asset_id for p in broken if verdicts[p].face_asset_id}
    originals = await check_originals(pg, schema, mapper, [f for f in faces if f]) if faces else {}
    entries = ledger.get(tracked)
    now = time.time()
    for p in tracked:
        v = verdicts[p]
        job = watch.jobs.get(p) if watch is not None else None
        why = None if v.written else explain_person(v, job, originals.get(v.face_asset_id or ""))
        over = job is not None and job.finished_at is not None
        result = ledger.record_check(p, v.written, v.describe(), now, opts.retry_after, opts.max_attempts,
                                     over=over, why=why)
        if result is None:
            continue
        entry = entries.get(p)
        shown = {"unchanged": "still_missing", "waiting": "waiting"}.get(result, result)
        report.set(_row(p, shown, "" if v.written else v.describe(), entry.attempts if entry else 0,
                        "face thumbnail written" if v.written else (why.text if why else v.describe()),
                        why.code if why else None))


def explain_person(verdict: PersonVerdict, job: PersonJob | None, original: Any) -> Why:
    """Why a face thumbnail is still broken after its request. Pure: the person's check, its job as the
    event stream told it (None: not seen), and its feature face's original (an ``OriginalVerdict``)."""
    if verdict.face_asset_id is None:
        return Why("no_face", SKIP_TEXT["no_face"])
    if original is not None and original.broken:
        return Why(original.code, f"its feature face's asset {verdict.face_asset_id}: {original.detail}")
    if job is None:
        return Why("queue_unknown", f"face thumbnail still {verdict.describe()}; its job was not seen")
    if job.outcome == "failed":
        return Why("job_failed", f"its PersonGenerateThumbnail job {job.job_id} failed: {job.failed_reason or ''}")
    if job.finished_at is None:
        return Why("job_waiting", f"its PersonGenerateThumbnail job {job.job_id} has not finished yet")
    return Why("no_effect", f"Immich ran its PersonGenerateThumbnail job {job.job_id} and the face thumbnail "
               f"is still {verdict.describe()} (Immich skips it when facial recognition and face import are "
               "both off, and fails it when the asset's dimensions or preview are unknown)")


def person_rows(report: RunReport) -> Mapping[str, Row]:
    """The rows of ``report`` that are people's."""
    return {k: r for k, r in report.rows.items() if r.kinds == (PERSON_KIND,)}
