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

Dry run unless ``apply``. Steps 1 to 3 are ``remediation/select.py``; the command line is
``cli/regenerate.py``; the report's rendering ``output/regenerate_report.py``.
"""

from __future__ import annotations

import asyncio
import logging
import time

from immich_thumbnail_exporter.config import Config
from immich_thumbnail_exporter.remediation.ledger import RETRYABLE, Ledger, LedgerError
from immich_thumbnail_exporter.remediation.ratelimit import RateLimiter
from immich_thumbnail_exporter.remediation.report import Row, RunReport
from immich_thumbnail_exporter.remediation.select import Failure, Options, Selection
from immich_thumbnail_exporter.remediation.submit import (
    BatchOutcome,
    Candidate,
    Confirmer,
    auth_hint,
    by_owner,
    submit_batch,
)
from immich_thumbnail_exporter.remediation.why import NOT_QUEUED, SKIP_TEXT, Why, ago, attempt_reasons, diagnose
from immich_thumbnail_exporter.sources.bullmq_queue import queued_assets
from immich_thumbnail_exporter.sources.immich_api import ApiAuthError
from immich_thumbnail_exporter.sources.postgres import SourceError
from immich_thumbnail_exporter.sources.schema import SchemaError

__all__ = ["Failure", "Options", "Regenerator", "preflight", "regenerate"]

log = logging.getLogger(__name__)

# A failed request (5xx, network) is retried this many times, after these pauses, before the run stops.
REQUEST_RETRY_DELAYS = (0.5, 1.0, 2.0)


class Regenerator(Selection):
    """One ``regenerate`` run. Holds the connections; ``close()`` releases them."""

    def __init__(self, config: Config, opts: Options) -> None:
        super().__init__(config, opts)
        self.confirmer: Confirmer | None = None
        self.limiter = RateLimiter(opts.rate)

    # -- submission --------------------------------------------------------------------------------
    async def submit(self, candidates: list[Candidate]) -> bool:
        """Submit in batches under the rate limit, then confirm the jobs; False when the API stopped the run.

        A refused batch (400: e.g. an asset the key may not touch) does not stop the others; a rejected
        key (401/403) or an API that keeps failing (5xx, network, after retries) stops the run.
        """
        assert self.api is not None and self.ledger is not None and self.confirmer is not None
        batches = by_owner(candidates, self.opts.batch_size)
        stopped = False
        for n, batch in enumerate(batches, 1):
            # The pause the rate limit imposes is spent reading the queue for the last batches' jobs.
            await self.confirmer.meanwhile(self.limiter.delay())
            outcome = await self._submit_one(batch)
            if outcome.error is not None:
                stop = outcome.result == "error" or isinstance(outcome.error, ApiAuthError)
                message = str(outcome.error) + auth_hint(outcome.error)
                if message not in self.report.errors:
                    self.report.errors.append(message)
                for rest in batches[n - 1 :] if stop else [batch]:
                    for c in rest:
                        if c.asset_id not in self.tracked:
                            self.report.set(Row(c.asset_id, "not_submitted", c.problems, tuple(sorted(c.kinds)),
                                                detail=f"request {outcome.result}: {outcome.error}"))
                if stop:
                    stopped = True
                    break
                continue
            log.info("regeneration request %d of %d: %d asset(s) accepted", n, len(batches), len(outcome.submitted))
            self.confirmer.accepted(outcome.submitted)
            entries = self.ledger.get(outcome.submitted)
            by_id = {c.asset_id: c for c in batch}
            for a in outcome.submitted:
                c, e = by_id[a], entries[a]
                self.tracked[a] = set(e.kinds)
                self.report.set(Row(a, "submitted", c.problems, tuple(sorted(e.kinds)), e.attempts,
                                    "Immich accepted the request (not verified: use --wait)"))
            for c in batch:
                if c.asset_id not in outcome.submitted and c.asset_id not in self.report.rows:
                    # Another process claimed it first (serve and a run sharing the ledger).
                    e2 = self.ledger.get([c.asset_id]).get(c.asset_id)
                    if e2 is not None:
                        self._track_waiting(c.asset_id, e2, c.problems, time.time())
        await self.confirm()
        return not stopped

    async def _submit_one(self, batch: list[Candidate]) -> BatchOutcome:
        assert self.api is not None and self.ledger is not None
        kinds = {c.asset_id: c.kinds for c in batch}
        reset = [c.asset_id for c in batch if c.reset]
        outcome = BatchOutcome("none", [])
        for delay in (*REQUEST_RETRY_DELAYS, None):
            await self.limiter.acquire()
            outcome = await submit_batch(self.api, self.ledger, kinds, retry_after=self.opts.retry_after,
                                         max_attempts=self.opts.max_attempts, reset=reset)
            if outcome.result != "none":
                self.report.requests[outcome.result] += 1
            if outcome.result != "error" or delay is None:
                return outcome
            log.warning("regeneration request failed (%s); retrying in %.1fs", outcome.error, delay)
            await asyncio.sleep(delay)
        return outcome

    async def confirm(self) -> None:
        """Wait (up to ``confirm_within`` after the last request) for a job naming each submitted asset."""
        assert self.confirmer is not None and self.ledger is not None
        if self.watch is None:
            note = ("Redis is not configured: whether Immich queued a job for each accepted asset cannot be "
                    "confirmed")
            if note not in self.report.notes:
                self.report.notes.append(note)
            return
        confirmation, outcomes = await self.confirmer.settle()
        if self.confirmer.error is not None:
            note = f"whether Immich queued the jobs could not be confirmed: {self.confirmer.error}"
            if note not in self.report.notes:
                self.report.notes.append(note)
        entries = self.ledger.get([*confirmation.confirmed, *outcomes])
        for a, job_id in confirmation.confirmed.items():
            row = self.report.rows.get(a)
            if row is not None and row.result == "submitted":
                row.detail = f"Immich accepted the request and queued job {job_id} (not verified: use --wait)"
        if outcomes:
            log.warning("Immich accepted the request but queued nothing for %d asset(s): %s", len(outcomes),
                        ", ".join(sorted(outcomes)))
        for a, outcome in outcomes.items():
            row, entry = self.report.rows.get(a), entries.get(a)
            attempts = entry.attempts if entry else 0
            problems, kinds = (row.problems, row.kinds) if row else ("", ())
            if outcome == "gave_up":
                self.tracked.pop(a, None)
                self.report.set(Row(a, "gave_up", problems, kinds, attempts,
                                    f"{NOT_QUEUED} after {attempts} attempt(s)", "not_queued"))
            else:
                self.report.set(Row(a, "not_queued", problems, kinds, attempts,
                                    f"{NOT_QUEUED} (attempt {attempts} of {self.opts.max_attempts})", "not_queued"))
        if confirmation.unconfirmed:
            self.report.notes.append(
                f"{len(confirmation.unconfirmed)} accepted asset(s) could not be confirmed as queued: "
                f"{confirmation.unreadable_jobs} thumbnail job(s) finished before their data could be read"
            )

    # -- verification ------------------------------------------------------------------------------
    async def wait(self) -> None:
        """Check the submitted assets until each is fixed or given up, or the deadline passes."""
        assert self.ledger is not None
        opts = self.opts
        loop = asyncio.get_running_loop()
        deadline = loop.time() + opts.deadline_seconds
        try:
            while self.tracked and loop.time() < deadline:
                await asyncio.sleep(max(0.0, min(opts.poll_interval, deadline - loop.time())))
                if not await self._poll():
                    break
        except (SourceError, SchemaError) as exc:
            # Lost the database or Redis while waiting: report what is known, as still broken.
            line = _source_line(exc)
            if line not in self.report.errors:
                self.report.errors.append(line)
        await self._finish_wait()

    async def _poll(self) -> bool:
        """One verification pass; False when the API stopped the run."""
        assert self.ledger is not None
        opts = self.opts
        if self.watch is not None:
            await self.watch.poll()
        checks = await self.checker.check(list(self.tracked))
        now = time.time()
        entries = self.ledger.get(list(self.tracked))
        broken = [e for a, e in entries.items() if a in self.tracked and checks[a].exists
                  and checks[a].original_exists is not False and checks[a].broken(self.tracked[a])]
        why_of = await attempt_reasons(broken, self.watch, self.redis, self.prefix, opts.retry_after)
        resubmit: list[Candidate] = []
        for a, kinds in list(self.tracked.items()):
            chk, entry = checks[a], entries.get(a)
            attempts = entry.attempts if entry else 0
            if not chk.exists or chk.original_exists is False:
                reason = SKIP_TEXT["not_in_database"] if not chk.exists else "original file is missing"
                self.ledger.give_up(a, reason, now)
                self.report.set(Row(a, "gave_up", chk.describe(kinds), tuple(sorted(kinds)), attempts, reason))
                del self.tracked[a]
                continue
            ok = not chk.broken(kinds)
            detail = chk.describe(kinds)
            over, why = why_of.get(a, (False, None))
            outcome = self.ledger.record_check(a, ok, detail, now, opts.retry_after, opts.max_attempts,
                                               over=over, why=why)
            if outcome is None:  # settled elsewhere (another process): report what the ledger says
                fresh = self.ledger.get([a]).get(a)
                if fresh is not None and fresh.state in ("fixed", "gave_up"):
                    self.report.set(Row(a, fresh.state, detail, tuple(sorted(kinds)), fresh.attempts,
                                        fresh.gave_up_reason or "settled by another process"))
                    del self.tracked[a]
                continue
            if outcome == "fixed":
                since = now - (entry.last_submitted or now) if entry else 0.0
                before = f" (attempt {attempts}; the one before: {entry.why_text})" if (
                    entry and attempts > 1 and entry.why_text) else ""
                self.report.set(Row(a, "fixed", "", tuple(sorted(kinds)), attempts,
                                    f"verified {ago(since)} after the last request{before}"))
                del self.tracked[a]
            elif outcome == "gave_up":
                why_text = f": {why.text}" if why else ""
                self.report.set(Row(a, "gave_up", detail, tuple(sorted(kinds)), attempts,
                                    f"still {detail} after {attempts} attempt(s){why_text}",
                                    why.code if why else None))
                del self.tracked[a]
            elif outcome in ("still_missing", "unchanged"):
                if outcome == "still_missing" and why is not None:
                    log.info("asset %s: %s; asked again once its window is over", a, why.text)
                if entry is not None and now >= entry.due_at(opts.retry_after):
                    resubmit.append(Candidate(a, set(kinds), detail, owner=chk.owner_id))
            else:
                self.report.set(Row(a, "waiting", detail, tuple(sorted(kinds)), attempts,
                                    f"checked {detail}; waiting for Immich"))
        if resubmit:
            resubmit = await self._not_queued(resubmit)
            if resubmit and not await self.submit(resubmit):
                return False
        return True

    async def _finish_wait(self) -> None:
        """Every asset still broken when the run ends: still_missing or not_queued, and why."""
        assert self.ledger is not None
        opts = self.opts
        entries = self.ledger.get(list(self.tracked))
        left = {a: k for a, k in self.tracked.items()
                if not (a in self.report.rows and self.report.rows[a].result == "not_submitted")}
        whys = await self._diagnose({a: entries[a].job_id if a in entries else None
                                     for a in left if entries.get(a) is None or entries[a].state != "not_queued"})
        for a, kinds in left.items():
            entry = entries.get(a)
            attempts = entry.attempts if entry else 0
            row = self.report.rows.get(a)
            problems = row.problems if row else ""
            of = f"(attempt {attempts} of {opts.max_attempts})"
            later = "the ledger keeps track: run again later"
            if entry is not None and entry.state == "not_queued":
                self.report.set(Row(a, "not_queued", problems, tuple(sorted(kinds)), attempts,
                                    f"{NOT_QUEUED} {of}; {later}", "not_queued"))
                continue
            why = whys.get(a)
            reason = f": {why.text}" if why else ""
            broken = entry.detail if entry and entry.detail else problems or "broken"
            self.report.set(Row(a, "still_missing", problems, tuple(sorted(kinds)), attempts,
                                f"still {broken} when the run ended {of}{reason}; {later}",
                                why.code if why else None))

    async def _diagnose(self, jobs: dict[str, str | None]) -> dict[str, Why]:
        """Why each asset is still broken, recorded in the ledger too; nothing when Redis cannot say."""
        if not jobs:
            return {}
        try:
            whys = await diagnose(self.redis, self.prefix, jobs, self.watch)
        except SourceError as exc:  # pragma: no cover - diagnose turns Redis trouble into queue_unknown
            log.info("cannot tell why assets are still broken: %s", exc)
            return {}
        if self.ledger is not None and not self.ledger.readonly:
            self.ledger.explain(whys, time.time())
        return whys

    async def _explain_waiting(self) -> None:
        """Rows waiting on an earlier run's request: add where its job is now."""
        waiting = [r for r in self.report.rows.values() if r.result == "waiting"]
        if not waiting or self.ledger is None:
            return
        entries = self.ledger.get([r.asset_id for r in waiting])
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
        if self.redis is None:
            return candidates
        view = await queued_assets(self.redis, self.prefix)
        return [c for c in candidates if c.asset_id not in view.assets]

    # -- the whole run -----------------------------------------------------------------------------
    async def run(self) -> RunReport:
        opts, config = self.opts, self.config
        if opts.apply:
            self.ledger = Ledger(opts.state_dir)
            self.confirmer = Confirmer(self.watch, self.ledger, opts.confirm_within, opts.max_attempts)
        else:
            self.ledger = Ledger.open_existing(opts.state_dir)
        candidates = await self.select()
        candidates = await self.skip_queued(candidates)
        candidates = await self.skip_other_owners(candidates)
        if opts.limit is not None and len(candidates) > opts.limit:
            self.report.notes.append(
                f"{len(candidates) - opts.limit} more asset(s) to submit left for a later run (--limit {opts.limit})"
            )
            candidates = candidates[: opts.limit]
        if not opts.apply:
            for c in candidates:
                entry = self.ledger.get([c.asset_id]).get(c.asset_id) if self.ledger else None
                attempts = entry.attempts if entry else 0
                self.report.set(Row(c.asset_id, "would_submit", c.problems, tuple(sorted(c.kinds)), attempts,
                                    f"would ask Immich (attempt {attempts + 1} of {opts.max_attempts})"))
            if opts.wait:
                self.report.notes.append("--wait ignored in a dry run")
            await self._explain_waiting()
            return self.report
        if not config.immich.api_key:
            self.report.notes.append("immich.api_key is not set: Immich will refuse the requests")
        assert self.confirmer is not None
        await self.confirmer.start()  # before the first request: only later jobs can be its answer
        if candidates:
            # After an API error the run stops submitting, but still verifies what Immich accepted.
            await self.submit(candidates)
        if opts.wait:
            await self.wait()
        else:
            await self._explain_waiting()
        return self.report


def preflight(config: Config, opts: Options) -> None:
    if not config.media.root:
        raise Failure("regenerate needs media.root (--media.root): it checks the files before and after")
    if opts.apply and not config.immich.enabled:
        raise Failure("regenerate --apply needs immich.url (IMMICH_URL) and immich.api_key (IMMICH_API_KEY)")


async def regenerate(config: Config, opts: Options) -> RunReport:
    """Run once; raises Failure for a configuration, connection or API problem found before any request."""
    preflight(config, opts)
    run = Regenerator(config, opts)
    try:
        return await run.run()
    except (SourceError, SchemaError, LedgerError) as exc:
        raise Failure(_source_line(exc)) from None
    finally:
        await run.close()


def _source_line(exc: Exception) -> str:
    if isinstance(exc, SourceError) and not str(exc).startswith(exc.source):
        return f"{exc.source}: {exc}"
    return str(exc)
