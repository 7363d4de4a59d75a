"""``report``: the restore report, from a fresh scan, the thumbnail queue, the remediation ledger and
Immich's own integrity report, as one Markdown or HTML document.

Everything is read: nothing is written to Immich's database, Redis, files, or to the ledger (opened
read-only through its own read methods). Each source is read on its own; one that is down is named in
the document and its figures are left out, never guessed.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

from immich_thumbnail_exporter.cli.exits import EXIT_CONFIG, EXIT_OK
from immich_thumbnail_exporter.config import Config
from immich_thumbnail_exporter.findings import FolderSpace, ProblemStore
from immich_thumbnail_exporter.output import restore_report, restore_report_html
from immich_thumbnail_exporter.output.restore_report import (
    AssetHistory,
    Check,
    FileNow,
    JobTimes,
    OrphanJob,
    QueueReport,
    RestoreData,
)
from immich_thumbnail_exporter.remediation.ledger import Entry, Ledger, LedgerError
from immich_thumbnail_exporter.scan.file_sql import targeted_sql
from immich_thumbnail_exporter.scan.run import run_scan
from immich_thumbnail_exporter.scan.targeted import check_assets, media_mapper
from immich_thumbnail_exporter.sources import integrity
from immich_thumbnail_exporter.sources.bullmq import BullMQ
from immich_thumbnail_exporter.sources.bullmq_queue import job_states, throughput
from immich_thumbnail_exporter.sources.capacity import media_space
from immich_thumbnail_exporter.sources.media import MediaStuck, media_call
from immich_thumbnail_exporter.sources.paths import PathMapper
from immich_thumbnail_exporter.sources.postgres import PostgresSource, QueryError, SourceError
from immich_thumbnail_exporter.sources.redis import RedisSource
from immich_thumbnail_exporter.sources.schema import SchemaError, has_integrity_report
from immich_thumbnail_exporter.vocabulary import THUMBNAIL_QUEUE

# Every state the ledger keeps an asset in.
LEDGER_STATES = ("submitting", "submitted", "not_queued", "still_missing", "error", "fixed", "gave_up")
LEDGER_LIMIT = 10_000
ORPHAN_SAMPLE = 1_000
SPACE_TIMEOUT = 10.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=("markdown", "html"), default="markdown")
    parser.add_argument("--output", metavar="FILE", help="write the report here instead of stdout")
    parser.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    parser.add_argument("--state-dir", dest="state_dir", metavar="DIR",
                        help="where the remediation ledger is (default remediation.state_dir)")


def ledger_history(directory: str, limit: int = LEDGER_LIMIT) -> tuple[list[Entry] | None, str]:
    """Every asset of the ledger in ``directory``, read-only; None and why when there is none to read.

    The one read of the ledger this command makes, through ``Ledger``'s public read API.
    """
    try:
        ledger = Ledger.open_existing(directory)
    except LedgerError as exc:
        return None, f"The remediation ledger could not be read: {exc}"
    if ledger is None:
        return None, (f"No remediation ledger in {directory}: nothing was regenerated through the exporter "
                      "(or --state-dir names another folder).")
    try:
        entries = ledger.entries(LEDGER_STATES, limit)
    except LedgerError as exc:
        return None, f"The remediation ledger could not be read: {exc}"
    finally:
        ledger.close()
    return sorted(entries, key=lambda e: (e.first_submitted or 0.0, e.asset_id)), ""


async def _spaces(root: str) -> list[FolderSpace] | None:
    """Each storage folder's filesystem; None when the media folder does not answer in time."""
    try:
        found = await media_call(media_space, root, timeout=SPACE_TIMEOUT)
    except MediaStuck:
        return None
    return found


def measure_space(config: Config) -> list[FolderSpace] | None:
    """``scan``'s free space figures: None without a media root; [] when it did not answer."""
    if config.media.root is None:
        return None
    spaces = asyncio.run(_spaces(config.media.root))
    return [] if spaces is None else spaces


def _sizes(mapper: PathMapper, files: list[tuple[str, str]]) -> dict[str, int | None]:
    """Each kind's file size on disk (not following links: only what is inside the media root)."""
    out: dict[str, int | None] = {}
    for kind, stored in files:
        rel = mapper.relative(stored)
        if rel is None:
            continue
        try:
            st = os.lstat(mapper.local(rel))
        except OSError:
            continue
        out[kind] = st.st_size
    return out


class Gatherer:
    def __init__(self, config: Config, progress: Callable[[str], None], state_dir: str) -> None:
        self.config = config
        self.say = progress
        self.state_dir = state_dir
        self.pg = PostgresSource(config.database)
        self.redis = RedisSource(config.redis) if config.redis.enabled else None
        self.data = RestoreData(time.time(), None)

    def check(self, what: str, how: str, result: str, ok: bool = True) -> None:
        self.data.checks.append(Check(what, how, result, ok))

    async def gather(self) -> RestoreData:
        try:
            await self._scan()
            await self._space()
            await self._queue()
            await self._ledger()
            await self._integrity()
        finally:
            await self.pg.close()
            if self.redis is not None:
                await self.redis.close()
        return self.data

    async def _scan(self) -> None:
        self.say("scanning the database and the media folder")
        # A restore report always asks whether the originals came back: regeneration needs them.
        cfg = dataclasses.replace(self.config, checks=dataclasses.replace(self.config.checks, check_originals=True))
        try:
            result = await run_scan(self.pg, cfg, ProblemStore())
        except (SourceError, SchemaError) as exc:
            self.data.scan_error = str(exc)
            self.check("Immich's database", "one read-only transaction", str(exc), ok=False)
            return
        self.data.scan = result
        stats = result.stats
        self.check("Immich's database", "one read-only snapshot: counts by Immich's own rule, every thumbnail "
                   "row", f"{sum(result.counts.assets.values())} eligible assets, schema {result.counts.schema}")
        if stats is None:
            self.check("Media folder", "not checked", "media.root is not set: database checks only", ok=False)
        else:
            how = "every referenced file stat'ed" + (", first bytes checked" if cfg.checks.verify_headers else "")
            self.check("Media folder", how, f"{stats.rows} database rows, {stats.entries} files under thumbs/")
            if stats.originals_missing is not None:
                self.check("Originals", "each eligible asset's original looked up",
                           f"{stats.originals_missing} missing")
            else:
                self.check("Originals", "not checked", "checks.check_originals is off", ok=True)
        person = getattr(stats, "person_missing", None)
        if isinstance(person, dict):
            self.data.person_missing = {str(k): int(v) for k, v in person.items()}

    async def _space(self) -> None:
        root = self.config.media.root
        if root is None:
            return
        self.say("measuring free space")
        spaces = await _spaces(root)
        if spaces is None:
            self.data.spaces = []
            self.check("Free space", "statvfs of each storage folder", "the media folder did not answer", ok=False)
            return
        self.data.spaces = spaces
        self.check("Free space", "statvfs of each storage folder (bytes an unprivileged writer can use)",
                   ", ".join(s.folder for s in spaces) or "no storage folder found")

    async def _queue(self) -> None:
        if self.redis is None:
            self.check("Job queues", "not checked", "Redis is not configured", ok=True)
            return
        self.say("reading the thumbnail queue")
        prefix = self.config.redis.prefix
        report = QueueReport()
        self.data.queue = report
        try:
            bull = BullMQ(self.redis, prefix)
            deadline = time.monotonic() + self.redis.timeout * 3
            sample = (await bull.sample([THUMBNAIL_QUEUE], deadline, ORPHAN_SAMPLE))[THUMBNAIL_QUEUE]
            workers = await bull.workers([THUMBNAIL_QUEUE], time.monotonic() + self.redis.timeout)
            self.data.throughput = await throughput(self.redis, prefix)
        except SourceError as exc:
            report.error = str(exc)
            self.data.throughput = str(exc)
            self.check("Job queues", f"Redis, prefix {prefix}", str(exc), ok=False)
            return
        report.workers = None if workers is None else workers.get(THUMBNAIL_QUEUE, 0)
        report.counts = dict(sample.counts)
        report.paused = sample.paused
        if sample.oldest_waiting_ms is not None:
            report.oldest_waiting_age = max(0.0, time.time() - sample.oldest_waiting_ms / 1000)
        report.jobs_checked, report.truncated = sample.checked, sample.truncated
        self.check("Job queues", f"Redis, prefix {prefix}: counts, workers, {sample.checked} job(s) looked at",
                   f"{sum(sample.counts.get(s, 0) for s in ('waiting', 'prioritized', 'active'))} waiting or active")
        if sample.asset_jobs and self.data.scan is not None:
            await self._orphans(sample.asset_jobs, prefix)

    async def _orphans(self, asset_jobs: list[tuple[str, str]], prefix: str) -> None:
        assert self.redis is not None and self.data.queue is not None
        ids = sorted({a for _, a in asset_jobs})
        try:
            present = await self._present(ids)
            states = await job_states(self.redis, prefix, [j for j, a in asset_jobs if a not in present])
        except (SourceError, QueryError) as exc:
            self.check("Orphaned jobs", "job assets looked up in the database", str(exc), ok=False)
            return
        orphans = [OrphanJob(j, a, states[j].state if j in states else "unknown")
                   for j, a in asset_jobs if a not in present]
        # BullMQ's ids are counters: oldest first, 10 after 9.
        self.data.queue.orphans = sorted(orphans, key=lambda o: (len(o.job_id), o.job_id))

    async def _present(self, ids: list[str]) -> set[str]:
        schema = await self.pg.schema()
        wanted = []
        for a in ids:
            try:
                wanted.append(uuid.UUID(a))
            except ValueError:
                continue
        async with self.pg.connection() as conn:
            rows = await conn.fetch(f"SELECT id::text FROM {schema.assets} WHERE id = ANY($1::uuid[])", wanted,
                                    timeout=self.config.database.statement_timeout)
        return {str(r[0]) for r in rows}

    async def _ledger(self) -> None:
        self.say("reading the remediation ledger")
        entries, note = ledger_history(self.state_dir)
        if entries is None:
            self.data.ledger_note = note
            self.check("Remediation ledger", f"read-only, {self.state_dir}", note.split(":")[0], ok=True)
            return
        jobs: dict[str, Any] = {}
        if self.redis is not None and self.data.queue is not None and self.data.queue.error is None:
            try:
                jobs = await job_states(self.redis, self.config.redis.prefix, [e.job_id for e in entries if e.job_id])
            except SourceError as exc:
                self.check("Regeneration jobs", "each attempt's job looked up in Redis", str(exc), ok=False)
        verdicts: dict[str, Any] = {}
        sizes: dict[str, dict[str, int | None]] = {}
        if self.data.scan is not None and self.config.media.root and entries:
            try:
                verdicts, sizes = await self._now([e.asset_id for e in entries])
            except (SourceError, QueryError, TimeoutError) as exc:
                self.check("Regenerated assets now", "targeted check of each ledger asset", str(exc) or "timed out",
                           ok=False)
        history = []
        for e in entries:
            job = None
            if e.job_id:
                js = jobs.get(e.job_id)
                job = JobTimes(e.job_id, "unknown") if js is None else JobTimes(
                    e.job_id, js.state, _sec(js.added_ms), _sec(js.started_ms), _sec(js.finished_ms), js.failed_reason)
            v = verdicts.get(e.asset_id)
            files_now = broken_now = exists_now = None
            if v is not None:
                exists_now = v.exists
                broken = {k for k, _, _ in v.problems}
                broken_now = [(k, r) for k, r, _ in v.problems]
                files_now = [FileNow(k, n) for k, n in sorted(sizes.get(e.asset_id, {}).items()) if k not in broken]
            history.append(AssetHistory(
                e.asset_id, e.state, e.attempts, e.first_submitted, e.last_submitted, e.last_outcome, e.detail, job,
                e.last_checked, e.fixed_at, e.why_text or e.why, e.gave_up_reason, files_now, broken_now, exists_now,
            ))
        self.data.ledger = history
        self.check("Remediation ledger", f"read-only, {self.state_dir}", f"{len(history)} asset(s)")

    async def _now(self, ids: list[str]) -> tuple[dict[str, Any], dict[str, dict[str, int | None]]]:
        schema = await self.pg.schema()
        mapper = await media_mapper(self.pg, self.config.media)
        verdicts = await check_assets(self.pg, schema, mapper, ids, headers=self.config.checks.verify_headers)
        wanted = [uuid.UUID(a) for a in ids if verdicts[a].exists]
        async with self.pg.connection() as conn:
            rows = await conn.fetch(targeted_sql(schema), wanted, timeout=self.config.database.statement_timeout)
        files = {str(r[0]): [(str(f[0]), str(f[1])) for f in r[6]] for r in rows}
        sizes = {a: await media_call(_sizes, mapper, fs, timeout=30) for a, fs in files.items()}
        return verdicts, sizes

    async def _integrity(self) -> None:
        if self.data.scan is None:
            self.data.integrity_note = "Not read: the database could not be reached."
            return
        self.say("reading Immich's integrity report")
        try:
            schema = await self.pg.schema()
            async with self.pg.connection() as conn:
                if schema.files != "asset_file" or not await has_integrity_report(
                        conn, self.config.database.statement_timeout):
                    self.data.integrity_note = ("Immich's integrity report does not exist on this release "
                                                "(it came with Immich v3).")
                    self.check("Immich's integrity report", "table integrity_report", "not on this release")
                    return
                rep = await integrity.read(conn, self.config.database.statement_timeout)
        except (SourceError, QueryError) as exc:
            self.data.integrity_note = f"Immich's integrity report could not be read: {exc}"
            self.check("Immich's integrity report", "table integrity_report", str(exc), ok=False)
            return
        self.data.integrity = dict(rep.entries)
        self.data.integrity_newest = rep.newest
        self.check("Immich's integrity report", "table integrity_report, aggregated",
                   f"{sum(rep.entries.values())} entries")


def _sec(ms: int | None) -> float | None:
    return None if ms is None else ms / 1000.0


def run(config: Config, args: argparse.Namespace) -> int:
    def progress(line: str) -> None:
        if not args.no_progress:
            sys.stderr.write(f"report: {line}\n")
            sys.stderr.flush()

    state_dir = args.state_dir or config.remediation.state_dir
    # Opened first: a path that cannot be written is said before a scan of the whole library.
    try:
        out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout  # noqa: SIM115
    except OSError as exc:
        sys.stderr.write(f"cannot write {args.output}: {exc.strerror or exc}\n")
        return EXIT_CONFIG
    try:
        data = asyncio.run(Gatherer(config, progress, state_dir).gather())
        if args.format == "html":
            restore_report_html.write_html(data, out)
        else:
            restore_report.write_markdown(data, out)
    finally:
        if args.output:
            out.close()
    progress("done" + (f": {args.output}" if args.output else ""))
    # The document is written either way; a database that could not be read is still an error to scripts.
    return EXIT_CONFIG if data.scan is None else EXIT_OK
