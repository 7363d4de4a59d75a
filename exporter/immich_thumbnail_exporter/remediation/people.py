"""Face (person) thumbnails remade through Immich's API: ``regenerate --kind person``.

Immich's "Missing" job queues only people whose ``thumbnailPath`` is ``''``, so a face thumbnail lost in
a restore while its path remains is never remade. What does remake one is ``PUT /api/people/{id}`` with
``featureFaceAssetId``: Immich's ``PersonService.update`` looks up that person's face in that asset, sets
it as the feature face and queues ``PersonGenerateThumbnail {"id": personId}`` on the thumbnail queue
whenever ``featureFaceAssetId`` is given, the same face or not (read in ``server/src/services/
person.service.ts``; see docs/face-thumbnails.md for the releases read). So the request names the asset
of the person's *current* feature face (``person."faceAssetId"`` -> ``asset_face.id`` -> ``"assetId"``):
nothing the user chose changes.

One run, ``regenerate_people`` (called by the engine for ``--kind person``, and by serve's rounds with
``person`` in ``remediation.kinds``, sharing their ledger, rate limit and retry clock):

1. select: the people the scan listed (``Problem`` rows of kind ``person``) and the ids asked for, plus
   the people an earlier run submitted and has not settled (the ledger rows of kinds ``{"person"}``,
   which the asset flows leave alone), each checked again now (``scan.targeted.check_people``: the one
   file rule);
2. decide with the one decision assets get too (``decision.decide``; ``seen_of`` is the person's
   ``Seen``, target ``person``): skip what a request cannot fix (no feature face, its original gone, a
   file the exporter cannot read, a path outside the media location), wait for an attempt still open,
   settle or retry one that is over, give up after the attempts, or ask;
3. ask, one person per request, at ``rate`` per second: each claimed in the ledger *before* it is sent
   (``Ledger.claim``, kinds ``{"person"}``: the ledger row's id is the person's), rolled back when Immich
   refuses or fails;
4. confirm that a ``PersonGenerateThumbnail`` job naming the person appeared, else ``not_queued``: a
   ``JobWatch`` built for ``PERSON_THUMBNAIL_JOB_NAMES`` (the caller's; one more subscriber of the
   process's one event reader, as the assets' watch is) and the assets' ``Confirmer``;
5. with ``wait``: wait for each job to finish, check the file again and settle the attempt in the ledger
   (fixed, still_missing, gave_up), saying why it is still broken: the job ran without effect, failed,
   is still waiting;
6. the people still broken after their attempts: their feature faces' originals read once
   (``original.check_originals``); a broken one (missing, unreadable, not an image, not the file Immich
   stored) is the reason, in the report and the ledger.

Every row goes into the engine's ``RunReport`` as an asset's does (``Row``, ``kinds=("person",)``, the
person's id in ``asset_id``), with the same results: would_submit, skipped, submitted, waiting, fixed,
still_missing, not_queued, gave_up, not_submitted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from immich_thumbnail_exporter.config import Config
from immich_thumbnail_exporter.findings import Problem
from immich_thumbnail_exporter.remediation.decision import (
    FIXED,
    GAVE_UP,
    GIVE_UP,
    RETRY,
    SETTLE,
    SKIP,
    SUBMIT,
    WAIT,
    Policy,
    RetryClock,
    Seen,
    decide,
)
from immich_thumbnail_exporter.remediation.jobwatch import JobSeen, JobWatch
from immich_thumbnail_exporter.remediation.ledger import AWAITING, PENDING, Entry, Ledger
from immich_thumbnail_exporter.remediation.original import check_originals, explain_rows, give_up_on_originals, why_of
from immich_thumbnail_exporter.remediation.report import Row, RunReport
from immich_thumbnail_exporter.remediation.submit import Confirmer, request_result
from immich_thumbnail_exporter.remediation.why import Why, ago, skip_text
from immich_thumbnail_exporter.scan.targeted import check_people, media_mapper
from immich_thumbnail_exporter.scan.verdict import PATH_REFUSED, PersonVerdict
from immich_thumbnail_exporter.sources.immich_api import ApiError, ImmichApi
from immich_thumbnail_exporter.sources.paths import PathMapper
from immich_thumbnail_exporter.sources.postgres import PostgresSource, SourceError
from immich_thumbnail_exporter.sources.schema import Schema
from immich_thumbnail_exporter.timing import RateLimiter
from immich_thumbnail_exporter.vocabulary import FILE_REASONS, ORIGINAL_BROKEN, PERSON_KIND

log = logging.getLogger(__name__)

KINDS = frozenset({PERSON_KIND})
# How often the event stream is read while waiting.
POLL = 0.25

# The sentences for the decision's reasons (``decision.REASONS``) about a person, where they differ from
# an asset's (``why.SKIP_TEXT``), and for the file reasons a person is not asked for by default.
SKIP_TEXT = {
    "not_in_database": "not a person in the database",
    "nothing_to_fix": "its face thumbnail is there and sound",
    "no_face": "the person has no feature face: Immich has nothing to crop its thumbnail from",
    "original_missing": "its feature face's original is missing: Immich cannot crop the face from it; "
    "restore it from a backup",
    "file_unreadable": "the exporter cannot read the file (permissions, or a symlink out of the media "
    "folder): regeneration would not change that",
    PATH_REFUSED: "its thumbnailPath is outside the media location: not checked",
    "no_record": "its thumbnailPath is empty: Immich's own \"Missing\" job makes it",
    "other_owner": "owned by another Immich user: Immich lets an API key change only its own user's people "
    "(run again with that user's key)",
}
# Reasons that are the feature face's (its original's) rather than the thumbnail's: the report's ``why``.
ORIGINAL_WHYS = frozenset({"no_face", *ORIGINAL_BROKEN})


@dataclass(frozen=True)
class PeopleOptions:
    """What a run may do (mapped from ``regenerate``'s options by the engine, or from ``remediation.*``
    by serve's rounds)."""

    apply: bool = False
    people: tuple[str, ...] = ()  # person ids asked for by name, besides the scan's
    reasons: tuple[str, ...] = tuple(r for r in FILE_REASONS if r != "file_unreadable")
    rate: float = 2.0
    wait: bool = False
    retry_after: float = 300.0
    max_attempts: int = 3
    retry_gave_up: bool = False
    confirm_within: float = 10.0
    # How long ``wait`` waits for the jobs to finish (then the attempt is checked as it is).
    wait_seconds: float = 120.0
    # The API key's user when known (``GET /api/users/me``): another user's people are not asked for.
    key_owner: str | None = None
    # At most this many requests in the run (serve: ``max_per_round``).
    limit: int | None = None


def person_reasons(configured: Iterable[str]) -> tuple[str, ...]:
    """The reasons a person is asked for by default: the configured ones but ``no_record`` (an empty
    ``thumbnailPath`` is what Immich's own "Missing" job remakes). ``--reason`` names it to ask anyway."""
    return tuple(r for r in configured if r != "no_record")


def seen_of(verdict: PersonVerdict, reasons: Iterable[str]) -> Seen:
    """The one decision's view (``decision.Seen``, target ``person``) of a person's fresh check. Pure.

    A person is broken when its face thumbnail is; fixable when its reason is among ``reasons``. What
    the request needs beyond that is the feature face's original, passed as ``Seen.original``: no feature
    face (``no_face``), or its original gone (``original_missing``). People have no eligibility or
    locked folder of their own."""
    if not verdict.exists:
        return Seen(exists=False, target="person")
    broken = frozenset(k for k, _, _ in verdict.problems)
    wanted = set(reasons)
    fixable = frozenset(k for k, r, _ in verdict.problems if r in wanted)
    original = "ok"
    if fixable and verdict.face_asset_id is None:
        original = "no_face"
    elif fixable and verdict.original_exists is False:
        original = "original_missing"
    return Seen(owner=verdict.owner_id, broken=broken, fixable=fixable, original=original, target="person")


def person_text(reason: str, verdict: PersonVerdict | None = None) -> str:
    """The sentence for a decision's reason about a person."""
    if reason == "reason_not_submitted" and verdict is not None and verdict.problems:
        r = verdict.problems[0][1]
        return SKIP_TEXT.get(r, f"{r}: not one of the reasons asked for (name it with --reason)")
    return SKIP_TEXT.get(reason) or skip_text(reason)


def _row(person_id: str, result: str, problems: str = "", attempts: int = 0, detail: str = "",
         why: str | None = None, reason: str | None = None) -> Row:
    return Row(person_id, result, problems, (PERSON_KIND,), attempts, detail, why, reason)


@dataclass
class _Run:
    """One people run's state: what it holds open and what stayed broken."""

    config: Config
    pg: PostgresSource
    schema: Schema
    mapper: PathMapper
    report: RunReport
    opts: PeopleOptions
    ledger: Ledger | None
    clock: RetryClock
    policy: Policy
    # The ledger may be written (``--apply`` and a ledger open for writing).
    write: bool
    verdicts: dict[str, PersonVerdict] = field(default_factory=dict)
    # People still broken after their attempts: their feature face's original is read once, at the end.
    broken_after: list[str] = field(default_factory=list)
    # What the ledger settled (``immich_regeneration_verified_total{result}`` under serve).
    verified: Counter[str] = field(default_factory=Counter)


async def regenerate_people(
    config: Config,
    pg: PostgresSource,
    report: RunReport,
    opts: PeopleOptions,
    *,
    problems: Iterable[Problem] = (),
    ledger: Ledger | None = None,
    api: ImmichApi | None = None,
    watch: JobWatch | None = None,
    clock: RetryClock | None = None,
    limiter: RateLimiter | None = None,
) -> Counter[str]:
    """One ``regenerate --kind person`` run (or one of serve's rounds); its rows go into ``report``.

    ``problems``: the scan's rows (those of kind ``person`` are taken); ``opts.people`` adds ids asked for
    by name. With ``opts.apply`` it needs ``ledger`` and ``api``; ``watch`` (a ``JobWatch`` for
    ``PERSON_THUMBNAIL_JOB_NAMES``, the caller's: it lives as long as the caller's Redis) confirms each
    request queued a job, and without it nothing is called ``not_queued``. ``clock`` and
    ``limiter``: the caller's (serve shares its retry clock and rate limit with the assets'). Raises what
    the sources raise when the database or the media folder fails (the engine reports those as for assets).
    """
    selected = list(dict.fromkeys([*(p.asset_id for p in problems if p.kind == PERSON_KIND), *opts.people]))
    earlier = [e.asset_id for e in (ledger.entries(PENDING) if ledger is not None else [])
               if PERSON_KIND in e.kinds and e.asset_id not in selected]
    if not selected and not earlier:
        return Counter()
    policy = Policy(max_attempts=opts.max_attempts, retry_after=opts.retry_after,
                    retry_gave_up=opts.retry_gave_up, key_owner=opts.key_owner)
    write = opts.apply and ledger is not None and not ledger.readonly and api is not None
    run = _Run(config, pg, await pg.schema(), await media_mapper(pg, config.media), report, opts, ledger,
               clock or RetryClock(), policy, write)
    ids = [*selected, *earlier]
    run.verdicts = await check_people(pg, run.schema, run.mapper, ids)
    entries = ledger.get(ids) if ledger is not None else {}
    ask: list[tuple[PersonVerdict, bool]] = []
    follow: list[str] = []
    for pid in ids:
        act = _act(run, pid, entries.get(pid), pid in selected)
        if act == "ask" or act == "reset":
            if opts.limit is None or len(ask) < opts.limit:
                ask.append((run.verdicts[pid], act == "reset"))
        elif act == "follow":
            follow.append(pid)
    if write:
        assert ledger is not None and api is not None
        confirmer = Confirmer(watch, ledger, opts.confirm_within, opts.max_attempts)
        await confirmer.start()  # before the first request: only later jobs can be its answer
        submitted = await _ask(run, api, ask, confirmer, limiter or RateLimiter(opts.rate))
        tracked = await _confirm(run, confirmer, [*follow, *submitted])
        if confirmer.error is not None:
            report.notes.append(f"face thumbnail jobs not confirmed: {confirmer.error}")
        if opts.wait and tracked:
            await _settle(run, tracked, confirmer.watch)
    await _originals(run)
    return run.verified


def _act(run: _Run, pid: str, entry: Entry | None, selected: bool) -> str:
    """Report (and, when writing, record) the decision about one person before anything is sent.
    Returns ``ask``, ``reset`` (ask, its attempts start over), ``follow`` (an attempt under way, to
    verify with ``wait``) or ``""``."""
    v, opts, report, ledger = run.verdicts[pid], run.opts, run.report, run.ledger
    d = decide(entry, seen_of(v, opts.reasons), run.clock.view(entry), run.policy)
    attempts = entry.attempts if entry is not None else 0
    problems = v.describe() if v.exists and v.problems else ""
    now = time.time()
    if d.action == SKIP:
        if selected:
            report.set(_row(pid, "skipped", problems, attempts, person_text(d.reason, v),
                            d.reason if d.reason in ORIGINAL_WHYS else None, d.reason))
        return ""
    if d.action == GIVE_UP and d.reason != "attempts_exhausted":
        if run.write and ledger is not None:
            ledger.give_up(pid, person_text(d.reason, v), now)
            run.verified["gave_up"] += 1
        report.set(_row(pid, "skipped", problems, attempts, person_text(d.reason, v),
                        d.reason if d.reason in ORIGINAL_WHYS else None, d.reason))
        return ""
    if d.action == GIVE_UP:
        assert entry is not None
        reason = f"{problems} after {entry.attempts} attempt(s)"
        if run.write and ledger is not None:
            if entry.state in AWAITING:
                ledger.record(pid, "gave_up", problems, now)
            else:
                ledger.give_up(pid, reason, now)
            run.verified["gave_up"] += 1
            run.broken_after.append(pid)
        report.set(_row(pid, "gave_up", problems, attempts, reason, entry.why, d.reason))
        return ""
    if d.action == GAVE_UP:
        assert entry is not None
        report.set(_row(pid, "gave_up", problems, attempts,
                        f"{entry.gave_up_reason or 'gave up'} (earlier run; --retry-gave-up to try again)",
                        entry.why, d.reason))
        return ""
    if d.action == FIXED:
        if run.write and ledger is not None and ledger.record(pid, "fixed", "face thumbnail written", now):
            run.verified["fixed"] += 1
        report.set(_row(pid, "fixed", "", attempts, "fixed since an earlier run asked"))
        return ""
    if d.action in (SETTLE, RETRY) and run.write and ledger is not None \
            and ledger.record(pid, "still_missing", problems, now) == "still_missing":
        run.verified["still_missing"] += 1
        run.broken_after.append(pid)
    if d.action in (WAIT, SETTLE):
        assert entry is not None
        since = run.clock.since(entry) or 0.0
        left = entry.window(opts.retry_after) - since
        report.set(_row(pid, "waiting", problems, attempts,
                        f"asked {ago(since)} ago (attempt {attempts} of {opts.max_attempts}); next request not "
                        f"before {ago(left)} from now", entry.why))
        return "follow" if d.action == WAIT and entry.state in AWAITING and run.write else ""
    assert d.action in (SUBMIT, RETRY), d
    if not run.write:
        report.set(_row(pid, "would_submit", problems, 0 if d.reset else attempts,
                        f"PUT /api/people/{pid} with its feature face's asset {v.face_asset_id}"))
        return ""
    return "reset" if d.reset else "ask"


async def _ask(run: _Run, api: ImmichApi, ask: list[tuple[PersonVerdict, bool]], confirmer: Confirmer,
               limiter: RateLimiter) -> list[str]:
    """One request per person, each in the ledger before it is sent. Returns the people Immich accepted."""
    ledger, report, opts = run.ledger, run.report, run.opts
    assert ledger is not None
    accepted: list[str] = []
    for v, reset in ask:
        claimed_at = time.time()
        claims = ledger.claim({v.person_id: KINDS}, claimed_at, opts.max_attempts, [v.person_id] if reset else ())
        if not claims:
            continue  # another process holds it, or its attempt is still open
        await confirmer.meanwhile(limiter.delay())  # the pause read from the event stream, not slept
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
        run.clock.requested(v.person_id, claimed_at)
        report.requests["accepted"] += 1
        accepted.append(v.person_id)
        confirmer.accepted([v.person_id])
        report.set(_row(v.person_id, "submitted", v.describe(), claims[0].prev_attempts + 1,
                        f"PUT /api/people/{v.person_id} accepted"))
    return accepted


async def _confirm(run: _Run, confirmer: Confirmer, tracked: list[str]) -> list[str]:
    """Wait until each person asked for has its job or its window has ended; record both (the assets'
    ``Confirmer``). Returns the people still to verify (those with a job, or not known to have none)."""
    report = run.report
    _, outcomes = await confirmer.settle()
    run.verified.update(outcomes.values())
    for p, outcome in outcomes.items():
        row = report.rows.get(p)
        report.set(_row(p, outcome, row.problems if row else "", row.attempts if row else 0,
                        "Immich answered but queued no PersonGenerateThumbnail job", "not_queued"))
    return [p for p in tracked if p not in outcomes]


async def _settle(run: _Run, tracked: list[str], watch: JobWatch | None) -> None:
    """Wait for the jobs to finish (or ``wait_seconds``), check each face thumbnail again and settle its
    attempt (``decision.decide``), saying why one is still broken."""
    ledger, report, opts = run.ledger, run.report, run.opts
    assert ledger is not None
    deadline = time.monotonic() + opts.wait_seconds
    if watch is not None:
        following = watch

        def unfinished() -> list[str]:
            return [p for p in tracked if (job := following.job_of(p)) is not None and not job.finished]

        try:
            while unfinished() and time.monotonic() < deadline:
                await following.poll(block=min(POLL, max(0.0, deadline - time.monotonic())))
        except SourceError as exc:
            run.report.notes.append(f"face thumbnail jobs not followed to their end: {exc}")
            watch = None
    verdicts = await check_people(run.pg, run.schema, run.mapper, tracked)
    run.verdicts.update(verdicts)
    entries = ledger.get(tracked)
    now = time.time()
    for p in tracked:
        v, entry = verdicts[p], entries.get(p)
        if entry is None:
            continue
        job = watch.job_of(p) if watch is not None else None
        why = None if v.written else explain_person(v, job, None)
        over = job is not None and job.finished_at is not None
        # Asked for already: whatever is still broken counts as asked for.
        seen = seen_of(v, [r for _, r, _ in v.problems])
        d = decide(entry, seen, run.clock.view(entry, attempt_over=over), run.policy)
        problems = v.describe() if v.problems else ""
        attempts = entry.attempts
        if d.action == FIXED:
            if ledger.record(p, "fixed", "face thumbnail written", now) is not None:
                run.verified["fixed"] += 1
                report.set(_row(p, "fixed", "", attempts, "face thumbnail written"))
            continue
        if d.action == GIVE_UP and d.reason != "attempts_exhausted":
            ledger.give_up(p, person_text(d.reason, v), now)
            run.verified["gave_up"] += 1
            report.set(_row(p, "gave_up", problems, attempts, person_text(d.reason, v),
                            d.reason if d.reason in ORIGINAL_WHYS else None, d.reason))
            continue
        outcome = {GIVE_UP: "gave_up", SETTLE: "still_missing", RETRY: "still_missing"}.get(d.action, "waiting")
        recorded = ledger.record(p, outcome, problems, now, why=why)
        if recorded is None:
            continue  # settled by another process meanwhile
        if outcome != "waiting":
            run.broken_after.append(p)
        if recorded in ("still_missing", "gave_up"):
            run.verified[recorded] += 1
        report.set(_row(p, outcome, problems, attempts, why.text if why else problems,
                        why.code if why else None, d.reason if d.action == GIVE_UP else None))


async def _originals(run: _Run) -> None:
    """The feature face's original of every person still broken after its attempts, read once: a broken
    one is why (``original.why_of``), in the report and the ledger."""
    faces = {p: run.verdicts[p].face_asset_id for p in run.broken_after if p in run.verdicts}
    wanted = {p: f for p, f in faces.items() if f}
    if not wanted:
        return
    try:
        verdicts = await check_originals(run.pg, run.schema, run.mapper, set(wanted.values()))
    except (SourceError, asyncpg.PostgresError, OSError, TimeoutError) as exc:
        run.report.notes.append(f"the feature faces' originals of the people still broken could not be checked: {exc}")
        return
    whys: dict[str, Why] = {}
    for p, face in wanted.items():
        why = why_of(verdicts[face]) if face in verdicts else None
        if why is not None:
            whys[p] = Why(why.code, f"its feature face's asset {face}: {why.text}")
    if run.write and run.ledger is not None:
        given = give_up_on_originals(whys, run.ledger, run.clock, run.policy, target="person")
        run.verified["gave_up"] += len(given)
        for p in given:
            row = run.report.rows[p]
            row.result, row.reason = "gave_up", whys[p].code
    explain_rows(run.report, whys, run.ledger if run.write else None)


def explain_person(verdict: PersonVerdict, job: JobSeen | None, original: Any) -> Why:
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
