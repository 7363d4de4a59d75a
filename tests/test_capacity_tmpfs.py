"""Capacity figures from real filesystems whose free space the test controls (tmpfs, mounted as root)."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from immich_thumbnail_exporter.collectors.capacity import CapacityCollection

MiB = 1 << 20


def _mount(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)


@pytest.fixture
def media(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.fail("this test mounts tmpfs filesystems: run it as root")
    root = tmp_path / "media"
    mounted: list[Path] = []
    try:
        # thumbs/ on an 8 MiB filesystem, library/ on its own 4 MiB one, upload/ on the parent's disk;
        # encoded-video/ absent.
        for folder, size in (("thumbs", "8m"), ("library", "4m")):
            _mount(root / folder, size)
            mounted.append(root / folder)
        (root / "upload").mkdir()
        with open(root / "thumbs" / "filler", "wb") as f:
            f.write(os.urandom(3 * MiB))  # real pages: tmpfs counts what is written
        with open(root / "library" / "filler", "wb") as f:
            f.write(b"\x01" * MiB)
        yield root
    finally:
        for path in reversed(mounted):
            subprocess.run(["umount", str(path)], check=False)


def _values(outcome: Any) -> dict[tuple[str, str], float]:
    return {
        (fam.name, s.labels["folder"]): s.value
        for part in outcome.parts for fam in part.families for s in fam.samples
    }


def test_statvfs_of_each_storage_folder(media: Path) -> None:
    coll = CapacityCollection(SimpleNamespace(media=SimpleNamespace(root=str(media)),
                                              intervals=SimpleNamespace(queues=15.0)))  # type: ignore[arg-type]
    values = _values(asyncio.run(coll.collect()))
    assert values[("immich_media_filesystem_size_bytes", "thumbs")] == 8 * MiB
    assert values[("immich_media_filesystem_avail_bytes", "thumbs")] == 5 * MiB
    assert values[("immich_media_filesystem_size_bytes", "library")] == 4 * MiB
    assert values[("immich_media_filesystem_avail_bytes", "library")] == 3 * MiB
    parent = os.statvfs(media)
    assert values[("immich_media_filesystem_size_bytes", "upload")] == parent.f_blocks * parent.f_frsize
    assert not {f for _, f in values} & {"encoded-video", "profile", "backups"}

    # library/'s filesystem goes away (unmounted, the folder removed): its series go, thumbs/ stays.
    subprocess.run(["umount", str(media / "library")], check=True)
    (media / "library").rmdir()
    values = _values(asyncio.run(coll.collect()))
    assert {f for _, f in values} == {"thumbs", "upload"}
    (media / "library").mkdir()  # for the fixture's umount to find a path (it ignores the failure)
