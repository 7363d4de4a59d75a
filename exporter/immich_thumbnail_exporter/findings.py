"""Plain data shared by the collections, the scan report and the HTTP pages."""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

ASSET_TYPES = ("image", "video")


@dataclass(frozen=True, slots=True)
class Problem:
    """One missing or broken thumbnail-type file of one asset (the rows of ``/problems`` and ``scan``).

    A face thumbnail's row (``kind`` ``person``) has the same fields, read for the person: ``asset_id`` is
    the person's id, ``owner_id`` the person's owner, ``asset_type`` ``person``, ``path`` the stored
    ``person."thumbnailPath"``, and ``original_path`` / ``original_exists`` the original of the asset that
    holds the person's current feature face (what Immich crops the face from; None when the person has
    none)."""

    asset_id: str
    owner_id: str
    asset_type: str
    kind: str
    reason: str
    path: str | None
    original_path: str | None
    original_exists: bool | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class InventoryCounts:
    """What the database alone says (collection ``inventory``)."""

    schema: str
    version: str | None
    assets: dict[str, int]
    no_record: dict[str, int]
    thumbhash_missing: int
    metadata_pending: int


@dataclass
class FileStats:
    """What the file check found (collection ``files``)."""

    missing: Counter[tuple[str, str]] = field(default_factory=Counter)
    files: Counter[str] = field(default_factory=Counter)
    bytes: Counter[str] = field(default_factory=Counter)
    orphaned_files: int = 0
    orphaned_bytes: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    # Face thumbnails missing or broken, by reason (every person counts: no eligibility rule applies).
    person_missing: Counter[str] = field(default_factory=Counter)
    # False when the walk read no sizes (``checks.file_sizes: false``): bytes and file_empty are unknown.
    sizes_known: bool = True
    originals_missing: int | None = None
    originals_unchecked: int = 0
    rows: int = 0
    entries: int = 0
    directories: int = 0
    problems_total: int = 0


@dataclass(frozen=True)
class ProblemSnapshot:
    """The problem assets of one successful file check (kept in memory up to the collection's limit)."""

    problems: tuple[Problem, ...]
    total: int
    truncated: bool
    orphaned_files: int
    started_at: float
    finished_at: float


class ProblemFeed:
    """The latest file check's problems, handed at wiring time to what lists or fixes them.

    ``/problems`` and remediation read it instead of reaching into another collection's result. It is
    empty until a file check succeeds, and emptied again when one fails: a list from before an outage
    is never served as current.
    """

    def __init__(self) -> None:
        self._latest: ProblemSnapshot | None = None

    def publish(self, snapshot: ProblemSnapshot | None) -> None:
        self._latest = snapshot

    def latest(self) -> ProblemSnapshot | None:
        return self._latest


class ProblemStore:
    """Problems kept in memory up to a limit, then spilled to a temporary JSON-lines file.

    A library with a million broken thumbnails must not cost a million objects in RAM; a scan still
    reports every one of them.
    """

    def __init__(self, memory_limit: int = 50_000, keep_overflow: bool = True) -> None:
        self.memory_limit = memory_limit
        self.keep_overflow = keep_overflow
        self._items: list[Problem] = []
        self._spill: Any = None
        self.total = 0
        self.by_asset_ids: set[str] | None = None

    def add(self, problem: Problem) -> None:
        self.total += 1
        if len(self._items) < self.memory_limit:
            self._items.append(problem)
            return
        if not self.keep_overflow:
            return
        if self._spill is None:
            self._spill = tempfile.TemporaryFile("w+", encoding="utf-8")  # noqa: SIM115 - lives with the store
        self._spill.write(json.dumps(problem.to_dict()) + "\n")

    @property
    def truncated(self) -> bool:
        return not self.keep_overflow and self.total > len(self._items)

    def __len__(self) -> int:
        return self.total if self.keep_overflow else len(self._items)

    def __iter__(self) -> Iterator[Problem]:
        yield from self._items
        if self._spill is not None:
            self._spill.flush()
            self._spill.seek(0)
            for line in self._spill:
                yield Problem(**json.loads(line))
            self._spill.seek(0, os.SEEK_END)

    def in_memory(self) -> list[Problem]:
        return list(self._items)

    def close(self) -> None:
        if self._spill is not None:
            self._spill.close()
            self._spill = None


@dataclass(frozen=True)
class FolderSpace:
    """The filesystem holding one of Immich's storage folders (``statvfs``)."""

    folder: str
    size_bytes: int
    # What an unprivileged writer (Immich runs as one) can still use: f_bavail, not f_bfree, which
    # counts the blocks reserved for root.
    avail_bytes: int
    # The filesystem's device: folders on one filesystem share it (and its free space); 0 when unknown.
    device: int = 0


@dataclass
class Throughput:
    """How fast Immich's workers finished thumbnail jobs recently, from the queue's event stream."""

    completed: int  # completed events in the sample
    window_seconds: float  # from the first to the last of them
    last_completed_age: float | None  # seconds since the newest one
    backlog: int  # jobs waiting, prioritized, paused or active now

    @property
    def rate(self) -> float | None:
        """Jobs per second, or None when fewer than two jobs finished in the sample."""
        if self.completed < 2 or self.window_seconds <= 0:
            return None
        return (self.completed - 1) / self.window_seconds
