"""``serve``'s remediation (``remediation.enabled``): one bounded round at a time.

Each round:

1. reads the thumbnail queue's new events (which of the jobs it asked for started or finished);
2. verifies what earlier rounds asked for with the targeted check: fixed; or, once the attempt is over
   (its job finished, or none was queued, or its window passed), still missing, with the reason the queue
   shows; given up after the attempt limit;
3. takes the problem assets from the file check's latest list (the ``ProblemFeed`` wired in ``app.py``;
   without a files collection it runs its own scan, at most once per ``intervals.files``), leaves out
   what Immich already has queued and what the API key's user does not own, and submits at most
   ``max_per_round`` of them under the rate limit, recorded in the ledger first;
4. confirms within ``confirm_within`` that a job naming each asset appeared in the queue.

While attempts are under way the collection runs again every few seconds (``FOLLOW_UP``). Those
follow-up rounds check only the assets whose job just finished or whose window just passed, so an asset
is called fixed moments after its job finished rather than at the next file check, and a long backlog of
jobs waiting for a worker costs nothing between full rounds (every ``remediation.interval``, or as soon
as the file check has a new list).

An asset whose attempt settles still broken has its original read once (``original.check_originals``);
a broken one is the reason the ledger keeps. With ``person`` in ``remediation.kinds``, full rounds also
remake lost face thumbnails (``people.regenerate_people``) under the same ledger, rate limit and retry
clock, within what is left of ``max_per_round``; the asset steps never take a person's ledger row.

It never writes to Immich's database, Redis or files: it only asks Immich's API.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass, field

import asyncpg

from immich_thumbnail_exporter.config import Config
from immich_thumbnail_exporter.findings import Problem, ProblemFeed, ProblemStore
from immich_thumbnail_exporter.remediation.check import AssetCheck, Checker
from immich_thumbnail_exporter.remediation.decision import (
    FIXED,
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
    window_over,
)
from immich_thumbnail_exporter.remediation.jobwatch import JobWatch
from immich_thumbnail_exporter.remediation.ledger import AWAITING, PENDING, RETRYABLE, Entry, Ledger, LedgerError
from immich_thumbnail_exporter.remediation.original import check_originals, give_up_on_originals, why_of
from immich_thumbnail_exporter.remediation.people import PeopleOptions, person_reasons, regenerate_people
from immich_thumbnail_exporter.remediation.report import RunReport
from immich_thumbnail_exporter.remediation.submit import Candidate, Confirmer, auth_hint, by_owner, submit_batch
from immich_thumbnail_exporter.remediation.why import Why, attempt_over, attempt_reasons, skip_text
from immich_thumbnail_exporter.scan.run import run_scan
from immich_thumbnail_exporter.sources.bullmq_queue import queued_assets
from immich_thumbnail_exporter.sources.immich_api import ApiAuthError, ApiError, ImmichApi
from immich_thumbnail_exporter.sources.postgres import PostgresSource, SourceError
from immich_thumbnail_exporter.sources.redis import RedisSource
from immich_thumbnail_exporter.timing import RateLimiter
from immich_thumbnail_exporter.vocabulary import KINDS, PERSON_KIND, PERSON_THUMBNAIL_JOB_NAMES

log = logging.getLogger(__name__)

# Seconds between rounds while requests await verification (at most remediation.interval).
FOLLOW_UP = 5.0


@dataclass
class RoundResult:
    """What one round did."""

    sources: dict[str, bool | str] = field(default_factory=dict)
    # An error line when the API refused the requests (the round still counts).
    error: str | None = None
    pending: int = 0  # submitted earlier, verified this round
    candidates: int = 0  # to be submitted (before max_per_round)
    submitted: int = 0  # accepted by Immich this round
    not_queued: int = 0  # ... of which Immich queued nothing
    already_queued: int = 0  # left out: a job for them waits in the queue
    other_owner: int = 0  # left out: the API key's user does not own them
    locked: int = 0  # left out: in Immich's locked folder, which an API key cannot reach
    refused: int = 0  # refused by Immich on their own (400, once isolated from their batch)


class Remediator:
    def __init__(self, config: Config, pg: PostgresSource, feed: ProblemFeed | None) -> None:
        self.config = config
        self.pg = pg
        self.feed = feed
        rem = config.remediation
        self.api = ImmichApi(config.immich)
        self.checker = Checker(config, pg) if config.media.root else None
        self.limiter = RateLimiter(rem.requests_per_second)
        self.redis = RedisSource(config.redis) if config.redis.enabled else None
        self.prefix = config.redis.prefix
        self.watch = JobWatch(self.redis, self.prefix) if self.redis is not None else None
        # Face thumbnails' confirmations: one more subscriber of the same reader, not a connection.
        self.person_watch = JobWatch(self.redis, self.prefix, PERSON_THUMBNAIL_JOB_NAMES) \
            if self.redis is not None and PERSON_KIND in rem.kinds else None
        self.requests: Counter[str] = Counter()
        self.verified: Counter[str] = Counter()
        self.ledger: Ledger | None = None
        self.confirmer: Confirmer | None = None
        self.in_flight = False  # attempts are under way: run again soon
        self._full_next = 0.0  # monotonic time of the next full round
        self._snapshot: object = None  # the problem list the last full round read
        self._last_round: float | None = None  # monotonic time the last round started
        self.clock = RetryClock()
        self.last_full = False  # was the last round a full one (else a follow-up)
        self._problems: list[Problem] = []
        self._problems_at = 0.0  # when the scan behind self._problems started
        self._scanned_at = float("-inf")
        self._owner: str | None = None
        self._owner_next = 0.0
        self._api_checked = float("-inf")
        # The face-thumbnail problems of the latest list (``person`` in ``remediation.kinds``).
        self._person_problems: list[Problem] = []

    async def close(self) -> None:
        await self.api.close()
        if self.redis is not None:
            await self.redis.close()
        if self.ledger is not None:
            self.ledger.close()
            self.ledger = None

    async def _latest_problems(self, sources: dict[str, bool | str]) -> tuple[list[Problem], float] | None:
        if self.feed is not None:
            latest = self.feed.latest()
            return (list(latest.problems), latest.started_at) if latest is not None else None
        if time.monotonic() - self._scanned_at >= float(self.config.intervals.files):
            store = ProblemStore(50_000, keep_overflow=False)
            result = await run_scan(self.pg, self.config, store)
            self._problems, self._problems_at = store.in_memory(), result.started_at
            self._scanned_at = time.monotonic()
            sources["postgres"] = True
            sources["filesystem"] = True
        return self._problems, self._problems_at

    async def _follow_jobs(self, sources: dict[str, bool | str]) -> bool:
        """Read the queue's new events; False when Redis cannot be read this round."""
        if self.watch is None:
            return False
        try:
            await self.watch.poll()
        except SourceError as exc:
            sources["redis"] = str(exc)
            return False
        sources["redis"] = True
        return True

    async def round(self) -> RoundResult:
        rem = self.config.remediation
        if self.checker is None:
            raise LedgerError("remediation needs media.root to check files before and after")
        if self.ledger is None:
            self.ledger = Ledger(rem.state_dir)
            self.confirmer = Confirmer(self.watch, self.ledger, float(rem.confirm_within), rem.max_attempts)
        ledger, out = self.ledger, RoundResult()
        # A write that changed nothing (no row matched) succeeds on a full disk too: only a round-end
        # probe says whether the ledger can be written again.
        had_failed = ledger.failed is not None
        redis_ok = await self._follow_jobs(out.sources)
        pending = self._pending()
        full = self.last_full = self._full_round()
        now_mono = time.monotonic()
        elapsed = None if self._last_round is None else now_mono - self._last_round
        self._last_round = now_mono
        if not full:
            # A follow-up: only the attempts that ended (their job finished, or their window passed)
            # and the retries that fell due since the last round.
            pending = [e for e in pending if self._settling(e, elapsed)]
        wanted, owners = await self._wanted(out.sources) if full else ({}, {})
        # Leave out what Immich already has queued and what the key may not touch *before* choosing
        # this round's share: otherwise the same first few would be picked, and skipped, every round.
        queued_ids: set[str] = set()
        # The queue is searched only when something may be asked for (its search reads up to 20,000 jobs).
        resubmittable = any(window_over(e, self.clock.since(e), rem.verify_after) for e in pending)
        if (wanted or resubmittable) and redis_ok and self.redis is not None:
            queued_ids = set((await queued_assets(self.redis, self.prefix)).assets)
        owner = await self._key_owner() if wanted else None
        fresh = self._fresh(wanted, owners, {e.asset_id for e in pending}, queued_ids, owner, out)
        ids = [*(e.asset_id for e in pending), *fresh]
        checks = await self.checker.check(ids)
        locked = await self.checker.locked(ids) if ids else set()
        out.sources["postgres"] = True
        if owner is None and (fresh or pending):
            owner = await self._key_owner()
        policy = self._policy(owner)
        candidates = await self._verify(pending, checks, locked, queued_ids, policy, out)
        entries = ledger.get(fresh)
        for a in fresh:
            d = decide(entries.get(a), self._seen(checks[a], a in locked, None),
                       self.clock.view(entries.get(a), a in queued_ids), policy)
            if d.action == SUBMIT:
                chk = checks[a]
                candidates.append(Candidate(a, set(d.kinds), chk.describe(d.kinds), reset=d.reset, owner=chk.owner_id))
            elif d.action == SKIP:
                self._count_skip(d.reason, out)
        out.pending, out.candidates = len(pending), len(candidates)
        out.submitted, out.error = await self._submit(candidates[: rem.max_per_round], out)
        out.not_queued = await self._confirm(out.submitted)
        if full and PERSON_KIND in rem.kinds and out.error is None:
            await self._people(owner, out)
        await self._check_api(out.sources)
        if had_failed or ledger.failed is not None:
            ledger.probe(time.time())
        self.in_flight = any(
            e.state in AWAITING or (e.attempts < rem.max_attempts
                                    and not window_over(e, self.clock.since(e), rem.verify_after))
            for e in self._pending()
        )
        if out.locked:
            log.info("remediation: %d locked asset(s) left out: an API key cannot reach Immich's locked folder "
                     "(regenerate them there, with the PIN)", out.locked)
        log.debug("remediation round: %s; ledger %s; problems from %s", out, ledger.counts(),
                  "own scan" if self.feed is None else "the file check")
        return out

    @property
    def asset_kinds(self) -> tuple[str, ...]:
        """``remediation.kinds`` without ``person`` (the people flow's)."""
        return tuple(k for k in self.config.remediation.kinds if k in KINDS)

    def _pending(self) -> list[Entry]:
        """The assets submitted and not settled. People's rows (kinds {"person"}) are the people flow's
        (``people.regenerate_people``): a person id is never sent as an asset's."""
        assert self.ledger is not None
        limit = max(2000, self.config.remediation.max_per_round * 4)
        return [e for e in self.ledger.entries(PENDING, limit=limit) if PERSON_KIND not in e.kinds]

    def _policy(self, owner: str | None) -> Policy:
        rem = self.config.remediation
        return Policy(max_attempts=rem.max_attempts, retry_after=float(rem.verify_after), key_owner=owner)

    def _seen(self, chk: AssetCheck, locked: bool, kinds: frozenset[str] | None) -> Seen:
        """The decision's view of a check: the configured kinds (or those already asked for) and reasons."""
        rem = self.config.remediation
        wanted = set(kinds or self.asset_kinds)
        reasons = set(rem.reasons)
        broken = chk.broken(wanted)
        return Seen(
            exists=chk.exists,
            eligible=chk.eligible,
            locked=locked,
            owner=chk.owner_id,
            broken=frozenset(k for k, _, _ in broken),
            # Asked for earlier: whatever is still broken is asked for again.
            fixable=frozenset(k for k, r, _ in broken if kinds is not None or r in reasons),
            original="original_missing" if chk.original_exists is False else "ok",
        )

    @staticmethod
    def _count_skip(reason: str, out: RoundResult) -> None:
        if reason == "queued":
            out.already_queued += 1
        elif reason == "other_owner":
            out.other_owner += 1
        elif reason == "locked":
            out.locked += 1

    def _full_round(self) -> bool:
        """Every ``remediation.interval``, and whenever the file check has a new list: every pending
        asset is checked and new problems are taken on. The rounds between are follow-ups."""
        snapshot = self.feed.latest() if self.feed is not None else None
        now = time.monotonic()
        if now < self._full_next and snapshot is self._snapshot:
            return False
        self._full_next, self._snapshot = now + float(self.config.remediation.interval), snapshot
        return True

    def _settling(self, e: Entry, elapsed: float | None) -> bool:
        """Is there something to learn about this attempt now: its job finished, or its window passed
        (a retry that fell due within the last ``elapsed`` seconds, by the monotonic clock)?"""
        retry_after = float(self.config.remediation.verify_after)
        since = self.clock.since(e)
        over = window_over(e, since, retry_after)
        if e.state in AWAITING:
            return over or attempt_over(e, self.watch)[0]
        if not over or since is None or elapsed is None:
            return over
        return not window_over(e, since - elapsed, retry_after)

    async def _wanted(self, sources: dict[str, bool | str]) -> tuple[dict[str, set[str]], dict[str, str]]:
        """The latest problems remediation may act on: asset -> kinds, asset -> owner."""
        rem = self.config.remediation
        latest = await self._latest_problems(sources)
        reasons, kinds = set(rem.reasons), set(self.asset_kinds)
        wanted: dict[str, set[str]] = {}
        owners: dict[str, str] = {}
        if latest is None:
            return wanted, owners
        problems, _ = latest
        self._person_problems = [p for p in problems if p.kind == PERSON_KIND and p.reason in reasons]
        for p in problems:
            if p.kind in kinds and p.reason in reasons and p.original_exists is not False:
                wanted.setdefault(p.asset_id, set()).add(p.kind)
                owners[p.asset_id] = p.owner_id
        return wanted, owners

    def _fresh(
        self,
        wanted: dict[str, set[str]],
        owners: dict[str, str],
        pending: set[str],
        queued_ids: set[str],
        owner: str | None,
        out: RoundResult,
    ) -> list[str]:
        """Problem assets the decision would ask for now, as the problem list shows them (never asked, due
        again, or broken again after a fix), at most twice a round's share; each is checked again before."""
        assert self.ledger is not None
        rem = self.config.remediation
        entries = self.ledger.get(wanted)
        policy = self._policy(owner)
        fresh: list[str] = []
        for a in sorted(wanted):
            if a in pending:
                continue
            e = entries.get(a)
            seen = Seen(owner=owners.get(a), broken=frozenset(wanted[a]), fixable=frozenset(wanted[a]))
            d = decide(e, seen, self.clock.view(e, a in queued_ids), policy)
            if d.action == SUBMIT:
                fresh.append(a)
            elif d.action == SKIP:
                self._count_skip(d.reason, out)
            if len(fresh) >= rem.max_per_round * 2:
                break
        return fresh

    async def _verify(
        self,
        pending: list[Entry],
        checks: dict[str, AssetCheck],
        locked: set[str],
        queued_ids: set[str],
        policy: Policy,
        out: RoundResult,
    ) -> list[Candidate]:
        """Settle what earlier rounds asked for (``decision.decide``); return those to ask for again now."""
        assert self.ledger is not None
        ledger, rem = self.ledger, self.config.remediation
        now = time.time()
        if self.watch is not None:
            for e in pending:
                if e.job_id:  # known from the ledger (an earlier process): follow its job from here on
                    self.watch.adopt(e.asset_id, e.job_id)
        kinds_of = {e.asset_id: frozenset(e.kinds or self.asset_kinds) for e in pending}
        still = [e for e in pending if checks[e.asset_id].exists and checks[e.asset_id].original_exists is not False
                 and checks[e.asset_id].broken(kinds_of[e.asset_id])]
        due = {e.asset_id for e in still if window_over(e, self.clock.since(e), float(rem.verify_after))}
        why_of = await attempt_reasons(still, self.watch, self.redis, self.prefix, due)
        again: list[Candidate] = []
        settled: list[str] = []  # still broken once their attempt was over: their originals are read
        for e in pending:
            a, chk, ek = e.asset_id, checks[e.asset_id], kinds_of[e.asset_id]
            over, why = why_of.get(a, (False, None))
            queue = self.clock.view(e, a in queued_ids, over)
            d = decide(e, self._seen(chk, a in locked, ek), queue, policy)
            detail = chk.describe(ek)
            if d.action == GIVE_UP and d.reason != "attempts_exhausted":
                ledger.give_up(a, skip_text(d.reason, short=True), now)
                self.verified["gave_up"] += 1
            elif d.action == GIVE_UP:
                if self._gave_up(e, detail, why, now):
                    settled.append(a)
            elif d.action == FIXED:
                if ledger.record(a, "fixed", detail, now) == "fixed":
                    self.verified["fixed"] += 1
            elif d.action in (SETTLE, RETRY):
                if ledger.record(a, "still_missing", detail, now, why=why) == "still_missing":
                    self.verified["still_missing"] += 1
                    settled.append(a)
                    if why is not None:
                        log.info("asset %s still %s: %s", a, detail, why.text)
                if d.action == RETRY:
                    again.append(Candidate(a, set(d.kinds), detail, owner=chk.owner_id))
            elif d.action == SUBMIT:
                again.append(Candidate(a, set(d.kinds), detail, owner=chk.owner_id))
            elif d.action == SKIP:
                self._count_skip(d.reason, out)
            elif d.action == WAIT and e.state in AWAITING:
                ledger.record(a, "waiting", detail, now, why=why)
        await self._originals(settled)
        return again

    async def _people(self, owner: str | None, out: RoundResult) -> None:
        """Face thumbnails (``people.regenerate_people``), in full rounds: under the same rate limit,
        ledger and retry clock as the assets, within what is left of ``max_per_round``."""
        rem = self.config.remediation
        if owner is None:
            owner = await self._key_owner()
        opts = PeopleOptions(
            apply=True, reasons=person_reasons(rem.reasons), rate=float(rem.requests_per_second),
            retry_after=float(rem.verify_after), max_attempts=rem.max_attempts,
            confirm_within=float(rem.confirm_within), key_owner=owner,
            limit=max(0, rem.max_per_round - out.submitted),
        )
        report = RunReport("apply")
        verified = await regenerate_people(self.config, self.pg, report, opts, problems=self._person_problems,
                                           ledger=self.ledger, api=self.api, watch=self.person_watch,
                                           clock=self.clock,
                                           limiter=self.limiter)
        self.requests.update(report.requests)
        self.verified.update(verified)
        people = report.requests["accepted"]
        out.submitted += people
        out.not_queued += verified["not_queued"]
        if people or report.requests:
            out.sources["immich_api"] = True if report.requests["error"] == 0 else "face thumbnail requests failed"

    async def _originals(self, ids: list[str]) -> None:
        """The assets that just settled still broken: each one's original read once; a broken one is why
        (``Ledger.explain``). Only those few are read, never the library."""
        if not ids or self.checker is None or self.ledger is None:
            return
        try:
            schema, mapper = await self.checker.prepare()
            verdicts = await check_originals(self.pg, schema, mapper, ids)
        except (SourceError, asyncpg.PostgresError, OSError, TimeoutError) as exc:
            log.info("cannot check the originals of %d asset(s) still broken: %s", len(ids), exc)
            return
        whys = {a: why for a, v in verdicts.items() if (why := why_of(v)) is not None}
        for a, why in whys.items():
            log.info("asset %s: %s", a, why.text)
        if whys:
            self.verified["gave_up"] += len(give_up_on_originals(whys, self.ledger, self.clock,
                                                                 self._policy(self._owner)))
            self.ledger.explain(whys, time.time())

    def _gave_up(self, e: Entry, detail: str, why: Why | None, now: float) -> bool:
        assert self.ledger is not None
        if e.state in RETRYABLE:
            self.ledger.give_up(e.asset_id, f"{detail} after {e.attempts} attempt(s)", now)
        elif self.ledger.record(e.asset_id, "gave_up", detail, now, why=why) != "gave_up":
            return False
        self.verified["gave_up"] += 1
        if why is not None:
            log.info("asset %s still %s: %s", e.asset_id, detail, why.text)
        return True

    async def _confirm(self, submitted: int) -> int:
        """Wait for the jobs of this round's requests; count what Immich queued nothing for."""
        if not submitted or self.confirmer is None:
            return 0
        _, outcomes = await self.confirmer.settle()
        if self.confirmer.error is not None:
            log.info("cannot confirm that Immich queued the jobs: %s", self.confirmer.error)
        for outcome in outcomes.values():
            self.verified[outcome] += 1
        if outcomes:
            log.warning("Immich accepted the request but queued nothing for %d asset(s): %s", len(outcomes),
                        ", ".join(sorted(outcomes)))
        return sum(1 for o in outcomes.values() if o == "not_queued")

    async def _check_api(self, sources: dict[str, bool | str]) -> None:
        """The API's state when no request said it this round, at most once per ``remediation.interval``."""
        if "immich_api" in sources or time.monotonic() - self._api_checked < float(self.config.remediation.interval):
            return
        self._api_checked = time.monotonic()
        try:
            await asyncio.wait_for(self.api.ping(), float(self.config.immich.timeout) + 5)
            sources["immich_api"] = True
        except ApiError as exc:
            sources["immich_api"] = str(exc)
        except TimeoutError:
            sources["immich_api"] = "did not answer in time"

    async def _key_owner(self) -> str | None:
        """The API key's user, asked once an hour; None when the key may not read it."""
        if time.monotonic() < self._owner_next:
            return self._owner
        self._owner_next = time.monotonic() + 3600.0
        try:
            self._owner = await asyncio.wait_for(self.api.me(), float(self.config.immich.timeout) + 5)
        except (ApiError, TimeoutError) as exc:
            log.info("cannot tell which Immich user the API key belongs to (%s): requests go one owner at a time",
                     exc)
            self._owner = None
        return self._owner

    async def _submit(self, chosen: list[Candidate], out: RoundResult) -> tuple[int, str | None]:
        assert self.ledger is not None and self.confirmer is not None
        rem = self.config.remediation
        sources = out.sources
        submitted = 0
        error: str | None = None
        if chosen:
            # A round after Redis trouble confirms again: the watch reconnects with the source.
            self.confirmer.watch, self.confirmer.error = self.watch, None
            await self.confirmer.start()
            if self.confirmer.error is not None:
                sources["redis"] = self.confirmer.error
        for batch in by_owner(chosen, rem.batch_size):
            await self.confirmer.meanwhile(self.limiter.delay())
            outcome = await submit_batch(
                self.api, self.ledger, {c.asset_id: c.kinds for c in batch}, max_attempts=rem.max_attempts,
                reset=[c.asset_id for c in batch if c.reset], pace=self.limiter.acquire,
            )
            if outcome.result == "none":
                continue
            self.requests.update(outcome.requests)
            for a in outcome.submitted:
                self.clock.requested(a, outcome.claimed_at)
            if outcome.refused:
                out.refused += len(outcome.refused)
                sources["immich_api"] = True
                log.warning("Immich refused %d asset(s) on their own: %s", len(outcome.refused),
                            "; ".join(f"{a}: {m}" for a, m in sorted(outcome.refused.items())))
            if outcome.submitted:
                submitted += len(outcome.submitted)
                self.confirmer.accepted(outcome.submitted)
                sources["immich_api"] = True
            if outcome.ledger_error is not None:
                raise LedgerError(f"{outcome.ledger_error} ({len(outcome.submitted)} asset(s) sent before it "
                                  "filled are recorded)")
            if outcome.error is None:
                continue
            error = f"immich_api: {outcome.error}{auth_hint(outcome.error)}"
            if outcome.requests["error"] == 0 and not isinstance(outcome.error, ApiAuthError):
                sources["immich_api"] = True  # a 4xx for this batch: the others may still go through
                continue
            # 403 says the key lacks a permission: the API itself is up, the collection failed.
            sources["immich_api"] = True if outcome.error.status == 403 else str(outcome.error)
            break
        return submitted, error
