"""``checks.check_originals``: count eligible assets whose original is gone, listing each folder once.

The originals stream comes sorted by path (``file_sql.originals_sql``), so each folder is resolved (inside
the media root: ``InRoot``, never through a link out of it) and listed once, in the media pool
(``sources/media.py``), a few hundred rows per call so that no single call holds it long.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import asyncpg

from immich_thumbnail_exporter.findings import FileStats
from immich_thumbnail_exporter.scan.file_sql import originals_sql
from immich_thumbnail_exporter.scan.inroot import MISSING, InRoot
from immich_thumbnail_exporter.sources.media import media_call
from immich_thumbnail_exporter.sources.paths import PathMapper
from immich_thumbnail_exporter.sources.schema import Schema

# Rows looked up in one media-pool call: each may list a folder.
ROWS_PER_CALL = 256


class Cancelled(Exception):
    """The check was cancelled while the media pool was listing folders for it."""


class _Lister:
    """The folder being looked at and its names; runs in the media pool's one thread."""

    def __init__(self, mapper: PathMapper, stats: FileStats) -> None:
        self.mapper = mapper
        self.stats = stats
        self.cancel = False
        self._disk: InRoot | None = None
        self._folder: bytes | None = None
        self._names: set[bytes] | None = set()

    def check(self, rows: Sequence[Any]) -> int:
        """Originals missing among ``rows``; those that cannot be told are counted as unchecked."""
        if self._disk is None:
            self._disk = InRoot(self.mapper.root_bytes)
        disk = self._disk
        missing = 0
        for row in rows:
            if self.cancel:
                raise Cancelled()
            rel = self.mapper.relative(row[0])
            if rel is None:
                # Outside the media location (external libraries): unchecked rather than guessed at.
                self.stats.originals_unchecked += 1
                continue
            folder, _, name = os.fsencode(rel).rpartition(b"/")
            if folder != self._folder:
                self._folder = folder
                self._names = self._list(disk, folder)
            if self._names is None:
                self.stats.originals_unchecked += 1
            elif name not in self._names:
                missing += 1
        return missing

    @staticmethod
    def _list(disk: InRoot, folder: bytes) -> set[bytes] | None:
        """The names in ``folder``; None when it cannot be told (it leads out of the root, or cannot be
        read: its originals are unchecked)."""
        real = disk.folder(folder)
        if isinstance(real, str):
            return set() if real == MISSING else None
        try:
            return set(os.listdir(disk.local(real)))
        except FileNotFoundError:
            return set()
        except OSError:
            return None


async def check_originals(
    conn: asyncpg.Connection,
    schema: Schema,
    mapper: PathMapper,
    stats: FileStats,
    *,
    fetch_size: int,
    timeout: float,
) -> None:
    """Set ``stats.originals_missing`` (and ``originals_unchecked``). Must run inside a transaction."""
    lister = _Lister(mapper, stats)
    missing = 0
    cursor = await conn.cursor(originals_sql(schema), timeout=timeout)
    try:
        while rows := await cursor.fetch(fetch_size, timeout=timeout):
            for k in range(0, len(rows), ROWS_PER_CALL):
                missing += await media_call(lister.check, rows[k : k + ROWS_PER_CALL])
    except BaseException:
        lister.cancel = True
        raise
    stats.originals_missing = missing
