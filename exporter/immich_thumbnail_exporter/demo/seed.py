"""Build a realistic post-restore Immich: a database of one schema era plus its media folder.

Used by ``demo``, the tests and the benchmark. The tables come from ``demo/schemas/<era>.sql``,
written from Immich's own migrations, or from SQL the caller passes (the tests pass Immich's real
schemas, ``../shared/immich-schema/<release>.sql``); this module fills them through the catalogue
(every NOT NULL column without a default gets a plausible value, an enum its first label), so one
seeder serves every era and every release.

It injects a known number of each problem the exporter must find and returns those numbers as
``Expected``. Nothing here is used by ``serve`` or ``scan``.
"""

from __future__ import annotations

import datetime as dt
import os
import random
import uuid
from collections import Counter
from dataclasses import dataclass, field, replace
from importlib import resources
from typing import Any

import asyncpg


@dataclass(frozen=True)
class Era:
    label: str
    ddl: str
    version: str
    users: str
    assets: str
    files: str
    # Paths stored relative to /usr/src/app ("upload/thumbs/...") before v1.136.
    relative: bool
    visibility_enum: bool
    media_location_row: bool
    name_sep: str


ERAS: dict[str, Era] = {
    "v1.113+": Era("v1.113+", "plural_v1_120.sql", "1.120.2", "users", "assets", "asset_files",
                   True, False, False, "-"),
    "v1.133+": Era("v1.133+", "plural_v1_133.sql", "1.133.1", "users", "assets", "asset_files",
                   True, True, False, "-"),
    "v1.136+": Era("v1.136+", "singular_v1_137.sql", "1.137.3", "user", "asset", "asset_file",
                   False, True, True, "_"),
    "v2.5+": Era("v2.5+", "edits_v2_5.sql", "2.5.2", "user", "asset", "asset_file",
                 False, True, True, "_"),
}

THUMB_SIZE, PREVIEW_SIZE, FULLSIZE_SIZE, PERSON_SIZE, ORPHAN_SIZE = 300, 1200, 2000, 150, 500


def webp(size: int) -> bytes:
    body = b"WEBPVP8 " + b"\x00" * (size - 16)
    return b"RIFF" + (size - 8).to_bytes(4, "little") + body


def jpeg(size: int) -> bytes:
    return b"\xff\xd8\xff\xe0" + b"\x00" * (size - 6) + b"\xff\xd9"


@dataclass(frozen=True)
class Plan:
    """How many of each problem to inject (distinct assets for each)."""

    assets: int = 254
    owners: int = 2
    video_every: int = 12
    thumbnail_file_missing: int = 3
    preview_file_missing: int = 4
    thumbnail_file_empty: int = 2
    preview_file_corrupt: int = 2
    thumbnail_no_record: int = 2
    preview_no_record: int = 1
    thumbhash_missing: int = 3
    metadata_pending: int = 2
    original_missing: int = 2
    thumbnail_symlink_outside: int = 1
    thumbnail_path_escape: int = 1
    fullsize_assets: int = 4
    fullsize_file_missing: int = 1
    hidden_assets: int = 3
    trashed_assets: int = 2
    persons: int = 2
    orphans: int = 3
    # Edited assets (schemas with asset."isEdited", v2.5+): an edited thumbnail, preview and fullsize
    # beside the original ones; the first ``edited_fullsize_no_record`` lack the edited fullsize row,
    # which Immich's "Missing" rule counts as missing. Elsewhere these are ignored.
    edited_assets: int = 0
    edited_fullsize_no_record: int = 0
    # A ``locked`` asset (visibility enum, v1.133+) whose thumbnail file is gone: Immich's API never lets
    # an API key reach it, so regeneration must skip it with that reason.
    locked_thumbnail_missing: int = 0
    # People whose face thumbnail file is gone while ``person.thumbnailPath`` still names it. Each person
    # gets one face (``asset_face``) on a healthy asset of its owner, its feature face, where the schema
    # has the table: what ``PUT /api/people/{id} {featureFaceAssetId}`` needs.
    person_thumbnail_missing: int = 0
    seed: int = 42


@dataclass
class Expected:
    assets: dict[str, int] = field(default_factory=lambda: {"image": 0, "video": 0})
    missing: Counter[tuple[str, str]] = field(default_factory=Counter)
    thumbhash_missing: int = 0
    metadata_pending: int = 0
    originals_missing: int = 0
    files: Counter[str] = field(default_factory=Counter)
    bytes: Counter[str] = field(default_factory=Counter)
    orphaned_files: int = 0
    orphaned_bytes: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    asset_ids: list[str] = field(default_factory=list)
    problem_asset_ids: set[str] = field(default_factory=set)
    location: str = ""
    version: str = ""
    locked_asset_ids: set[str] = field(default_factory=set)
    # person id -> the asset holding its feature face (only where the schema has a face table)
    person_faces: dict[str, str] = field(default_factory=dict)
    person_thumbnails_missing: set[str] = field(default_factory=set)


def ddl_text(era: Era) -> str:
    return resources.files("immich_thumbnail_exporter.demo.schemas").joinpath(era.ddl).read_text(encoding="utf-8")


async def _columns(conn: asyncpg.Connection, table: str) -> list[asyncpg.Record]:
    return list(await conn.fetch(
        """SELECT c.column_name, c.is_nullable, c.column_default, c.data_type, c.udt_name
           FROM information_schema.columns c
           WHERE c.table_schema = current_schema() AND c.table_name = $1 ORDER BY c.ordinal_position""",
        table,
    ))


async def _enum_first(conn: asyncpg.Connection, udt: str) -> str | None:
    label = await conn.fetchval(
        "SELECT e.enumlabel FROM pg_enum e JOIN pg_type t ON t.oid = e.enumtypid "
        "WHERE t.typname = $1 ORDER BY e.enumsortorder LIMIT 1",
        udt,
    )
    return None if label is None else str(label)


class _Table:
    """Fills the NOT NULL columns a row does not set, with values unique per row."""

    def __init__(self, name: str, columns: list[asyncpg.Record], enums: dict[str, str | None]) -> None:
        self.name = name
        self.columns = columns
        self.enums = enums
        self.names = [c["column_name"] for c in columns]

    def complete(self, row: dict[str, Any], n: int) -> dict[str, Any]:
        now = dt.datetime(2024, 6, 1, tzinfo=dt.UTC) + dt.timedelta(minutes=n)
        out = dict(row)
        for c in self.columns:
            col = c["column_name"]
            if col in out or c["is_nullable"] == "YES" or c["column_default"] is not None:
                continue
            dtype, udt = c["data_type"], c["udt_name"]
            if dtype == "uuid":
                out[col] = uuid.uuid4()
            elif dtype in ("character varying", "text"):
                out[col] = f"{col}-{n}"
            elif dtype.startswith("timestamp"):
                out[col] = now
            elif dtype == "date":
                out[col] = now.date()
            elif dtype == "bytea":
                out[col] = f"{col}-{n}".encode()
            elif dtype == "boolean":
                out[col] = False
            elif dtype in ("integer", "bigint", "smallint", "double precision", "real", "numeric"):
                out[col] = 0
            elif dtype in ("jsonb", "json"):
                out[col] = "{}"
            elif dtype == "USER-DEFINED":
                out[col] = self.enums.get(udt)
            elif dtype == "ARRAY":
                out[col] = []
            else:
                raise ValueError(f"seed: no filler for {self.name}.{col} of type {dtype}")
        return out


async def _table(conn: asyncpg.Connection, name: str) -> _Table:
    cols = await _columns(conn, name)
    enums = {c["udt_name"]: await _enum_first(conn, c["udt_name"]) for c in cols if c["data_type"] == "USER-DEFINED"}
    return _Table(name, cols, enums)


async def _insert(conn: asyncpg.Connection, table: _Table, rows: list[dict[str, Any]], start: int = 0) -> None:
    if not rows:
        return
    full = [table.complete(r, start + i) for i, r in enumerate(rows)]
    cols = list(full[0].keys())
    for r in full:
        if list(r.keys()) != cols:
            # Rows with different column sets go in one by one.
            await _insert_one(conn, table.name, r)
    uniform = [r for r in full if list(r.keys()) == cols]
    if uniform:
        await conn.copy_records_to_table(table.name, records=[tuple(r[c] for c in cols) for r in uniform],
                                         columns=cols)


async def _insert_one(conn: asyncpg.Connection, table: str, row: dict[str, Any]) -> None:
    cols = list(row)
    names = ", ".join(f'"{c}"' for c in cols)
    params = ", ".join(f"${i + 1}" for i in range(len(cols)))
    await conn.execute(f'INSERT INTO "{table}" ({names}) VALUES ({params})', *row.values())


async def create_database(admin_dsn: str, name: str) -> None:
    conn = await asyncpg.connect(admin_dsn, timeout=10)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


async def seed(
    dsn: str,
    media_root: str,
    era_label: str = "v1.136+",
    plan: Plan | None = None,
    *,
    ddl: str | None = None,
    versions: tuple[str, ...] | None = None,
) -> Expected:
    """Create the tables in the (empty) database at ``dsn`` and the files under ``media_root``.

    ``ddl`` builds the tables (default: the era's hand-written file); it must give the era's table and
    column names. ``versions`` are the ``version_history`` rows, oldest first (default: an older
    release, then the era's); the last is the installed version."""
    plan = plan or Plan()
    era = ERAS[era_label]
    if versions is not None:
        era = replace(era, version=versions[-1])
    rng = random.Random(plan.seed)
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await conn.execute(ddl if ddl is not None else ddl_text(era))
        # Immich's own migrations set the database's search_path; this session started before them.
        await conn.execute("RESET search_path")
        return await _seed(conn, era, plan, rng, media_root, versions or ("1.118.0", era.version))
    finally:
        await conn.close()


async def _seed_faces(conn: asyncpg.Connection, people: list[dict[str, Any]], assets: list[dict[str, Any]],
                      exp: Expected) -> None:
    """One face per person, on a healthy visible asset of the same owner, made its feature face."""
    table = None
    for name in ("asset_face", "asset_faces"):  # singular from v1.137 (StandardizeNames)
        if await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", f'public."{name}"'):
            table = name
            break
    if table is None:
        return
    healthy = [a for a in assets if str(a["id"]) not in exp.problem_asset_ids and a["deletedAt"] is None
               and a.get("visibility", "timeline") == "timeline" and a.get("isVisible", True) and a["type"] == "IMAGE"]
    faces, features = [], []
    for n, person in enumerate(people):
        mine = [a for a in healthy if a["ownerId"] == person["ownerId"]]
        if not mine:
            continue
        asset = mine[n % len(mine)]
        face = uuid.UUID(int=person["id"].int ^ asset["id"].int, version=4)
        faces.append({"id": face, "assetId": asset["id"], "personId": person["id"]})
        features.append((face, person["id"]))
        exp.person_faces[str(person["id"])] = str(asset["id"])
    await _insert(conn, await _table(conn, table), faces)
    await conn.executemany('UPDATE person SET "faceAssetId" = $1 WHERE id = $2', features)


def _uuid(rng: random.Random) -> uuid.UUID:
    return uuid.UUID(int=rng.getrandbits(128), version=4)


async def _seed(
    conn: asyncpg.Connection, era: Era, plan: Plan, rng: random.Random, root: str, versions: tuple[str, ...]
) -> Expected:
    exp = Expected(version=f"v{era.version}")
    location = "/usr/src/app/upload" if era.relative else "/data"
    exp.location = location

    def stored(rel: str) -> str:
        # What Immich writes into the database for a file at <media>/<rel>.
        return f"upload/{rel}" if era.relative else f"{location}/{rel}"

    def write(rel: str, data: bytes) -> None:
        full = os.path.join(root, rel)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "wb") as fh:
            fh.write(data)

    os.makedirs(os.path.join(root, "thumbs"), exist_ok=True)
    for folder in ("thumbs", "upload", "library", "encoded-video", "profile", "backups"):
        write(f"{folder}/.immich", b"")

    users = await _table(conn, era.users)
    owners = [_uuid(rng) for _ in range(plan.owners)]
    await _insert(conn, users, [{"id": o, "email": f"user{i}@example.com", "name": f"User {i}"}
                                for i, o in enumerate(owners)])

    assets_t = await _table(conn, era.assets)
    files_t = await _table(conn, era.files)
    status_t = await _table(conn, "asset_job_status")

    # Indices of assets receiving each problem: consecutive, disjoint blocks after a shuffle.
    order = list(range(plan.assets))
    rng.shuffle(order)
    blocks: dict[str, set[int]] = {}
    pos = 0
    for name in ("thumbnail_file_missing", "preview_file_missing", "thumbnail_file_empty", "preview_file_corrupt",
                 "thumbnail_no_record", "preview_no_record", "thumbhash_missing", "metadata_pending",
                 "original_missing", "thumbnail_symlink_outside", "thumbnail_path_escape", "hidden_assets",
                 "trashed_assets", "fullsize_assets", "edited_assets", "locked_thumbnail_missing"):
        n = getattr(plan, name) if name != "locked_thumbnail_missing" or era.visibility_enum else 0
        blocks[name] = set(order[pos : pos + n])
        pos += n
    # One asset whose original is gone also lost its preview: a problem regeneration cannot fix.
    unfixable = next(iter(sorted(blocks["original_missing"])), None)
    fullsize_missing = set(sorted(blocks["fullsize_assets"])[: plan.fullsize_file_missing])
    edits = "isEdited" in assets_t.names and "isEdited" in files_t.names
    edited = blocks["edited_assets"] if edits else set()
    edited_no_fullsize = set(sorted(edited)[: plan.edited_fullsize_no_record])

    asset_rows: list[dict[str, Any]] = []
    file_rows: list[dict[str, Any]] = []
    status_rows: list[dict[str, Any]] = []
    for i in range(plan.assets):
        aid = _uuid(rng)
        owner = owners[i % len(owners)]
        is_video = plan.video_every > 0 and i % plan.video_every == plan.video_every - 1
        atype = "VIDEO" if is_video else "IMAGE"
        hidden = i in blocks["hidden_assets"]
        trashed = i in blocks["trashed_assets"]
        eligible = not hidden and not trashed
        sid = str(aid)
        ext = "mp4" if is_video else ("dng" if i in blocks["fullsize_assets"] else "jpg")
        orig_rel = f"upload/{owner}/{sid[:2]}/{sid[2:4]}/{sid}.{ext}"
        row: dict[str, Any] = {
            "id": aid, "ownerId": owner, "type": atype, "originalPath": stored(orig_rel),
            "originalFileName": f"IMG_{i:05d}.{ext}", "checksum": aid.bytes,
            "thumbhash": None if i in blocks["thumbhash_missing"] else b"\x01\x02\x03",
            "deletedAt": dt.datetime(2024, 7, 1, tzinfo=dt.UTC) if trashed else None,
        }
        locked = i in blocks["locked_thumbnail_missing"]
        if era.visibility_enum:
            row["visibility"] = "hidden" if hidden else ("locked" if locked else "timeline")
            if locked:
                exp.locked_asset_ids.add(sid)
        else:
            row["isVisible"] = not hidden
        if trashed and "status" in assets_t.names:
            row["status"] = "trashed"
        if i in edited:
            row["isEdited"] = True
        asset_rows.append(row)
        if i not in blocks["original_missing"]:
            write(orig_rel, jpeg(400))
        elif eligible:
            exp.originals_missing += 1
        if eligible:
            exp.assets[atype.lower()] += 1
            exp.asset_ids.append(sid)
            if i in blocks["thumbhash_missing"]:
                exp.thumbhash_missing += 1
        if i not in blocks["metadata_pending"]:
            status_rows.append({"assetId": aid, "metadataExtractedAt": dt.datetime(2024, 6, 2, tzinfo=dt.UTC)})
        elif eligible:
            exp.metadata_pending += 1

        folder = f"thumbs/{owner}/{sid[:2]}/{sid[2:4]}"
        kinds: list[tuple[str, str, bytes]] = [
            ("thumbnail", f"{sid}{era.name_sep}thumbnail.webp", webp(THUMB_SIZE)),
            ("preview", f"{sid}{era.name_sep}preview.jpeg", jpeg(PREVIEW_SIZE)),
        ]
        if i in blocks["fullsize_assets"]:
            kinds.append(("fullsize", f"{sid}{era.name_sep}fullsize.jpeg", jpeg(FULLSIZE_SIZE)))
        if i in edited:
            # Immich keeps the original renditions and adds edited ones, fullsize included.
            for kind, size, make in (("thumbnail", THUMB_SIZE, webp), ("preview", PREVIEW_SIZE, jpeg),
                                     ("fullsize", FULLSIZE_SIZE, jpeg)):
                if kind == "fullsize" and i in edited_no_fullsize:
                    exp.missing[(kind, "no_record")] += 1
                    exp.problem_asset_ids.add(sid)
                    continue
                ext = "webp" if make is webp else "jpeg"
                rel = f"{folder}/{sid}_{kind}_edited.{ext}"
                file_rows.append({"assetId": aid, "type": kind, "path": stored(rel), "isEdited": True})
                write(rel, make(size))
                exp.files[kind] += 1
                exp.bytes[kind] += size
        for kind, name, data in kinds:
            rel = f"{folder}/{name}"
            reason: str | None = None
            if i in blocks[f"{kind}_no_record"] if f"{kind}_no_record" in blocks else False:
                if eligible:
                    exp.missing[(kind, "no_record")] += 1
                    exp.problem_asset_ids.add(sid)
                continue
            path = stored(rel)
            if kind == "thumbnail" and i in blocks["thumbnail_path_escape"]:
                path = stored(f"thumbs/{owner}/../../../etc/passwd")
                file_rows.append({"assetId": aid, "type": kind, "path": path})
                if eligible:
                    exp.refused[kind] += 1
                continue
            file_rows.append({"assetId": aid, "type": kind, "path": path})
            missing = (
                (kind == "thumbnail" and (i in blocks["thumbnail_file_missing"] or locked))
                or (kind == "preview" and (i in blocks["preview_file_missing"] or i == unfixable))
                or (kind == "fullsize" and i in fullsize_missing)
            )
            if missing:
                reason = "file_missing"
            elif kind == "thumbnail" and i in blocks["thumbnail_file_empty"]:
                write(rel, b"")
                reason = "file_empty"
                exp.files[kind] += 1
            elif kind == "preview" and i in blocks["preview_file_corrupt"]:
                write(rel, webp(PREVIEW_SIZE))  # a webp body behind a .jpeg name
                reason = "file_corrupt"
                exp.files[kind] += 1
                exp.bytes[kind] += PREVIEW_SIZE
            elif kind == "thumbnail" and i in blocks["thumbnail_symlink_outside"]:
                full = os.path.join(root, rel)
                os.makedirs(os.path.dirname(full), exist_ok=True)
                os.symlink("/etc/hostname", full)
                reason = "file_unreadable"
            else:
                write(rel, data)
                exp.files[kind] += 1
                exp.bytes[kind] += len(data)
            if reason is not None and eligible:
                exp.missing[(kind, reason)] += 1
                exp.problem_asset_ids.add(sid)

    await _insert(conn, assets_t, asset_rows)
    await _insert(conn, files_t, file_rows)
    await _insert(conn, status_t, status_rows)

    # Face thumbnails share the thumbs/ tree and are not orphans.
    person_rows = []
    for p in range(plan.persons):
        pid = _uuid(rng)
        owner = owners[p % len(owners)]
        spid = str(pid)
        rel = f"thumbs/{owner}/{spid[:2]}/{spid[2:4]}/{spid}.jpeg"
        if p < plan.person_thumbnail_missing:
            exp.person_thumbnails_missing.add(spid)  # the row keeps naming a file the restore lost
        else:
            write(rel, jpeg(PERSON_SIZE))
        person_rows.append({"id": pid, "ownerId": owner, "thumbnailPath": stored(rel)})
    await _insert(conn, await _table(conn, "person"), person_rows)
    await _seed_faces(conn, person_rows, asset_rows, exp)

    # Orphans: in a directory the database uses, in one it never mentions, and with a non-UTF-8 name.
    first = asset_rows[0]
    sid0, owner0 = str(first["id"]), first["ownerId"]
    orphan_paths = [
        os.fsencode(os.path.join(root, f"thumbs/{owner0}/{sid0[:2]}/{sid0[2:4]}/{uuid.UUID(int=1)}-preview.jpeg")),
        os.fsencode(os.path.join(root, f"thumbs/{owners[-1]}/zz/zz/deadbeef-thumbnail.webp")),
        os.fsencode(os.path.join(root, f"thumbs/{owners[-1]}/zz/zz/")) + b"bad-\xff\xfe-name.webp",
    ][: plan.orphans]
    for orphan in orphan_paths:
        os.makedirs(os.path.dirname(orphan), exist_ok=True)
        with open(orphan, "wb") as fh:  # noqa: ASYNC230 - a test fixture, a few small files
            fh.write(jpeg(ORPHAN_SIZE))
        exp.orphaned_files += 1
        exp.orphaned_bytes += ORPHAN_SIZE

    await _insert(conn, await _table(conn, "version_history"), [
        {"version": v, "createdAt": dt.datetime(2024, 10, 1, tzinfo=dt.UTC) + dt.timedelta(days=30 * n)}
        for n, v in enumerate(versions)
    ])
    if era.media_location_row:
        await _insert_one(conn, "system_metadata", {"key": "MediaLocation", "value": '{"location": "/data"}'})
    return exp
