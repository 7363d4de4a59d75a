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

Dry run unless ``apply``. The command line is ``cli/regenerate.py``; the report's rendering
``output/regenerate_report.py``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from immich_thumbnail_exporter.config import Config
from immich_thumbnail_exporter.model import Problem, ProblemStore
from immich_thumbnail_exporter.remediation.check import AssetCheck, Checker, valid_asset_id
from immich_thumbnail_exporter.remediation.jobwatch import JobWatch
from immich_thumbnail_exporter.remediation.ledger import AWAITING, PENDING, RETRYABLE, Entry, Ledger, LedgerError
from immich_thumbnail_exporter.remediation.queue_view import queued_assets
from immich_thumbnail_exporter.remediation.ratelimit import RateLimiter
from immich_thumbnail_exporter.remediation.report import Row, RunReport
from immich_thumbnail_exporter.remediation.submit import (
    OTHER_OWNER,
    BatchOutcome,
    Candidate,
    Confirmer,
    auth_hint,
    by_owner,
    submit_batch,
)
from immich_thumbnail_exporter.remediation.why import NOT_QUEUED, SKIP_TEXT, Why, ago, attempt_reasons, diagnose
from immich_thumbnail_exporter.scan.run import run_scan
from immich_thumbnail_exporter.sources.immich_api import ApiAuthError, ApiError, ImmichApi
from immich_thumbnail_exporter.sources.postgres import PostgresSource, SourceError
from immich_thumbnail_exporter.sources.redis import RedisSource
from immich_thumbnail_exporter.sources.schema import SchemaError
from immich_thumbnail_exporter.vocabulary import KINDS, REASONS

log = logging.getLogger(__name__)

# A failed request (5xx, network) is retried this many times, after these pauses, before the run stops.
REQUEST_RETRY_DELAYS = (0.5, 1.0, 2.0)


class Failure(Exception):
    """A configuration, connection or API problem: one line, exit 2."""


@dataclass(frozen=True)
class Options:
    apply: bool = False
    kinds: tuple[str, ...] = KINDS
    reasons: tuple[str, ...] | None = None
    assets: tuple[str, ...] = ()
    limit: int | None = None
    batch_size: int = 50
    rate: float = 2.0
    wait: bool = False
    timeout: float | None = None
    max_attempts: int = 3
    retry_after: float = 300.0
    retry_gave_up: bool = False
    state_dir: str = "."
    format: str = "table"
    confirm_within: float = 10.0

    @property
    def deadline_seconds(self) -> float:
        if self.timeout is not None:
            return self.timeout
        # Every attempt's window (doubling), plus a minute for the last check.
        return self.retry_after * ((1 << self.max_attempts) - 1) + 60.0

    @property
    def poll_interval(self) -> float:
        return min(5.0, max(0.2, self.retry_after / 10))


class Regenerator:
    """One ``regenerate`` run. Holds the connections; ``close()`` releases them."""

    def __init__(self, config: Config, opts: Options) -> None:
        self.config = config
        self.opts = opts
        self.pg = PostgresSource(config.database)
        self.checker = Checker(config, self.pg)
        self.api = ImmichApi(config.immich) if opts.apply else None
        self.redis = RedisSource(config.redis) if config.redis.enabled else None
        self.prefix = config.redis.prefix
        self.watch = JobWatch(self.redis, self.prefix) if self.redis is not None and opts.apply else None
        self.ledger: Ledger | None = None
        self.confirmer: Confirmer | None = None
        self.report = RunReport("apply" if opts.apply else "dry_run")
        self.limiter = RateLimiter(opts.rate)
        self.tracked: dict[str, set[str]] = {}  # submitted, awaiting verification -> kinds

    async def close(self) -> None:
        if self.api is not None:
            await self.api.close()
        if self.redis is not None:
            await self.redis.close()
        await self.pg.close()
        if self.ledger is not None:
            self.ledger.close()

    # -- selection ---------------------------------------------------------------------------------
    async def scan(self) -> dict[str, list[Problem]]:
        # Headers are always checked here: a corrupt preview is as broken as a missing one.
        config = dataclasses.replace(self.config, checks=dataclasses.replace(self.config.checks, verify_headers=True))
        store = ProblemStore()
        deadline = float(self.config.intervals.files)
        try:
            try:
                # The same deadline as serve's file check: a scan that never ends is an outage, not a result.
                result = await asyncio.wait_for(run_scan(self.pg, config, store), deadline)
            except TimeoutError:
                raise Failure(f"the scan did not finish within intervals.files ({deadline:.0f}s)") from None
            select_reasons = set(self.opts.reasons or REASONS)
            kinds = set(self.opts.kinds)
            wanted = set(self.opts.assets)
            by_asset: dict[str, list[Problem]] = {}
            for p in result.problems:
                if p.kind in kinds and p.reason in select_reasons and (not wanted or p.asset_id in wanted):
                    by_asset.setdefault(p.asset_id, []).append(p)
            self.report.problems_total = result.problems.total
            self.report.assets_with_problems = len({p.asset_id for p in result.problems})
        finally:
            store.close()
        return by_asset

    def submit_reasons(self) -> set[str]:
        return set(self.opts.reasons or self.config.remediation.reasons)

    async def select(self) -> list[Candidate]:
        by_asset = await self.scan()
        ids = list(dict.fromkeys([*sorted(by_asset), *self.opts.assets]))
        for a in ids:
            if not valid_asset_id(a):
                self.report.set(Row(a, "skipped", detail=SKIP_TEXT["invalid_id"]))
        ids = [a for a in ids if valid_asset_id(a)]
        entries = self.ledger.get(ids) if self.ledger else {}
        earlier = self._earlier_pending(set(ids))
        checks = await self.checker.check([*ids, *earlier])
        self._settle_earlier(earlier, checks)
        now = time.time()
        candidates: list[Candidate] = []
        select_reasons = set(self.opts.reasons or REASONS)
        submit_reasons = self.submit_reasons()
        for a in ids:
            chk, entry = checks[a], entries.get(a)
            cand = self._decide(a, chk, entry, select_reasons, submit_reasons, now)
            if cand is not None:
                candidates.append(cand)
        return candidates

    def _earlier_pending(self, selected: set[str]) -> list[str]:
        """Assets an earlier run submitted that this run did not select (fixed since, or filtered out)."""
        if self.ledger is None:
            return []
        return [e.asset_id for e in self.ledger.entries(PENDING) if e.asset_id not in selected]

    def _settle_earlier(self, earlier: Sequence[str], checks: dict[str, AssetCheck]) -> None:
        if not earlier or self.ledger is None:
            return
        entries = self.ledger.get(earlier)
        for a in earlier:
            entry, chk = entries.get(a), checks[a]
            if entry is None or not chk.exists:
                continue
            kinds = entry.kinds or set(KINDS)
            if chk.broken(kinds):
                continue  # not selected by this run's filters: left for a run that selects it
            if self.opts.apply:
                self.ledger.record_check(a, True, chk.describe(kinds), time.time(), self.opts.retry_after,
                                         self.opts.max_attempts)
            self.report.set(Row(a, "fixed", kinds=tuple(sorted(kinds)), attempts=entry.attempts,
                                detail="fixed since an earlier run asked"))

    def _decide(
        self,
        a: str,
        chk: AssetCheck,
        entry: Entry | None,
        select_reasons: set[str],
        submit_reasons: set[str],
        now: float,
    ) -> Candidate | None:
        report, opts = self.report, self.opts
        attempts = entry.attempts if entry else 0
        if not chk.exists:
            report.set(Row(a, "skipped", attempts=attempts, detail=SKIP_TEXT["not_in_database"]))
            self._give_up(entry, SKIP_TEXT["not_in_database"], now)
            return None
        if not chk.eligible:
            report.set(Row(a, "skipped", attempts=attempts, detail=SKIP_TEXT["not_eligible"]))
            return None
        broken = [b for b in chk.broken(opts.kinds) if b[1] in select_reasons]
        problems = ", ".join(sorted({f"{k} {r}" for k, r, _ in broken}))
        if chk.original_exists is False:
            detail = f"{SKIP_TEXT['original_missing']} ({chk.original_path})"
            report.set(Row(a, "skipped", problems, attempts=attempts, detail=detail))
            self._give_up(entry, "original file is missing", now)
            return None
        if not broken:
            if entry is not None and entry.state in PENDING:
                if opts.apply and self.ledger is not None:
                    self.ledger.record_check(a, True, "all files present", now, opts.retry_after, opts.max_attempts)
                report.set(Row(a, "fixed", attempts=attempts, detail="fixed since an earlier run asked"))
            else:
                report.set(Row(a, "skipped", attempts=attempts,
                               detail="nothing to fix: checked again, all files present"))
            return None
        fixable = [b for b in broken if b[1] in submit_reasons]
        kinds = {k for k, _, _ in fixable}
        if not fixable:
            reasons = sorted({r for _, r, _ in broken})
            text = "; ".join(SKIP_TEXT.get(r, f"{r} is not submitted (name it with --reason)") for r in reasons)
            report.set(Row(a, "skipped", problems, attempts=attempts, detail=text))
            return None
        owner = chk.owner_id
        if entry is None:
            return Candidate(a, kinds, problems, owner=owner)
        if entry.state == "gave_up":
            if not opts.retry_gave_up:
                report.set(Row(a, "gave_up", problems, tuple(sorted(entry.kinds)), attempts,
                               f"{entry.gave_up_reason or 'gave up'} (earlier run; --retry-gave-up to try again)"))
                return None
            return Candidate(a, kinds, problems, reset=True, owner=owner)
        if entry.state == "fixed":
            return Candidate(a, kinds, problems, reset=True, owner=owner)  # fixed once, broken again
        if entry.state in AWAITING:
            outcome = self._verify(a, entry, chk, now)
            if outcome == "gave_up":
                return None
            if outcome == "waiting":
                self._track_waiting(a, entry, problems, now)
                return None
            return Candidate(a, kinds | set(entry.kinds), problems, owner=owner)
        # still_missing or error: resubmit once the window has passed and attempts remain.
        if entry.state in RETRYABLE and now < entry.due_at(opts.retry_after):
            self._track_waiting(a, entry, problems, now)
            return None
        if entry.attempts >= opts.max_attempts:
            reason = f"{problems} after {entry.attempts} attempt(s)"
            self._give_up(entry, reason, now, force=True)
            report.set(Row(a, "gave_up", problems, tuple(sorted(entry.kinds)), entry.attempts, reason))
            return None
        return Candidate(a, kinds | set(entry.kinds), problems, owner=owner)

    def _verify(self, a: str, entry: Entry, chk: AssetCheck, now: float) -> str:
        """An asset submitted earlier and broken now: waiting, or its window is over."""
        opts = self.opts
        kinds = entry.kinds or set(opts.kinds)
        detail = chk.describe(kinds)
        if opts.apply and self.ledger is not None:
            outcome = self.ledger.record_check(a, False, detail, now, opts.retry_after, opts.max_attempts) or "waiting"
        elif now < entry.due_at(opts.retry_after):
            outcome = "waiting"
        else:
            outcome = "gave_up" if entry.attempts >= opts.max_attempts else "still_missing"
        if outcome == "gave_up":
            self.report.set(Row(a, "gave_up", detail, tuple(sorted(kinds)), entry.attempts,
                                f"{detail} after {entry.attempts} attempt(s)"))
        return outcome

    def _track_waiting(self, a: str, entry: Entry, problems: str, now: float) -> None:
        due = entry.due_at(self.opts.retry_after)
        detail = (f"asked {ago(now - (entry.last_submitted or now))} ago (attempt {entry.attempts} of "
                  f"{self.opts.max_attempts}); next request not before {ago(due - now)} from now")
        self.report.set(Row(a, "waiting", problems, tuple(sorted(entry.kinds)), entry.attempts, detail))
        if entry.state in AWAITING:
            self.tracked[a] = set(entry.kinds) or set(self.opts.kinds)
            if self.watch is not None and entry.job_id:
                self.watch.adopt(a, entry.job_id)

    def _give_up(self, entry: Entry | None, reason: str, now: float, *, force: bool = False) -> None:
        if self.ledger is None or not self.opts.apply or entry is None:
            return
        if force or entry.state in (*AWAITING, *RETRYABLE):
            self.ledger.give_up(entry.asset_id, reason, now)

    async def skip_queued(self, candidates: list[Candidate]) -> list[Candidate]:
        if self.redis is None or not candidates:
            return candidates
        view = await queued_assets(self.redis, self.prefix)
        if not view.complete:
            self.report.notes.append(
                f"the thumbnail queue holds {view.jobs} jobs; only the next {view.checked} were checked for "
                "assets already waiting"
            )
        queued = {c.asset_id: view.assets[c.asset_id].job_id for c in candidates if c.asset_id in view.assets}
        whys = await diagnose(self.redis, self.prefix, queued) if queued else {}
        out = []
        for c in candidates:
            if c.asset_id not in queued:
                out.append(c)
                continue
            why = whys[c.asset_id]
            self.report.set(Row(c.asset_id, "skipped", c.problems, tuple(sorted(c.kinds)),
                                detail=f"{SKIP_TEXT['queued']}: {why.text}", why=why.code))
        return out

    async def skip_other_owners(self, candidates: list[Candidate]) -> list[Candidate]:
        """Leave out assets the API key's user does not own: Immich would refuse the whole request."""
        if not candidates or not self.config.immich.enabled:
            return candidates
        api = self.api or ImmichApi(self.config.immich)
        try:
            owner = await asyncio.wait_for(api.me(), float(self.config.immich.timeout) + 5)
        except (ApiError, TimeoutError) as exc:
            why = str(exc) if isinstance(exc, ApiError) else "no answer in time"
            self.report.notes.append(
                f"cannot tell which Immich user the API key belongs to ({why}): Immich refuses a request "
                "naming another user's assets, so requests are sent one owner at a time"
            )
            return candidates
        finally:
            if api is not self.api:
                await api.close()
        out = []
        for c in candidates:
            if c.owner is None or c.owner == owner:
                out.append(c)
            else:
                self.report.set(Row(c.asset_id, "skipped", c.problems, tuple(sorted(c.kinds)),
                                    detail=OTHER_OWNER))
        return out

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
        confirmation, outcomes = await self.confirmer.settle(wait=True)
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
        whys = await self._diagnose({r.asset_id: entries[r.asset_id].job_id if r.asset_id in entries else None
                                     for r in waiting})
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
