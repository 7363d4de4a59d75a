"""How full the filesystems holding Immich's storage folders are: one ``statvfs`` per folder.

Immich keeps each kind of file in a fixed folder under its media location (``StorageFolder`` in
Immich's ``server/src/enum.ts``); any of them may be a separate mount (a big ``library/`` on a NAS share,
``thumbs/`` on a fast disk), so each is measured on its own. Nothing here opens a file.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

# Immich's StorageFolder enum, in the order the dashboard lists them.
STORAGE_FOLDERS = ("thumbs", "upload", "library", "encoded-video", "profile", "backups")


@dataclass(frozen=True)
class FolderSpace:
    folder: str
    size_bytes: int
    # What an unprivileged writer (Immich runs as one) can still use: f_bavail, not f_bfree, which
    # counts the blocks reserved for root.
    avail_bytes: int
    # The filesystem's device: folders on one filesystem share it (and its free space).
    device: int = 0


def folder_space(root: str, folder: str) -> FolderSpace | None:
    """The filesystem holding ``root/folder``; None when the folder is absent or cannot be read."""
    path = os.path.join(root, folder)
    try:
        info = os.stat(path)
        if not stat.S_ISDIR(info.st_mode):
            return None
        st = os.statvfs(path)
    except OSError:
        return None
    return FolderSpace(folder, st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize, info.st_dev)


def media_space(root: str, folders: tuple[str, ...] = STORAGE_FOLDERS) -> list[FolderSpace]:
    """Every storage folder present under ``root``. Blocking: call it off the event loop."""
    return [s for s in (folder_space(root, f) for f in folders) if s is not None]
