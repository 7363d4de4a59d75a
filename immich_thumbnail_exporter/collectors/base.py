"""The collections that read Immich's database and media folder.

Each collection runs in its own loop (``runtime.py``) under its own deadline and publishes an
immutable result. A collection never raises for a backend problem: it reports which sources it found
down, and its series disappear until that source is back.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

from prometheus_client.core import Metric

from immich_thumbnail_exporter.config import Config
from immich_thumbnail_exporter.exposition.metrics import gauge
from immich_thumbnail_exporter.exposition.store import Part
from immich_thumbnail_exporter.model import InventoryCounts, ProblemFeed, ProblemList, ProblemStore
from immich_thumbnail_exporter.scan.run import ScanResult, run_inventory, run_scan
from immich_thumbnail_exporter.sources.postgres import PostgresSource
from immich_thumbnail_exporter.vocabulary import FILE_REASONS, KINDS, RECORD_KINDS

log = logging.getLogger(__name__)



@dataclass
class Outcome:
    parts: tuple[Part, ...] = ()
    # Each source the run touched: True when it worked, else a one-line error.
    sources: dict[str, bool | str] = field(default_factory=dict)
    detail: dict[str, Any] = field(default_factory=dict)
    # Set when the run failed in part: the parts it did produce are still published.
    error: str | None = None


class Collection(Protocol):
    name: str
    interval: float
    timeout: float

    async def collect(self) -> Outcome: ...

    async def close(self) -> None: ...


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
        gauge("immich_asset_files_missing", [((k, "no_record"), float(counts.no_record[k])) for k in RECORD_KINDS]),
        gauge("immich_assets_thumbhash_missing", [((), float(counts.thumbhash_missing))]),
        gauge("immich_assets_metadata_pending", [((), float(counts.metadata_pending))]),
        gauge("immich_server_info", [((counts.version or "unknown", counts.schema), 1.0)]),
    ]
    return fams


def file_families(result: ScanResult, check_originals: bool) -> list[Metric]:
    """
    immich_asset_files_missing{kind="preview",reason="file_missing"} 4
    immich_thumbnail_files{kind="thumbnail"} 245
    immich_thumbnail_bytes{kind="thumbnail"} 2.5e+06
    immich_thumbnail_orphaned_files 3
    immich_thumbnail_orphaned_bytes 12000
    immich_assets_original_missing 1
    immich_exporter_paths_refused{kind="thumbnail"} 1

    With ``checks.file_sizes: false`` the walk reads no sizes: the two ``_bytes`` families and the
    ``file_empty`` series are left out rather than shown as 0.
    """
    stats = result.stats
    assert stats is not None
    sized = stats.sizes_known
    reasons = FILE_REASONS if sized else tuple(r for r in FILE_REASONS if r != "file_empty")
    fams = [
        gauge("immich_asset_files_missing", [
            ((k, r), float(stats.missing[(k, r)])) for k in KINDS for r in reasons
        ]),
        gauge("immich_thumbnail_files", [((k,), float(stats.files[k])) for k in KINDS]),
        *([gauge("immich_thumbnail_bytes", [((k,), float(stats.bytes[k])) for k in KINDS])] if sized else []),
        gauge("immich_thumbnail_orphaned_files", [((), float(stats.orphaned_files))]),
        *([gauge("immich_thumbnail_orphaned_bytes", [((), float(stats.orphaned_bytes))])] if sized else []),
        gauge("immich_exporter_paths_refused", [((k,), float(stats.refused[k])) for k in KINDS]),
    ]
    if check_originals and stats.originals_missing is not None:
        fams.append(gauge("immich_assets_original_missing", [((), float(stats.originals_missing))]))
    return fams


class InventoryCollection:
    """Database-only counts: cheap, so it runs more often than the file check."""

    name = "inventory"

    def __init__(self, config: Config, pg: PostgresSource) -> None:
        self.config = config
        self.pg = pg
        self.interval = float(config.intervals.inventory)
        self.timeout = float(min(config.intervals.inventory, config.database.statement_timeout + 30))

    async def collect(self) -> Outcome:
        counts = await run_inventory(self.pg, self.config)
        part = Part(frozenset({"postgres"}), tuple(inventory_families(counts)))
        return Outcome((part,), {"postgres": True}, {"schema": counts.schema, "version": counts.version})

    async def close(self) -> None:
        pass


class FilesCollection:
    """The full reconciliation of database rows with files; its problems go to ``feed`` (``/problems``,
    remediation)."""

    name = "files"

    def __init__(
        self, config: Config, pg: PostgresSource, problem_limit: int = 50_000, feed: ProblemFeed | None = None
    ) -> None:
        self.config = config
        self.pg = pg
        self.feed = feed
        self.interval = float(config.intervals.files)
        # The file check may take long on a big library, but never longer than its own interval.
        self.timeout = float(config.intervals.files)
        self.problem_limit = problem_limit

    async def collect(self) -> Outcome:
        store = ProblemStore(self.problem_limit, keep_overflow=False)
        result = await run_scan(self.pg, self.config, store, beside=False)
        assert result.stats is not None
        part = Part(frozenset({"postgres", "filesystem"}),
                    tuple(file_families(result, self.config.checks.check_originals)))
        if self.feed is not None:
            self.feed.publish(ProblemList(tuple(store.in_memory()), store.total, store.truncated,
                                          result.started_at, result.started_at + result.duration))
        detail = {
            "problems_total": store.total,
            "problems_truncated": store.truncated,
            "location": result.location,
            "rows": result.stats.rows,
            "orphaned_files": result.stats.orphaned_files,
            "scan_seconds": result.duration,
        }
        return Outcome((part,), {"postgres": True, "filesystem": True}, detail)

    async def close(self) -> None:
        pass

