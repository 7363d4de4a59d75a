"""The SQL the file checks read: the sorted file stream, problem assets' details, eligible originals, and
the targeted check's assets with their rows. Read-only, every statement."""

from __future__ import annotations

from immich_thumbnail_exporter.sources.paths import normalized_sql
from immich_thumbnail_exporter.sources.schema import Schema

# Kind codes in the file stream (person: a face thumbnail, ``person."thumbnailPath"``; its row carries the
# person's id where an asset's carries the asset's).
KINDS = ("thumbnail", "preview", "fullsize", "person")
PERSON = 3
FILE_TYPES = "('thumbnail', 'preview', 'fullsize')"


def files_sql(schema: Schema) -> str:
    """Every thumbnail-type file the database references (and face thumbnails), in disk-walk order:
    ``(absolute path as bytes, kind code, asset id (a person's id for a face thumbnail)[, stored path as
    bytes])``.

    Narrow on purpose: two million paths are sorted (a few seconds at a million assets, spilling to
    disk beyond ``work_mem``), and every column widens the sort and its temporary files. No join: the
    asset's details are only needed for the few rows with a problem, looked up afterwards
    (``problem_assets_sql``). Paths are sorted as bytes: bytewise, like the walk and ``COLLATE "C"``.
    """
    kind = "CASE f.type WHEN 'thumbnail' THEN 0 WHEN 'preview' THEN 1 ELSE 2 END"
    if not schema.relative_paths_possible:
        # Absolute paths only (v1.136+): the path is its own sort key, sorted once, stored once.
        return f"""SELECT convert_to(f.path, 'UTF8') AS path, {kind} AS kind, f."assetId" AS asset_id
FROM {schema.files} f WHERE f.type IN {FILE_TYPES}
{_person_plain(schema)}
ORDER BY path"""
    # Older eras may store paths relative to Immich's working directory: merge on the absolute form (the
    # sort key), and keep the stored form for the report.
    person = (
        f"""UNION ALL SELECT convert_to({normalized_sql('p."thumbnailPath"')}, 'UTF8'), {PERSON}, p.id,
  convert_to(p."thumbnailPath", 'UTF8')
FROM person p WHERE p."thumbnailPath" IS NOT NULL AND p."thumbnailPath" <> ''"""
        if schema.has_person_thumbnails
        else ""
    )
    return f"""SELECT convert_to({normalized_sql("f.path")}, 'UTF8') AS path, {kind} AS kind, f."assetId" AS asset_id,
  convert_to(f.path, 'UTF8') AS stored
FROM {schema.files} f WHERE f.type IN {FILE_TYPES}
{person}
ORDER BY path"""


def _person_plain(schema: Schema) -> str:
    if not schema.has_person_thumbnails:
        return ""
    return f"""UNION ALL SELECT convert_to(p."thumbnailPath", 'UTF8'), {PERSON}, p.id
FROM person p WHERE p."thumbnailPath" IS NOT NULL AND p."thumbnailPath" <> ''"""


def problem_assets_sql(schema: Schema) -> str:
    """``(id, owner, type, original path, eligible)`` of the assets ``$1`` (uuid[])."""
    return f"""SELECT a.id, a."ownerId"::text, lower(a.type), a."originalPath", ({schema.eligible("a")})
FROM {schema.assets} a WHERE a.id = ANY($1::uuid[])"""


# Immich's face table: ``asset_faces`` until StandardizeNames (v1.136) renamed it with ``assets``. Its
# ``id`` is what ``person."faceAssetId"`` points at, its ``"assetId"`` the asset the face is in.
FACE_TABLES = ("asset_face", "asset_faces")
FACE_TABLE_SQL = """SELECT c.relname FROM pg_class c
WHERE c.oid IN (to_regclass('asset_face'), to_regclass('asset_faces'))
  AND (SELECT count(*) FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attname IN ('id', 'assetId')
       AND NOT a.attisdropped) = 2
ORDER BY c.relname LIMIT 1"""


def _face_asset(schema: Schema, faces: str | None) -> tuple[str, str]:
    """The join from person ``p`` to its feature face's asset ``fa``, and that asset's columns
    ``(id, original path)``; NULLs where the database has no face table (the exporter's own test schemas)."""
    if faces not in FACE_TABLES:
        return "", "NULL::text, NULL::text"
    join = (f'LEFT JOIN {faces} ff ON ff.id = p."faceAssetId"\n'
            f'LEFT JOIN {schema.assets} fa ON fa.id = ff."assetId"')
    return join, 'fa.id::text, fa."originalPath"'


def problem_people_sql(schema: Schema, faces: str | None) -> str:
    """``(id, owner, feature face's asset id, its original path)`` of the people ``$1`` (uuid[])."""
    join, cols = _face_asset(schema, faces)
    return f"""SELECT p.id, p."ownerId"::text, {cols}
FROM person p {join}
WHERE p.id = ANY($1::uuid[])"""


def targeted_people_sql(schema: Schema, faces: str | None) -> str:
    """The people ``$1`` (uuid[]) as the targeted check reads them: ``(id, owner, stored thumbnail path,
    feature face's asset id, its original path)``. One primary-key probe per person, and one per join."""
    join, cols = _face_asset(schema, faces)
    return f"""SELECT p.id::text, p."ownerId"::text, p."thumbnailPath", {cols}
FROM person p {join}
WHERE p.id = ANY($1::uuid[])"""


def originals_sql(schema: Schema) -> str:
    return f"""SELECT a."originalPath" FROM {schema.assets} a WHERE {schema.eligible("a")}
ORDER BY {normalized_sql('a."originalPath"')} COLLATE "C\""""


def targeted_sql(schema: Schema) -> str:
    """The assets ``$1`` (uuid[]) with their thumbnail-type rows, in one statement:
    ``(id, owner, type, original path, eligible, edited, [[kind, stored path, edited], ...])`` (edited:
    ``'true'``/``'false'``, false before v2.5). One primary-key probe and one ``asset_file ("assetId",
    type)`` index range per asset."""
    asset_edited = 'a."isEdited"' if schema.has_edited_assets else "false"
    file_edited = 'f."isEdited"' if schema.has_edited else "false"
    return f"""SELECT a.id::text, a."ownerId"::text, lower(a.type), a."originalPath", ({schema.eligible("a")}),
  {asset_edited},
  ARRAY(SELECT ARRAY[f.type::text, f.path, ({file_edited})::text] FROM {schema.files} f
        WHERE f."assetId" = a.id AND f.type IN {FILE_TYPES} ORDER BY f.type, f.path)
FROM {schema.assets} a WHERE a.id = ANY($1::uuid[])"""
