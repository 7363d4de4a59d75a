"""``capacity``: how full the filesystems under Immich's storage folders are, every ``intervals.queues``.

``immich_media_filesystem_size_bytes{folder}`` and ``immich_media_filesystem_avail_bytes{folder}``, one
pair per storage folder present under ``media.root``. A folder that is absent, unreadable or does not
answer (a hung network mount) has no series this round: a stale figure would hide a disk filling up.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Sequence
from typing import TypeVar

from prometheus_client.core import Metric

from immich_thumbnail_exporter.collectors.base import Outcome
from immich_thumbnail_exporter.config import Config
from immich_thumbnail_exporter.metrics import gauge
from immich_thumbnail_exporter.sources.capacity import STORAGE_FOLDERS, FolderSpace, folder_space
from immich_thumbnail_exporter.store import Part
from immich_thumbnail_exporter.timing import deadline_in, left

T = TypeVar("T")

# A statvfs on a healthy filesystem answers in microseconds; a hung NFS mount never does.
STATVFS_TIMEOUT = 5.0


def capacity_families(spaces: Sequence[FolderSpace]) -> list[Metric]:
    """
    immich_media_filesystem_size_bytes{folder="thumbs"} 8.388608e+06
    immich_media_filesystem_avail_bytes{folder="thumbs"} 5.24288e+06
    """
    return [
        gauge("immich_media_filesystem_size_bytes", [((s.folder,), float(s.size_bytes)) for s in spaces]),
        gauge("immich_media_filesystem_avail_bytes", [((s.folder,), float(s.avail_bytes)) for s in spaces]),
    ]


def off_loop(fn: Callable[..., T], *args: object) -> asyncio.Future[T]:
    """Run a blocking call on the media folder off the event loop; await the future it returns.

    The one place capacity figures leave the loop: to be switched to the media folder's own thread pool
    (``sources/media.py``) so a hung mount never fills asyncio's default executor. A plain future, not a
    task: waiting on it with a timeout creates no task per call.
    """
    return asyncio.get_running_loop().run_in_executor(None, functools.partial(fn, *args))


class CapacityCollection:
    name = "capacity"
    sources = frozenset({"filesystem"})

    def __init__(self, config: Config) -> None:
        assert config.media.root is not None
        self.root = config.media.root
        self.interval = float(config.intervals.queues)
        self.timeout = STATVFS_TIMEOUT * 2
        # A statvfs stuck on a hung mount keeps its thread: never start a second one beside it.
        self._stuck: dict[str, asyncio.Future[FolderSpace | None]] = {}

    async def collect(self) -> Outcome:
        # One folder after the other, under one budget: a hung mount costs its share once, then is
        # skipped while its statvfs is still stuck (it keeps its thread; never a second one beside it).
        deadline = deadline_in(STATVFS_TIMEOUT)
        spaces: list[FolderSpace] = []
        for folder in STORAGE_FOLDERS:
            pending = self._stuck.get(folder)
            if pending is not None and not pending.done():
                continue
            self._stuck.pop(folder, None)
            if left(deadline) <= 0:
                break  # the round's budget went to a hung folder: the rest wait for the next round
            future = off_loop(folder_space, self.root, folder)
            done, _ = await asyncio.wait({future}, timeout=left(deadline))
            if not done:
                self._stuck[folder] = future
                continue
            found = future.result()
            if found is not None:
                spaces.append(found)
        stuck = sorted(f for f, t in self._stuck.items() if not t.done())
        error = f"no answer from {', '.join(stuck)} within {STATVFS_TIMEOUT:.0f}s" if stuck else None
        # Whether the media folder is up is the probe's call (thumbs/ and its marker), not this one's.
        return Outcome((Part(self.sources, tuple(capacity_families(spaces))),), {}, error)

    async def close(self) -> None:
        pass
