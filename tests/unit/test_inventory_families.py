"""``inventory_families`` and ``integrity_families``: database counts in, exposition lines out."""

from __future__ import annotations

import pytest

from immich_thumbnail_exporter.collectors.integrity import integrity_families
from immich_thumbnail_exporter.collectors.inventory import inventory_families
from immich_thumbnail_exporter.findings import InventoryCounts
from immich_thumbnail_exporter.sources.integrity import IntegrityReport
from tests.unit.expo import lines, render


def counts(**changes: object) -> InventoryCounts:
    base: dict[str, object] = {
        "schema": "v1.136+", "version": "v1.137.3", "assets": {"image": 250, "video": 4},
        "no_record": {"thumbnail": 2, "preview": 1}, "thumbhash_missing": 3, "metadata_pending": 1,
    }
    return InventoryCounts(**{**base, **changes})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("counts", "expected"),
    [
        (counts(), [
            'immich_assets{asset_type="image"} 250.0',
            'immich_assets{asset_type="video"} 4.0',
            'immich_asset_files_missing{kind="thumbnail",reason="no_record"} 2.0',
            'immich_asset_files_missing{kind="preview",reason="no_record"} 1.0',
            "immich_assets_thumbhash_missing 3.0",
            "immich_assets_metadata_pending 1.0",
            'immich_server_info{schema="v1.136+",version="v1.137.3"} 1.0',
        ]),
        # An empty library still says so: zeros, not absent series.
        (counts(assets={"image": 0, "video": 0}, no_record={"thumbnail": 0, "preview": 0},
                thumbhash_missing=0, metadata_pending=0), [
            'immich_assets{asset_type="image"} 0.0',
            'immich_assets{asset_type="video"} 0.0',
            'immich_asset_files_missing{kind="thumbnail",reason="no_record"} 0.0',
            'immich_asset_files_missing{kind="preview",reason="no_record"} 0.0',
            "immich_assets_thumbhash_missing 0.0",
            "immich_assets_metadata_pending 0.0",
            'immich_server_info{schema="v1.136+",version="v1.137.3"} 1.0',
        ]),
        # No version_history row: the version is "unknown", never an empty label.
        (counts(version=None, schema="v1.113+"), [
            'immich_assets{asset_type="image"} 250.0',
            'immich_assets{asset_type="video"} 4.0',
            'immich_asset_files_missing{kind="thumbnail",reason="no_record"} 2.0',
            'immich_asset_files_missing{kind="preview",reason="no_record"} 1.0',
            "immich_assets_thumbhash_missing 3.0",
            "immich_assets_metadata_pending 1.0",
            'immich_server_info{schema="v1.113+",version="unknown"} 1.0',
        ]),
        # A fullsize no_record count (v2.5+ edited assets) is shown like the others.
        (counts(no_record={"thumbnail": 0, "preview": 0, "fullsize": 1}, schema="v2.5+", version="v3.1.0"), [
            'immich_assets{asset_type="image"} 250.0',
            'immich_assets{asset_type="video"} 4.0',
            'immich_asset_files_missing{kind="thumbnail",reason="no_record"} 0.0',
            'immich_asset_files_missing{kind="preview",reason="no_record"} 0.0',
            'immich_asset_files_missing{kind="fullsize",reason="no_record"} 1.0',
            "immich_assets_thumbhash_missing 3.0",
            "immich_assets_metadata_pending 1.0",
            'immich_server_info{schema="v2.5+",version="v3.1.0"} 1.0',
        ]),
    ],
    ids=["library", "empty", "no-version", "edited-fullsize"],
)
def test_inventory_families(counts: InventoryCounts, expected: list[str]) -> None:
    assert lines(render(inventory_families(counts))) == expected


def test_inventory_help_and_type() -> None:
    text = render(inventory_families(counts()))
    assert "# TYPE immich_assets gauge" in text
    assert "# HELP immich_assets_metadata_pending Eligible assets with no asset_job_status row" in text


def usual(thumbnail: float = 0.0, original: float = 0.0, untracked: float = 0.0) -> list[str]:
    """The series every report shows, in order, with these values."""
    entries = [("thumbnail", "missing_file", thumbnail), ("preview", "missing_file", 0.0),
               ("fullsize", "missing_file", 0.0), ("original", "missing_file", original),
               ("unknown", "untracked_file", untracked), ("original", "checksum_mismatch", 0.0)]
    return [f'immich_integrity_report_entries{{kind="{k}",type="{t}"}} {v}' for k, t, v in entries]


@pytest.mark.parametrize(
    ("report", "expected"),
    [
        # Empty report: every usual series at 0 ("Immich found none"), and no timestamp.
        (IntegrityReport(), usual()),
        (IntegrityReport({("missing_file", "thumbnail"): 4, ("missing_file", "original"): 1,
                          ("untracked_file", "unknown"): 6}, newest=1_785_400_000.0),
         [*usual(4.0, 1.0, 6.0), "immich_integrity_report_newest_timestamp_seconds 1.7854e+09"]),
        # Kinds beyond the usual ones are added as found, after them.
        (IntegrityReport({("missing_file", "sidecar"): 2}, newest=1.0),
         [*usual(), 'immich_integrity_report_entries{kind="sidecar",type="missing_file"} 2.0',
          "immich_integrity_report_newest_timestamp_seconds 1.0"]),
    ],
    ids=["empty", "entries", "unusual-kind"],
)
def test_integrity_families(report: IntegrityReport, expected: list[str]) -> None:
    assert lines(render(integrity_families(report))) == expected
