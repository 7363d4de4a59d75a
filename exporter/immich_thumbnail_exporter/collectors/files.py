"""``files``: every thumbnail row checked against the media folder, every ``intervals.files``."""

from __future__ import annotations

from prometheus_client.core import Metric

from immich_thumbnail_exporter.collectors.base import Outcome
from immich_thumbnail_exporter.config import Config
from immich_thumbnail_exporter.findings import ProblemFeed, ProblemSnapshot, ProblemStore
from immich_thumbnail_exporter.metrics import gauge
from immich_thumbnail_exporter.scan.run import ScanResult, run_scan
from immich_thumbnail_exporter.sources.postgres import PostgresSource
from immich_thumbnail_exporter.store import Part
from immich_thumbnail_exporter.vocabulary import FILE_REASONS, KINDS, PERSON_KIND, PERSON_REASONS


def file_families(result: ScanResult, check_originals: bool) -> list[Metric]:
    """
    immich_asset_files_missing{kind="preview",reason="file_missing"} 4
    immich_thumbnail_files{kind="thumbnail"} 245
    immich_thumbnail_bytes{kind="thumbnail"} 2.5e+06
    immich_thumbnail_orphaned_files 3
    immich_thumbnail_orphaned_bytes 12000
    immich_assets_original_missing 1
    immich_exporter_paths_refused{kind="thumbnail"} 1
    immich_exporter_paths_refused{kind="person"} 0
    immich_person_thumbnails_missing{reason="file_missing"} 2

    With ``checks.file_sizes: false`` the walk reads no sizes: the two ``_bytes`` families and the
    ``file_empty`` series (of assets and of people) are left out rather than shown as 0.
    """
    stats = result.stats
    assert stats is not None
    sized = stats.sizes_known
    reasons = FILE_REASONS if sized else tuple(r for r in FILE_REASONS if r != "file_empty")
    person_reasons = tuple(r for r in PERSON_REASONS if sized or r != "file_empty")
    fams = [
        gauge("immich_asset_files_missing", [
            ((k, r), float(stats.missing[(k, r)])) for k in KINDS for r in reasons
        ]),
        gauge("immich_thumbnail_files", [((k,), float(stats.files[k])) for k in KINDS]),
        *([gauge("immich_thumbnail_bytes", [((k,), float(stats.bytes[k])) for k in KINDS])] if sized else []),
        gauge("immich_thumbnail_orphaned_files", [((), float(stats.orphaned_files))]),
        *([gauge("immich_thumbnail_orphaned_bytes", [((), float(stats.orphaned_bytes))])] if sized else []),
        gauge("immich_exporter_paths_refused", [((k,), float(stats.refused[k])) for k in (*KINDS, PERSON_KIND)]),
        gauge("immich_person_thumbnails_missing", [((r,), float(stats.person_missing[r])) for r in person_reasons]),
    ]
    if check_originals and stats.originals_missing is not None:
        fams.append(gauge("immich_assets_original_missing", [((), float(stats.originals_missing))]))
    return fams


class FilesCollection:
    """The full reconciliation of database rows with files; it also feeds ``/problems`` and remediation."""

    name = "files"
    sources = frozenset({"postgres", "filesystem"})

    def __init__(
        self, config: Config, pg: PostgresSource, feed: ProblemFeed | None = None, problem_limit: int = 50_000
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
        try:
            result = await run_scan(self.pg, self.config, store, beside=False)
        except BaseException:
            if self.feed is not None:
                self.feed.publish(None)
            raise
        assert result.stats is not None
        part = Part(self.sources, tuple(file_families(result, self.config.checks.check_originals)))
        if self.feed is not None:
            self.feed.publish(ProblemSnapshot(
                problems=tuple(store.in_memory()),
                total=store.total,
                truncated=store.truncated,
                orphaned_files=result.stats.orphaned_files,
                started_at=result.started_at,
                finished_at=result.started_at + result.duration,
            ))
        return Outcome((part,), {"postgres": True, "filesystem": True})

    async def close(self) -> None:
        pass
