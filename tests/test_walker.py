"""The disk walk without sizes (``checks.file_sizes: false``) sees exactly what the walk with sizes sees,
in the same order, less the sizes of regular files in plain folders; through the helper processes and
through the in-process fallback alike. Its helper processes are waited for by asyncio alone."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from immich_thumbnail_exporter.scan.disk_walk import DiskWalk
from immich_thumbnail_exporter.scan.walk_child import FILE, SIZE_UNKNOWN, SYMLINK
from tests.faultkit import until

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


LATE = 3.0


class LateWatcher(asyncio.ThreadedChildWatcher):
    """asyncio's own child watcher, starting to wait for each child a few seconds late, as its thread may
    on a busy machine: the window in which anything else that waits for the child reaps it first."""

    def add_child_handler(self, pid: int, callback: Any, *args: Any) -> None:
        asyncio.get_running_loop().call_later(LATE, super().add_child_handler, pid, callback, *args)


@contextlib.contextmanager
def late_watcher() -> Iterator[None]:
    policy: Any = asyncio.get_event_loop_policy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        policy.set_child_watcher(LateWatcher())
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            policy.set_child_watcher(asyncio.ThreadedChildWatcher())


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return "gone"
    return stat[stat.rindex(b")") + 2 :].split()[0].decode()


@pytest.mark.skipif(not hasattr(asyncio, "ThreadedChildWatcher"), reason="Python 3.14+ has no child watchers")
async def test_walkers_are_reaped_by_asyncio_alone(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A walk read to its end and closed while its walkers have exited but asyncio has not yet reaped
    them: closing must not reap them behind asyncio's back (``Process.kill`` polls the child first,
    which did, and asyncio then logged "Unknown child process pid ..., will report returncode 255")."""
    _tree(tmp_path)
    with late_watcher():
        walk = DiskWalk(os.fsencode(tmp_path), workers=2)
        async for _ in walk.frames():
            pass
        procs = walk.processes
        assert len(procs) == 2
        # The walkers exit on their own once their last frame is read: zombies until asyncio waits.
        await until(lambda: {_state(p.pid) for p in procs} == {"Z"}, LATE - 0.5, 0.01)
        with caplog.at_level(logging.WARNING, logger="asyncio"):
            await walk.close()
    assert "Unknown child process" not in caplog.text, caplog.text
    # Each exit status read by asyncio's watcher: 0, as the walker exited, not 255 ("unknown").
    assert [p.returncode for p in procs] == [0, 0]
