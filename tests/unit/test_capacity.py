"""The capacity families and collection from made-up statvfs answers: one table, no servers."""

from __future__ import annotations

import asyncio
import os
import threading
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from immich_thumbnail_exporter.collectors import capacity
from immich_thumbnail_exporter.collectors.capacity import CapacityCollection, capacity_families
from immich_thumbnail_exporter.output.scan_report import Space, by_filesystem
from immich_thumbnail_exporter.sources import capacity as source
from immich_thumbnail_exporter.sources.capacity import FolderSpace, folder_space


def samples(spaces: list[FolderSpace]) -> dict[tuple[str, str], float]:
    return {
        (fam.name, s.labels["folder"]): s.value
        for fam in capacity_families(spaces)
        for s in fam.samples
    }


@pytest.mark.parametrize(
    ("spaces", "expected"),
    [
        ([], {}),
        (
            [FolderSpace("thumbs", 8 << 20, 5 << 20)],
            {
                ("immich_media_filesystem_size_bytes", "thumbs"): 8 << 20,
                ("immich_media_filesystem_avail_bytes", "thumbs"): 5 << 20,
            },
        ),
        (
            [FolderSpace("thumbs", 100, 0), FolderSpace("library", 10**13, 4 * 10**12)],
            {
                ("immich_media_filesystem_size_bytes", "thumbs"): 100,
                ("immich_media_filesystem_avail_bytes", "thumbs"): 0,
                ("immich_media_filesystem_size_bytes", "library"): 10**13,
                ("immich_media_filesystem_avail_bytes", "library"): 4 * 10**12,
            },
        ),
    ],
    ids=["none-present", "thumbs", "full-thumbs-and-a-big-library"],
)
def test_families(spaces: list[FolderSpace], expected: dict[tuple[str, str], float]) -> None:
    assert samples(spaces) == expected


class _StatVfs:
    f_blocks, f_frsize, f_bavail, f_bfree = 1000, 4096, 300, 350


@pytest.mark.parametrize(
    ("present", "error", "expected"),
    [
        (True, None, FolderSpace("thumbs", 1000 * 4096, 300 * 4096)),  # f_bavail, not f_bfree
        (False, None, None),
        (True, PermissionError(13, "Permission denied"), None),
        (True, OSError(107, "Transport endpoint is not connected"), None),
    ],
    ids=["present", "absent", "unreadable", "dead-mount"],
)
def test_folder_space(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, present: bool, error: OSError | None,
    expected: FolderSpace | None,
) -> None:
    if present:
        (tmp_path / "thumbs").mkdir()

    def statvfs(path: str) -> Any:
        assert path == os.path.join(tmp_path, "thumbs")
        if error is not None:
            raise error
        return _StatVfs()

    monkeypatch.setattr(source.os, "statvfs", statvfs)
    if expected is not None:
        expected = replace(expected, device=os.stat(tmp_path / "thumbs").st_dev)
    assert folder_space(str(tmp_path), "thumbs") == expected


def _config(root: Path) -> Any:
    return SimpleNamespace(media=SimpleNamespace(root=str(root)), intervals=SimpleNamespace(queues=15.0))


def test_a_hung_folder_drops_its_series_and_is_not_asked_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The statvfs runs in the media folder's own pool: once a call hangs, the pool is stuck and the next
    round asks nothing (no second thread beside the stuck one), so every folder's series go."""
    release = threading.Event()
    calls: list[str] = []

    def fake(root: str, folder: str) -> FolderSpace | None:
        calls.append(folder)
        if folder == "library":
            release.wait(30)  # a hung NFS mount
        return FolderSpace(folder, 10, 5) if folder in ("thumbs", "library") else None

    monkeypatch.setattr(capacity, "folder_space", fake)
    monkeypatch.setattr(capacity, "STATVFS_TIMEOUT", 0.2)

    async def rounds() -> tuple[Any, Any]:
        coll = CapacityCollection(_config(tmp_path))
        first = await coll.collect()
        second = await coll.collect()
        release.set()
        return first, second

    try:
        first, second = asyncio.run(rounds())
    finally:
        release.set()

    def folders(outcome: Any) -> set[str]:
        return {s.labels["folder"] for fam in outcome.parts[0].families for s in fam.samples}

    assert folders(first) == {"thumbs"}
    assert first.error is not None and first.error.startswith("library: ")
    assert folders(second) == set()
    assert second.error is not None and "has not returned" in second.error
    assert calls.count("library") == 1
    assert calls.count("thumbs") == 1


@pytest.mark.parametrize(
    ("spaces", "expected"),
    [
        ([], []),
        ([Space("thumbs", 10, 5, 1), Space("upload", 10, 5, 1), Space("library", 99, 9, 2)],
         [(["thumbs", "upload"], 5), (["library"], 9)]),
        # A device not known (0): never merged with another folder.
        ([Space("thumbs", 10, 5), Space("upload", 10, 5)], [(["thumbs"], 5), (["upload"], 5)]),
    ],
    ids=["none", "shared-and-own", "unknown-device"],
)
def test_folders_grouped_by_filesystem(spaces: list[Space], expected: list[tuple[list[str], int]]) -> None:
    assert [(folders, s.avail_bytes) for folders, s in by_filesystem(spaces)] == expected
