"""``capacity``: how full the filesystems under Immich's storage folders are, every ``intervals.queues``.

``immich_media_filesystem_size_bytes{folder}`` and ``immich_media_filesystem_avail_bytes{folder}``, one
pair per storage folder present under ``media.root``. A folder that is absent, unreadable or does not
answer (a hung network mount) has no series this round: a stale figure would hide a disk filling up.
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client.core import Metric

from immich_thumbnail_exporter.collectors.base import Outcome
from immich_thumbnail_exporter.config import Config
from immich_thumbnail_exporter.metrics import gauge
from immich_thumbnail_exporter.sources.capacity import STORAGE_FOLDERS, FolderSpace, folder_space
from immich_thumbnail_exporter.sources.media import MediaStuck, media_call
from immich_thumbnail_exporter.store import Part
from immich_thumbnail_exporter.timing import deadline_in, left

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


class CapacityCollection:
    name = "capacity"
    sources = frozenset({"filesystem"})

    def __init__(self, config: Config) -> None:
        assert config.media.root is not None
        self.root = config.media.root
        self.interval = float(config.intervals.queues)
        self.timeout = STATVFS_TIMEOUT * 2

    async def collect(self) -> Outcome:
        # One folder after the other, under one budget, in the media folder's own pool: on a hung mount
        # the pool is stuck and every later call fails at once (no thread piles up); the folders not
        # measured this round drop their series until the mount answers.
        deadline = deadline_in(STATVFS_TIMEOUT)
        spaces: list[FolderSpace] = []
        error: str | None = None
        for folder in STORAGE_FOLDERS:
            try:
                found = await media_call(folder_space, self.root, folder, timeout=max(0.1, left(deadline)))
            except MediaStuck as exc:
                error = f"{folder}: {exc}"
                break
            if found is not None:
                spaces.append(found)
        # Whether the media folder is up is the probe's call (thumbs/ and its marker), not this one's.
        return Outcome((Part(self.sources, tuple(capacity_families(spaces))),), {}, error)

    async def close(self) -> None:
        pass
