"""One full inventory: database counts, then the file check. Shared by ``scan`` and ``serve``."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace

import asyncpg

from immich_thumbnail_exporter.config import Config
from immich_thumbnail_exporter.findings import FileStats, InventoryCounts, Problem, ProblemStore
from immich_thumbnail_exporter.scan.disk_walk import DiskWalk
from immich_thumbnail_exporter.scan.file_check import reconcile
from immich_thumbnail_exporter.scan.inroot import InRoot
from immich_thumbnail_exporter.scan.inventory import count, count_and_stream_records, media_location
from immich_thumbnail_exporter.scan.originals import check_originals
from immich_thumbnail_exporter.scan.verdict import original_exists
from immich_thumbnail_exporter.sources.media import media_call, probe_filesystem
from immich_thumbnail_exporter.sources.paths import PathMapper
from immich_thumbnail_exporter.sources.postgres import PostgresSource, SourceError

log = logging.getLogger(__name__)


@dataclass
class ScanResult:
    counts: InventoryCounts
    stats: FileStats | None
    problems: ProblemStore
    location: str | None
    root: str | None
    started_at: float
    duration: float = 0.0
    no_record_problems: int = 0
    notes: list[str] = field(default_factory=list)


# Settings for the exporter's own transactions: no parallel workers (a scan's queries take one core of
# Immich's database, not three), and room for the file stream's sort.
GENTLE = "SET LOCAL max_parallel_workers_per_gather = 0"


# no_record problems whose originals are looked up in one worker-thread call.
ORIGINALS_BATCH = 500


async def _add_with_originals(mapper: PathMapper | None, found: list[Problem], problems: ProblemStore) -> None:
    """Add problems to the store, each with whether its original is still there (looked up off the
    event loop, inside the media root only)."""
    if mapper is not None and found:
        def look() -> list[bool | None]:
            disk = InRoot(mapper.root_bytes)
            return [original_exists(mapper, p.original_path, disk) for p in found]

        for problem, exists in zip(found, await media_call(look), strict=True):
            problems.add(replace(problem, original_exists=exists))
        return
    for problem in found:
        problems.add(problem)


async def run_inventory(pg: PostgresSource, config: Config) -> InventoryCounts:
    schema = await pg.schema()
    timeout = config.database.statement_timeout
    async with pg.connection() as conn, conn.transaction(readonly=True):
        await conn.execute(GENTLE, timeout=timeout)
        return await count(conn, schema, timeout)


async def _gentle(conn: asyncpg.Connection, timeout: float) -> None:
    # Sorting millions of paths: give the transaction's sort some room, and no parallel workers.
    await conn.execute("SET LOCAL work_mem = '64MB'", timeout=timeout)
    await conn.execute(GENTLE, timeout=timeout)


async def _export_snapshot(conn: asyncpg.Connection, timeout: float) -> str | None:
    """The transaction's snapshot, for a second connection to share; None where the server cannot
    export one (a standby, in recovery)."""
    # Not in a savepoint (an export needs the top transaction), so nothing that can fail: a server in
    # recovery is not asked.
    snapshot = await conn.fetchval(
        "SELECT CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_export_snapshot() END", timeout=timeout
    )
    if snapshot is None:
        log.debug("a standby: no shared snapshot, the file check waits for the counts")
    return snapshot if isinstance(snapshot, str) and re.fullmatch(r"[0-9A-Fa-f-]+", snapshot) else None


async def _beside(
    pg: PostgresSource,
    snapshot: str,
    work: Callable[[asyncpg.Connection], Awaitable[None]],
    timeout: float,
    holding: asyncio.Future[bool],
) -> bool:
    """Run ``work`` on a second connection, in the scan's ``snapshot``. ``holding`` is set once this
    session holds the snapshot (True), or has given up without one (False: the pool has no connection to
    spare, ``database.pool_size: 1`` or another collection holds it); only then may the exporting
    transaction end. Returns whether the work was done here."""
    try:
        async with pg.spare_connection() as other:
            if other is None:
                holding.set_result(False)
                return False
            async with other.transaction(isolation="repeatable_read", readonly=True):
                await other.execute(f"SET TRANSACTION SNAPSHOT '{snapshot}'", timeout=timeout)
                holding.set_result(True)
                await _gentle(other, timeout)
                await work(other)
        return True
    finally:
        if not holding.done():
            holding.set_result(False)


async def run_scan(
    pg: PostgresSource,
    config: Config,
    problems: ProblemStore,
    *,
    check_files: bool = True,
    progress: Callable[[FileStats], None] | None = None,
    beside: bool = True,
) -> ScanResult:
    """Counts from the database, every no_record problem, then (with a media root) the file check.

    ``beside``: read the file list on a second pooled connection while the first counts, when one is
    free. ``serve`` passes False: there the pool is shared with the other collections, which must never
    wait for a connection behind a long file check.
    """
    started, t0 = time.time(), time.monotonic()
    timeout = config.database.statement_timeout
    schema = await pg.schema()
    root = config.media.root if check_files else None
    identity = await probe_filesystem(root, 10.0) if root else None
    # The disk walk starts now: its helper processes list thumbs/ while PostgreSQL counts and sorts.
    disk = (
        DiskWalk(PathMapper(root, "/").root_bytes, config.checks.verify_headers, sizes=config.checks.file_sizes)
        if root else None
    )
    try:
        if disk is not None:
            await disk.start()
        async with pg.connection() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            # One snapshot for the whole scan: counts, missing records and files agree with each other.
            await _gentle(conn, timeout)
            mapper: PathMapper | None = None
            location: str | None = None
            if root is not None:
                location = config.media.location
                if location == "auto":
                    location = await media_location(conn, schema, timeout)
                mapper = PathMapper(root, location)
            stats = FileStats() if mapper is not None else None

            async def files(on: asyncpg.Connection) -> None:
                assert mapper is not None and stats is not None
                await reconcile(
                    on, schema, mapper, stats, problems.add,
                    verify_headers=config.checks.verify_headers,
                    fetch_size=config.database.fetch_size,
                    timeout=timeout,
                    progress=progress,
                    disk=disk,
                )
                if config.checks.check_originals:
                    await check_originals(
                        on, schema, mapper, stats, fetch_size=config.database.fetch_size, timeout=timeout
                    )

            # PostgreSQL sorts the file list (seconds, at a million assets) on a second connection, in the
            # same snapshot, while this one counts; with no connection to spare, one after the other.
            snapshot = await _export_snapshot(conn, timeout) if mapper is not None and beside else None
            holding: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
            second = asyncio.create_task(_beside(pg, snapshot, files, timeout, holding)) if snapshot else None
            try:
                # Counts and the no_record problems come from one query: its first row has the counts.
                records = count_and_stream_records(conn, schema, config.database.fetch_size, timeout)
                counts = await anext(records)
                assert isinstance(counts, InventoryCounts)
                result = ScanResult(counts, stats, problems, location, root, started)
                found: list[Problem] = []
                async for problem in records:
                    assert isinstance(problem, Problem)
                    found.append(problem)
                    if len(found) >= ORIGINALS_BATCH:
                        await _add_with_originals(mapper, found, problems)
                        result.no_record_problems += len(found)
                        found = []
                await _add_with_originals(mapper, found, problems)
                result.no_record_problems += len(found)
                # This transaction may end (and give its connection back, rather than sit idle in a
                # transaction for the whole file check) once the second session holds the snapshot.
                if second is not None and not await holding:
                    await second  # it did nothing: the file check runs here, below
                    second = None
                if mapper is not None and second is None:
                    await files(conn)
            except BaseException:
                if second is not None and not second.done():
                    second.cancel()
                    await asyncio.gather(second, return_exceptions=True)
                raise
        if second is not None:
            await second
        if mapper is None:
            result.duration = time.monotonic() - t0
            return result
    finally:
        if disk is not None:
            await disk.close()
    assert root is not None and identity is not None
    # The folder must still be the same one: a volume unmounted mid-scan would look like "all missing".
    if await probe_filesystem(root, 10.0) != identity:
        raise SourceError(
            "filesystem", f"{root}/thumbs changed during the scan (unmounted?): results discarded"
        )
    result.duration = time.monotonic() - t0
    return result
