"""``scan/merge.Merge`` on made-up rows and walk frames: face thumbnails judged by the one file rule,
counted apart from the assets' files, and a sound face thumbnail never an orphan."""

from __future__ import annotations

from array import array
from collections import Counter

import pytest

from immich_thumbnail_exporter.findings import FileStats
from immich_thumbnail_exporter.scan.file_sql import PERSON
from immich_thumbnail_exporter.scan.merge import Merge
from immich_thumbnail_exporter.scan.walk_child import FILE, HEAD_BAD, UNREADABLE_DIR
from immich_thumbnail_exporter.sources.paths import PathMapper

THUMB = 0
DIR = b"thumbs/u1/aa/bb/"


def run(rows: list[tuple[bytes, int, str]], entries: list[tuple[bytes, int, int]],
        headers: bool = True) -> tuple[FileStats, list[tuple[str, str, str]]]:
    """Rows ``(relative path, kind code, id)`` against one walk frame of ``(relative path, size, flag)``."""
    stats = FileStats()
    merge = Merge(PathMapper("/nonexistent-media-root", "/data"), stats, headers)
    stream = sorted((b"/data/" + rel, kind, ident) for rel, kind, ident in rows)
    entries = sorted(entries)
    merge.push_frame(([e[0] for e in entries], array("q", [e[1] for e in entries]), bytes(e[2] for e in entries)))
    i = 0
    while i < len(stream):
        i = merge.merge(stream, i)
        assert not merge.deferred  # nothing here needs a look of its own
        if merge.needs_frame:
            merge.push_frame(None)
    merge.orphans_left()
    return stats, [(str(c[0]), c[1], c[2]) for c in merge.take_candidates()]


@pytest.mark.parametrize(("size", "flag", "reason"), [
    (900, FILE, None),
    (-1, FILE, "file_missing"),  # not in the walk
    (0, FILE, "file_empty"),
    (900, FILE | HEAD_BAD, "file_corrupt"),
])
def test_a_face_thumbnail_is_judged_and_counted_apart(size: int, flag: int, reason: str | None) -> None:
    face = DIR + b"p1.jpeg"
    entries = [(DIR + b"a1_thumbnail.webp", 500, FILE)]
    if size >= 0:
        entries.append((face, size, flag))
    stats, candidates = run([(DIR + b"a1_thumbnail.webp", THUMB, "a1"), (face, PERSON, "p1")], entries)
    assert stats.person_missing == (Counter({reason: 1}) if reason else Counter())
    assert candidates == ([("p1", "person", reason)] if reason else [])
    # Never an asset kind's file, bytes or problem; never an orphan.
    assert stats.files == Counter({"thumbnail": 1}) and stats.bytes == Counter({"thumbnail": 500})
    assert not stats.missing and stats.orphaned_files == 0


def test_faces_in_bulk_runs_are_sound_and_uncounted() -> None:
    rows = [(DIR + b"p%d.jpeg" % n, PERSON, f"p{n}") for n in range(50)]
    stats, candidates = run(rows, [(r[0], 700, FILE) for r in rows])
    assert not candidates and not stats.person_missing and not stats.files and stats.orphaned_files == 0


def test_a_face_in_a_folder_that_cannot_be_read_is_unreadable() -> None:
    stats, candidates = run([(DIR + b"p1.jpeg", PERSON, "p1")], [(DIR[:-1], 0, UNREADABLE_DIR)])
    assert candidates == [("p1", "person", "file_unreadable")]
    assert stats.person_missing == Counter({"file_unreadable": 1})


def test_a_refused_face_path_is_counted_as_kind_person() -> None:
    stats, candidates = run([(b"thumbs/../../etc/passwd", PERSON, "p1")], [])
    assert stats.refused == Counter({"person": 1}) and not candidates and not stats.person_missing
