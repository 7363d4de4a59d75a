"""What Immich's database says about thumbnails, without touching the disk.

All counts use Immich's own eligibility rule (``Schema.eligible``): not deleted, not hidden, an image or
a video. Immich's "Missing" job also INNER JOINs ``asset_job_status``; the assets that join drops are
reported on their own as ``metadata_pending`` because "Missing" will never queue them.

A row is missing (``reason="no_record"``) where Immich's "Missing" rule (``streamForThumbnailJob``,
``asset-job.repository.ts``, unchanged through v3) says so: no thumbnail row, no preview row, and, from
v2.5 on, an edited asset (``asset."isEdited"``) without an edited fullsize row (``asset_file."isEdited"``).
Its remaining fullsize condition depends on the admin's settings and the decoded original, so a plain
asset's missing fullsize row is not judged from the database.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import asyncpg

from immich_thumbnail_exporter.findings import InventoryCounts, Problem
from immich_thumbnail_exporter.sources.paths import DEFAULT_LOCATION, LEGACY_LOCATION, location_from_sample
from immich_thumbnail_exporter.sources.schema import Schema
from immich_thumbnail_exporter.vocabulary import RECORD_KINDS

# The kind whose row Immich requires of edited assets only (an edited asset is shown from its edited
# fullsize rendition).
EDITED_KIND = "fullsize"


def record_kinds(schema: Schema) -> tuple[str, ...]:
    """The kinds whose missing row counts as ``no_record`` on this schema: a thumbnail and a preview for
    every eligible asset (``RECORD_KINDS``) and, where assets can be edited, the edited fullsize."""
    return (*RECORD_KINDS, EDITED_KIND) if schema.has_edited_assets else RECORD_KINDS


def _lacking(schema: Schema, kind: str) -> str:
    """The condition, on asset alias ``x``, that it lacks the row ``kind`` requires."""
    if kind == EDITED_KIND:
        return f"""x."isEdited" AND NOT EXISTS
  (SELECT 1 FROM {schema.files} f WHERE f."assetId" = x.id AND f.type = '{kind}' AND f."isEdited")"""
    return f"""NOT EXISTS
  (SELECT 1 FROM {schema.files} f WHERE f."assetId" = x.id AND f.type = '{kind}')"""


def lacking_sql(schema: Schema, kinds: tuple[str, ...], with_job_status: bool) -> str:
    """Ids of assets (any, eligible or not) with no row of each kind, tagged with the kind's position.

    Each is an anti-join on ids alone, which PostgreSQL runs as a merge of two index-only scans
    (``asset`` primary key, ``asset_file ("assetId", type)``) instead of a probe per asset: 9 s became
    under 1 s at a million assets. Eligibility is checked afterwards, on the (few) ids found. The edited
    fullsize check reads only the (few) edited assets' rows, through ``("assetId", type, "isEdited")``.
    """
    parts = [f"SELECT x.id, {i} AS k FROM {schema.assets} x WHERE {_lacking(schema, kind)}"
             for i, kind in enumerate(kinds)]
    if with_job_status:
        parts.append(f"""SELECT x.id, {len(kinds)} AS k FROM {schema.assets} x WHERE NOT EXISTS
  (SELECT 1 FROM asset_job_status j WHERE j."assetId" = x.id)""")
    return "\nUNION ALL ".join(parts)


def _totals(schema: Schema) -> str:
    """Eligible assets by type, and those without a thumbhash: one pass over the asset table."""
    return f"""
  SELECT
    count(*) FILTER (WHERE a.type = 'IMAGE') AS images,
    count(*) FILTER (WHERE a.type = 'VIDEO') AS videos,
    count(*) FILTER (WHERE a.thumbhash IS NULL) AS thumbhash_missing
  FROM {schema.assets} a
  WHERE {schema.eligible("a")}
"""


def counts_sql(schema: Schema) -> str:
    eligible = schema.eligible("a")
    kinds = record_kinds(schema)
    missing = ",\n  ".join(f"count(*) FILTER (WHERE l.k = {i}) AS no_{kind}" for i, kind in enumerate(kinds))
    job_status = f"count(*) FILTER (WHERE l.k = {len(kinds)})" if schema.has_job_status else "0"
    # LATERAL ... LIMIT 1: one primary-key probe per id found, whatever the planner guesses for the CTE.
    return f"""
WITH lacking AS MATERIALIZED (
{lacking_sql(schema, kinds, schema.has_job_status)}
), totals AS ({_totals(schema)}), missing AS (
  SELECT
  {missing},
  {job_status} AS metadata_pending
  FROM lacking l CROSS JOIN LATERAL (SELECT 1 FROM {schema.assets} a WHERE a.id = l.id AND {eligible} LIMIT 1) e
)
SELECT * FROM totals, missing
"""


async def server_version(conn: asyncpg.Connection, schema: Schema, timeout: float) -> str | None:
    if not schema.has_version_history:
        return None
    value = await conn.fetchval(
        'SELECT version FROM version_history ORDER BY "createdAt" DESC, id DESC LIMIT 1', timeout=timeout
    )
    if value is None:
        return None
    # Immich stores "1.120.2"; its API and release names say "v1.120.2".
    text = str(value).strip()
    return f"v{text}" if text[:1].isdigit() else text


async def _counts(conn: asyncpg.Connection, schema: Schema, row: Any, timeout: float) -> InventoryCounts:
    """The counts carried by a row of ``counts_sql`` or ``counts_and_records_sql``."""
    return InventoryCounts(
        schema=schema.era,
        version=await server_version(conn, schema, timeout),
        assets={"image": int(row["images"]), "video": int(row["videos"])},
        no_record={kind: int(row[f"no_{kind}"]) for kind in record_kinds(schema)},
        thumbhash_missing=int(row["thumbhash_missing"]),
        metadata_pending=int(row["metadata_pending"]),
    )


async def count(conn: asyncpg.Connection, schema: Schema, timeout: float) -> InventoryCounts:
    if conn.is_in_transaction():
        # The anti-joins are cheapest as merges of index-only scans; left to itself the planner often
        # hashes a million ids for one of them instead (about 1 s more at a million assets).
        await conn.execute("SET LOCAL enable_hashjoin = off", timeout=timeout)
    row = await conn.fetchrow(counts_sql(schema), timeout=timeout)
    assert row is not None
    return await _counts(conn, schema, row, timeout)


def counts_and_records_sql(schema: Schema) -> str:
    """``counts_sql`` and the no_record rows in one pass over the anti-joins: every row carries the counts;
    the rows naming an asset (``k`` set) are the eligible assets with no row of a required kind, ordered by
    kind then id. With none, one row of counts alone."""
    eligible = schema.eligible("a")
    kinds = record_kinds(schema)
    labels = " ".join(f"WHEN {i} THEN '{kind}'" for i, kind in enumerate(kinds))
    missing = ",\n  ".join(
        f"(SELECT count(*) FROM found WHERE found.k = {i}) AS no_{kind}" for i, kind in enumerate(kinds)
    )
    job_status = f"(SELECT count(*) FROM found WHERE found.k = {len(kinds)})" if schema.has_job_status else "0"
    return f"""
WITH lacking AS MATERIALIZED (
{lacking_sql(schema, kinds, schema.has_job_status)}
), found AS MATERIALIZED (
  SELECT l.k, e.id, e."ownerId", e.type, e."originalPath"
  FROM lacking l CROSS JOIN LATERAL (
    SELECT a.id, a."ownerId", a.type, a."originalPath" FROM {schema.assets} a WHERE a.id = l.id AND {eligible} LIMIT 1
  ) e
), totals AS ({_totals(schema)})
SELECT t.images, t.videos, t.thumbhash_missing,
  {missing},
  {job_status} AS metadata_pending,
  f.id::text AS asset_id, f."ownerId"::text AS owner_id, lower(f.type) AS asset_type,
  CASE f.k {labels} END AS kind, f."originalPath" AS original_path
FROM totals t LEFT JOIN (SELECT * FROM found WHERE found.k < {len(kinds)}) f ON true
ORDER BY f.k, f.id
"""


async def count_and_stream_records(
    conn: asyncpg.Connection, schema: Schema, fetch_size: int, timeout: float
) -> AsyncIterator[InventoryCounts | Problem]:
    """``count`` then ``stream_no_record`` in one query (the anti-joins once, not twice): yields the counts
    first, then the no_record problems. Must run inside a transaction (server cursor)."""
    await conn.execute("SET LOCAL enable_hashjoin = off", timeout=timeout)
    cursor = conn.cursor(counts_and_records_sql(schema), prefetch=fetch_size, timeout=timeout)
    first = True
    async for row in cursor:
        if first:
            first = False
            yield await _counts(conn, schema, row, timeout)
        if row["kind"] is None:
            continue
        yield Problem(
            asset_id=row["asset_id"],
            owner_id=row["owner_id"],
            asset_type=row["asset_type"],
            kind=row["kind"],
            reason="no_record",
            path=None,
            original_path=row["original_path"],
            original_exists=None,
        )


async def media_location(conn: asyncpg.Connection, schema: Schema, timeout: float) -> str:
    """Immich's media location: ``system_metadata.MediaLocation``, else the prefix of a stored thumbnail
    path, else the era's default."""
    if schema.has_system_metadata:
        raw = await conn.fetchval(
            "SELECT value FROM system_metadata WHERE key = 'MediaLocation'", timeout=timeout
        )
        value: Any = json.loads(raw) if isinstance(raw, str) else raw
        if isinstance(value, dict) and isinstance(value.get("location"), str) and value["location"]:
            return str(value["location"]).rstrip("/") or "/"
    sample = await conn.fetchval(
        f"SELECT path FROM {schema.files} WHERE type = 'thumbnail' AND path LIKE '%/thumbs/%' LIMIT 1",
        timeout=timeout,
    )
    guessed = location_from_sample(sample)
    if guessed:
        return guessed
    return LEGACY_LOCATION if schema.relative_paths_possible else DEFAULT_LOCATION


async def stream_no_record(
    conn: asyncpg.Connection, schema: Schema, fetch_size: int, timeout: float
) -> AsyncIterator[Problem]:
    """Eligible assets with no row of a required kind. Must run inside a transaction (server cursor)."""
    eligible = schema.eligible("a")
    kinds = record_kinds(schema)
    labels = " ".join(f"WHEN {i} THEN '{kind}'" for i, kind in enumerate(kinds))
    sql = f"""WITH lacking AS MATERIALIZED (
{lacking_sql(schema, kinds, False)}
)
SELECT a.id::text, a."ownerId"::text, lower(a.type), CASE l.k {labels} END, a."originalPath"
FROM lacking l CROSS JOIN LATERAL (SELECT * FROM {schema.assets} a WHERE a.id = l.id AND {eligible} LIMIT 1) a
ORDER BY l.k, a.id"""
    cursor = conn.cursor(sql, prefetch=fetch_size, timeout=timeout)
    async for row in cursor:
        yield Problem(
            asset_id=row[0],
            owner_id=row[1],
            asset_type=row[2],
            kind=row[3],
            reason="no_record",
            path=None,
            original_path=row[4],
            original_exists=None,
        )
