"""``inventory``: what Immich's database alone says about thumbnails, every ``intervals.inventory``."""

from __future__ import annotations

from prometheus_client.core import Metric

from immich_thumbnail_exporter.collectors.base import Outcome
from immich_thumbnail_exporter.collectors.integrity import IntegrityReader
from immich_thumbnail_exporter.config import Config
from immich_thumbnail_exporter.findings import InventoryCounts
from immich_thumbnail_exporter.metrics import gauge
from immich_thumbnail_exporter.scan.run import run_inventory
from immich_thumbnail_exporter.sources.postgres import PostgresSource
from immich_thumbnail_exporter.store import Part


def inventory_families(counts: InventoryCounts) -> list[Metric]:
    """
    immich_assets{asset_type="image"} 250
    immich_asset_files_missing{kind="thumbnail",reason="no_record"} 2
    immich_assets_thumbhash_missing 3
    immich_assets_metadata_pending 1
    immich_server_info{schema="v1.136+",version="v1.137.3"} 1
    """
    fams = [
        gauge("immich_assets", [((t,), float(n)) for t, n in counts.assets.items()]),
        gauge("immich_asset_files_missing", [((k, "no_record"), float(n)) for k, n in counts.no_record.items()]),
        gauge("immich_assets_thumbhash_missing", [((), float(counts.thumbhash_missing))]),
        gauge("immich_assets_metadata_pending", [((), float(counts.metadata_pending))]),
        gauge("immich_server_info", [((counts.version or "unknown", counts.schema), 1.0)]),
    ]
    return fams


class InventoryCollection:
    """Database-only counts: cheap, so it runs more often than the file check."""

    name = "inventory"
    sources = frozenset({"postgres"})

    def __init__(self, config: Config, pg: PostgresSource) -> None:
        self.config = config
        self.pg = pg
        self.interval = float(config.intervals.inventory)
        self.timeout = float(min(config.intervals.inventory, config.database.statement_timeout + 30))
        self.integrity = IntegrityReader(pg, config.database.statement_timeout)

    async def collect(self) -> Outcome:
        counts = await run_inventory(self.pg, self.config)
        part = Part(self.sources, (*inventory_families(counts), *await self.integrity.families()))
        return Outcome((part,), {"postgres": True})

    async def close(self) -> None:
        pass
