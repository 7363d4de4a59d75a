"""Reconcile the thumbnail rows in the database with the files under ``<media>/thumbs``.

Both sides are read as sorted streams and merged, like ``comm``:

* the database side streams every thumbnail, preview, fullsize and face-thumbnail path from a
  server-side cursor, ordered bytewise (``COLLATE "C"``) by the path Immich would resolve;
* the disk side walks ``thumbs/`` depth-first, listing each directory once (``os.scandir``) and sorting
  its entries so the walk comes out in the same bytewise order (a directory sorts as ``name/``).

A path on both sides is a file that exists; database-only is missing; disk-only is an orphan. Memory is
a cursor batch plus one directory per level, whatever the library size. No path is ever checked with
its own ``stat`` for existence; sizes come from the directory entry (``fstatat`` on the listed name).

The merge runs in a worker thread, one cursor batch per call, so the event loop keeps serving scrapes.
Each call does bounded work and checks a cancel flag, so a deadline really stops it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import asyncpg

from exporter.logs import warn_once
from exporter.model import FileStats, Problem
from exporter.paths import PathMapper, normalized_sql
from exporter.schema import Schema

log = logging.getLogger(__name__)

THUMBS = b"thumbs"
MARKER = b".immich"

# Entry flags from the disk walk.
FILE, SYMLINK, UNREADABLE_DIR, UNREADABLE_FILE = 0, 1, 2, 3

# Magic numbers of the formats Immich writes thumbnails in, by file extension.
_JPEG = (b"\xff\xd8\xff",)


def header_ok(ext: str, head: bytes) -> bool | None:
    """True/False when the extension's format is known, None when we cannot judge it."""
    if ext in ("jpeg", "jpg"):
        return head.startswith(b"\xff\xd8\xff")
    if ext == "webp":
        return head[:4] == b"RIFF" and head[8:12] == b"WEBP"
    if ext == "avif":
        return head[4:8] == b"ftyp" and head[8:12] in (b"avif", b"avis", b"mif1", b"msf1")
    if ext == "png":
        return head.startswith(b"\x89PNG\r\n\x1a\n")
    return None


class Cancelled(Exception):
    pass


def walk(root: bytes, top: bytes, cancelled: Callable[[], bool]) -> Iterator[tuple[bytes, int, int]]:
    """Yield ``(relative path, size, flag)`` for every file under ``root/top`` in bytewise path order.

    An unreadable directory yields one ``(dir + b"/", 0, UNREADABLE_DIR)`` entry, which sorts before
    everything inside it, so the merge can tell "unreadable" from "missing".
    """
    stack: list[Iterator[tuple[bytes, bool]]] = []
    prefixes: list[bytes] = []

    def listing(rel_dir: bytes) -> Iterator[tuple[bytes, bool]] | None:
        try:
            with os.scandir(root + b"/" + rel_dir) as it:
                keyed = [
                    (e.name + b"/", True) if e.is_dir(follow_symlinks=False) else (e.name, False) for e in it
                ]
        except OSError as exc:
            log.debug("cannot list %r: %s", rel_dir, exc.strerror)
            return None
        keyed.sort()
        return iter(keyed)

    first = listing(top)
    if first is None:
        yield top + b"/", 0, UNREADABLE_DIR
        return
    stack.append(first)
    prefixes.append(top + b"/")
    count = 0
    while stack:
        prefix = prefixes[-1]
        for key, is_dir in stack[-1]:
            if is_dir:
                rel_dir = prefix + key[:-1]
                sub = listing(rel_dir)
                if sub is None:
                    yield rel_dir + b"/", 0, UNREADABLE_DIR
                    continue
                stack.append(sub)
                prefixes.append(rel_dir + b"/")
                break
            if key == MARKER:
                continue
            rel = prefix + key
            count += 1
            if count & 1023 == 0 and cancelled():
                raise Cancelled()
            try:
                st = os.lstat(root + b"/" + rel)
            except OSError:
                yield rel, 0, UNREADABLE_FILE
                continue
            yield rel, st.st_size, SYMLINK if stat.S_ISLNK(st.st_mode) else FILE
        else:
            stack.pop()
            prefixes.pop()


class Reconciler:
    """The merge itself; synchronous, fed one cursor batch at a time from a worker thread.

    Rows are ``(path, kind, asset_id, owner_id, asset_type, original_path, eligible)``; ``kind`` is
    ``person`` for face thumbnails, which only protect their file from being called an orphan.
    """

    def __init__(
        self,
        mapper: PathMapper,
        stats: FileStats,
        on_problem: Callable[[Problem], None],
        verify_headers: bool = False,
    ) -> None:
        self.mapper = mapper
        self.stats = stats
        self.on_problem = on_problem
        self.verify_headers = verify_headers
        self._cancel = False
        self._disk = walk(mapper.root_bytes, THUMBS, lambda: self._cancel)
        self._cur: tuple[bytes, int, int] | None = None
        self._started = False
        self._unreadable: bytes | None = None
        # The last path judged, with what the disk said about it (size, flag).
        self._last: tuple[bytes, int, int] | None = None
        self._other_dir: bytes | None = None
        self._other_names: dict[bytes, int] = {}
        self._root_real = os.path.realpath(mapper.root_bytes)

    def cancel(self) -> None:
        self._cancel = True

    def _next_disk(self) -> None:
        try:
            self._cur = next(self._disk)
        except StopIteration:
            self._cur = None
        self.stats.entries += 1

    def _orphan(self, entry: tuple[bytes, int, int]) -> None:
        rel, size, flag = entry
        if flag == UNREADABLE_DIR:
            self._unreadable = rel
            self.stats.directories += 1
            return
        self.stats.orphaned_files += 1
        if flag == FILE:
            self.stats.orphaned_bytes += size
        if self.stats.orphaned_files <= 3:
            log.debug("orphaned file %r", rel)

    def feed(self, rows: Sequence[Any]) -> None:
        if not self._started:
            self._started = True
            self._next_disk()
        stats = self.stats
        relative = self.mapper.relative
        for row in rows:
            if self._cancel:
                raise Cancelled()
            stats.rows += 1
            path, kind = row[0], row[1]
            rel = relative(path)
            if rel is None:
                if kind != "person":
                    stats.refused[kind] += 1
                    if stats.refused.total() <= 20:
                        warn_once(
                            log, f"refused:{path}",
                            "refusing %s path %r: outside the media location %s, or not a clean path",
                            kind, path, self.mapper.location,
                        )
                continue
            rel_b = rel.encode("utf-8", "surrogateescape")
            if not rel_b.startswith(b"thumbs/"):
                self._check_elsewhere(row, rel_b)
                continue
            last = self._last
            if last is not None and last[0] == rel_b:
                # Two rows naming one file: judge it once more from what the disk said.
                self._judge(row, rel_b, last[1], last[2])
                continue
            cur = self._cur
            while cur is not None and cur[0] < rel_b:
                self._orphan(cur)
                self._next_disk()
                cur = self._cur
            if cur is not None and cur[0] == rel_b:
                self._judge(row, rel_b, cur[1], cur[2])
                self._next_disk()
            else:
                unreadable = self._unreadable is not None and rel_b.startswith(self._unreadable)
                self._judge(row, rel_b, -1, UNREADABLE_DIR if unreadable else FILE)

    def finish(self, budget: int = 200_000) -> bool:
        """Walk what is left of the disk (all orphans); True when done, False to be called again."""
        if not self._started:
            self._started = True
            self._next_disk()
        while self._cur is not None and budget > 0:
            if self._cancel:
                raise Cancelled()
            self._orphan(self._cur)
            self._next_disk()
            budget -= 1
        return self._cur is None

    def _judge(self, row: Any, rel_b: bytes, size: int, flag: int) -> None:
        """Record one database row against what the disk said: size -1 means not found."""
        kind = row[1]
        self._last = (rel_b, size, flag)
        if kind == "person":
            return
        stats = self.stats
        eligible = row[6]
        reason: str | None = None
        if size < 0:
            reason = "file_unreadable" if flag == UNREADABLE_DIR else "file_missing"
        elif flag == UNREADABLE_FILE:
            reason = "file_unreadable"
        else:
            target: bytes | None = None
            if flag == SYMLINK:
                size, reason, target = self._follow(rel_b)
            if reason is None:
                if size == 0:
                    reason = "file_empty"
                elif self.verify_headers:
                    reason = self._check_header(rel_b, target)
            if reason not in ("file_unreadable", "file_missing"):  # file_missing: a dangling symlink
                stats.files[kind] += 1
                stats.bytes[kind] += max(size, 0)
        if reason is not None and eligible:
            stats.missing[(kind, reason)] += 1
            stats.problems_total += 1
            self.on_problem(
                Problem(
                    asset_id=row[2],
                    owner_id=row[3],
                    asset_type=row[4],
                    kind=kind,
                    reason=reason,
                    path=row[0],
                    original_path=row[5],
                    original_exists=self._original_exists(row[5]),
                )
            )

    def _inside(self, real: bytes) -> bool:
        return real == self._root_real or real.startswith(self._root_real.rstrip(b"/") + b"/")

    def _follow(self, rel_b: bytes) -> tuple[int, str | None, bytes | None]:
        """A symlink: follow it only when its target stays inside the media root; return the size, a
        reason when it cannot be followed, and the resolved target."""
        target = os.path.realpath(self.mapper.root_bytes + b"/" + rel_b)
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
        try:
            path = target if target is not None else self.mapper.root_bytes + b"/" + rel_b
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            try:
                head = os.read(fd, 16)
            finally:
                os.close(fd)
        except OSError:
            return "file_unreadable"
        ok = header_ok(ext, head)
        return "file_corrupt" if ok is False else None

    def _original_exists(self, original: str | None) -> bool | None:
        return original_exists(self.mapper, original)

    def _check_elsewhere(self, row: Any, rel_b: bytes) -> None:
        """A thumbnail stored outside thumbs/ (old layouts): list its directory once and look it up."""
        directory, _, name = rel_b.rpartition(b"/")
        if directory != self._other_dir:
            self._other_dir = directory
            self._other_names = {}
            folder = self.mapper.root_bytes + b"/" + directory
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
        else:
            self._judge(row, rel_b, size, FILE)


def original_exists(mapper: PathMapper, original: str | None) -> bool | None:
    """Whether a problem asset's original is still there (None: outside the media root, or unknown).

    Only called for problem assets, so one ``lstat`` each is cheap; the bulk originals check lists
    directories instead (``check_originals``).
    """
    rel = mapper.relative(original)
    if rel is None:
        return None
    local = mapper.local(rel)
    if not _inside_root(os.path.realpath(mapper.root_bytes), os.path.dirname(local)):
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
    """Every thumbnail-type file the database references (and face thumbnails), in disk-walk order."""
    eligible = schema.eligible("a")
    person = (
        """UNION ALL SELECT p."thumbnailPath", 'person', p.id::text, p."ownerId"::text, NULL, NULL, false
FROM person p WHERE p."thumbnailPath" IS NOT NULL AND p."thumbnailPath" <> ''"""
        if schema.has_person_thumbnails
        else ""
    )
    return f"""SELECT path, kind, asset_id, owner_id, asset_type, original_path, eligible FROM (
SELECT f.path AS path, f.type AS kind, a.id::text AS asset_id, a."ownerId"::text AS owner_id,
       lower(a.type) AS asset_type, a."originalPath" AS original_path, ({eligible}) AS eligible
FROM {schema.files} f JOIN {schema.assets} a ON a.id = f."assetId"
WHERE f.type IN ('thumbnail', 'preview', 'fullsize')
{person}
) t ORDER BY {normalized_sql("path")} COLLATE "C\""""


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
) -> None:
    """Run the merge. Must be called inside a transaction (the cursor is server-side)."""
    rec = Reconciler(mapper, stats, on_problem, verify_headers=verify_headers)
    cursor = await conn.cursor(files_sql(schema), timeout=timeout)
    try:
        batch = await cursor.fetch(fetch_size, timeout=timeout)
        while batch:
            # Read the next batch from PostgreSQL while the thread merges this one.
            pending = asyncio.ensure_future(cursor.fetch(fetch_size, timeout=timeout))
            try:
                await asyncio.to_thread(rec.feed, batch)
            except BaseException:
                pending.cancel()
                await asyncio.gather(pending, return_exceptions=True)
                raise
            batch = await pending
            if progress is not None:
                progress(stats)
        while not await asyncio.to_thread(rec.finish):
            if progress is not None:
                progress(stats)
    except BaseException:
        rec.cancel()
        raise


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
