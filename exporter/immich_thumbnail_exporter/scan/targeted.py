"""The targeted check: a given set of assets judged by the one file rule, without walking the tree.

For ``regenerate`` and remediation (``remediation.check.Checker``), and for verifying what a finished
thumbnail job left behind. Per batch of ids: one query (``file_sql.targeted_sql``: the assets and their
``asset_file`` rows together), then every file of the batch looked at in one media-pool call
(``verdict.judge_asset``: a row for each kind the asset must have, each path mapped through
``PathMapper``, the file present, not empty, its first bytes matching its extension, readable; links
followed inside the media root only). Nothing touches the disk in the event loop.

``check_people`` does the same for face thumbnails: given person ids, one query per batch (the person's
``thumbnailPath`` and its feature face's asset), each file judged by the same rule (``judge_person``).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from immich_thumbnail_exporter.config import MediaConfig
from immich_thumbnail_exporter.scan.file_sql import FACE_TABLE_SQL, targeted_people_sql, targeted_sql
from immich_thumbnail_exporter.scan.inroot import InRoot
from immich_thumbnail_exporter.scan.inventory import media_location
from immich_thumbnail_exporter.scan.verdict import (
    AssetRow,
    AssetVerdict,
    PersonRow,
    PersonVerdict,
    judge_asset,
    judge_person,
)
from immich_thumbnail_exporter.sources.media import media_call
from immich_thumbnail_exporter.sources.paths import PathMapper
from immich_thumbnail_exporter.sources.postgres import PostgresSource
from immich_thumbnail_exporter.sources.schema import Schema

__all__ = ["BATCH", "AssetVerdict", "PersonVerdict", "check_assets", "check_people", "media_mapper"]

R = TypeVar("R")
V = TypeVar("V")

# Assets per query (and per worker-thread call).
BATCH = 1_000
# The worker thread's time for one batch: generous, for a slow disk (a hung one never answers at all,
# and the round fails with a timeout instead of waiting for it).
SECONDS_PER_ASSET = 0.1
MIN_SECONDS = 30.0


def _canonical(asset_id: str) -> str | None:
    try:
        return str(uuid.UUID(asset_id))
    except (ValueError, AttributeError, TypeError):
        return None


def _wanted(given: Iterable[str]) -> tuple[dict[str, str | None], list[str]]:
    """Each id as given -> its canonical UUID (None: not one); and the distinct UUIDs to query, sorted."""
    canonical = {a: _canonical(a) for a in given}
    return canonical, sorted({c for c in canonical.values() if c is not None})


def _as_given(canonical: dict[str, str | None], found: dict[str, V], absent: Callable[[str], V]) -> dict[str, V]:
    """One verdict per id, keyed as given; ``absent(id)`` for one that is not a UUID or was not found."""
    out: dict[str, V] = {}
    for a, c in canonical.items():
        verdict = found.get(c) if c is not None else None
        out[a] = verdict if verdict is not None else absent(a)
    return out


async def media_mapper(pg: PostgresSource, media: MediaConfig) -> PathMapper:
    """The mapping of stored paths onto ``media.root``, the media location detected when ``auto``."""
    if not media.root:
        raise ValueError("media.root is not set")
    location = media.location
    if location == "auto":
        async with pg.connection() as conn:
            location = await media_location(conn, await pg.schema(), pg.config.statement_timeout)
    return PathMapper(media.root, location)


async def check_assets(
    pg: PostgresSource,
    schema: Schema,
    mapper: PathMapper,
    asset_ids: Iterable[str],
    *,
    headers: bool = True,
    batch_size: int = BATCH,
    timeout: float | None = None,
) -> dict[str, AssetVerdict]:
    """Judge each asset in ``asset_ids`` as it is now, in the database and on disk.

    Returns one ``AssetVerdict`` per id given (keyed as given): ``exists`` False for an id that is not a
    UUID or names no asset; else its eligibility, original (``original_exists``) and every problem
    ``(kind, reason, stored path)`` with reason ``no_record``, ``path_refused`` or a file reason
    (``verdict.file_reason``); ``written`` when it has none. ``headers``: compare each file's first bytes
    with its extension (on by default: a file is only called sound on good evidence).

    One query per ``batch_size`` ids (a pooled connection, each statement bounded by ``timeout``,
    ``database.statement_timeout`` by default), no walk; the files of a batch are looked at in one
    media-pool call, bounded in time. Raises what ``PostgresSource`` raises when the database fails,
    and ``MediaStuck`` (a ``SourceError`` of ``filesystem``) when the disk does not answer.
    """
    canonical, ids = _wanted(asset_ids)
    statement_timeout = pg.config.statement_timeout if timeout is None else timeout
    found = await _in_batches(pg, targeted_sql(schema), ids, batch_size, statement_timeout, _asset_row, _judge,
                              mapper, headers)
    return _as_given(canonical, found, lambda a: AssetVerdict(a, exists=False))


def _asset_row(r: Any) -> AssetRow:
    return AssetRow(r[0], r[1], r[2], r[3], bool(r[4]), [(f[0], f[1], f[2] == "true") for f in r[6]],
                    edited=bool(r[5]))


def _person_row(r: Any) -> PersonRow:
    return PersonRow(r[0], r[1], r[2] or "", r[3], r[4])


async def _in_batches(
    pg: PostgresSource,
    sql: str,
    ids: list[str],
    batch_size: int,
    timeout: float,
    row: Callable[[Any], R],
    judge: Callable[[PathMapper, list[InRoot], Sequence[R], bool], dict[str, V]],
    mapper: PathMapper,
    headers: bool,
) -> dict[str, V]:
    """One query per ``batch_size`` ids (each on a pooled connection, bounded by ``timeout``), then the
    files of the batch judged in one media-pool call, bounded in time: the verdicts by canonical id."""
    disk: list[InRoot] = []
    found: dict[str, V] = {}
    for i in range(0, len(ids), batch_size):
        chunk = ids[i : i + batch_size]
        async with pg.connection() as conn:
            rows = await conn.fetch(sql, [uuid.UUID(a) for a in chunk], timeout=timeout)
        budget = max(MIN_SECONDS, len(chunk) * SECONDS_PER_ASSET)
        found.update(await media_call(judge, mapper, disk, [row(r) for r in rows], headers, timeout=budget))
    return found


def _judge(
    mapper: PathMapper, disk: list[InRoot], assets: Sequence[AssetRow], headers: bool
) -> dict[str, AssetVerdict]:
    """Blocking (a worker thread): the verdict on each asset of one batch."""
    root = _root(mapper, disk)
    return {a.asset_id: judge_asset(mapper, root, a, headers) for a in assets}


def _root(mapper: PathMapper, disk: list[InRoot]) -> InRoot:
    """Blocking: the media root, opened once per check (in the worker thread) and kept for its batches."""
    if not disk:
        disk.append(InRoot(mapper.root_bytes))
    return disk[0]


async def check_people(
    pg: PostgresSource,
    schema: Schema,
    mapper: PathMapper,
    person_ids: Iterable[str],
    *,
    headers: bool = True,
    batch_size: int = BATCH,
    timeout: float | None = None,
) -> dict[str, PersonVerdict]:
    """Judge each person's face thumbnail in ``person_ids`` as it is now, in the database and on disk.

    One ``PersonVerdict`` per id given (keyed as given): ``exists`` False for an id that is not a UUID or
    names no person (or a database without face thumbnails); else its stored path, its feature face's
    asset and original, and its problem: ``no_record`` (``thumbnailPath`` is ``''``), ``path_refused`` or
    a file reason; ``written`` when it has none. Bounded as ``check_assets``: one query per batch, the
    files of a batch looked at in one media-pool call with a time limit.
    """
    canonical, ids = _wanted(person_ids)
    statement_timeout = pg.config.statement_timeout if timeout is None else timeout
    found: dict[str, PersonVerdict] = {}
    if ids and schema.has_person_thumbnails:
        async with pg.connection() as conn:
            faces = await conn.fetchval(FACE_TABLE_SQL, timeout=statement_timeout)
        sql = targeted_people_sql(schema, None if faces is None else str(faces))
        found = await _in_batches(pg, sql, ids, batch_size, statement_timeout, _person_row, _judge_people,
                                  mapper, headers)
    return _as_given(canonical, found, lambda p: PersonVerdict(p, exists=False))


def _judge_people(
    mapper: PathMapper, disk: list[InRoot], people: Sequence[PersonRow], headers: bool
) -> dict[str, PersonVerdict]:
    """Blocking (a worker thread): the verdict on each person of one batch."""
    root = _root(mapper, disk)
    return {p.person_id: judge_person(mapper, root, p, headers) for p in people}
