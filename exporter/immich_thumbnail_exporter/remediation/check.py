"""The targeted check as regeneration uses it: ``regenerate`` and ``serve``'s remediation check what they
ask Immich for, before and after.

The rule is the full scan's (``scan.targeted.check_assets``, ``scan.verdict``): fetch the assets'
``asset_file`` rows, map each path onto the media root (``PathMapper``, refusing paths that escape it),
and judge the file: missing, empty, corrupt (magic bytes) or unreadable. Headers are always checked
here, whatever ``checks.verify_headers`` says: an asset is only called fixed on good evidence.

``Checker.locked`` says which assets are in Immich's locked folder (``visibility = 'locked'``, from
v1.133): an API key never reaches them (no PIN session), so they are never sent.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable

import asyncpg

from immich_thumbnail_exporter.config import Config
from immich_thumbnail_exporter.scan.targeted import check_assets, media_mapper
from immich_thumbnail_exporter.scan.verdict import AssetVerdict
from immich_thumbnail_exporter.sources.paths import PathMapper
from immich_thumbnail_exporter.sources.postgres import PostgresSource, QueryError
from immich_thumbnail_exporter.sources.schema import Schema

# The file rule and the targeted check live in ``scan/`` (``verdict``, ``targeted``): one rule for the full
# scan, this check and job verification.
AssetCheck = AssetVerdict


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
            self.schema, self.mapper = await self.pg.schema(), await media_mapper(self.pg, self.config.media)
        return self.schema, self.mapper

    async def check(self, asset_ids: Iterable[str]) -> dict[str, AssetCheck]:
        """Fetch the assets' rows and judge their files. Ids that are not UUIDs are reported as absent."""
        schema, mapper = await self.prepare()
        return await check_assets(self.pg, schema, mapper, asset_ids,
                                  timeout=self.config.database.statement_timeout)

    async def locked(self, asset_ids: Iterable[str]) -> set[str]:
        """The assets among ``asset_ids`` that are locked; none before v1.133 (no ``visibility`` column)."""
        schema, _ = await self.prepare()
        given = {str(uuid.UUID(a)): a for a in asset_ids if valid_asset_id(a)}
        ids = sorted(given)
        if not ids or schema.era == "v1.113+":
            return set()
        timeout = float(self.config.database.statement_timeout)
        sql = f"SELECT id::text FROM {schema.assets} WHERE id = ANY($1::uuid[]) AND visibility::text = 'locked'"
        try:
            async with self.pg.connection() as conn:
                rows = await conn.fetch(sql, [uuid.UUID(a) for a in ids], timeout=timeout)
        except asyncpg.PostgresError as exc:
            raise QueryError(self.pg.name, f"cannot read which assets are locked: {exc}") from None
        return {given[str(r[0])] for r in rows}
