"""The targeted check as regeneration uses it: ``regenerate`` and ``serve``'s remediation check what they
ask Immich for, before and after.

The rule is the full scan's (``scan.targeted.check_assets``, ``scan.verdict``): fetch the assets'
``asset_file`` rows, map each path onto the media root (``PathMapper``, refusing paths that escape it),
and judge the file: missing, empty, corrupt (magic bytes) or unreadable. Headers are always checked
here, whatever ``checks.verify_headers`` says: an asset is only called fixed on good evidence.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable

from immich_thumbnail_exporter.config import Config
from immich_thumbnail_exporter.scan.targeted import check_assets, media_mapper
from immich_thumbnail_exporter.scan.verdict import AssetVerdict
from immich_thumbnail_exporter.sources.paths import PathMapper
from immich_thumbnail_exporter.sources.postgres import PostgresSource
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
