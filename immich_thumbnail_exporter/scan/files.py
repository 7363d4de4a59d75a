"""Reconcile the thumbnail rows in the database with the files under ``<media>/thumbs``.

Both sides are read as sorted streams and merged, like ``comm``:

* the database side streams every thumbnail, preview, fullsize and face-thumbnail path from a
  server-side cursor, ordered bytewise by the path Immich would resolve (the path is sent as bytes,
  ``convert_to(path, 'UTF8')``, and sorted as such: byte order is ``COLLATE "C"`` order);
* the disk side is a depth-first walk of ``thumbs/`` that lists each directory once and sorts its
  entries, so the walk comes out in the same bytewise order (a directory sorts as ``name/``).

A path on both sides is a file that exists; database-only is missing; disk-only is an orphan. No path is
ever checked with its own ``stat`` for existence; sizes come from the directory entry (``fstatat`` on
the listed name), or not at all with ``checks.file_sizes: false`` (the entry types come with the
listing: half the walk's CPU).

Where the time goes, and how it is kept small (``python -m bench``; README, "Performance"): at a million
assets, listing 356k folders and ``lstat`` of 2M files is 60% of the CPU a scan needs, so the walk runs
in two helper processes (``immich_thumbnail_exporter/scan/walker.py``, at low priority), each taking every other
``thumbs/<owner>/<xx>`` subtree, reading each folder in bulk (``listdir``, ``lstat`` mapped in C) and
working ahead into a bounded buffer while PostgreSQL counts and sorts. They send frames (paths joined by
NUL, sizes, flags) that cost the exporter a ``split``. The database stream is narrow (path bytes, a kind
code, the asset id: no join, a third of the sort's temporary files); a one-shot ``scan`` reads it on a
second connection in the same snapshot (``scanner._beside``), so the sort runs while the counts do.
The merge runs in the event loop in slices, so a scrape waits at most one slice (no GIL contention with
a worker thread), and takes runs of rows that match the walk one for one with list-slice comparisons.
Problems are rare, so the details a problem row needs (owner, type, original, eligibility) are fetched
afterwards, by primary key, for those rows only.

Memory is a cursor batch, a few frames and one directory per level, whatever the library size.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import stat
import sys
from array import array
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from itertools import compress
from typing import Any

import asyncpg

from immich_thumbnail_exporter.logs import warn_once
from immich_thumbnail_exporter.model import FileStats, Problem
from immich_thumbnail_exporter.scan import walker as _walker
from immich_thumbnail_exporter.scan.walker import (
    FILE,
    HEAD_BAD,
    HEAD_UNREADABLE,
    KIND_MASK,
    MARKER,
    SYMLINK,
    UNREADABLE_DIR,
    UNREADABLE_FILE,
    Frame,
    header_ok,
    list_level,
    walk_tree,
)
from immich_thumbnail_exporter.sources.paths import IMMICH_CWD, PathMapper, normalized_sql
from immich_thumbnail_exporter.sources.schema import Schema

log = logging.getLogger(__name__)

__all__ = [
    "FILE", "MARKER", "SYMLINK", "THUMBS", "UNREADABLE_DIR", "UNREADABLE_FILE", "Cancelled", "DiskWalk", "Merge",
    "Reconciler", "check_originals", "files_sql", "header_ok", "header_verdict", "original_exists", "originals_sql",
    "problem_assets_sql", "reconcile",
]

THUMBS = b"thumbs"

# Kind codes in the database stream (person: a face thumbnail, which only keeps its file from being an
# orphan).
KINDS = ("thumbnail", "preview", "fullsize", "person")
PERSON = 3
# Rows merged between two yields to the event loop: well under a millisecond of work.
SLICE = 2000
# Rows per fetch from the file stream's cursor (at most ``database.fetch_size``).
STREAM_BATCH = 500
# How far each walker may work ahead of the merge.
WALKER_BUFFER = 32 << 20
WALKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "walker.py")
WALKER_RUNNABLE = bool(sys.executable) and os.path.exists(WALKER)
# Started through ``nice`` when there is one, so that even the interpreter's start-up (tens of
# milliseconds, every scan) runs at the walker's low priority; the walker lowers its own otherwise.
WALKER_COMMAND = (
    [nice, "-n", "10", sys.executable, "-I", "-S", WALKER] if (nice := shutil.which("nice"))
    else [sys.executable, "-I", "-S", WALKER]
)


class Cancelled(Exception):
    pass


class WalkerError(OSError):
    """A walker process died (it never fails for an unreadable file or folder: those are entries)."""


# -- the disk side ----------------------------------------------------------------------------------


def default_walkers() -> int:
    return max(1, min(2, os.cpu_count() or 1))


class DiskWalk:
    """Every entry under ``thumbs/`` in bytewise path order, as frames ``(paths, sizes, flags)``.

    The first two levels (``thumbs/``, ``thumbs/<owner>/``) are listed here; each directory below them
    (``thumbs/<owner>/<xx>``, a 256th of an owner's files) is a unit walked by a helper process, units
    dealt round-robin so the helpers take turns and work in parallel. Files found on the first two
    levels (rare: strays, old flat layouts) are stat-ed here while planning, one directory per step of
    the event loop. Without helper processes (``workers=0``, or when they cannot be started) the units
    are walked in a thread instead.
    """

    def __init__(self, root: bytes, verify_headers: bool = False, workers: int | None = None,
                 buffer_bytes: int = WALKER_BUFFER, sizes: bool = True) -> None:
        self.root = root
        self.verify_headers = verify_headers
        # Header checks read every file: sizes come with them.
        self.sizes = sizes or verify_headers
        self.workers = default_walkers() if workers is None else workers
        self.buffer_bytes = buffer_bytes
        self._segments: list[Frame | int] = []
        self._units: list[bytes] = []
        self._procs: list[asyncio.subprocess.Process] = []
        self._started = False
        self._closed = False

    def _plan(self) -> None:
        for _ in self._plan_steps():
            pass

    def _plan_steps(self) -> Iterator[None]:
        """List ``thumbs/`` and ``thumbs/<x>/``: the entries found there, and the units below them. Yields
        after each directory, so the event loop can serve in between (a few dozen listings in all)."""
        headers = self.verify_headers
        inline: list[tuple[bytes, int, int]] = []

        def flush() -> None:
            if inline:
                paths = [p for p, _, _ in inline]
                self._segments.append((paths, array("q", [s for _, s, _ in inline]), bytes(f for _, _, f in inline)))
                inline.clear()

        top = list_level(self.root, THUMBS, headers)
        if top is None:
            inline.append((THUMBS + b"/", 0, UNREADABLE_DIR))
            flush()
            return
        for key, size, flag in top[1]:
            if flag >= 0:
                inline.append((THUMBS + b"/" + key, size, flag))
                continue
            yield
            rel = THUMBS + b"/" + key[:-1]
            level = list_level(self.root, rel, headers)
            if level is None:
                inline.append((rel + b"/", 0, UNREADABLE_DIR))
                continue
            for key2, size2, flag2 in level[1]:
                if flag2 >= 0:
                    inline.append((rel + b"/" + key2, size2, flag2))
                    continue
                flush()
                self._segments.append(len(self._units))
                self._units.append(rel + b"/" + key2[:-1])
        flush()

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        for _ in self._plan_steps():
            await asyncio.sleep(0)
        if not self._units or self.workers < 1:
            self.workers = 0
            return
        self.workers = min(self.workers, len(self._units))
        if not WALKER_RUNNABLE:
            self.workers = 0
            return
        try:
            for w in range(self.workers):
                proc = await asyncio.create_subprocess_exec(
                    # -I -S: nothing from the environment or site-packages; the walker needs the stdlib only.
                    *WALKER_COMMAND, os.fsdecode(self.root), "1" if self.verify_headers else "0",
                    str(self.buffer_bytes), "1" if self.sizes else "0",
                    stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                    limit=1 << 20,
                )
                self._procs.append(proc)
                assert proc.stdin is not None
                proc.stdin.write(b"\0".join(b"%d %s" % (k, u) for k, u in enumerate(self._units)
                                            if k % self.workers == w))
                await proc.stdin.drain()
                proc.stdin.close()
        except OSError as exc:
            warn_once(log, "walker-spawn", "cannot start the file walker processes (%s): walking in-process", exc)
            await self.close()
            self._closed = False
            self.workers = 0

    async def _read_unit(self, k: int) -> AsyncIterator[Frame]:
        proc = self._procs[k % self.workers]
        out = proc.stdout
        assert out is not None
        size = _walker.FRAME.size
        while True:
            try:
                unit, count, blob, last = _walker.decode(await out.readexactly(size))
                body = await out.readexactly(blob + 9 * count)
            except asyncio.IncompleteReadError:
                raise WalkerError(f"file walker exited unexpectedly: {await self._stderr(proc)}") from None
            if unit != k:
                raise WalkerError(f"file walker out of step: unit {unit}, expected {k}")
            if count:
                sizes = array("q")
                sizes.frombytes(body[blob : blob + 8 * count])
                prefix = self._units[k] + b"/"
                yield [prefix + p for p in body[:blob].split(b"\0")], sizes, body[blob + 8 * count :]
            if last:
                return

    @staticmethod
    async def _stderr(proc: asyncio.subprocess.Process) -> str:
        err = b""
        if proc.stderr is not None:
            with contextlib.suppress(Exception):
                err = await asyncio.wait_for(proc.stderr.read(4000), 1)
        text = err.decode(errors="replace").strip().splitlines()
        return text[-1] if text else f"exit status {proc.returncode}"

    async def frames(self) -> AsyncIterator[Frame]:
        await self.start()
        for seg in self._segments:
            if not isinstance(seg, int):
                yield seg
            elif self.workers:
                async for frame in self._read_unit(seg):
                    yield frame
            else:
                gen = walk_tree(self.root, self._units[seg], self.verify_headers, sizes=self.sizes)
                while (walked := await asyncio.to_thread(_next_frame, gen)) is not None:
                    yield walked

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        procs, self._procs = self._procs, []
        for proc in procs:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
        for proc in procs:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(proc.wait(), 5)


def _next_frame(frames: Iterator[Frame]) -> Frame | None:
    return next(frames, None)


# -- the merge ----------------------------------------------------------------------------------------


class Merge:
    """The merge: database rows ``(absolute path as bytes, kind code, asset id[, stored path])`` in path
    order against disk frames.

    ``merge`` runs synchronously over a slice of rows and stops early when it needs the next disk frame.
    A row with a problem becomes a candidate ``(asset id, kind, reason, stored path)``: whether it counts
    depends on the asset (eligible or not), which the caller looks up (``take_candidates``).
    """

    def __init__(self, mapper: PathMapper, stats: FileStats, verify_headers: bool = False) -> None:
        self.mapper = mapper
        self.stats = stats
        self.verify_headers = verify_headers
        self._prefix = os.fsencode(mapper.location.rstrip("/") + "/")
        self._plen = len(self._prefix)
        self._root = mapper.root_bytes
        self._root_real = self.root_real = os.path.realpath(mapper.root_bytes)
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
        self._other_dir: bytes | None = None
        self._other_names: dict[bytes, int] = {}
        self._files = [0, 0, 0, 0]
        self._bytes = [0, 0, 0, 0]
        self.candidates: list[tuple[Any, str, str, bytes]] = []
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
        if kind == PERSON:
            return
        self.stats.refused[KINDS[kind]] += 1
        if self.stats.refused.total() <= 20:
            path = row[0].decode("utf-8", "replace")
            warn_once(
                log, f"refused:{path}",
                "refusing %s path %r: outside the media location %s, or not a clean path",
                KINDS[kind], path, self.mapper.location,
            )

    def _judge(self, row: Any, rel_b: bytes, size: int, flag: int) -> None:
        """Record one database row against what the disk said: size -1 means not found."""
        self._last = (rel_b, size, flag)
        kind = row[1]
        if kind == PERSON:
            return
        name = KINDS[kind]
        stats = self.stats
        base = flag & KIND_MASK
        reason: str | None = None
        if size < 0:
            reason = "file_unreadable" if base == UNREADABLE_DIR else "file_missing"
        elif base == UNREADABLE_FILE:
            reason = "file_unreadable"
        else:
            target: bytes | None = None
            if base == SYMLINK:
                size, reason, target = self._follow(rel_b)
            if reason is None:
                if size == 0:
                    reason = "file_empty"
                elif self.verify_headers:
                    if base == SYMLINK:
                        reason = self._check_header(rel_b, target)
                    elif flag & HEAD_UNREADABLE:
                        reason = "file_unreadable"
                    elif flag & HEAD_BAD:
                        reason = "file_corrupt"
            if reason not in ("file_unreadable", "file_missing"):  # file_missing: a dangling symlink
                stats.files[name] += 1
                stats.bytes[name] += max(size, 0)
        if reason is not None:
            # The stored path, when the stream merged on its absolute form.
            self.candidates.append((row[2], name, reason, row[3] if len(row) > 3 else row[0]))

    def take_candidates(self) -> list[tuple[Any, str, str, bytes]]:
        out, self.candidates = self.candidates, []
        return out

    def _out_of_order(self, row: Any, rel: bytes) -> None:
        """A row sorting before one already merged (the database's order and ours disagree, which the
        query is written to prevent): look the file up on its own, and take it back from the orphans
        if the walk already counted it as one."""
        warn_once(log, "out-of-order", "database paths came out of order (at %r): checking them one by one", rel)
        try:
            st = os.lstat(self._root + b"/" + rel)
        except FileNotFoundError:
            self._judge(row, rel, -1, FILE)
            return
        except OSError:
            self._judge(row, rel, 0, UNREADABLE_FILE)
            return
        flag = SYMLINK if stat.S_ISLNK(st.st_mode) else FILE
        if flag == FILE and self.verify_headers and st.st_size and stat.S_ISREG(st.st_mode):
            flag |= _walker.head_flag(self._root + b"/" + rel)
        if self._orphans is not None and rel in self._orphans:
            self.stats.orphaned_files -= 1
            self.stats.orphaned_bytes -= self._orphans.pop(rel)
        elif self._orphans is None:
            warn_once(log, "out-of-order-orphans", "orphan counts may include files the database references")
        self._judge(row, rel, st.st_size, flag)

    def _inside(self, real: bytes) -> bool:
        return real == self._root_real or real.startswith(self._root_real.rstrip(b"/") + b"/")

    def _follow(self, rel_b: bytes) -> tuple[int, str | None, bytes | None]:
        """A symlink: follow it only when its target stays inside the media root; return the size, a
        reason when it cannot be followed, and the resolved target."""
        target = os.path.realpath(self._root + b"/" + rel_b)
        if not self._inside(target):
            warn_once(log, f"symlink:{rel_b!r}", "not following symlink %r: it points outside the media root", rel_b)
            return 0, "file_unreadable", None
        try:
            return os.stat(target).st_size, None, target
        except OSError:
            return 0, "file_missing", None

    def _check_header(self, rel_b: bytes, target: bytes | None = None) -> str | None:
        """Compare the first bytes with the extension; ``target`` is a symlink's resolved (checked) target."""
        ext = rel_b.rsplit(b".", 1)[-1].decode("ascii", "replace").lower() if b"." in rel_b else ""
        return header_verdict(target if target is not None else self._root + b"/" + rel_b, ext)

    def _check_elsewhere(self, row: Any, rel_b: bytes) -> None:
        """A thumbnail stored outside thumbs/ (old layouts): list its directory once and look it up."""
        directory, _, name = rel_b.rpartition(b"/")
        if directory != self._other_dir:
            self._other_dir = directory
            self._other_names = {}
            folder = self._root + b"/" + directory
            # Unlike thumbs/, this folder is not walked: one of its parents may be a link out of the root.
            if not self._inside(os.path.realpath(folder)):
                warn_once(log, f"dir:{directory!r}", "not following %r: it leads outside the media root", directory)
                self._other_names = {b"": -3}
            else:
                try:
                    with os.scandir(folder) as it:
                        for entry in it:
                            if not entry.is_dir(follow_symlinks=False):
                                try:
                                    size = entry.stat(follow_symlinks=False).st_size
                                    self._other_names[entry.name] = -4 if entry.is_symlink() else size
                                except OSError:
                                    self._other_names[entry.name] = -2
                except FileNotFoundError:
                    pass
                except OSError:
                    self._other_names = {b"": -3}
        size = self._other_names.get(name, -1)
        if self._other_names.get(b"") == -3:
            self._judge(row, rel_b, -1, UNREADABLE_DIR)
        elif size == -2:
            self._judge(row, rel_b, 0, UNREADABLE_FILE)
        elif size == -4:
            self._judge(row, rel_b, 0, SYMLINK)  # followed only if it stays inside the root
        elif size > 0 and self.verify_headers and row[1] != PERSON:
            head = self._check_header(rel_b)
            self._judge(row, rel_b, size, HEAD_BAD if head == "file_corrupt" else HEAD_UNREADABLE if head else FILE)
        else:
            self._judge(row, rel_b, size, FILE)


def _sync_frames(root: bytes, verify_headers: bool) -> Iterator[Frame]:
    """The disk side walked in this process, synchronously (``Reconciler``'s own use)."""
    walk = DiskWalk(root, verify_headers, workers=0)
    walk._plan()
    for seg in walk._segments:
        if isinstance(seg, int):
            yield from walk_tree(root, walk._units[seg], verify_headers)
        else:
            yield seg


class Reconciler(Merge):
    """The merge fed synchronously, walking the disk in this process: rows are
    ``(path, kind, asset_id, owner_id, asset_type, original_path, eligible)`` with ``kind`` one of
    ``KINDS`` (``person`` for face thumbnails, which only protect their file from being called an
    orphan). Problems go to ``on_problem`` as they are found. ``reconcile`` does the same with the walk
    in helper processes and a narrower query."""

    def __init__(
        self,
        mapper: PathMapper,
        stats: FileStats,
        on_problem: Callable[[Problem], None],
        verify_headers: bool = False,
    ) -> None:
        super().__init__(mapper, stats, verify_headers)
        self.on_problem = on_problem
        self._cancel = False
        self._frames: Iterator[Frame] | None = None

    def cancel(self) -> None:
        self._cancel = True

    def _next_frame(self) -> None:
        if self._cancel:
            raise Cancelled()
        if self._frames is None:
            self._frames = _sync_frames(self.mapper.root_bytes, self.verify_headers)
        self.push_frame(next(self._frames, None))

    def feed(self, rows: Sequence[Any]) -> None:
        code = {k: i for i, k in enumerate(KINDS)}
        cwd = IMMICH_CWD + "/"
        converted = [
            ((r[0] if r[0][:1] == "/" else cwd + r[0]).encode("utf-8", "surrogatepass"), code[r[1]], n)
            for n, r in enumerate(rows)
        ]
        i = 0
        while i < len(converted):
            if self._cancel:
                raise Cancelled()
            i = self.merge(converted, i)
            if self.needs_frame:
                self._next_frame()
        for n, kind, reason, _ in self.take_candidates():
            row = rows[n]
            if not row[6]:
                continue
            self.stats.missing[(kind, reason)] += 1
            self.stats.problems_total += 1
            self.on_problem(Problem(
                asset_id=row[2], owner_id=row[3], asset_type=row[4], kind=kind, reason=reason, path=row[0],
                original_path=row[5], original_exists=original_exists(self.mapper, row[5]),
            ))

    def finish(self, budget: int = 200_000) -> bool:
        """Walk what is left of the disk (all orphans); True when done, False to be called again."""
        while budget > 0:
            if self.needs_frame:
                self._next_frame()
            if self.disk_done:
                return True
            budget -= len(self._paths) - self._j
            self.orphans_left()
        return self.disk_done


def header_verdict(path: bytes, ext: str) -> str | None:
    """``file_corrupt`` when the first bytes do not match the extension, ``file_unreadable`` when they cannot
    be read, else None. Never follows a symlink and never blocks (a FIFO opens and reads nothing)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            head = os.read(fd, 16)
        finally:
            os.close(fd)
    except OSError:
        return "file_unreadable"
    return "file_corrupt" if header_ok(ext, head) is False else None


def original_exists(mapper: PathMapper, original: str | None, root_real: bytes | None = None) -> bool | None:
    """Whether a problem asset's original is still there (None: outside the media root, or unknown).

    Only called for problem assets, so one ``lstat`` each is cheap; the bulk originals check lists
    directories instead (``check_originals``). ``root_real``: the media root resolved, when the caller
    checks many (resolving it costs an ``lstat`` per path component).
    """
    rel = mapper.relative(original)
    if rel is None:
        return None
    local = mapper.local(rel)
    if root_real is None:
        root_real = os.path.realpath(mapper.root_bytes)
    if not _inside_root(root_real, os.path.dirname(local)):
        return None  # its folder is a link out of the media root: not looked at
    try:
        os.lstat(local)
    except FileNotFoundError:
        return False
    except OSError:
        return None
    return True


def _inside_root(root_real: bytes, folder: bytes) -> bool:
    """True when ``folder`` resolves (symlinks followed) to the media root (``root_real``, resolved) or
    somewhere inside it."""
    real = os.path.realpath(folder)
    return real == root_real or real.startswith(root_real.rstrip(b"/") + b"/")


def files_sql(schema: Schema) -> str:
    """Every thumbnail-type file the database references (and face thumbnails), in disk-walk order:
    ``(absolute path as bytes, kind code, asset id[, stored path as bytes])``.

    Narrow on purpose: two million paths are sorted (a few seconds at a million assets, spilling to
    disk beyond ``work_mem``), and every column widens the sort and its temporary files. No join: the
    asset's details are only needed for the few rows with a problem, looked up afterwards
    (``problem_assets_sql``). Paths are sorted as bytes: bytewise, like the walk and ``COLLATE "C"``.
    """
    kind = "CASE f.type WHEN 'thumbnail' THEN 0 WHEN 'preview' THEN 1 ELSE 2 END"
    if not schema.relative_paths_possible:
        # Absolute paths only (v1.136+): the path is its own sort key, sorted once, stored once.
        return f"""SELECT convert_to(f.path, 'UTF8') AS path, {kind} AS kind, f."assetId" AS asset_id
FROM {schema.files} f WHERE f.type IN ('thumbnail', 'preview', 'fullsize')
{_person_plain(schema)}
ORDER BY path"""
    # Older eras may store paths relative to Immich's working directory: merge on the absolute form (the
    # sort key), and keep the stored form for the report.
    person = (
        f"""UNION ALL SELECT convert_to({normalized_sql('p."thumbnailPath"')}, 'UTF8'), {PERSON}, NULL::uuid,
  convert_to(p."thumbnailPath", 'UTF8')
FROM person p WHERE p."thumbnailPath" IS NOT NULL AND p."thumbnailPath" <> ''"""
        if schema.has_person_thumbnails
        else ""
    )
    return f"""SELECT convert_to({normalized_sql("f.path")}, 'UTF8') AS path, {kind} AS kind, f."assetId" AS asset_id,
  convert_to(f.path, 'UTF8') AS stored
FROM {schema.files} f WHERE f.type IN ('thumbnail', 'preview', 'fullsize')
{person}
ORDER BY path"""


def _person_plain(schema: Schema) -> str:
    if not schema.has_person_thumbnails:
        return ""
    return f"""UNION ALL SELECT convert_to(p."thumbnailPath", 'UTF8'), {PERSON}, NULL::uuid
FROM person p WHERE p."thumbnailPath" IS NOT NULL AND p."thumbnailPath" <> ''"""


def problem_assets_sql(schema: Schema) -> str:
    return f"""SELECT a.id, a."ownerId"::text, lower(a.type), a."originalPath", ({schema.eligible("a")})
FROM {schema.assets} a WHERE a.id = ANY($1::uuid[])"""


def originals_sql(schema: Schema) -> str:
    return f"""SELECT a."originalPath" FROM {schema.assets} a WHERE {schema.eligible("a")}
ORDER BY {normalized_sql('a."originalPath"')} COLLATE "C\""""


async def reconcile(
    conn: asyncpg.Connection,
    schema: Schema,
    mapper: PathMapper,
    stats: FileStats,
    on_problem: Callable[[Problem], None],
    *,
    verify_headers: bool,
    fetch_size: int,
    timeout: float,
    progress: Callable[[FileStats], None] | None = None,
    disk: DiskWalk | None = None,
) -> None:
    """Run the merge. Must be called inside a transaction (the cursor is server-side).

    ``disk``: a walk already started (``run_scan`` starts it before its first query, so the walkers
    work while PostgreSQL counts and sorts); by default one is started here. It is closed either way.
    """
    if disk is None:
        disk = DiskWalk(mapper.root_bytes, verify_headers)
    merge = Merge(mapper, stats, verify_headers)
    lookup = problem_assets_sql(schema)
    # asyncpg decodes a whole batch in one go, in the event loop: keep batches small enough that a
    # scrape never waits long behind one (about a millisecond per thousand rows here).
    batch_size = min(fetch_size, STREAM_BATCH)
    try:
        frames = disk.frames()
        cursor = await conn.cursor(files_sql(schema), timeout=timeout)
        batch = await cursor.fetch(batch_size, timeout=timeout)
        while batch:
            # PostgreSQL sends the next batch while this one is merged.
            pending = asyncio.ensure_future(cursor.fetch(batch_size, timeout=timeout))
            try:
                i = 0
                while i < len(batch):
                    i = merge.merge(batch, i)
                    if merge.needs_frame:
                        merge.push_frame(await anext(frames, None))
                    # A slice done: let scrapes through (reading a frame may not have yielded).
                    await asyncio.sleep(0)
            except BaseException:
                pending.cancel()
                await asyncio.gather(pending, return_exceptions=True)
                raise
            batch = await pending
            if merge.candidates:
                await _report(conn, lookup, merge, mapper, stats, on_problem, timeout)
            if progress is not None:
                progress(stats)
        merge.orphans_left()
        while (frame := await anext(frames, None)) is not None:
            merge.push_frame(frame)
            merge.orphans_left()
            await asyncio.sleep(0)
        merge.push_frame(None)
        stats.sizes_known = disk.sizes
        if progress is not None:
            progress(stats)
    finally:
        await disk.close()


async def _report(
    conn: asyncpg.Connection,
    sql: str,
    merge: Merge,
    mapper: PathMapper,
    stats: FileStats,
    on_problem: Callable[[Problem], None],
    timeout: float,
) -> None:
    """Turn the merge's candidates into problems: only eligible assets count (Immich's own rule)."""
    candidates = merge.take_candidates()
    ids = list({c[0] for c in candidates if c[0] is not None})
    assets = {r[0]: r for r in await conn.fetch(sql, ids, timeout=timeout)} if ids else {}
    root_real = merge.root_real
    for asset_id, kind, reason, path in candidates:
        asset = assets.get(asset_id)
        if asset is None or not asset[4]:
            continue
        stats.missing[(kind, reason)] += 1
        stats.problems_total += 1
        on_problem(Problem(
            asset_id=str(asset_id), owner_id=asset[1], asset_type=asset[2], kind=kind, reason=reason,
            path=path.decode("utf-8", "surrogateescape"), original_path=asset[3],
            original_exists=original_exists(mapper, asset[3], root_real),
        ))


async def check_originals(
    conn: asyncpg.Connection,
    schema: Schema,
    mapper: PathMapper,
    stats: FileStats,
    *,
    fetch_size: int,
    timeout: float,
) -> None:
    """Count eligible assets whose original is gone, listing each directory once.

    Originals outside the media location (external libraries) cannot be mapped and are counted as
    unchecked rather than guessed at.
    """
    state: dict[str, Any] = {"dir": None, "names": set(), "cancel": False, "root": None}
    missing = 0

    def check(rows: Sequence[Any]) -> int:
        found_missing = 0
        if state["root"] is None:
            state["root"] = os.path.realpath(mapper.root_bytes)
        for row in rows:
            if state["cancel"]:
                raise Cancelled()
            rel = mapper.relative(row[0])
            if rel is None:
                stats.originals_unchecked += 1
                continue
            directory, _, name = mapper.local(rel).rpartition(b"/")
            if directory != state["dir"]:
                state["dir"] = directory
                try:
                    # A folder that links out of the media root is not listed: its originals are unchecked.
                    state["names"] = set(os.listdir(directory)) if _inside_root(state["root"], directory) else None
                except FileNotFoundError:
                    state["names"] = set()
                except OSError:
                    state["names"] = None
            names = state["names"]
            if names is None:
                stats.originals_unchecked += 1
            elif name not in names:
                found_missing += 1
        return found_missing

    cursor = await conn.cursor(originals_sql(schema), timeout=timeout)
    try:
        while rows := await cursor.fetch(fetch_size, timeout=timeout):
            missing += await asyncio.to_thread(check, rows)
    except BaseException:
        state["cancel"] = True
        raise
    stats.originals_missing = missing
