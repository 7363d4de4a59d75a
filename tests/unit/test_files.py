"""``collectors/files.file_families``: the file check's counts as metric families, from made-up results."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from immich_thumbnail_exporter.collectors.files import file_families
from immich_thumbnail_exporter.findings import FileStats, InventoryCounts, ProblemStore
from immich_thumbnail_exporter.scan.run import ScanResult

Sample = tuple[str, tuple[tuple[str, str], ...]]


def result(stats: FileStats) -> ScanResult:
    counts = InventoryCounts("v1.136+", "v2.4.1", {"image": 10, "video": 1}, {}, 0, 0)
    return ScanResult(counts, stats, ProblemStore(), "/data", "/media", 0.0)


def exposed(stats: FileStats, check_originals: bool = True) -> dict[Sample, float]:
    out: dict[Sample, float] = {}
    for fam in file_families(result(stats), check_originals):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def key(name: str, **labels: str) -> Sample:
    return (name, tuple(sorted(labels.items())))


def stats(**kw: Any) -> FileStats:
    s = FileStats()
    for k, v in kw.items():
        setattr(s, k, v)
    return s


CASES: list[tuple[str, FileStats, bool, dict[Sample, float | None]]] = [
    ("assets and faces counted apart", stats(
        missing=Counter({("preview", "file_missing"): 4, ("thumbnail", "file_corrupt"): 1}),
        files=Counter({"thumbnail": 9, "preview": 6}), bytes=Counter({"thumbnail": 900, "preview": 6000}),
        person_missing=Counter({"file_missing": 2, "file_unreadable": 1}),
        refused=Counter({"thumbnail": 1, "person": 3}), orphaned_files=2, orphaned_bytes=20, originals_missing=1,
    ), True, {
        key("immich_asset_files_missing", kind="preview", reason="file_missing"): 4,
        key("immich_asset_files_missing", kind="thumbnail", reason="file_corrupt"): 1,
        key("immich_asset_files_missing", kind="fullsize", reason="file_empty"): 0,
        key("immich_thumbnail_files", kind="thumbnail"): 9,
        key("immich_thumbnail_bytes", kind="preview"): 6000,
        key("immich_thumbnail_orphaned_files"): 2,
        key("immich_thumbnail_orphaned_bytes"): 20,
        key("immich_exporter_paths_refused", kind="thumbnail"): 1,
        key("immich_exporter_paths_refused", kind="person"): 3,
        key("immich_person_thumbnails_missing", reason="file_missing"): 2,
        key("immich_person_thumbnails_missing", reason="file_unreadable"): 1,
        key("immich_person_thumbnails_missing", reason="file_empty"): 0,
        key("immich_person_thumbnails_missing", reason="file_corrupt"): 0,
        key("immich_assets_original_missing"): 1,
        # A face thumbnail is never an asset kind, and no_record is the inventory's.
        key("immich_asset_files_missing", kind="person", reason="file_missing"): None,
        key("immich_person_thumbnails_missing", reason="no_record"): None,
        key("immich_thumbnail_files", kind="person"): None,
    }),
    ("nothing missing: every series present at 0", stats(), True, {
        key("immich_person_thumbnails_missing", reason="file_missing"): 0,
        key("immich_asset_files_missing", kind="thumbnail", reason="file_missing"): 0,
        key("immich_exporter_paths_refused", kind="person"): 0,
        key("immich_assets_original_missing"): None,  # originals_missing unknown (None): not shown
    }),
    ("no sizes read: bytes and file_empty left out, assets and faces alike", stats(
        sizes_known=False, person_missing=Counter({"file_missing": 1}),
    ), True, {
        key("immich_person_thumbnails_missing", reason="file_missing"): 1,
        key("immich_person_thumbnails_missing", reason="file_empty"): None,
        key("immich_asset_files_missing", kind="preview", reason="file_empty"): None,
        key("immich_thumbnail_bytes", kind="thumbnail"): None,
        key("immich_thumbnail_orphaned_bytes"): None,
    }),
    ("originals not checked: no originals family", stats(originals_missing=3), False, {
        key("immich_assets_original_missing"): None,
    }),
]


@pytest.mark.parametrize(("stats_", "check_originals", "want"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_file_families(stats_: FileStats, check_originals: bool, want: dict[Sample, float | None]) -> None:
    got = exposed(stats_, check_originals)
    for sample, value in want.items():
        assert got.get(sample) == value, (sample, got.get(sample))


def test_person_family_has_exactly_the_file_reasons() -> None:
    got = exposed(stats())
    reasons = sorted(dict(labels)["reason"] for name, labels in got if name == "immich_person_thumbnails_missing")
    assert reasons == ["file_corrupt", "file_empty", "file_missing", "file_unreadable"]
