"""The ``regenerate`` engine: ask Immich to regenerate the problem assets' thumbnails, and make sure it
happened.

Immich's ``POST /api/assets/jobs`` answers 204 when it *accepted* a request; that says nothing about a
job being queued, nor about a worker ever producing the files. So a run:

1. runs a fresh scan (headers always verified) and selects problem assets by kind and reason;
2. checks each selected asset again (rows and files, ``remediation.check.Checker``) and skips, with the
   reason, what regeneration cannot fix: the original is gone, the asset is not in the database (any
   more), it is trashed or hidden, or the file is merely unreadable to the exporter;
3. skips assets whose thumbnail job is already waiting in the queue (when Redis is configured), saying
   where that job is;
4. submits the rest in batches under a rate limit, recording each submission in the ledger first, and
   confirms within ``confirm_within`` that a job naming each asset appeared in the queue (else the
   asset is ``not_queued``: "Immich answered 204 but queued nothing");
5. with ``wait``, checks the submitted assets until they are fixed or the deadline passes: an asset whose
   job finished without writing its files, or that was not queued, is settled at once; it is resubmitted
   once its waiting window is over (doubling each time) and given up after the attempt limit. Every
   asset still broken at the end says why, as the queue shows it (``remediation.why``).

Every "what now" about an asset (skip and why, wait, ask again, give up, fixed) is ``decision.decide``,
the one decision ``serve``'s rounds use too. Locked assets (Immich's locked folder) are never sent; a
request Immich refuses with 400 is split until the refused assets stand alone (``submit.submit_batch``).
When the ledger cannot be written (a full disk) the run stops sending and its report lists what it sent
before, all of it recorded in the ledger.

With ``--kind person`` the people's flow (``remediation/people.py``) runs after the assets', from the same
scan, with the same ledger, rate limit and retry clock. With ``apply``, the assets still broken at the
end have their originals read once (``original.check_originals``): a broken one is why, in the report
and the ledger.

Dry run unless ``apply``. Steps 1 to 3 are ``remediation/select.py``; the command line is
``cli/regenerate.py``; the report's rendering ``output/regenerate_report.py``.
"""

from __future__ import annotations

import asyncio
import logging
import time

import asyncpg

from immich_thumbnail_exporter.config import Config
from immich_thumbnail_exporter.remediation.decision import (
    FIXED,
    GIVE_UP,
    ORIGINAL_REASONS,
    RETRY,
    SETTLE,
    SKIP,
    SUBMIT,
    decide,
    window_over,
)
from immich_thumbnail_exporter.remediation.ledger import RETRYABLE, Ledger, LedgerError
from immich_thumbnail_exporter.remediation.original import check_originals, explain_rows, give_up_on_originals, why_of
from immich_thumbnail_exporter.remediation.people import PeopleOptions, person_reasons, regenerate_people
from immich_thumbnail_exporter.remediation.report import Row, RunReport
from immich_thumbnail_exporter.remediation.select import Failure, Options, RunState, Selector
from immich_thumbnail_exporter.remediation.submit import (
    BatchOutcome,
    Candidate,
    Confirmer,
    auth_hint,
    by_owner,
    submit_batch,
)
from immich_thumbnail_exporter.remediation.why import (
    NOT_QUEUED,
    SKIP_TEXT,
    Why,
    ago,
    attempt_reasons,
    diagnose,
    skip_text,
)
from immich_thumbnail_exporter.sources.bullmq_queue import queued_assets
from immich_thumbnail_exporter.sources.immich_api import ApiAuthError
from immich_thumbnail_exporter.sources.postgres import SourceError
from immich_thumbnail_exporter.sources.schema import SchemaError
from immich_thumbnail_exporter.timing import Backoff, RateLimiter, deadline_in, left
from immich_thumbnail_exporter.vocabulary import PERSON_KIND, REASONS

__all__ = ["Failure", "Options", "Regenerator", "preflight", "regenerate"]

log = logging.getLogger(__name__)

# How long ``--kind person --wait`` waits for its jobs when no --timeout is given.
PEOPLE_WAIT = 120.0
# A failed request (5xx, network) is retried this many times, after a pause doubling from 0.5s, before
# the run stops.
REQUEST_RETRIES = 3


class Regenerator:
    """One ``regenerate`` run. Holds the connections (``RunState``); ``close()`` releases them."""

    def __init__(self, config: Config, opts: Options) -> None:
        self.run = RunState.open(config, opts)
        self.selector = Selector(self.run)
        self.confirmer: Confirmer | None = None
        self.limiter = RateLimiter(opts.rate)

    async def close(self) -> None:
        await self.run.close()

    # -- submission --------------------------------------------------------------------------------
    async def submit(self, candidates: list[Candidate]) -> bool:
        """Submit in batches under the rate limit, then confirm the jobs; False when the run must stop.

        An asset Immich refuses on its own (400) does not stop the others; a rejected key (401/403), an
        API that keeps failing (5xx, network, after retries) or a ledger that cannot be written stops
        the run.
        """
        run = self.run
        assert run.ledger is not None and self.confirmer is not None
        report = run.report
        batches = by_owner(candidates, run.opts.batch_size)
        stopped = False
        for n, batch in enumerate(batches, 1):
            # The pause the rate limit imposes is spent reading the queue for the last batches' jobs.
            await self.confirmer.meanwhile(self.limiter.delay())
            outcome = await self._submit_one(batch)
            self._record_outcome(batch, outcome, n, len(batches))
            if outcome.ledger_error is not None:
                # Nothing more can be recorded, so nothing more is sent or confirmed.
                self._ledger_full(outcome.ledger_error, [c for b in batches[n - 1 :] for c in b])
                return False
            if outcome.error is not None:
                stop = outcome.requests["error"] > 0 or isinstance(outcome.error, ApiAuthError)
                message = str(outcome.error) + auth_hint(outcome.error)
                if message not in report.errors:
                    report.errors.append(message)
                for rest in batches[n - 1 :] if stop else [batch]:
                    for c in rest:
                        if c.asset_id not in run.tracked and c.asset_id not in outcome.refused:
                            report.set(Row(c.asset_id, "not_submitted", c.problems, tuple(sorted(c.kinds)),
                                           detail=f"request failed: {outcome.error}"))
                if stop:
                    stopped = True
                    break
        await self.confirm()
        return not stopped

    def _record_outcome(self, batch: list[Candidate], outcome: BatchOutcome, n: int, of: int) -> None:
        run = self.run
        assert run.ledger is not None and self.confirmer is not None
        report = run.report
        report.requests.update(outcome.requests)
        report.sent.extend(outcome.accepted_requests)
        by_id = {c.asset_id: c for c in batch}
        for a, message in outcome.refused.items():
            c = by_id[a]
            report.set(Row(a, "skipped", c.problems, tuple(sorted(c.kinds)),
                           detail=f"{SKIP_TEXT['refused']}: {message}", reason="refused"))
        if outcome.refused:
            log.warning("Immich refused %d asset(s) on their own: %s", len(outcome.refused),
                        ", ".join(sorted(outcome.refused)))
        if outcome.submitted:
            log.info("regeneration batch %d of %d: %d asset(s) accepted", n, of, len(outcome.submitted))
            self.confirmer.accepted(outcome.submitted)
        entries = run.ledger.get(outcome.submitted)
        for a in outcome.submitted:
            c, e = by_id[a], entries.get(a)
            run.clock.requested(a, outcome.claimed_at)
            kinds = set(e.kinds) if e is not None else set(c.kinds)
            run.tracked[a] = kinds
            note = ("sent before the state folder filled; recorded in the ledger" if outcome.ledger_error
                    else "Immich accepted the request (not verified: use --wait)")
            report.set(Row(a, "submitted", c.problems, tuple(sorted(kinds)), e.attempts if e else 1, note))
        if outcome.error is None and outcome.ledger_error is None:
            for c in batch:
                if c.asset_id not in outcome.submitted and c.asset_id not in outcome.refused \
                        and c.asset_id not in report.rows:
                    # Another process claimed it first (serve and a run sharing the ledger).
                    e2 = run.ledger.get([c.asset_id]).get(c.asset_id)
                    if e2 is not None:
                        run.track_waiting(c.asset_id, e2, c.problems, time.time())

    def _ledger_full(self, error: str, unsent: list[Candidate]) -> None:
        """The ledger could not be written: say so, with every request sent before, and stop sending."""
        report = self.run.report
        sent = sum(len(ids) for ids in report.sent)
        line = (f"{error}: stopped sending; the {len(report.sent)} request(s) sent before ({sent} asset(s), "
                "listed as submitted) are recorded in the ledger")
        if line not in report.errors:
            report.errors.append(line)
        for c in unsent:
            if c.asset_id not in self.run.tracked and c.asset_id not in report.rows:
                report.set(Row(c.asset_id, "not_submitted", c.problems, tuple(sorted(c.kinds)),
                               detail="not sent: the ledger could not be written"))

    async def _submit_one(self, batch: list[Candidate]) -> BatchOutcome:
        """One batch, its requests retried after an error (5xx, network) with a growing pause."""
        run = self.run
        assert run.api is not None and run.ledger is not None
        kinds = {c.asset_id: c.kinds for c in batch}
        reset = [c.asset_id for c in batch if c.reset]
        total = BatchOutcome("none", [])
        backoff = Backoff(0.5, 2.0)
        for attempt in range(REQUEST_RETRIES + 1):
            outcome = await submit_batch(run.api, run.ledger, kinds, max_attempts=run.opts.max_attempts,
                                         reset=reset, pace=self.limiter.acquire)
            total = total.merge(outcome)
            retry = outcome.error is not None and outcome.requests["error"] > 0 \
                and not isinstance(outcome.error, ApiAuthError)
            if not retry or outcome.ledger_error is not None or attempt == REQUEST_RETRIES:
                return total
            delay = backoff.failed()
            log.warning("regeneration request failed (%s); retrying in %.1fs", outcome.error, delay)
            await asyncio.sleep(delay)
            kinds = {a: k for a, k in kinds.items() if a not in total.submitted and a not in total.refused}
            total.error = None
        return total

    async def confirm(self) -> None:
        """Wait (up to ``confirm_within`` after the last request) for a job naming each submitted asset."""
        run = self.run
        assert self.confirmer is not None and run.ledger is not None
        report = run.report
        if run.watch is None:
            note = ("Redis is not configured: whether Immich queued a job for each accepted asset cannot be "
                    "confirmed")
            if note not in report.notes:
                report.notes.append(note)
            return
        confirmation, outcomes = await self.confirmer.settle()
        if self.confirmer.error is not None:
            note = f"whether Immich queued the jobs could not be confirmed: {self.confirmer.error}"
            if note not in report.notes:
                report.notes.append(note)
        entries = run.ledger.get([*confirmation.confirmed, *outcomes])
        for a, job_id in confirmation.confirmed.items():
            row = report.rows.get(a)
            if row is not None and row.result == "submitted":
                row.detail = f"Immich accepted the request and queued job {job_id} (not verified: use --wait)"
        if outcomes:
            log.warning("Immich accepted the request but queued nothing for %d asset(s): %s", len(outcomes),
                        ", ".join(sorted(outcomes)))
        for a, outcome in outcomes.items():
            row, entry = report.rows.get(a), entries.get(a)
            attempts = entry.attempts if entry else 0
            problems, kinds = (row.problems, row.kinds) if row else ("", ())
            if outcome == "gave_up":
                run.tracked.pop(a, None)
                report.set(Row(a, "gave_up", problems, kinds, attempts,
                               f"{NOT_QUEUED} after {attempts} attempt(s)", "not_queued"))
            else:
                report.set(Row(a, "not_queued", problems, kinds, attempts,
                               f"{NOT_QUEUED} (attempt {attempts} of {run.opts.max_attempts})", "not_queued"))
        if confirmation.unconfirmed:
            report.notes.append(
                f"{len(confirmation.unconfirmed)} accepted asset(s) could not be confirmed as queued: "
                f"{confirmation.unreadable_jobs} thumbnail job(s) finished before their data could be read"
            )

    # -- verification ------------------------------------------------------------------------------
    async def wait(self) -> None:
        """Check the submitted assets until each is fixed or given up, or the deadline passes."""
        run = self.run
        opts = run.opts
        deadline = deadline_in(opts.deadline_seconds)
        try:
            while run.tracked and left(deadline) > 0:
                await asyncio.sleep(min(opts.poll_interval, left(deadline)))
                if not await self._poll():
                    break
        except (SourceError, SchemaError) as exc:
            # Lost the database or Redis while waiting: report what is known, as still broken.
            line = _source_line(exc)
            if line not in run.report.errors:
                run.report.errors.append(line)
        await self._finish_wait()

    async def _poll(self) -> bool:
        """One verification pass (``decision.decide`` for each asset); False when the run must stop."""
        run = self.run
        assert run.ledger is not None
        ledger, opts, report = run.ledger, run.opts, run.report
        if run.watch is not None:
            await run.watch.poll()
        ids = list(run.tracked)
        checks = await run.checker.check(ids)
        locked = await run.checker.locked(ids)
        now = time.time()
        entries = ledger.get(ids)
        broken = [e for a, e in entries.items() if a in run.tracked and checks[a].exists
                  and checks[a].original_exists is not False and checks[a].broken(run.tracked[a])]
        due = {e.asset_id for e in broken if window_over(e, run.clock.since(e), opts.retry_after)}
        why_of = await attempt_reasons(broken, run.watch, run.redis, run.prefix, due)
        policy = run.policy()
        every = set(REASONS)
        resubmit: list[Candidate] = []
        for a, kinds in list(run.tracked.items()):
            chk, entry = checks[a], entries.get(a)
            if entry is None or entry.state in ("fixed", "gave_up"):
                # Settled elsewhere (another process): report what the ledger says.
                if entry is not None:
                    report.set(Row(a, entry.state, entry.detail or "", tuple(sorted(kinds)), entry.attempts,
                                   entry.gave_up_reason or "settled by another process"))
                del run.tracked[a]
                continue
            attempts = entry.attempts
            detail = chk.describe(kinds)
            over, why = why_of.get(a, (False, None))
            seen = run.seen(chk, kinds, every, every, a in locked)
            d = decide(entry, seen, run.clock.view(entry, attempt_over=over), policy)
            if d.action == FIXED:
                if ledger.record(a, "fixed", detail, now) is None:
                    continue  # settled by another process meanwhile: read again next pass
                since = run.clock.since(entry) or 0.0
                before = f" (attempt {attempts}; the one before: {entry.why_text})" if (
                    attempts > 1 and entry.why_text) else ""
                report.set(Row(a, "fixed", "", tuple(sorted(kinds)), attempts,
                               f"verified {ago(since)} after the last request{before}"))
                del run.tracked[a]
            elif d.action == GIVE_UP and d.reason != "attempts_exhausted":
                reason = skip_text(d.reason, chk, short=True)
                ledger.give_up(a, reason, now)
                report.set(Row(a, "gave_up", detail, tuple(sorted(kinds)), attempts, reason, reason=d.reason))
                del run.tracked[a]
            elif d.action == GIVE_UP:
                if entry.state in RETRYABLE:
                    ledger.give_up(a, f"still {detail} after {attempts} attempt(s)", now)
                else:
                    ledger.record(a, "gave_up", detail, now, why=why)
                why_text = f": {why.text}" if why else ""
                report.set(Row(a, "gave_up", detail, tuple(sorted(kinds)), attempts,
                               f"still {detail} after {attempts} attempt(s){why_text}",
                               why.code if why else None, reason=d.reason))
                del run.tracked[a]
            elif d.action in (SETTLE, RETRY):
                ledger.record(a, "still_missing", detail, now, why=why)
                if why is not None:
                    log.info("asset %s: %s; asked again once its window is over", a, why.text)
                if d.action == RETRY:
                    resubmit.append(Candidate(a, set(d.kinds), detail, owner=chk.owner_id))
            elif d.action == SUBMIT:
                resubmit.append(Candidate(a, set(d.kinds), detail, owner=chk.owner_id))
            elif d.action == SKIP:
                report.set(Row(a, "skipped", detail, tuple(sorted(kinds)), attempts, skip_text(d.reason, chk),
                               reason=d.reason))
                del run.tracked[a]
            elif entry.state not in RETRYABLE:  # WAIT: its attempt runs
                ledger.record(a, "waiting", detail, now, why=why)
                report.set(Row(a, "waiting", detail, tuple(sorted(kinds)), attempts,
                               f"checked {detail}; waiting for Immich"))
        if resubmit:
            resubmit = await self._not_queued(resubmit)
            if resubmit and not await self.submit(resubmit):
                return False
        return True

    async def _finish_wait(self) -> None:
        """Every asset still broken when the run ends: still_missing or not_queued, and why."""
        run = self.run
        assert run.ledger is not None
        opts, report = run.opts, run.report
        entries = run.ledger.get(list(run.tracked))
        pending = {a: k for a, k in run.tracked.items()
                   if not (a in report.rows and report.rows[a].result == "not_submitted")}
        whys = await self._diagnose({a: entries[a].job_id if a in entries else None
                                     for a in pending if entries.get(a) is None or entries[a].state != "not_queued"})
        for a, kinds in pending.items():
            entry = entries.get(a)
            attempts = entry.attempts if entry else 0
            row = report.rows.get(a)
            problems = row.problems if row else ""
            of = f"(attempt {attempts} of {opts.max_attempts})"
            later = "the ledger keeps track: run again later"
            if entry is not None and entry.state == "not_queued":
                report.set(Row(a, "not_queued", problems, tuple(sorted(kinds)), attempts,
                               f"{NOT_QUEUED} {of}; {later}", "not_queued"))
                continue
            why = whys.get(a)
            reason = f": {why.text}" if why else ""
            broken = entry.detail if entry and entry.detail else problems or "broken"
            report.set(Row(a, "still_missing", problems, tuple(sorted(kinds)), attempts,
                           f"still {broken} when the run ended {of}{reason}; {later}",
                           why.code if why else None))

    async def _diagnose(self, jobs: dict[str, str | None]) -> dict[str, Why]:
        """Why each asset is still broken, recorded in the ledger too; nothing when Redis cannot say."""
        run = self.run
        if not jobs:
            return {}
        try:
            whys = await diagnose(run.redis, run.prefix, jobs, run.watch)
        except SourceError as exc:  # pragma: no cover - diagnose turns Redis trouble into queue_unknown
            log.info("cannot tell why assets are still broken: %s", exc)
            return {}
        if run.ledger is not None and not run.ledger.readonly:
            run.ledger.explain(whys, time.time())
        return whys

    async def _explain_waiting(self) -> None:
        """Rows waiting on an earlier run's request: add where its job is now."""
        run = self.run
        waiting = [r for r in run.report.rows.values() if r.result == "waiting"]
        if not waiting or run.ledger is None:
            return
        entries = run.ledger.get([r.asset_id for r in waiting])
        # An attempt already settled keeps the reason it ended with; the others say where their job is now.
        settled = {a: Why(e.why, e.why_text) for a, e in entries.items()
                   if e.state in RETRYABLE and e.why and e.why_text}
        whys = await self._diagnose({r.asset_id: entries[r.asset_id].job_id if r.asset_id in entries else None
                                     for r in waiting if r.asset_id not in settled})
        whys.update(settled)
        for row in waiting:
            why = whys.get(row.asset_id)
            if why is not None:
                row.detail, row.why = f"{row.detail}; {why.text}", why.code

    async def _not_queued(self, candidates: list[Candidate]) -> list[Candidate]:
        """Resubmit only what is not still waiting in the queue (a slow Immich is not a failed one)."""
        run = self.run
        if run.redis is None:
            return candidates
        view = await queued_assets(run.redis, run.prefix)
        return [c for c in candidates if c.asset_id not in view.assets]

    # -- the whole run -----------------------------------------------------------------------------
    async def execute(self) -> RunReport:
        """The assets' flow for the asset kinds asked for, then the people's (``--kind person``), from one
        scan, with one ledger, rate limit and retry clock."""
        run = self.run
        opts, report = run.opts, run.report
        if opts.apply:
            run.ledger = Ledger(opts.state_dir)
            self.confirmer = Confirmer(run.watch, run.ledger, opts.confirm_within, opts.max_attempts)
        else:
            run.ledger = Ledger.open_existing(opts.state_dir)
        if opts.asset_kinds:
            await self._assets()
        else:
            await self.selector.scan()
        if opts.people and (report.errors or _ledger_failed(run)):
            report.notes.append("face thumbnails not asked for: the run stopped on the error below")
        elif opts.people:
            try:
                await self._people()
            except LedgerError as exc:
                self._ledger_full(str(exc), [])
        if opts.apply and opts.asset_kinds:
            await self._originals()
        return report

    async def _people(self) -> None:
        """Face thumbnails (``remediation/people.py``): the rows go into the same report."""
        run = self.run
        opts = run.opts
        if opts.apply and run.key_owner is None:
            await self.selector.ask_key_owner()
        people = PeopleOptions(
            apply=opts.apply,
            # --asset names people when only people are asked for.
            people=opts.assets if not opts.asset_kinds else (),
            reasons=opts.reasons or person_reasons(run.config.remediation.reasons),
            rate=opts.rate,
            wait=opts.wait,
            retry_after=opts.retry_after,
            max_attempts=opts.max_attempts,
            retry_gave_up=opts.retry_gave_up,
            confirm_within=opts.confirm_within,
            wait_seconds=opts.timeout if opts.timeout is not None else PEOPLE_WAIT,
            key_owner=run.key_owner,
            limit=opts.limit,
        )
        await regenerate_people(run.config, run.pg, run.report, people, problems=run.person_problems,
                                ledger=run.ledger, api=run.api, watch=run.person_watch, clock=run.clock,
                                limiter=self.limiter)

    async def _originals(self) -> None:
        """Every asset still broken after its attempts: its original read once (``check_originals``); a
        broken one is why, in the report and the ledger. Only those few assets are read."""
        run = self.run
        report = run.report
        ids = [r.asset_id for r in report.rows.values()
               if r.result in ("still_missing", "gave_up") and r.kinds != (PERSON_KIND,) and r.why != "not_queued"
               and r.reason not in ORIGINAL_REASONS]
        if not ids:
            return
        try:
            schema, mapper = await run.checker.prepare()
            verdicts = await check_originals(run.pg, schema, mapper, ids)
        except (SourceError, SchemaError, asyncpg.PostgresError, OSError, TimeoutError) as exc:
            report.notes.append(f"the originals of the assets still broken could not be checked: {exc}")
            return
        whys = {a: why for a, v in verdicts.items() if (why := why_of(v)) is not None}
        ledger = run.ledger if run.ledger is not None and not run.ledger.readonly else None
        if ledger is not None:
            for a in give_up_on_originals(whys, ledger, run.clock, run.policy()):
                row = report.rows[a]
                row.result, row.reason = "gave_up", whys[a].code
        explain_rows(report, whys, ledger)

    async def _assets(self) -> None:
        run = self.run
        opts, config, report = run.opts, run.config, run.report
        assert run.ledger is not None or not opts.apply
        try:
            candidates = await self.selector.select()
        except LedgerError as exc:
            if not opts.apply:
                raise
            # Nothing sent yet: what the selection recorded is in the ledger; nothing else is lost.
            self._ledger_full(str(exc), [])
            return
        if opts.limit is not None and len(candidates) > opts.limit:
            report.notes.append(
                f"{len(candidates) - opts.limit} more asset(s) to submit left for a later run (--limit {opts.limit})"
            )
            candidates = candidates[: opts.limit]
        if not opts.apply:
            entries = run.ledger.get([c.asset_id for c in candidates]) if run.ledger else {}
            for c in candidates:
                entry = entries.get(c.asset_id)
                attempts = 0 if entry is None or c.reset else entry.attempts
                report.set(Row(c.asset_id, "would_submit", c.problems, tuple(sorted(c.kinds)), attempts,
                               f"would ask Immich (attempt {attempts + 1} of {opts.max_attempts})"))
            if opts.wait:
                report.notes.append("--wait ignored in a dry run")
            await self._explain_waiting()
            return
        if not config.immich.api_key:
            report.notes.append("immich.api_key is not set: Immich will refuse the requests")
        assert self.confirmer is not None
        await self.confirmer.start()  # before the first request: only later jobs can be its answer
        try:
            # After an API error the run stops submitting, but still verifies what Immich accepted.
            if candidates and not await self.submit(candidates) and _ledger_failed(run):
                return
            if opts.wait:
                await self.wait()
            else:
                await self._explain_waiting()
        except LedgerError as exc:
            self._ledger_full(str(exc), [])


def _ledger_failed(run: RunState) -> bool:
    return run.ledger is not None and run.ledger.failed is not None


def preflight(config: Config, opts: Options) -> None:
    if not config.media.root:
        raise Failure("regenerate needs media.root (--media.root): it checks the files before and after")
    if opts.apply and not config.immich.enabled:
        raise Failure("regenerate --apply needs immich.url (IMMICH_URL) and immich.api_key (IMMICH_API_KEY)")


async def regenerate(config: Config, opts: Options) -> RunReport:
    """Run once; raises Failure for a configuration, connection or API problem found before any request.

    A ledger that cannot be written once requests were sent ends the run with its report (an error line
    names what was sent and recorded): the requests are not lost from view."""
    preflight(config, opts)
    regenerator = Regenerator(config, opts)
    try:
        return await regenerator.execute()
    except (SourceError, SchemaError, LedgerError) as exc:
        raise Failure(_source_line(exc)) from None
    finally:
        await regenerator.close()


def _source_line(exc: Exception) -> str:
    if isinstance(exc, SourceError) and not str(exc).startswith(exc.source):
        return f"{exc.source}: {exc}"
    return str(exc)
