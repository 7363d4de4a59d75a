"""``file_families``: what the file check found in, exposition lines out."""

from __future__ import annotations

from collections import Counter

import pytest

from immich_thumbnail_exporter.collectors.files import file_families
from immich_thumbnail_exporter.findings import FileStats, InventoryCounts, ProblemStore
from immich_thumbnail_exporter.scan.run import ScanResult
from tests.unit.expo import lines, render

COUNTS = InventoryCounts("v1.136+", "v1.137.3", {"image": 10, "video": 0}, {}, 0, 0)


def result(stats: FileStats) -> ScanResult:
    return ScanResult(COUNTS, stats, ProblemStore(10), "/data", "/media", started_at=0.0)


def found(**changes: object) -> FileStats:
    stats = FileStats(
        missing=Counter({("thumbnail", "file_missing"): 3, ("preview", "file_corrupt"): 2,
                         ("thumbnail", "file_empty"): 1}),
        files=Counter({"thumbnail": 7, "preview": 8}),
        bytes=Counter({"thumbnail": 700, "preview": 8000}),
        orphaned_files=2, orphaned_bytes=50, refused=Counter({"thumbnail": 1}),
    )
    for key, value in changes.items():
        setattr(stats, key, value)
    return stats


def missing(sized: bool = True, **values: float) -> list[str]:
    """Every (kind, reason) series the file check shows, in order, 0 unless given as kind__reason."""
    reasons = ("file_missing", "file_empty", "file_corrupt", "file_unreadable") if sized else (
        "file_missing", "file_corrupt", "file_unreadable")
    return [
        f'immich_asset_files_missing{{kind="{k}",reason="{r}"}} {float(values.get(f"{k}__{r}", 0))}'
        for k in ("thumbnail", "preview", "fullsize") for r in reasons
    ]


FOUND = dict(thumbnail__file_missing=3, thumbnail__file_empty=1, preview__file_corrupt=2)
FILES = ['immich_thumbnail_files{kind="thumbnail"} 7.0', 'immich_thumbnail_files{kind="preview"} 8.0',
         'immich_thumbnail_files{kind="fullsize"} 0.0']
BYTES = ['immich_thumbnail_bytes{kind="thumbnail"} 700.0', 'immich_thumbnail_bytes{kind="preview"} 8000.0',
         'immich_thumbnail_bytes{kind="fullsize"} 0.0']
REFUSED = ['immich_exporter_paths_refused{kind="thumbnail"} 1.0', 'immich_exporter_paths_refused{kind="preview"} 0.0',
           'immich_exporter_paths_refused{kind="fullsize"} 0.0', 'immich_exporter_paths_refused{kind="person"} 0.0']


def people(sized: bool = True, **values: float) -> list[str]:
    """Every face-thumbnail series, in order, 0 unless given by reason (people count whatever the asset)."""
    reasons = ("file_missing", "file_empty", "file_corrupt", "file_unreadable") if sized else (
        "file_missing", "file_corrupt", "file_unreadable")
    return [f'immich_person_thumbnails_missing{{reason="{r}"}} {float(values.get(r, 0))}' for r in reasons]


@pytest.mark.parametrize(
    ("stats", "check_originals", "expected"),
    [
        (found(), False, [*missing(**FOUND), *FILES, *BYTES, "immich_thumbnail_orphaned_files 2.0",
                          "immich_thumbnail_orphaned_bytes 50.0", *REFUSED, *people()]),
        # Face thumbnails: their own family, and their refused paths under kind="person".
        (found(person_missing=Counter({"file_missing": 2, "file_corrupt": 1}),
               refused=Counter({"thumbnail": 1, "person": 3})), False,
         [*missing(**FOUND), *FILES, *BYTES, "immich_thumbnail_orphaned_files 2.0",
          "immich_thumbnail_orphaned_bytes 50.0", *REFUSED[:3], 'immich_exporter_paths_refused{kind="person"} 3.0',
          *people(file_missing=2, file_corrupt=1)]),
        # Originals checked: their count follows; not checked (None) it is left out even when asked.
        (found(originals_missing=4), True,
         [*missing(**FOUND), *FILES, *BYTES, "immich_thumbnail_orphaned_files 2.0",
          "immich_thumbnail_orphaned_bytes 50.0", *REFUSED, *people(), "immich_assets_original_missing 4.0"]),
        (found(originals_missing=None), True, [*missing(**FOUND), *FILES, *BYTES,
                                               "immich_thumbnail_orphaned_files 2.0",
                                               "immich_thumbnail_orphaned_bytes 50.0", *REFUSED, *people()]),
        (found(originals_missing=4), False, [*missing(**FOUND), *FILES, *BYTES,
                                             "immich_thumbnail_orphaned_files 2.0",
                                             "immich_thumbnail_orphaned_bytes 50.0", *REFUSED, *people()]),
        # No sizes read: no bytes and no file_empty, rather than zeros that would claim there are none.
        (found(sizes_known=False, bytes=Counter(), orphaned_bytes=0,
               missing=Counter({("thumbnail", "file_missing"): 3, ("preview", "file_corrupt"): 2})), False,
         [*missing(False, thumbnail__file_missing=3, preview__file_corrupt=2), *FILES,
          "immich_thumbnail_orphaned_files 2.0", *REFUSED, *people(False)]),
        # Nothing wrong: every series still there, at 0.
        (FileStats(), False, [*missing(), *(f.rsplit(" ", 1)[0] + " 0.0" for f in FILES),
                              *(b.rsplit(" ", 1)[0] + " 0.0" for b in BYTES), "immich_thumbnail_orphaned_files 0.0",
                              "immich_thumbnail_orphaned_bytes 0.0", *(r.rsplit(" ", 1)[0] + " 0.0" for r in REFUSED),
                              *people()]),
    ],
    ids=["found", "people", "originals", "originals-unchecked", "originals-off", "no-sizes", "clean"],
)
def test_file_families(stats: FileStats, check_originals: bool, expected: list[str]) -> None:
    assert lines(render(file_families(result(stats), check_originals))) == expected
