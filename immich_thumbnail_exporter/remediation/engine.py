"""``regenerate``: ask Immich to regenerate the problem assets' thumbnails, and make sure it happened.

Immich's ``POST /api/assets/jobs`` answers 204 when it *accepted* a request; that says nothing about a
worker ever producing the files. So this command:

1. runs a fresh scan (headers always verified) and selects problem assets by kind and reason;
2. checks each selected asset again (rows and files, ``remediation.Checker``) and skips, with the reason,
   what regeneration cannot fix: the original is gone, the asset is not in the database (any more), it
   is trashed or hidden, or the file is merely unreadable to the exporter;
3. skips assets whose thumbnail job is already waiting in the queue (when Redis is configured);
4. submits the rest in batches under a rate limit, recording each submission in the ledger first;
5. with ``--wait``, checks the submitted assets until they are fixed or the deadline passes, resubmits
   what is still broken once its waiting window is over (doubling each time), and gives up after the
   attempt limit, with the reason.

Dry run unless ``--apply``. Exit 0 when everything selected was fixed or skipped (or, without
``--wait``, submitted), 1 when something is still broken or was given up, 2 on a configuration,
connection or API error.

``RemediationCollection`` does the same, a bounded amount per round, under ``serve`` when
``remediation.enabled`` is set.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from immich_thumbnail_exporter.collectors.base import Outcome
from immich_thumbnail_exporter.config import Config, parse_duration
from immich_thumbnail_exporter.exposition.metrics import counter
from immich_thumbnail_exporter.exposition.store import Part
from immich_thumbnail_exporter.model import Problem, ProblemFeed, ProblemStore
from immich_thumbnail_exporter.remediation.check import (
    REASON_TEXT,
    AssetCheck,
    BatchOutcome,
    Checker,
    QueueView,
    RateLimiter,
    queued_assets,
    submit_batch,
    valid_asset_id,
)
from immich_thumbnail_exporter.remediation.ledger import AWAITING, RETRYABLE, Entry, Ledger, LedgerError
from immich_thumbnail_exporter.scan.run import run_scan
from immich_thumbnail_exporter.sources.immich_api import ApiAuthError, ApiError, ImmichApi
from immich_thumbnail_exporter.sources.postgres import PostgresSource, SourceError
from immich_thumbnail_exporter.sources.schema import SchemaError
from immich_thumbnail_exporter.vocabulary import KINDS, REASONS

log = logging.getLogger(__name__)

EXIT_OK, EXIT_BROKEN, EXIT_ERROR = 0, 1, 2
# Results a row of the report can have.
RESULTS = ("fixed", "still_broken", "gave_up", "skipped", "submitted", "waiting", "would_submit", "not_submitted")
BROKEN_RESULTS = ("still_broken", "gave_up")
# A failed request (5xx, network) is retried this many times, after these pauses, before the run stops.
REQUEST_RETRY_DELAYS = (0.5, 1.0, 2.0)


class Failure(Exception):
    """A configuration, connection or API problem: one line, exit 2."""


# -- command line ----------------------------------------------------------------------------------


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("regenerate")
    g.add_argument("--apply", action="store_true",
                   help="really ask Immich (otherwise a dry run that prints what it would do)")
    g.add_argument("--kind", action="append", choices=KINDS, metavar="KIND",
                   help="only problems of this kind: thumbnail, preview, fullsize (repeatable; default all)")
    g.add_argument("--reason", action="append", choices=REASONS, metavar="REASON",
                   help="only problems with this reason (repeatable; default all; file_unreadable is only "
                   "submitted when named here)")
    g.add_argument("--asset", action="append", metavar="ID", help="only this asset (repeatable)")
    g.add_argument("--limit", type=int, metavar="N", help="submit at most N assets in this run")
    g.add_argument("--batch-size", type=int, metavar="N",
                   help="assets per request (default remediation.batch_size)")
    g.add_argument("--rate", type=float, metavar="R",
                   help="requests per second (default remediation.requests_per_second)")
    g.add_argument("--wait", action="store_true",
                   help="verify: check the files until fixed or --timeout, retrying what is still broken")
    g.add_argument("--timeout", type=_duration, metavar="DURATION",
                   help="verification deadline with --wait (default: long enough for every attempt)")
    g.add_argument("--max-attempts", type=int, metavar="N",
                   help="give up on an asset after N requests (default remediation.max_attempts)")
    g.add_argument("--retry-after", type=_duration, metavar="DURATION",
                   help="wait this long after a request before calling it failed and retrying; doubles "
                   "with each attempt (default remediation.verify_after)")
    g.add_argument("--retry-gave-up", action="store_true",
                   help="try again assets an earlier run gave up on")
    g.add_argument("--format", choices=("table", "json"), default="table")
    g.add_argument("--state-dir", metavar="DIR",
                   help="where the ledger of requests is kept (default remediation.state_dir)")


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

    @classmethod
    def from_args(cls, config: Config, args: argparse.Namespace) -> Options:
        rem = config.remediation
        def flag(name: str, default: Any) -> Any:
            given = getattr(args, name, None)
            return default if given is None else given

        opts = cls(
            apply=bool(flag("apply", False)),
            kinds=tuple(dict.fromkeys(args.kind)) if getattr(args, "kind", None) else KINDS,
            reasons=tuple(dict.fromkeys(args.reason)) if getattr(args, "reason", None) else None,
            assets=tuple(dict.fromkeys(args.asset)) if getattr(args, "asset", None) else (),
            limit=flag("limit", None),
            batch_size=flag("batch_size", rem.batch_size),
            rate=flag("rate", rem.requests_per_second),
            wait=bool(flag("wait", False)),
            timeout=flag("timeout", None),
            max_attempts=flag("max_attempts", rem.max_attempts),
            retry_after=float(flag("retry_after", rem.verify_after)),
            retry_gave_up=bool(flag("retry_gave_up", False)),
            state_dir=flag("state_dir", rem.state_dir),
            format=flag("format", "table"),
        )
        problems = []
        if opts.limit is not None and opts.limit < 1:
            problems.append("--limit: expected 1 or more")
        if not 1 <= opts.batch_size <= 1000:
            problems.append("--batch-size: expected 1 to 1000")
        if opts.rate <= 0:
            problems.append("--rate: expected a positive number")
        if opts.max_attempts < 1:
            problems.append("--max-attempts: expected 1 or more")
        if problems:
            raise Failure("; ".join(problems))
        return opts

    @property
    def deadline_seconds(self) -> float:
        if self.timeout is not None:
            return self.timeout
        # Every attempt's window (doubling), plus a minute for the last check.
        return self.retry_after * ((1 << self.max_attempts) - 1) + 60.0

    @property
    def poll_interval(self) -> float:
        return min(5.0, max(0.2, self.retry_after / 10))


# -- the report ------------------------------------------------------------------------------------


@dataclass
class Row:
    asset_id: str
    result: str
    problems: str = ""
    kinds: tuple[str, ...] = ()
    attempts: int = 0
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "asset_id": self.asset_id,
            "result": self.result,
            "problems": self.problems,
            "kinds": list(self.kinds),
            "attempts": self.attempts,
            "detail": self.detail,
        }


@dataclass
class RunReport:
    mode: str
    problems_total: int = 0
    assets_with_problems: int = 0
    rows: dict[str, Row] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    requests: Counter[str] = field(default_factory=Counter)

    def set(self, row: Row) -> None:
        self.rows[row.asset_id] = row

    def counts(self) -> dict[str, int]:
        c = Counter(r.result for r in self.rows.values())
        return {k: c[k] for k in RESULTS}

    def exit_code(self) -> int:
        if self.errors:
            return EXIT_ERROR
        if any(r.result in BROKEN_RESULTS for r in self.rows.values()):
            return EXIT_BROKEN
        return EXIT_OK

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "summary": {
                "problems": self.problems_total,
                "assets_with_problems": self.assets_with_problems,
                "assets_listed": len(self.rows),
                **self.counts(),
                "requests": {k: self.requests[k] for k in ("accepted", "rejected", "error")},
            },
            "assets": [r.to_dict() for r in sorted(self.rows.values(), key=_row_order)],
            "errors": list(self.errors),
            "notes": list(self.notes),
        }


def _row_order(row: Row) -> tuple[int, str]:
    return RESULTS.index(row.result), row.asset_id


def write_json(report: RunReport, out: TextIO) -> None:
    json.dump(report.to_dict(), out, indent=2)
    out.write("\n")


def write_table(report: RunReport, out: TextIO) -> None:
    w = out.write
    if report.mode == "dry_run":
        w("Regeneration: dry run, nothing submitted (add --apply to ask Immich)\n")
    else:
        w("Regeneration: applied\n")
    w(f"Scan: {report.problems_total} problem(s) on {report.assets_with_problems} asset(s)\n")
    for note in report.notes:
        w(f"Note: {note}\n")
    if report.rows:
        w(f"\n{'ASSET':<36}  {'RESULT':<13}  {'TRIES':>5}  {'PROBLEMS':<32}  DETAIL\n")
        for row in sorted(report.rows.values(), key=_row_order):
            w(f"{row.asset_id:<36}  {row.result:<13}  {row.attempts:>5}  {row.problems or '-':<32}  {row.detail}\n")
    c = report.counts()
    w(f"\nFixed {c['fixed']}, still broken {c['still_broken']}, gave up {c['gave_up']}, skipped {c['skipped']}")
    if report.mode == "dry_run":
        w(f", would submit {c['would_submit']}, waiting {c['waiting']}\n")
    else:
        w(f", submitted (not verified) {c['submitted']}, waiting {c['waiting']}, "
          f"not submitted {c['not_submitted']}\n")
    for error in report.errors:
        w(f"Error: {error}\n")


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


# -- the run ---------------------------------------------------------------------------------------


@dataclass
class Candidate:
    asset_id: str
    kinds: set[str]
    problems: str
    reset: bool = False
    owner: str | None = None


def by_owner(candidates: Sequence[Candidate], size: int) -> list[list[Candidate]]:
    """Batches that never mix owners: Immich refuses a whole request when one asset is not the key's."""
    groups: dict[str | None, list[Candidate]] = {}
    for c in candidates:
        groups.setdefault(c.owner, []).append(c)
    return [chunk for group in groups.values() for chunk in _chunks(group, size)]


def _auth_hint(exc: ApiError) -> str:
    if exc.status == 401:
        return ": check immich.api_key (IMMICH_API_KEY)"
    if exc.status == 403:
        return ": the API key needs the job.create permission (or all permissions)"
    return ""


OTHER_OWNER = ("owned by another Immich user: Immich lets an API key regenerate only its own user's assets "
               "(run again with that user's key)")


class Regenerator:
    """One ``regenerate`` run. Holds the connections; ``close()`` releases them."""

    def __init__(self, config: Config, opts: Options) -> None:
        self.config = config
        self.opts = opts
        self.pg = PostgresSource(config.database)
        self.checker = Checker(config, self.pg)
        self.api = ImmichApi(config.immich) if opts.apply else None
        self.ledger: Ledger | None = None
        self.report = RunReport("apply" if opts.apply else "dry_run")
        self.limiter = RateLimiter(opts.rate)
        self.tracked: dict[str, set[str]] = {}  # submitted, awaiting verification -> kinds

    async def close(self) -> None:
        if self.api is not None:
            await self.api.close()
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
                self.report.set(Row(a, "skipped", detail=REASON_TEXT["invalid_id"]))
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
        return [e.asset_id for e in self.ledger.entries((*AWAITING, "still_missing")) if e.asset_id not in selected]

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
            report.set(Row(a, "skipped", attempts=attempts, detail=REASON_TEXT["not_in_database"]))
            self._give_up(entry, REASON_TEXT["not_in_database"], now)
            return None
        if not chk.eligible:
            report.set(Row(a, "skipped", attempts=attempts, detail=REASON_TEXT["not_eligible"]))
            return None
        broken = [b for b in chk.broken(opts.kinds) if b[1] in select_reasons]
        problems = ", ".join(sorted({f"{k} {r}" for k, r, _ in broken}))
        if chk.original_exists is False:
            detail = f"{REASON_TEXT['original_missing']} ({chk.original_path})"
            report.set(Row(a, "skipped", problems, attempts=attempts, detail=detail))
            self._give_up(entry, "original file is missing", now)
            return None
        if not broken:
            if entry is not None and entry.state in (*AWAITING, "still_missing"):
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
            text = "; ".join(REASON_TEXT.get(r, f"{r} is not submitted (name it with --reason)") for r in reasons)
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
        detail = (f"asked {_ago(now - (entry.last_submitted or now))} ago (attempt {entry.attempts} of "
                  f"{self.opts.max_attempts}); next request not before {_ago(due - now)} from now")
        self.report.set(Row(a, "waiting", problems, tuple(sorted(entry.kinds)), entry.attempts, detail))
        if entry.state in AWAITING:
            self.tracked[a] = set(entry.kinds) or set(self.opts.kinds)

    def _give_up(self, entry: Entry | None, reason: str, now: float, *, force: bool = False) -> None:
        if self.ledger is None or not self.opts.apply or entry is None:
            return
        if force or entry.state in (*AWAITING, *RETRYABLE):
            self.ledger.give_up(entry.asset_id, reason, now)

    async def skip_queued(self, candidates: list[Candidate]) -> list[Candidate]:
        if not self.config.redis.enabled or not candidates:
            return candidates
        view = await queued_assets(self.config.redis)
        if not view.complete:
            self.report.notes.append(
                f"the thumbnail queue holds {view.jobs} jobs; only the newest {view.checked} were checked for "
                "assets already waiting"
            )
        out = []
        for c in candidates:
            state = view.assets.get(c.asset_id)
            if state is None:
                out.append(c)
                continue
            self.report.set(Row(c.asset_id, "skipped", c.problems, tuple(sorted(c.kinds)),
                                detail=f"{REASON_TEXT['queued']} ({state})"))
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
                self.report.set(Row(c.asset_id, "skipped", c.problems, tuple(sorted(c.kinds)), detail=OTHER_OWNER))
        return out

    # -- submission --------------------------------------------------------------------------------
    async def submit(self, candidates: list[Candidate]) -> bool:
        """Submit in batches under the rate limit; False when the API stopped the run.

        A refused batch (400: e.g. an asset the key may not touch) does not stop the others; a rejected
        key (401/403) or an API that keeps failing (5xx, network, after retries) stops the run.
        """
        assert self.api is not None and self.ledger is not None
        opts = self.opts
        batches = by_owner(candidates, opts.batch_size)
        for n, batch in enumerate(batches, 1):
            outcome = await self._submit_one(batch)
            if outcome.error is not None:
                stop = outcome.result == "error" or isinstance(outcome.error, ApiAuthError)
                message = str(outcome.error) + _auth_hint(outcome.error)
                if message not in self.report.errors:
                    self.report.errors.append(message)
                for rest in batches[n - 1 :] if stop else [batch]:
                    for c in rest:
                        if c.asset_id not in self.tracked:
                            self.report.set(Row(c.asset_id, "not_submitted", c.problems, tuple(sorted(c.kinds)),
                                                detail=f"request {outcome.result}: {outcome.error}"))
                if stop:
                    return False
                continue
            log.info("regeneration request %d of %d: %d asset(s) accepted", n, len(batches), len(outcome.submitted))
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
        return True

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

    # -- verification ------------------------------------------------------------------------------
    async def wait(self) -> None:
        """Check the submitted assets until each is fixed or given up, or the deadline passes."""
        assert self.ledger is not None
        opts = self.opts
        loop = asyncio.get_running_loop()
        deadline = loop.time() + opts.deadline_seconds
        while self.tracked and loop.time() < deadline:
            await asyncio.sleep(max(0.0, min(opts.poll_interval, deadline - loop.time())))
            try:
                if not await self._poll():
                    break
            except (SourceError, SchemaError) as exc:
                # Lost the database or Redis while waiting: report what is known, as still broken.
                line = _source_line(exc)
                if line not in self.report.errors:
                    self.report.errors.append(line)
                break
        self._finish_wait()

    async def _poll(self) -> bool:
        """One verification pass; False when the API stopped the run."""
        assert self.ledger is not None
        opts = self.opts
        checks = await self.checker.check(list(self.tracked))
        now = time.time()
        entries = self.ledger.get(list(self.tracked))
        resubmit: list[Candidate] = []
        for a, kinds in list(self.tracked.items()):
            chk, entry = checks[a], entries.get(a)
            attempts = entry.attempts if entry else 0
            if not chk.exists or chk.original_exists is False:
                reason = REASON_TEXT["not_in_database"] if not chk.exists else "original file is missing"
                self.ledger.give_up(a, reason, now)
                self.report.set(Row(a, "gave_up", chk.describe(kinds), tuple(sorted(kinds)), attempts, reason))
                del self.tracked[a]
                continue
            ok = not chk.broken(kinds)
            detail = chk.describe(kinds)
            outcome = self.ledger.record_check(a, ok, detail, now, opts.retry_after, opts.max_attempts)
            if outcome is None:  # settled elsewhere (another process): report what the ledger says
                fresh = self.ledger.get([a]).get(a)
                if fresh is not None and fresh.state in ("fixed", "gave_up"):
                    self.report.set(Row(a, fresh.state, detail, tuple(sorted(kinds)), fresh.attempts,
                                        fresh.gave_up_reason or "settled by another process"))
                    del self.tracked[a]
                continue
            if outcome == "fixed":
                since = now - (entry.last_submitted or now) if entry else 0.0
                self.report.set(Row(a, "fixed", "", tuple(sorted(kinds)), attempts,
                                    f"verified {_ago(since)} after the last request"))
                del self.tracked[a]
            elif outcome == "gave_up":
                self.report.set(Row(a, "gave_up", detail, tuple(sorted(kinds)), attempts,
                                    f"still {detail} after {attempts} attempt(s)"))
                del self.tracked[a]
            elif outcome in ("still_missing", "unchanged"):
                resubmit.append(Candidate(a, set(kinds), detail, owner=chk.owner_id))
            else:
                self.report.set(Row(a, "waiting", detail, tuple(sorted(kinds)), attempts,
                                    f"checked {detail}; waiting for Immich"))
        if resubmit:
            resubmit = await self._not_queued(resubmit)
            if resubmit and not await self.submit(resubmit):
                return False
        return True

    def _finish_wait(self) -> None:
        assert self.ledger is not None
        opts = self.opts
        entries = self.ledger.get(list(self.tracked))
        for a, kinds in self.tracked.items():
            entry = entries.get(a)
            attempts = entry.attempts if entry else 0
            row = self.report.rows.get(a)
            problems = row.problems if row else ""
            if row is not None and row.result == "not_submitted":
                continue
            detail = (f"still {entry.detail or problems or 'broken'} when the run ended (attempt {attempts} of "
                      f"{opts.max_attempts}); the ledger keeps track: run again later") if entry else "still broken"
            self.report.set(Row(a, "still_broken", problems, tuple(sorted(kinds)), attempts, detail))

    async def _not_queued(self, candidates: list[Candidate]) -> list[Candidate]:
        """Resubmit only what is not still waiting in the queue (a slow Immich is not a failed one)."""
        if not self.config.redis.enabled:
            return candidates
        view: QueueView = await queued_assets(self.config.redis)
        return [c for c in candidates if c.asset_id not in view.assets]

    # -- the whole run -----------------------------------------------------------------------------
    async def run(self) -> RunReport:
        opts, config = self.opts, self.config
        if opts.apply:
            self.ledger = Ledger(opts.state_dir)
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
            return self.report
        if not config.immich.api_key:
            self.report.notes.append("immich.api_key is not set: Immich will refuse the requests")
        if candidates:
            # After an API error the run stops submitting, but still verifies what Immich accepted.
            await self.submit(candidates)
        if opts.wait:
            await self.wait()
        return self.report


def _chunks(items: Sequence[Candidate], n: int) -> Iterator[list[Candidate]]:
    for i in range(0, len(items), n):
        yield list(items[i : i + n])


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


def run_command(config: Config, args: argparse.Namespace) -> int:
    try:
        opts = Options.from_args(config, args)
        report = asyncio.run(regenerate(config, opts))
    except Failure as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    if opts.format == "json":
        write_json(report, sys.stdout)
    else:
        write_table(report, sys.stdout)
    for error in report.errors:
        print(f"error: {error}", file=sys.stderr)
    return report.exit_code()


# -- serve: the remediation collection -------------------------------------------------------------


class RemediationCollection:
    """Opt-in auto-remediation under ``serve`` (``remediation.enabled``).

    Each round: verify what earlier rounds asked for (fixed, still missing, given up), then submit at
    most ``max_per_round`` problem assets under the rate limit, recording everything in the ledger. The
    problems come from the files collection's ``ProblemFeed`` when ``serve`` runs that collection;
    otherwise the collection runs its own scan, at most once per ``intervals.files``.

    It never writes to Immich's database, Redis or files: it only asks Immich's API.
    """

    name = "remediation"
    sources = frozenset({"postgres", "immich_api", "filesystem"})

    def __init__(self, config: Config, pg: PostgresSource, feed: ProblemFeed | None = None) -> None:
        self.config = config
        self.pg = pg
        self.feed = feed
        rem = config.remediation
        self.interval = float(rem.interval)
        submit_time = rem.max_per_round / rem.batch_size / rem.requests_per_second
        self.timeout = max(self.interval, float(config.intervals.files)) + submit_time + 60.0
        self.api = ImmichApi(config.immich)
        self.checker = Checker(config, pg) if config.media.root else None
        self.limiter = RateLimiter(rem.requests_per_second)
        self.requests: Counter[str] = Counter()
        self.verified: Counter[str] = Counter()
        self.ledger: Ledger | None = None
        self._problems: list[Problem] = []
        self._problems_at = 0.0  # when the scan behind self._problems started
        self._scanned_at = float("-inf")
        self._owner: str | None = None
        self._owner_next = 0.0

    def families(self) -> tuple[Any, ...]:
        return (
            counter("immich_regeneration_requests",
                    [((r,), float(self.requests[r])) for r in ("accepted", "rejected", "error")]),
            counter("immich_regeneration_verified",
                    [((r,), float(self.verified[r])) for r in ("fixed", "still_missing", "gave_up")]),
        )

    async def collect(self) -> Outcome:
        sources: dict[str, bool | str] = {}
        error: str | None = None
        try:
            error = await self._round(sources)
        except (SourceError, SchemaError) as exc:
            source = exc.source if isinstance(exc, SourceError) else "postgres"
            sources[source] = str(exc)
            error = f"{source}: {exc}"
        except LedgerError as exc:
            error = str(exc)
        part = Part(frozenset({"immich_api", "postgres"}), self.families())
        return Outcome((part,), sources, error)

    async def _latest_problems(self, sources: dict[str, bool | str]) -> tuple[list[Problem], float] | None:
        if self.feed is not None:
            snapshot = self.feed.latest()
            if snapshot is None:
                return None
            return list(snapshot.problems), snapshot.started_at
        if time.monotonic() - self._scanned_at >= float(self.config.intervals.files):
            store = ProblemStore(50_000, keep_overflow=False)
            result = await run_scan(self.pg, self.config, store)
            self._problems, self._problems_at = store.in_memory(), result.started_at
            self._scanned_at = time.monotonic()
            sources["postgres"] = True
            sources["filesystem"] = True
        return self._problems, self._problems_at

    async def _round(self, sources: dict[str, bool | str]) -> str | None:
        """One round; returns an error line when the API refused the requests (the round still counts)."""
        rem = self.config.remediation
        if self.checker is None:
            raise LedgerError("remediation needs media.root to check files before and after")
        if self.ledger is None:
            self.ledger = Ledger(rem.state_dir)
        ledger = self.ledger
        now = time.time()
        pending = ledger.entries((*AWAITING, "still_missing"), limit=max(2000, rem.max_per_round * 4))
        latest = await self._latest_problems(sources)
        reasons, kinds = set(rem.reasons), set(rem.kinds)
        wanted: dict[str, set[str]] = {}
        owners: dict[str, str] = {}
        scan_at = 0.0
        if latest is not None:
            problems, scan_at = latest
            for p in problems:
                if p.kind in kinds and p.reason in reasons and p.original_exists is not False:
                    wanted.setdefault(p.asset_id, set()).add(p.kind)
                    owners[p.asset_id] = p.owner_id
        entries = ledger.get(wanted)
        pending_ids = {e.asset_id for e in pending}
        # Leave out what Immich already has queued and what the key may not touch *before* choosing
        # this round's share: otherwise the same first few would be picked, and skipped, every round.
        queued_ids: set[str] = set()
        if wanted and self.config.redis.enabled:
            queued_ids = set((await queued_assets(self.config.redis)).assets)
            sources["redis"] = True
        owner = await self._key_owner() if wanted else None
        queued = other_owner = 0
        fresh: list[str] = []
        for a in sorted(wanted):
            e = entries.get(a)
            if a in pending_ids:
                continue
            if a in queued_ids:
                queued += 1
                continue
            if owner is not None and owners.get(a, owner) != owner:
                other_owner += 1
                continue
            if e is None or (e.state in RETRYABLE and e.attempts < rem.max_attempts
                             and now >= e.due_at(rem.verify_after)):
                fresh.append(a)
            elif e.state == "fixed" and (e.fixed_at or 0) < scan_at:
                fresh.append(a)  # fixed, then a later scan found it broken again
            if len(fresh) >= rem.max_per_round * 2:
                break
        checks = await self.checker.check([*pending_ids, *fresh])
        sources["postgres"] = True
        candidates: list[Candidate] = []
        for e in pending:
            chk = checks[e.asset_id]
            if not chk.exists or chk.original_exists is False:
                ledger.give_up(e.asset_id, REASON_TEXT["not_in_database"] if not chk.exists else
                               "original file is missing", now)
                self.verified["gave_up"] += 1
                continue
            ek = e.kinds or kinds
            outcome = ledger.record_check(e.asset_id, not chk.broken(ek), chk.describe(ek), now,
                                          rem.verify_after, rem.max_attempts)
            if outcome in ("fixed", "still_missing", "gave_up"):
                self.verified[outcome] += 1
            if outcome in ("still_missing", "unchanged") and e.attempts < rem.max_attempts:
                candidates.append(Candidate(e.asset_id, set(ek), chk.describe(ek), owner=chk.owner_id))
        for a in fresh:
            chk = checks[a]
            if not chk.exists or not chk.eligible or chk.original_exists is False:
                continue
            broken = {k for k, r, _ in chk.broken(kinds) if r in reasons}
            if not broken:
                continue
            e = entries.get(a)
            reset = e is not None and e.state == "fixed"
            candidates.append(Candidate(a, broken, chk.describe(kinds), reset=reset, owner=chk.owner_id))
        if candidates and self.config.redis.enabled:
            view = await queued_assets(self.config.redis)
            sources["redis"] = True
            before = len(candidates)
            candidates = [c for c in candidates if c.asset_id not in view.assets]
            queued += before - len(candidates)
        if owner is None and candidates:
            owner = await self._key_owner()
        if owner is not None:
            before = len(candidates)
            candidates = [c for c in candidates if c.owner in (None, owner)]
            other_owner += before - len(candidates)
        submitted, error = await self._submit(candidates[: rem.max_per_round], sources)
        if "immich_api" not in sources:
            try:
                await asyncio.wait_for(self.api.ping(), float(self.config.immich.timeout) + 5)
                sources["immich_api"] = True
            except ApiError as exc:
                sources["immich_api"] = str(exc)
            except TimeoutError:
                sources["immich_api"] = "did not answer in time"
        log.debug("remediation round: %d pending, %d candidates, %d submitted, %d already queued, "
                  "%d owned by another user, ledger %s, problems from %s", len(pending), len(candidates),
                  submitted, queued, other_owner, ledger.counts(), "own scan" if self.feed is None else "files")
        return error

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

    async def _submit(self, chosen: list[Candidate], sources: dict[str, bool | str]) -> tuple[int, str | None]:
        assert self.ledger is not None
        rem = self.config.remediation
        submitted = 0
        error: str | None = None
        for batch in by_owner(chosen, rem.batch_size):
            await self.limiter.acquire()
            outcome = await submit_batch(
                self.api, self.ledger, {c.asset_id: c.kinds for c in batch}, retry_after=rem.verify_after,
                max_attempts=rem.max_attempts, reset=[c.asset_id for c in batch if c.reset],
            )
            if outcome.result == "none":
                continue
            self.requests[outcome.result] += 1
            if outcome.error is None:
                submitted += len(outcome.submitted)
                sources["immich_api"] = True
                continue
            error = f"immich_api: {outcome.error}{_auth_hint(outcome.error)}"
            if outcome.result == "rejected" and not isinstance(outcome.error, ApiAuthError):
                sources["immich_api"] = True  # 400 for this batch: the others may still go through
                continue
            # 403 says the key lacks a permission: the API itself is up, the collection failed.
            sources["immich_api"] = True if outcome.error.status == 403 else str(outcome.error)
            break
        return submitted, error

    async def close(self) -> None:
        await self.api.close()
        if self.ledger is not None:
            self.ledger.close()
            self.ledger = None

