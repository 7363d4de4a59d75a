"""The first half of a ``regenerate`` run: select the problem assets, check each again, and decide what
to ask for, what to skip (with the reason), and what an earlier run already asked for.

``Selection`` holds the run's connections and report; ``engine.Regenerator`` adds submission and
verification.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass

from immich_thumbnail_exporter.config import Config
from immich_thumbnail_exporter.findings import Problem, ProblemStore
from immich_thumbnail_exporter.remediation.check import AssetCheck, Checker, valid_asset_id
from immich_thumbnail_exporter.remediation.jobwatch import JobWatch
from immich_thumbnail_exporter.remediation.ledger import AWAITING, PENDING, RETRYABLE, Entry, Ledger
from immich_thumbnail_exporter.remediation.report import Row, RunReport
from immich_thumbnail_exporter.remediation.submit import OTHER_OWNER, Candidate
from immich_thumbnail_exporter.remediation.why import SKIP_TEXT, ago, diagnose
from immich_thumbnail_exporter.scan.run import run_scan
from immich_thumbnail_exporter.sources.bullmq_queue import queued_assets
from immich_thumbnail_exporter.sources.immich_api import ApiError, ImmichApi
from immich_thumbnail_exporter.sources.postgres import PostgresSource
from immich_thumbnail_exporter.sources.redis import RedisSource
from immich_thumbnail_exporter.vocabulary import KINDS, REASONS


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


class Selection:
    """A run's connections, its report, and the selection of what to ask for."""

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
        self.report = RunReport("apply" if opts.apply else "dry_run")
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
