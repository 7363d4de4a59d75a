"""The disk walk without sizes (``checks.file_sizes: false``) sees exactly what the walk with sizes sees,
in the same order, less the sizes of regular files in plain folders; through the helper processes and
through the in-process fallback alike."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from immich_thumbnail_exporter.scan.walker import FILE, SIZE_UNKNOWN, SYMLINK
from immich_thumbnail_exporter.scan.walkers import DiskWalk

pytestmark = pytest.mark.asyncio


def _tree(root: Path) -> None:
    thumbs = root / "thumbs"
    (thumbs / ".immich").parent.mkdir(parents=True)
    (thumbs / ".immich").write_bytes(b"")
    owner = thumbs / "owner-a"
    plain = owner / "ab" / "cd"
    plain.mkdir(parents=True)
    (plain / "abcd-thumbnail.webp").write_bytes(b"RIFF....WEBP" * 10)
    (plain / "abcd-preview.jpeg").write_bytes(b"\xff\xd8\xff" + b"x" * 500)
    (plain / "abcd-empty.webp").write_bytes(b"")  # empty: only a walk with sizes can tell
    linked = owner / "ab" / "ce"
    linked.mkdir(parents=True)
    (linked / "abce-thumbnail.webp").write_bytes(b"y" * 70)
    os.symlink("/etc/hostname", linked / "abce-preview.jpeg")
    odd = owner / "ac" / "00"
    odd.mkdir(parents=True)
    os.mkfifo(odd / "ac00-thumbnail.webp")
    (odd / "ac00-preview.jpeg").write_bytes(b"z" * 30)
    nested = owner / "ad" / "01"
    (nested / "deeper").mkdir(parents=True)
    (nested / "ad01-thumbnail.webp").write_bytes(b"w" * 20)
    (nested / "deeper" / "stray.webp").write_bytes(b"v" * 10)
    (owner / "flat.jpeg").write_bytes(b"old flat layout")


async def _entries(root: Path, sizes: bool, workers: int) -> list[tuple[bytes, int, int]]:
    walk = DiskWalk(os.fsencode(root), workers=workers, sizes=sizes)
    out: list[tuple[bytes, int, int]] = []
    try:
        async for paths, sizes_, flags in walk.frames():
            out.extend(zip(paths, sizes_, flags, strict=True))
    finally:
        await walk.close()
    return out


@pytest.mark.parametrize("workers", [2, 0])
async def test_walk_without_sizes_matches_walk_with_sizes(tmp_path: Path, workers: int) -> None:
    _tree(tmp_path)
    with_sizes = await _entries(tmp_path, True, workers)
    without = await _entries(tmp_path, False, workers)
    paths = [p for p, _, _ in with_sizes]
    assert paths == sorted(paths)
    assert [(p, f) for p, _, f in without] == [(p, f) for p, _, f in with_sizes]
    by_path = {p: (s, f) for p, s, f in with_sizes}
    assert by_path[b"thumbs/owner-a/ab/cd/abcd-empty.webp"] == (0, FILE)
    assert by_path[b"thumbs/owner-a/ab/ce/abce-preview.jpeg"][1] == SYMLINK
    unsized = {p for p, s, _ in without if s != by_path[p][0]}
    # Only the plain folders of regular files went without lstat; their sizes are "unknown, not empty".
    assert unsized == {
        b"thumbs/owner-a/ab/cd/abcd-thumbnail.webp",
        b"thumbs/owner-a/ab/cd/abcd-preview.jpeg",
        b"thumbs/owner-a/ab/cd/abcd-empty.webp",
        b"thumbs/owner-a/ad/01/deeper/stray.webp",
    }
    assert all(s == SIZE_UNKNOWN for p, s, _ in without if p in unsized)
    # A folder with a link, a FIFO or a directory in it is read with sizes as before.
    assert dict((p, s) for p, s, _ in without)[b"thumbs/owner-a/ac/00/ac00-thumbnail.webp"] == 0
    assert b"thumbs/owner-a/ad/01/deeper/stray.webp" in paths
    assert b"thumbs/.immich" not in paths


async def test_header_checks_keep_sizes(tmp_path: Path) -> None:
    _tree(tmp_path)
    walk = DiskWalk(os.fsencode(tmp_path), verify_headers=True, sizes=False)
    assert walk.sizes  # reading every file anyway: sizes come with it
    await walk.close()
