"""The targeted check: the full scan's file rule applied to a handful of assets (``regenerate`` and
``serve``'s remediation check what they ask Immich for, before and after).

Fetch the assets' ``asset_file`` rows, map each path onto the media root (``PathMapper``, refusing paths
that escape it), and judge the file: missing, empty, corrupt (magic bytes, ``header_ok``) or unreadable.
Headers are always checked here, whatever ``checks.verify_headers`` says: an asset is only called fixed
on good evidence.
"""

from __future__ import annotations

import asyncio
import os
import stat
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from immich_thumbnail_exporter.config import Config
from immich_thumbnail_exporter.scan.files import header_verdict
from immich_thumbnail_exporter.scan.inventory import media_location
from immich_thumbnail_exporter.sources.paths import PathMapper
from immich_thumbnail_exporter.sources.postgres import PostgresSource
from immich_thumbnail_exporter.sources.schema import Schema
from immich_thumbnail_exporter.vocabulary import RECORD_KINDS

CHECK_CHUNK = 1_000


# -- the targeted check ----------------------------------------------------------------------------


@dataclass
class AssetCheck:
    """One asset as the database and the disk show it now."""

    asset_id: str
    exists: bool
    eligible: bool = False
    owner_id: str | None = None
    asset_type: str | None = None
    original_path: str | None = None
    original_exists: bool | None = None
    # (kind, reason, stored path) for each missing or broken thumbnail-type file.
    problems: list[tuple[str, str, str | None]] = field(default_factory=list)

    def broken(self, kinds: Iterable[str] | None = None) -> list[tuple[str, str, str | None]]:
        wanted = None if kinds is None else set(kinds)
        return [p for p in self.problems if wanted is None or p[0] in wanted]

    def describe(self, kinds: Iterable[str] | None = None) -> str:
        broken = self.broken(kinds)
        if not broken:
            return "all files present"
        return ", ".join(sorted({f"{k} {r}" for k, r, _ in broken}))


def judge_file(mapper: PathMapper, root_real: bytes, stored: str) -> str | None:
    """The scan's rule for one file: None when it is fine, else the reason."""
    rel = mapper.relative(stored)
    if rel is None:
        return "path_refused"
    local = mapper.local(rel)
    try:
        st = os.lstat(local)
    except (FileNotFoundError, NotADirectoryError):
        return "file_missing"
    except OSError:
        return "file_unreadable"
    target = local
    if stat.S_ISLNK(st.st_mode):
        target = os.path.realpath(local)
        if not (target == root_real or target.startswith(root_real.rstrip(b"/") + b"/")):
            return "file_unreadable"
        try:
            st = os.stat(target)
        except OSError:
            return "file_missing"
    if not stat.S_ISREG(st.st_mode):
        return "file_missing"
    if st.st_size == 0:
        return "file_empty"
    ext = rel.rsplit(".", 1)[-1].lower() if "." in rel.rsplit("/", 1)[-1] else ""
    return header_verdict(target, ext)


def original_exists(mapper: PathMapper, stored: str | None) -> bool | None:
    rel = mapper.relative(stored)
    if rel is None:
        return None  # outside the media location (external library): not ours to judge
    try:
        os.lstat(mapper.local(rel))
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError:
        return None
    return True


def valid_asset_id(asset_id: str) -> bool:
    try:
        uuid.UUID(asset_id)
    except ValueError:
        return False
    return True


class Checker:
    """Targeted checks against one Immich: the schema and media mapping are looked up once."""

    def __init__(self, config: Config, pg: PostgresSource) -> None:
        if not config.media.root:
            raise ValueError("media.root is not set")
        self.config = config
        self.pg = pg
        self.schema: Schema | None = None
        self.mapper: PathMapper | None = None

    async def prepare(self) -> tuple[Schema, PathMapper]:
        if self.schema is None or self.mapper is None:
            schema = await self.pg.schema()
            location = self.config.media.location
            if location == "auto":
                async with self.pg.connection() as conn:
                    location = await media_location(conn, schema, self.config.database.statement_timeout)
            assert self.config.media.root is not None
            self.schema, self.mapper = schema, PathMapper(self.config.media.root, location)
        return self.schema, self.mapper

    async def check(self, asset_ids: Iterable[str]) -> dict[str, AssetCheck]:
        """Fetch the assets' rows and judge their files. Ids that are not UUIDs are reported as absent."""
        schema, mapper = await self.prepare()
        ids = sorted({a for a in asset_ids if valid_asset_id(a)})
        out: dict[str, AssetCheck] = {}
        timeout = self.config.database.statement_timeout
        eligible = schema.eligible("a")
        assets_sql = (
            f'SELECT a.id::text, a."ownerId"::text, lower(a.type), a."originalPath", ({eligible}) '
            f"FROM {schema.assets} a WHERE a.id = ANY($1::uuid[])"
        )
        files_sql = (
            f'SELECT f."assetId"::text, f.type, f.path FROM {schema.files} f '
            f"WHERE f.\"assetId\" = ANY($1::uuid[]) AND f.type IN ('thumbnail', 'preview', 'fullsize') "
            f'ORDER BY f."assetId", f.type, f.path'
        )
        for i in range(0, len(ids), CHECK_CHUNK):
            chunk = [uuid.UUID(a) for a in ids[i : i + CHECK_CHUNK]]
            async with self.pg.connection() as conn:
                asset_rows = await conn.fetch(assets_sql, chunk, timeout=timeout)
                file_rows = await conn.fetch(files_sql, chunk, timeout=timeout)
            files: dict[str, list[tuple[str, str]]] = {}
            for r in file_rows:
                files.setdefault(r[0], []).append((r[1], r[2]))
            rows = [(r[0], r[1], r[2], r[3], bool(r[4])) for r in asset_rows]
            judged = await asyncio.wait_for(
                asyncio.to_thread(self._judge, mapper, rows, files), max(30.0, len(chunk) * 0.1)
            )
            out.update(judged)
        for a in asset_ids:
            out.setdefault(a, AssetCheck(a, exists=False))
        return out

    @staticmethod
    def _judge(
        mapper: PathMapper,
        rows: Sequence[tuple[str, str, str, str | None, bool]],
        files: Mapping[str, list[tuple[str, str]]],
    ) -> dict[str, AssetCheck]:
        root_real = os.path.realpath(mapper.root_bytes)
        out: dict[str, AssetCheck] = {}
        for asset_id, owner, atype, original, eligible in rows:
            check = AssetCheck(asset_id, True, eligible, owner, atype, original, original_exists(mapper, original))
            seen: set[str] = set()
            for kind, path in files.get(asset_id, []):
                seen.add(kind)
                reason = judge_file(mapper, root_real, path)
                if reason is not None:
                    check.problems.append((kind, reason, path))
            for kind in RECORD_KINDS:
                if kind not in seen:
                    check.problems.append((kind, "no_record", None))
            out[asset_id] = check
        return out
