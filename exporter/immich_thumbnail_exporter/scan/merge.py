"""The merge of the file check: database rows against the walk, both in bytewise path order, like ``comm``.

* the database side streams every thumbnail, preview, fullsize and face-thumbnail (``person``) path from
  a server-side cursor, ordered bytewise by the path Immich would resolve (``file_sql.files_sql``);
* the disk side is a depth-first walk of ``thumbs/`` that lists each directory once and sorts its
  entries, so the walk comes out in the same bytewise order (a directory sorts as ``name/``:
  ``scan/disk_walk.py``).

A path on both sides is a file that exists; database-only is missing; disk-only is an orphan. No path is
ever checked with its own ``stat`` for existence; sizes come from the directory entry (``fstatat`` on
the listed name), or not at all with ``checks.file_sizes: false``.

The merge runs in the event loop in slices, so a scrape waits at most one slice (no GIL contention with
a worker thread), and takes runs of rows that match the walk one for one with list-slice comparisons.
It never touches the file system itself: the few rows that need a look of their own (a link to follow,
an old-layout path outside ``thumbs/``, a row out of order) are set aside (``deferred``), looked at in a
worker thread (``resolve``, through ``InRoot``: nothing outside the media root is ever named) and judged
once that is done (``settle``). Every verdict is ``verdict.file_reason``'s, a face thumbnail's too: it
is judged like an asset's file and counted apart (``FileStats.person_missing``; never in an asset kind's
files, bytes or refusals).
"""

from __future__ import annotations

import logging
import os
from array import array
from collections.abc import Sequence
from itertools import compress
from typing import Any

from immich_thumbnail_exporter.findings import FileStats
from immich_thumbnail_exporter.logs import warn_once
from immich_thumbnail_exporter.scan.file_sql import KINDS, PERSON
from immich_thumbnail_exporter.scan.inroot import Facts, InRoot
from immich_thumbnail_exporter.scan.verdict import file_reason, on_disk
from immich_thumbnail_exporter.scan.walk_child import FILE, KIND_MASK, SYMLINK, UNREADABLE_DIR, UNREADABLE_FILE, Frame
from immich_thumbnail_exporter.sources.paths import PathMapper

log = logging.getLogger(__name__)

# Rows merged between two yields to the event loop: well under a millisecond of work.
SLICE = 2000
# What a deferred row needs: its link followed; looked up outside thumbs/; looked up out of order.
LINK, ELSEWHERE, LOOKUP = 0, 1, 2
Deferred = tuple[int, Any, bytes]
Candidate = tuple[Any, str, str, bytes]


class Merge:
    """The merge: database rows ``(absolute path as bytes, kind code, asset id[, stored path])`` in path
    order against disk frames.

    ``merge`` runs synchronously over a slice of rows and stops early when it needs the next disk frame.
    Rows that need a look at the disk of their own wait in ``deferred``; the caller runs ``resolve`` on
    them in a worker thread and hands the answers to ``settle`` before merging on. A row with a problem
    becomes a candidate ``(asset id, kind, reason, stored path)``: whether it counts depends on the
    asset (eligible or not), which the caller looks up (``take_candidates``).
    """

    def __init__(self, mapper: PathMapper, stats: FileStats, verify_headers: bool = False,
                 disk: InRoot | None = None) -> None:
        self.mapper = mapper
        self.stats = stats
        self.verify_headers = verify_headers
        self._prefix = os.fsencode(mapper.location.rstrip("/") + "/")
        self._plen = len(self._prefix)
        # Made on first use, in the worker thread (finding the root's real path is a system call).
        self._disk = disk
        self.deferred: list[Deferred] = []
        # The current disk frame and the position in it.
        self._paths: list[bytes] = []
        self._sizes: array[int] = array("q")
        self._flags: bytes = b""
        self._j = 0
        self.disk_done = False
        self._unreadable: bytes | None = None
        # The last path judged, with what the disk said about it (size, flag).
        self._last: tuple[bytes, int, int] | None = None
        self._last_rel = b""
        # Orphans seen, to take one back if a row turns up out of order (bounded; None once full).
        self._orphans: dict[bytes, int] | None = {}
        self._files = [0, 0, 0, 0]
        self._bytes = [0, 0, 0, 0]
        self.candidates: list[Candidate] = []
        # The batch being merged, prepared for the bulk path: its rows' paths less the location prefix
        # (a guess until checked: see ``_prepare``) and kind codes.
        self._rows: Sequence[Any] | None = None
        self._rels: list[bytes] = []
        self._kinds: list[int] = []

    # -- disk frames
    @property
    def needs_frame(self) -> bool:
        return self._j >= len(self._paths) and not self.disk_done

    def push_frame(self, frame: Frame | None) -> None:
        if frame is None:
            self.disk_done = True
            self._paths, self._sizes, self._flags, self._j = [], array("q"), b"", 0
            return
        self._paths, self._sizes, self._flags = frame
        self._j = 0
        self.stats.entries += len(frame[0])

    def _orphan(self, j: int) -> None:
        path, flag = self._paths[j], self._flags[j] & KIND_MASK
        if flag == UNREADABLE_DIR:
            self._unreadable = path
            self.stats.directories += 1
            return
        size = self._sizes[j] if flag == FILE else 0
        self.stats.orphaned_files += 1
        self.stats.orphaned_bytes += size
        if self.stats.orphaned_files <= 3:
            log.debug("orphaned file %r", path)
        orphans = self._orphans
        if orphans is not None:
            if len(orphans) < 100_000:
                orphans[path] = size
            else:
                self._orphans = None

    def orphans_left(self) -> None:
        """Everything left in the current frame is an orphan (once the rows are done)."""
        for j in range(self._j, len(self._paths)):
            self._orphan(j)
        self._j = len(self._paths)

    # -- rows
    def _prepare(self, rows: Sequence[Any]) -> None:
        """Relative paths and kinds of a batch, each in one list comprehension (no Python loop body per
        row). A relative path here is only a guess (the path may not start with the location): the bulk
        path checks the prefix at both ends of a run, which covers the run since rows are sorted."""
        self._rows = rows
        plen = self._plen
        self._rels = [r[0][plen:] for r in rows]
        self._kinds = [r[1] for r in rows]

    def merge(self, rows: Sequence[Any], start: int, limit: int = SLICE) -> int:
        """Merge rows from ``start``; returns where it stopped: ``len(rows)`` when done with them, earlier
        after ``limit`` rows or when the disk frame ran out (``needs_frame``: that row comes again).

        Most rows name the next file on disk, which is there and not empty: such runs are found by
        comparing slices of the two sorted lists and counted in bulk. A run can only equal walk paths
        (real names: never empty, ``.`` or ``..``) if its paths are clean, so nothing the path mapper
        would refuse gets through. Anything else (a missing file, an orphan, a problem, a refused path)
        goes through ``_merge_one``.
        """
        if rows is not self._rows:
            self._prepare(rows)
        rels, prefix = self._rels, self._prefix
        end = min(len(rows), start + limit)
        i = start
        try:
            while i < end:
                paths, j = self._paths, self._j
                k = min(end - i, len(paths) - j)
                if k > 0 and rels[i] == paths[j] and rels[i] > self._last_rel and rows[i][0].startswith(prefix):
                    m = self._run(rels, i, j, k)
                    if m and rows[i + m - 1][0].startswith(prefix):
                        self._bulk(i, j, m)
                        i += m
                        continue
                if not self._merge_one(rows[i]):
                    return i
                i += 1
            return i
        finally:
            self.stats.rows += i - start
            self._fold()

    def _run(self, rels: list[bytes], i: int, j: int, k: int) -> int:
        """How many rows from ``i`` match disk entries from ``j`` one for one, all plain files that are
        not empty (at most ``k``)."""
        paths = self._paths
        if rels[i : i + k] != paths[j : j + k]:
            lo, hi = 1, k  # rels[i] == paths[j]: the matching run is lo..hi-1 long
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if rels[i : i + mid] == paths[j : j + mid]:
                    lo = mid
                else:
                    hi = mid - 1
            k = lo
        flags, sizes = self._flags, self._sizes
        if flags.count(0, j, j + k) != k or min(sizes[j : j + k]) <= 0:
            for n in range(k):
                if flags[j + n] != FILE or sizes[j + n] <= 0:
                    return n
        return k

    def _bulk(self, i: int, j: int, m: int) -> None:
        kinds = self._kinds[i : i + m]
        sizes = self._sizes[j : j + m]
        total = sum(sizes)
        counts = [kinds.count(0), kinds.count(1), kinds.count(2), kinds.count(3)]
        # Bytes by kind: all but one kind by selection, the last one by difference.
        main = max(range(4), key=counts.__getitem__)
        for kind in range(4):
            if kind != main and counts[kind]:
                part = sum(compress(sizes, map(kind.__eq__, kinds)))
                self._bytes[kind] += part
                total -= part
        self._bytes[main] += total
        for kind in range(3):
            self._files[kind] += counts[kind]
        self._bytes[PERSON] = self._files[PERSON] = 0
        self._j = j + m
        rel = self._paths[j + m - 1]
        self._last_rel = rel
        self._last = (rel, sizes[m - 1], FILE)

    def _merge_one(self, row: Any) -> bool:
        """One row the bulk path did not take; False when the disk frame ran out first."""
        p = row[0]
        rel: bytes | None = p[self._plen :] if p.startswith(self._prefix) else None
        if (rel is None or not rel or rel[0] in b"./" or rel[-1] == 47 or b"/." in rel or b"//" in rel
                or b"\0" in rel):
            rel = self._relative(p)
        if rel is None:
            self._refused(row)
            return True
        if not rel.startswith(b"thumbs/"):
            self._check_elsewhere(row, rel)
            return True
        last_rel = self._last_rel
        if rel <= last_rel:
            if rel == last_rel and self._last is not None:
                # Two rows naming one file: judge it once more from what the disk said.
                self._judge(row, rel, self._last[1], self._last[2])
            else:
                self._out_of_order(row, rel)
            return True
        paths, j = self._paths, self._j
        n = len(paths)
        while j < n and paths[j] < rel:
            self._orphan(j)
            j += 1
        self._j = j
        if j >= n and not self.disk_done:
            return False
        if j < n and paths[j] == rel:
            self._j = j + 1
            self._judge(row, rel, self._sizes[j], self._flags[j])
        else:
            unreadable = self._unreadable is not None and rel.startswith(self._unreadable)
            self._judge(row, rel, -1, UNREADABLE_DIR if unreadable else FILE)
        self._last_rel = rel
        return True

    def _fold(self) -> None:
        stats = self.stats
        for k in range(3):
            if self._files[k]:
                stats.files[KINDS[k]] += self._files[k]
                stats.bytes[KINDS[k]] += self._bytes[k]
                self._files[k] = self._bytes[k] = 0

    def _relative(self, p: bytes) -> bytes | None:
        rel = self.mapper.relative(p.decode("utf-8", "surrogateescape"))
        return None if rel is None else rel.encode("utf-8", "surrogateescape")

    def _refused(self, row: Any) -> None:
        kind = row[1]
        self.stats.refused[KINDS[kind]] += 1
        if self.stats.refused.total() <= 20:
            path = row[0].decode("utf-8", "replace")
            warn_once(
                log, f"refused:{path}",
                "refusing %s path %r: outside the media location %s, or not a clean path",
                KINDS[kind], path, self.mapper.location,
            )

    def _judge(self, row: Any, rel_b: bytes, size: int, flag: int) -> None:
        """Record one database row against what the walk said: size -1 means not found. A link is set
        aside, to be followed (inside the root only) off the event loop."""
        self._last = (rel_b, size, flag)
        if flag & KIND_MASK == SYMLINK:
            self.deferred.append((LINK, row, rel_b))
            return
        self._record(row, size, flag)

    def _record(self, row: Any, size: int, flag: int) -> None:
        """The verdict on one row's file (a link already followed), counted."""
        name = KINDS[row[1]]
        reason = file_reason(size, flag, self.verify_headers)
        if row[1] == PERSON:
            # Every person counts (no eligibility rule): counted here, whatever the details lookup finds.
            if reason is not None:
                self.stats.person_missing[reason] += 1
        elif on_disk(reason):
            self.stats.files[name] += 1
            self.stats.bytes[name] += max(size, 0)
        if reason is not None:
            # The stored path, when the stream merged on its absolute form.
            self.candidates.append((row[2], name, reason, row[3] if len(row) > 3 else row[0]))

    def take_candidates(self) -> list[Candidate]:
        out, self.candidates = self.candidates, []
        return out

    def _out_of_order(self, row: Any, rel: bytes) -> None:
        """A row sorting before one already merged (the database's order and ours disagree, which the
        query is written to prevent): look the file up on its own, and take it back from the orphans
        if the walk already counted it as one."""
        warn_once(log, "out-of-order", "database paths came out of order (at %r): checking them one by one", rel)
        self.deferred.append((LOOKUP, row, rel))

    def _take_back(self, rel: bytes, entry: Facts) -> None:
        if entry[0] < 0 or entry[1] & KIND_MASK == UNREADABLE_FILE:
            return
        if self._orphans is not None and rel in self._orphans:
            self.stats.orphaned_files -= 1
            self.stats.orphaned_bytes -= self._orphans.pop(rel)
        elif self._orphans is None:
            warn_once(log, "out-of-order-orphans", "orphan counts may include files the database references")

    def _check_elsewhere(self, row: Any, rel_b: bytes) -> None:
        """A thumbnail stored outside thumbs/ (old layouts): not walked, so looked up on its own (its folder
        resolved inside the root: one of its parents may be a link out of it)."""
        self.deferred.append((ELSEWHERE, row, rel_b))

    # -- the rows set aside
    def resolve(self, items: Sequence[Deferred]) -> list[tuple[Facts, Facts]]:
        """Blocking: look at what each deferred row names, ``(entry, what a link leads to)``. Run in a
        worker thread, one call at a time."""
        if self._disk is None:
            self._disk = InRoot(self.mapper.root_bytes)
        disk, headers = self._disk, self.verify_headers
        out: list[tuple[Facts, Facts]] = []
        for what, _, rel in items:
            if what == LINK:
                followed = disk.follow(rel, headers)
                out.append((followed, followed))
            else:
                out.append(disk.facts(rel, headers))
        return out

    def take_deferred(self) -> list[Deferred]:
        out, self.deferred = self.deferred, []
        return out

    def settle(self, items: Sequence[Deferred], facts: Sequence[tuple[Facts, Facts]]) -> None:
        """Judge the deferred rows with what ``resolve`` found."""
        for (what, row, rel), (entry, final) in zip(items, facts, strict=True):
            if what == LOOKUP:
                self._take_back(rel, entry)
            self._record(row, *final)
