"""The first half of a ``regenerate`` run: select the problem assets, check each again, and decide what
to ask for, what to skip (with the reason), and what an earlier run already asked for.

``RunState`` holds the run's connections, ledger and report; ``Selector`` reads and checks, and hands each
asset to ``decision.decide``, the one decision ``serve``'s rounds use too; ``engine.Regenerator`` holds
the same ``RunState`` and submits and verifies. Neither inherits from the other.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from immich_thumbnail_exporter.config import Config
from immich_thumbnail_exporter.findings import Problem, ProblemStore
from immich_thumbnail_exporter.remediation.check import AssetCheck, Checker, valid_asset_id
from immich_thumbnail_exporter.remediation.decision import (
    FIXED,
    GAVE_UP,
    GIVE_UP,
    RETRY,
    SETTLE,
    SKIP,
    SUBMIT,
    WAIT,
    Decision,
    Policy,
    RetryClock,
    Seen,
    decide,
)
from immich_thumbnail_exporter.remediation.jobwatch import JobWatch
from immich_thumbnail_exporter.remediation.ledger import AWAITING, PENDING, Entry, Ledger
from immich_thumbnail_exporter.remediation.report import Row, RunReport
from immich_thumbnail_exporter.remediation.submit import Candidate
from immich_thumbnail_exporter.remediation.why import SKIP_TEXT, ago, diagnose, skip_text
from immich_thumbnail_exporter.scan.run import run_scan
from immich_thumbnail_exporter.sources.bullmq_queue import queued_assets
from immich_thumbnail_exporter.sources.immich_api import ApiError, ImmichApi
from immich_thumbnail_exporter.sources.postgres import PostgresSource
from immich_thumbnail_exporter.sources.redis import RedisSource
from immich_thumbnail_exporter.vocabulary import KINDS, PERSON_KIND, PERSON_THUMBNAIL_JOB_NAMES, REASONS


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
    def asset_kinds(self) -> tuple[str, ...]:
        """The asset kinds asked for (``person`` is the people flow's, ``remediation/people.py``)."""
        return tuple(k for k in self.kinds if k in KINDS)

    @property
    def people(self) -> bool:
        """Face thumbnails asked for (``--kind person``)."""
        return PERSON_KIND in self.kinds

    @property
    def deadline_seconds(self) -> float:
        if self.timeout is not None:
            return self.timeout
        # Every attempt's window (doubling), plus a minute for the last check.
        return self.retry_after * ((1 << self.max_attempts) - 1) + 60.0

    @property
    def poll_interval(self) -> float:
        return min(5.0, max(0.2, self.retry_after / 10))


@dataclass
class RunState:
    """A run's connections, ledger, report and what it follows: shared by ``Selector`` and the engine."""

    config: Config
    opts: Options
    pg: PostgresSource
    checker: Checker
    api: ImmichApi | None
    redis: RedisSource | None
    prefix: str
    watch: JobWatch | None
    report: RunReport
    # ``--kind person``'s confirmations: a watch of ``PersonGenerateThumbnail`` jobs on the same reader.
    person_watch: JobWatch | None = None
    ledger: Ledger | None = None
    clock: RetryClock = field(default_factory=RetryClock)
    # Submitted, awaiting verification -> kinds.
    tracked: dict[str, set[str]] = field(default_factory=dict)
    # The API key's user, once asked (None: cannot tell).
    key_owner: str | None = None
    # The scan's face-thumbnail problems, for the people flow (``--kind person``).
    person_problems: list[Problem] = field(default_factory=list)

    @classmethod
    def open(cls, config: Config, opts: Options) -> RunState:
        pg = PostgresSource(config.database)
        redis = RedisSource(config.redis) if config.redis.enabled else None
        return cls(
            config=config,
            opts=opts,
            pg=pg,
            checker=Checker(config, pg),
            api=ImmichApi(config.immich) if opts.apply else None,
            redis=redis,
            prefix=config.redis.prefix,
            watch=JobWatch(redis, config.redis.prefix) if redis is not None and opts.apply else None,
            report=RunReport("apply" if opts.apply else "dry_run"),
            person_watch=JobWatch(redis, config.redis.prefix, PERSON_THUMBNAIL_JOB_NAMES)
            if redis is not None and opts.apply and opts.people else None,
        )

    def policy(self) -> Policy:
        opts = self.opts
        return Policy(max_attempts=opts.max_attempts, retry_after=opts.retry_after,
                      retry_gave_up=opts.retry_gave_up, key_owner=self.key_owner)

    def seen(self, chk: AssetCheck, kinds: set[str], select_reasons: set[str], submit_reasons: set[str],
             locked: bool) -> Seen:
        broken = [b for b in chk.broken(kinds) if b[1] in select_reasons]
        return Seen(
            exists=chk.exists,
            eligible=chk.eligible,
            locked=locked,
            owner=chk.owner_id,
            broken=frozenset(k for k, _, _ in broken),
            fixable=frozenset(k for k, r, _ in broken if r in submit_reasons),
            original="original_missing" if chk.original_exists is False else "ok",
        )

    def track_waiting(self, a: str, entry: Entry, problems: str, now: float) -> None:
        since = self.clock.since(entry) or 0.0
        left = entry.window(self.opts.retry_after) - since
        detail = (f"asked {ago(since)} ago (attempt {entry.attempts} of {self.opts.max_attempts}); "
                  f"next request not before {ago(left)} from now")
        self.report.set(Row(a, "waiting", problems, tuple(sorted(entry.kinds)), entry.attempts, detail))
        if entry.state in AWAITING:
            self.tracked[a] = set(entry.kinds) or set(self.opts.asset_kinds)
            if self.watch is not None and entry.job_id:
                self.watch.adopt(a, entry.job_id)

    async def close(self) -> None:
        if self.api is not None:
            await self.api.close()
        if self.redis is not None:
            await self.redis.close()
        await self.pg.close()
        if self.ledger is not None:
            self.ledger.close()


class Selector:
    """Select the problem assets, check each again, and decide (``decision.decide``) about each."""

    def __init__(self, run: RunState) -> None:
        self.run = run

    async def scan(self) -> dict[str, list[Problem]]:
        run = self.run
        # Headers are always checked here: a corrupt preview is as broken as a missing one.
        config = dataclasses.replace(run.config, checks=dataclasses.replace(run.config.checks, verify_headers=True))
        store = ProblemStore()
        deadline = float(run.config.intervals.files)
        try:
            try:
                # The same deadline as serve's file check: a scan that never ends is an outage, not a result.
                result = await asyncio.wait_for(run_scan(run.pg, config, store), deadline)
            except TimeoutError:
                raise Failure(f"the scan did not finish within intervals.files ({deadline:.0f}s)") from None
            select_reasons = set(run.opts.reasons or REASONS)
            kinds = set(run.opts.asset_kinds)
            wanted = set(run.opts.assets)
            by_asset: dict[str, list[Problem]] = {}
            for p in result.problems:
                if p.reason not in select_reasons or (wanted and p.asset_id not in wanted):
                    continue
                if p.kind in kinds:
                    by_asset.setdefault(p.asset_id, []).append(p)
                elif p.kind == PERSON_KIND and run.opts.people:
                    run.person_problems.append(p)
            run.report.problems_total = result.problems.total
            run.report.assets_with_problems = len({p.asset_id for p in result.problems})
        finally:
            store.close()
        return by_asset

    async def select(self) -> list[Candidate]:
        run = self.run
        opts, report = run.opts, run.report
        by_asset = await self.scan()
        ids = list(dict.fromkeys([*sorted(by_asset), *opts.assets]))
        for a in ids:
            if not valid_asset_id(a):
                report.set(Row(a, "skipped", detail=SKIP_TEXT["invalid_id"], reason="invalid_id"))
        ids = [a for a in ids if valid_asset_id(a)]
        # A person's row (an id given with --asset) is not an asset's entry.
        entries = {a: e for a, e in (run.ledger.get(ids) if run.ledger else {}).items() if PERSON_KIND not in e.kinds}
        earlier = self._earlier_pending(set(ids))
        checks = await run.checker.check([*ids, *earlier])
        self._settle_earlier(earlier, checks)
        locked = await run.checker.locked(ids) if ids else set()
        if ids:
            await self.ask_key_owner()
        queued = await self._queued(ids)
        select_reasons = set(opts.reasons or REASONS)
        submit_reasons = set(opts.reasons or run.config.remediation.reasons)
        policy = run.policy()
        now = time.time()
        candidates: list[Candidate] = []
        waiting_in_queue: dict[str, tuple[Candidate, str]] = {}
        for a in ids:
            chk, entry = checks[a], entries.get(a)
            seen = run.seen(chk, set(opts.asset_kinds), select_reasons, submit_reasons, a in locked)
            queue = run.clock.view(entry, a in queued if queued is not None else None)
            d = decide(entry, seen, queue, policy)
            cand = self._act(a, chk, entry, d, now)
            if cand is not None:
                candidates.append(cand)
            elif d.action == SKIP and d.reason == "queued" and queued is not None:
                waiting_in_queue[a] = (Candidate(a, set(seen.fixable), _problems(chk, seen)), queued[a])
        await self._explain_queued(waiting_in_queue)
        return candidates

    def _act(self, a: str, chk: AssetCheck, entry: Entry | None, d: Decision, now: float) -> Candidate | None:
        """Report (and, with --apply, record) one decision; the candidate to submit, if any."""
        run = self.run
        opts, report, ledger = run.opts, run.report, run.ledger if run.opts.apply else None
        attempts = entry.attempts if entry else 0
        seen_kinds = set(opts.asset_kinds)
        problems = chk.describe(seen_kinds) if chk.exists and chk.broken(seen_kinds) else ""
        kinds = tuple(sorted(d.kinds or (entry.kinds if entry else frozenset())))
        if d.action == SKIP:
            if d.reason in ("queued",):
                return None  # explained once the queue was read (``_explain_queued``)
            detail = skip_text(d.reason, chk)
            if d.reason == "refused" and entry is not None and entry.detail:
                detail = (f"{detail}: {entry.detail} (at an earlier request; asked again once "
                          f"{ago(opts.retry_after)} have passed)")
            report.set(Row(a, "skipped", problems if d.reason != "nothing_to_fix" else "", kinds if problems else (),
                           attempts, detail, reason=d.reason))
            return None
        if d.action == GIVE_UP and d.reason != "attempts_exhausted":
            # Regeneration cannot help any more: skipped, and the attempt under way given up.
            if ledger is not None:
                ledger.give_up(a, skip_text(d.reason, chk, short=True), now)
            report.set(Row(a, "skipped", problems, (), attempts, skip_text(d.reason, chk), reason=d.reason))
            return None
        if d.action == GIVE_UP:
            assert entry is not None
            reason = f"{problems} after {entry.attempts} attempt(s)"
            if ledger is not None:
                if entry.state in AWAITING:
                    ledger.record(a, "gave_up", problems, now)
                else:
                    ledger.give_up(a, reason, now)
            report.set(Row(a, "gave_up", problems, kinds, attempts, reason, reason="attempts_exhausted"))
            return None
        if d.action == GAVE_UP:
            assert entry is not None
            report.set(Row(a, "gave_up", problems, tuple(sorted(entry.kinds)), attempts,
                           f"{entry.gave_up_reason or 'gave up'} (earlier run; --retry-gave-up to try again)",
                           reason=d.reason))
            return None
        if d.action == FIXED:
            if ledger is not None:
                ledger.record(a, "fixed", "all files present", now)
            report.set(Row(a, "fixed", attempts=attempts, detail="fixed since an earlier run asked"))
            return None
        assert d.action in (WAIT, SETTLE, RETRY, SUBMIT), d
        if d.action in (SETTLE, RETRY) and ledger is not None:
            ledger.record(a, "still_missing", problems, now)
        if d.action in (WAIT, SETTLE):
            assert entry is not None
            run.track_waiting(a, entry, problems, now)
            return None
        return Candidate(a, set(d.kinds), problems, reset=d.reset, owner=chk.owner_id)

    def _earlier_pending(self, selected: set[str]) -> list[str]:
        """Assets an earlier run submitted that this run did not select (fixed since, or filtered out)."""
        if self.run.ledger is None:
            return []
        # People's rows (kinds {"person"}) are the people flow's: a person id is never sent as an asset's.
        return [e.asset_id for e in self.run.ledger.entries(PENDING)
                if e.asset_id not in selected and PERSON_KIND not in e.kinds]

    def _settle_earlier(self, earlier: Sequence[str], checks: dict[str, AssetCheck]) -> None:
        run = self.run
        if not earlier or run.ledger is None:
            return
        entries = run.ledger.get(earlier)
        for a in earlier:
            entry, chk = entries.get(a), checks[a]
            if entry is None or not chk.exists:
                continue
            kinds = entry.kinds or set(KINDS)
            if chk.broken(kinds):
                continue  # not selected by this run's filters: left for a run that selects it
            if run.opts.apply:
                run.ledger.record(a, "fixed", chk.describe(kinds), time.time())
            run.report.set(Row(a, "fixed", kinds=tuple(sorted(kinds)), attempts=entry.attempts,
                               detail="fixed since an earlier run asked"))

    async def _queued(self, ids: list[str]) -> dict[str, str] | None:
        """Asset -> the job already waiting for it in the thumbnail queue; None without Redis."""
        run = self.run
        if run.redis is None or not ids:
            return None
        view = await queued_assets(run.redis, run.prefix)
        if not view.complete:
            run.report.notes.append(
                f"the thumbnail queue holds {view.jobs} jobs; only the next {view.checked} were checked for "
                "assets already waiting"
            )
        return {a: view.assets[a].job_id for a in ids if a in view.assets}

    async def _explain_queued(self, queued: dict[str, tuple[Candidate, str]]) -> None:
        run = self.run
        if not queued:
            return
        whys = await diagnose(run.redis, run.prefix, {a: job for a, (_, job) in queued.items()})
        for a, (c, _) in queued.items():
            why = whys[a]
            run.report.set(Row(a, "skipped", c.problems, tuple(sorted(c.kinds)),
                               detail=f"{SKIP_TEXT['queued']}: {why.text}", why=why.code, reason="queued"))

    async def ask_key_owner(self) -> None:
        """Which user the API key belongs to: Immich refuses a request naming another user's assets."""
        run = self.run
        if not run.config.immich.enabled:
            return
        api = run.api or ImmichApi(run.config.immich)
        try:
            run.key_owner = await asyncio.wait_for(api.me(), float(run.config.immich.timeout) + 5)
        except (ApiError, TimeoutError) as exc:
            why = str(exc) if isinstance(exc, ApiError) else "no answer in time"
            run.report.notes.append(
                f"cannot tell which Immich user the API key belongs to ({why}): Immich refuses a request "
                "naming another user's assets, so requests are sent one owner at a time"
            )
        finally:
            if api is not run.api:
                await api.close()


def _problems(chk: AssetCheck, seen: Seen) -> str:
    return chk.describe(seen.broken) if seen.broken else ""
