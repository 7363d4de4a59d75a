"""``collectors/inventory.inventory_families`` and ``collectors/integrity.integrity_families``: the
database's counts and Immich v3's integrity report as metric families, from made-up data."""

from __future__ import annotations

import pytest
from prometheus_client.core import Metric

from immich_thumbnail_exporter.collectors.integrity import integrity_families
from immich_thumbnail_exporter.collectors.inventory import inventory_families
from immich_thumbnail_exporter.findings import InventoryCounts
from immich_thumbnail_exporter.sources.integrity import IntegrityReport

Sample = tuple[str, tuple[tuple[str, str], ...]]


def flat(fams: list[Metric]) -> dict[Sample, float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in fams for s in f.samples}


def key(name: str, **labels: str) -> Sample:
    return (name, tuple(sorted(labels.items())))


COUNTS = InventoryCounts("v2.5+", "v3.1.0", {"image": 250, "video": 4},
                         {"thumbnail": 2, "preview": 1, "fullsize": 1}, 3, 1)


@pytest.mark.parametrize(("counts", "want"), [
    (COUNTS, {
        key("immich_assets", asset_type="image"): 250,
        key("immich_assets", asset_type="video"): 4,
        key("immich_asset_files_missing", kind="thumbnail", reason="no_record"): 2,
        key("immich_asset_files_missing", kind="fullsize", reason="no_record"): 1,
        key("immich_assets_thumbhash_missing"): 3,
        key("immich_assets_metadata_pending"): 1,
        key("immich_server_info", version="v3.1.0", schema="v2.5+"): 1,
        # Face thumbnails are the file check's: never here.
        key("immich_person_thumbnails_missing", reason="no_record"): None,
    }),
    # An era whose "Missing" rule has no fullsize row condition, and no version row.
    (InventoryCounts("v1.113+", None, {"image": 0, "video": 0}, {"thumbnail": 0, "preview": 0}, 0, 0), {
        key("immich_asset_files_missing", kind="fullsize", reason="no_record"): None,
        key("immich_asset_files_missing", kind="preview", reason="no_record"): 0,
        key("immich_server_info", version="unknown", schema="v1.113+"): 1,
    }),
], ids=["v3", "old-era"])
def test_inventory_families(counts: InventoryCounts, want: dict[Sample, float | None]) -> None:
    got = flat(inventory_families(counts))
    for sample, value in want.items():
        assert got.get(sample) == value, sample


@pytest.mark.parametrize(("report", "want"), [
    (IntegrityReport(), {
        key("immich_integrity_report_entries", type="missing_file", kind="preview"): 0,
        key("immich_integrity_report_entries", type="checksum_mismatch", kind="original"): 0,
        key("immich_integrity_report_entries", type="untracked_file", kind="unknown"): 0,
        key("immich_integrity_report_newest_timestamp_seconds"): None,  # no entry: no time
    }),
    (IntegrityReport({("missing_file", "thumbnail"): 4, ("missing_file", "encoded_video"): 1}, 1.7e9), {
        key("immich_integrity_report_entries", type="missing_file", kind="thumbnail"): 4,
        key("immich_integrity_report_entries", type="missing_file", kind="encoded_video"): 1,
        key("immich_integrity_report_entries", type="missing_file", kind="fullsize"): 0,
        key("immich_integrity_report_newest_timestamp_seconds"): 1.7e9,
    }),
], ids=["empty", "entries"])
def test_integrity_families(report: IntegrityReport, want: dict[Sample, float | None]) -> None:
    got = flat(integrity_families(report))
    for sample, value in want.items():
        assert got.get(sample) == value, sample
