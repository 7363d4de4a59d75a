"""The full file check: the database's file stream merged with the walk of ``thumbs/``.

Where the time goes, and how it is kept small (``python -m bench``; README, "Performance"): the walk runs
in helper processes (``scan/disk_walk.py``) working ahead while PostgreSQL counts and sorts; the database
stream is narrow (path bytes, a kind code, the asset id: no join, a third of the sort's temporary
files: ``scan/file_sql.py``), and a one-shot ``scan`` reads it on a second connection in the same
snapshot (``scan/run.py``), so the sort runs while the counts do. The merge (``scan/merge.py``) runs in
the event loop in slices, each followed by a yield, so a scrape waits at most one slice; the few rows
that need a look at the disk of their own are looked at in a worker thread. Problems are rare, so the
details a problem row needs (owner, type, original, eligibility) are fetched afterwards, by primary key,
for those rows only. Face thumbnails (``person."thumbnailPath"``) are rows of the same stream, judged by
the same rule; a problem one is listed with its person's owner and feature face (``problem_people_sql``).

Memory is a cursor batch, a few frames and one directory per level, whatever the library size.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import asyncpg

from immich_thumbnail_exporter.findings import FileStats, Problem
from immich_thumbnail_exporter.scan.disk_walk import DiskWalk
from immich_thumbnail_exporter.scan.file_sql import FACE_TABLE_SQL, files_sql, problem_assets_sql, problem_people_sql
from immich_thumbnail_exporter.scan.inroot import InRoot
from immich_thumbnail_exporter.scan.merge import Merge
from immich_thumbnail_exporter.scan.verdict import original_exists
from immich_thumbnail_exporter.sources.media import media_call
from immich_thumbnail_exporter.sources.paths import PathMapper
from immich_thumbnail_exporter.sources.schema import Schema
from immich_thumbnail_exporter.vocabulary import PERSON_KIND

# Rows per fetch from the file stream's cursor (at most ``database.fetch_size``).
STREAM_BATCH = 500

# The next batch of the file stream (``file_sql.files_sql``'s rows); empty once it is done.
FetchRows = Callable[[], Awaitable[Sequence[Any]]]
# Asset ids -> ``(id, owner, type, original path, eligible)`` for those found (``problem_assets_sql``).
LookupAssets = Callable[[list[Any]], Awaitable[Mapping[Any, Sequence[Any]]]]
# Person ids -> ``(id, owner, feature face's asset id, its original path)`` (``problem_people_sql``).
LookupPeople = LookupAssets


async def face_table(conn: asyncpg.Connection, timeout: float) -> str | None:
    """Immich's face table on this database (``asset_face`` or ``asset_faces``), None without one."""
    name = await conn.fetchval(FACE_TABLE_SQL, timeout=timeout)
    return str(name) if name is not None else None


async def reconcile(
    conn: asyncpg.Connection,
    schema: Schema,
    mapper: PathMapper,
    stats: FileStats,
    on_problem: Callable[[Problem], None],
    *,
    verify_headers: bool,
    fetch_size: int,
    timeout: float,
    progress: Callable[[FileStats], None] | None = None,
    disk: DiskWalk | None = None,
) -> None:
    """Run the merge over the database's file stream. Must be called inside a transaction (the cursor
    is server-side).

    ``disk``: a walk already started (``run_scan`` starts it before its first query, so the walkers
    work while PostgreSQL counts and sorts); by default one is started here. It is closed either way.
    """
    lookup_sql = problem_assets_sql(schema)
    people_sql = problem_people_sql(schema, await face_table(conn, timeout)) if schema.has_person_thumbnails else None
    # asyncpg decodes a whole batch in one go, in the event loop: keep batches small enough that a
    # scrape never waits long behind one (about a millisecond per thousand rows here).
    batch_size = min(fetch_size, STREAM_BATCH)
    cursor: Any = None

    async def fetch() -> Sequence[Any]:
        nonlocal cursor
        if cursor is None:
            cursor = await conn.cursor(files_sql(schema), timeout=timeout)
        rows: Sequence[Any] = await cursor.fetch(batch_size, timeout=timeout)
        return rows

    async def lookup(ids: list[Any]) -> Mapping[Any, Sequence[Any]]:
        return {r[0]: r for r in await conn.fetch(lookup_sql, ids, timeout=timeout)}

    async def lookup_people(ids: list[Any]) -> Mapping[Any, Sequence[Any]]:
        assert people_sql is not None  # no person table: no person rows in the stream
        return {r[0]: r for r in await conn.fetch(people_sql, ids, timeout=timeout)}

    await merge_stream(fetch, lookup, mapper, stats, on_problem, verify_headers=verify_headers,
                       progress=progress, disk=disk, lookup_people=lookup_people)


async def merge_stream(
    fetch: FetchRows,
    lookup: LookupAssets,
    mapper: PathMapper,
    stats: FileStats,
    on_problem: Callable[[Problem], None],
    *,
    verify_headers: bool,
    progress: Callable[[FileStats], None] | None = None,
    disk: DiskWalk | None = None,
    lookup_people: LookupPeople | None = None,
) -> None:
    """The file check's driver: rows from ``fetch`` merged with the walk, problems reported through
    ``on_problem`` for eligible assets (``lookup``) and for people (``lookup_people``; without it face
    thumbnails are still counted in ``stats.person_missing`` but not listed). ``fetch`` and the lookups
    never overlap: one connection may serve them all."""
    if disk is None:
        disk = DiskWalk(mapper.root_bytes, verify_headers)
    in_root: list[InRoot] = []  # made in the worker thread, on first use
    merge = Merge(mapper, stats, verify_headers)
    try:
        frames = disk.frames()
        batch = await fetch()
        while batch:
            # PostgreSQL sends the next batch while this one is merged.
            pending = asyncio.ensure_future(fetch())
            try:
                i = 0
                while i < len(batch):
                    i = merge.merge(batch, i)
                    if merge.deferred:
                        items = merge.take_deferred()
                        merge.settle(items, await media_call(merge.resolve, items))
                    if merge.needs_frame:
                        merge.push_frame(await anext(frames, None))
                    # A slice done: let scrapes through (reading a frame may not have yielded).
                    await asyncio.sleep(0)
            except BaseException:
                pending.cancel()
                await asyncio.gather(pending, return_exceptions=True)
                raise
            batch = await pending
            if merge.candidates:
                await _report(lookup, lookup_people, merge, mapper, in_root, stats, on_problem)
            if progress is not None:
                progress(stats)
        merge.orphans_left()
        while (frame := await anext(frames, None)) is not None:
            merge.push_frame(frame)
            merge.orphans_left()
            await asyncio.sleep(0)
        merge.push_frame(None)
        stats.sizes_known = disk.sizes
        if progress is not None:
            progress(stats)
    finally:
        await disk.close()


async def _report(
    lookup: LookupAssets,
    lookup_people: LookupPeople | None,
    merge: Merge,
    mapper: PathMapper,
    in_root: list[InRoot],
    stats: FileStats,
    on_problem: Callable[[Problem], None],
) -> None:
    """Turn the merge's candidates into problems: only eligible assets count (Immich's own rule); every
    person does."""
    candidates = merge.take_candidates()
    people = [c for c in candidates if c[1] == PERSON_KIND]
    if people:
        candidates = [c for c in candidates if c[1] != PERSON_KIND]
        if lookup_people is not None:
            await _report_people(lookup_people, people, mapper, in_root, stats, on_problem)
    ids = list({c[0] for c in candidates if c[0] is not None})
    assets = await lookup(ids) if ids else {}
    found = [(c, assets[c[0]]) for c in candidates if c[0] in assets and assets[c[0]][4]]
    if not found:
        return
    originals = await media_call(_originals, mapper, in_root, [asset[3] for _, asset in found])
    for ((asset_id, kind, reason, path), asset), exists in zip(found, originals, strict=True):
        stats.missing[(kind, reason)] += 1
        stats.problems_total += 1
        on_problem(Problem(
            asset_id=str(asset_id), owner_id=asset[1], asset_type=asset[2], kind=kind, reason=reason,
            path=path.decode("utf-8", "surrogateescape"), original_path=asset[3], original_exists=exists,
        ))


async def _report_people(
    lookup: LookupPeople,
    candidates: Sequence[Any],
    mapper: PathMapper,
    in_root: list[InRoot],
    stats: FileStats,
    on_problem: Callable[[Problem], None],
) -> None:
    """Face thumbnails as problem rows: the person's id and owner, and the original of its feature face."""
    people = await lookup(list({c[0] for c in candidates}))
    found = [(c, people[c[0]]) for c in candidates if c[0] in people]
    originals = await asyncio.to_thread(_originals, mapper, in_root, [person[3] for _, person in found])
    for ((person_id, kind, reason, path), person), exists in zip(found, originals, strict=True):
        stats.problems_total += 1
        on_problem(Problem(
            asset_id=str(person_id), owner_id=person[1], asset_type=PERSON_KIND, kind=kind, reason=reason,
            path=path.decode("utf-8", "surrogateescape"), original_path=person[3], original_exists=exists,
        ))


def _originals(mapper: PathMapper, in_root: list[InRoot], originals: Sequence[str | None]) -> list[bool | None]:
    """Blocking (a worker thread): whether each problem asset's original is still there."""
    if not in_root:
        in_root.append(InRoot(mapper.root_bytes))
    return [original_exists(mapper, o, in_root[0]) for o in originals]
