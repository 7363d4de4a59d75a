"""``scan``: one full inventory and file check now, as a report."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from immich_thumbnail_exporter.cli.exits import EXIT_OK, EXIT_PROBLEMS, fail
from immich_thumbnail_exporter.cli.report import measure_space
from immich_thumbnail_exporter.config import Config
from immich_thumbnail_exporter.findings import FileStats, ProblemStore, Throughput
from immich_thumbnail_exporter.output import scan_report as report
from immich_thumbnail_exporter.scan.run import ScanResult, run_scan
from immich_thumbnail_exporter.sources.bullmq_queue import thumbnail_throughput
from immich_thumbnail_exporter.sources.postgres import PostgresSource, SourceError
from immich_thumbnail_exporter.sources.schema import SchemaError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=("table", "json", "csv"), default="table")
    parser.add_argument("--output", metavar="FILE", help="write the report here instead of stdout")
    parser.add_argument("--no-progress", action="store_true", help="no progress display on stderr")
    parser.add_argument("--fail-on-problems", action="store_true", help="exit 1 when problems are found")
    parser.add_argument("--max-rows", type=int, default=None, help="table format: list at most this many problems")


def observe_queue(config: Config) -> Throughput | str | None:
    """The thumbnail queue's recent finish rate, for the review's time estimate.

    None when Redis is not configured, the error line when it cannot be read: the report says which.
    """
    if not config.redis.enabled:
        return None
    try:
        return asyncio.run(thumbnail_throughput(config.redis))
    except SourceError as exc:
        return str(exc)


class Progress:
    """A one-line progress display on stderr, redrawn at most a few times a second."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._last = 0.0

    def __call__(self, stats: FileStats) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < 0.25:
            return
        self._last = now
        sys.stderr.write(
            f"\rchecked {stats.rows:,} database rows, {stats.entries:,} files on disk, "
            f"{stats.problems_total:,} problems"
        )
        sys.stderr.flush()

    def done(self) -> None:
        if self.enabled and self._last:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


async def _scan(config: Config, problems: ProblemStore, progress: Progress) -> ScanResult:
    pg = PostgresSource(config.database)
    try:
        return await run_scan(pg, config, problems, progress=progress)
    finally:
        await pg.close()


def run(config: Config, args: argparse.Namespace) -> int:
    progress = Progress(enabled=not args.no_progress and sys.stderr.isatty())
    problems = ProblemStore()
    try:
        result = asyncio.run(_scan(config, problems, progress))
    except (SourceError, SchemaError) as exc:
        progress.done()
        return fail([str(exc)])
    progress.done()
    throughput = observe_queue(config) if args.format != "csv" else None
    spaces = measure_space(config) if args.format != "csv" else None
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout  # noqa: SIM115
    try:
        if args.format == "json":
            report.write_json(result, out, throughput, spaces)
        elif args.format == "csv":
            report.write_csv(result.problems, out)
        else:
            report.write_table(result, out, args.max_rows, throughput, spaces)
    finally:
        if args.output:
            out.close()
        problems.close()
    if args.fail_on_problems and result.problems.total:
        return EXIT_PROBLEMS
    return EXIT_OK
