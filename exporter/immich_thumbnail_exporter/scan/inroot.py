"""The media tree seen strictly from inside the media root: what is at a path, links resolved lexically.

``os.path.realpath`` resolves a link by ``lstat``-ing its target and every folder on the way, wherever
they are: outside the media root, on a hung mount. Here a link is read (``readlink``), its target joined
to the link's folder and walked one component at a time from the root, each component ``lstat``-ed only
once it is known to lie inside the root. A target that leaves the root (an absolute path elsewhere, or
``..`` above the root) is judged from its text alone: no system call ever names it. Chains of links are
followed up to ``MAX_LINKS``, as the kernel does.

Facts come out in the walk's terms (``scan/walk_child.py``): ``(size, flag)`` with size -1 for "not there",
so that a path looked at here is judged exactly as the walk would have judged it (``verdict.file_reason``).

Every call here blocks on the file system: callers run them in the media pool (``sources/media.py``),
never in the event loop nor in asyncio's default executor.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import stat
from dataclasses import dataclass

from immich_thumbnail_exporter.logs import warn_once
from immich_thumbnail_exporter.scan.walk_child import FILE, SYMLINK, UNREADABLE_DIR, UNREADABLE_FILE, head_flag

log = logging.getLogger(__name__)

# Links followed in one resolution, as Linux's own limit (``MAXSYMLINKS``).
MAX_LINKS = 40
# Resolved folders remembered (each costs an ``lstat`` per component to resolve again).
FOLDER_CACHE = 4096
THUMBS = b"thumbs"
# Why a path resolves to nothing.
OUTSIDE, MISSING, UNREADABLE, LOOP = "outside", "missing", "unreadable", "loop"
O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC

Facts = tuple[int, int]  # (size, flag): size -1 when nothing is there
NOT_THERE: Facts = (-1, FILE)
UNREADABLE_ENTRY: Facts = (0, UNREADABLE_FILE)


@dataclass(frozen=True, slots=True)
class Found:
    """A path inside the root with no link left in it: ``rel`` (relative to the root) and its ``lstat``."""

    rel: bytes
    st: os.stat_result


def real_root(root: bytes) -> bytes | None:
    """The media root's real path, asked of the kernel for the root itself (``/proc/self/fd``), not by
    ``lstat`` of every folder above it: an absolute link may spell the root either way."""
    try:
        fd = os.open(root, O_DIR)
    except OSError:
        return None
    try:
        real = os.readlink(b"/proc/self/fd/%d" % fd)
    except OSError:
        return None
    finally:
        os.close(fd)
    return real if real.startswith(b"/") and not real.endswith(b" (deleted)") else None


class InRoot:
    """Lexical, in-root resolution and lookups under one media root (bytes paths relative to it).

    Not thread-safe: one thread at a time (the media pool has one) (its folder cache is unlocked)."""

    def __init__(self, root: bytes, real: bytes | None = None) -> None:
        self.root = root.rstrip(b"/") or b"/"
        self._prefix = self.root + b"/" if self.root != b"/" else b"/"
        real = real_root(self.root) if real is None else real
        self._aliases = [a for a in {self.root, (real or self.root).rstrip(b"/") or b"/"} if a]
        self._folders: dict[bytes, bytes | str] = {}
        self._listed: dict[bytes, bool | str] = {}

    def local(self, rel: bytes) -> bytes:
        return self._prefix + rel if rel else self.root

    def inside(self, target: bytes) -> bytes | None:
        """An absolute link target as a path relative to the root, or None when it names a place outside
        (decided from the text alone)."""
        target = re.sub(rb"/+", b"/", target)
        for alias in self._aliases:
            if alias == b"/":
                return target[1:]
            if target == alias:
                return b""
            if target.startswith(alias + b"/"):
                return target[len(alias) + 1 :]
        return None

    # -- resolution -------------------------------------------------------------------------------

    def resolve(self, rel: bytes, follow_last: bool = True) -> Found | str:
        """``rel`` with every link in it resolved inside the root (the last one too, with
        ``follow_last``), or why it cannot be: ``OUTSIDE``, ``MISSING``, ``UNREADABLE``, ``LOOP``."""
        folder, _, name = rel.rpartition(b"/")
        base = self.folder(folder)
        if isinstance(base, str):
            return base
        return self._walk(base, [name], follow_last)

    def folder(self, rel: bytes) -> bytes | str:
        """A folder, resolved: the real folder inside the root it stands for (b"" is the root)."""
        if not rel:
            return b""
        hit = self._folders.get(rel)
        if hit is not None:
            return hit
        parent, _, name = rel.rpartition(b"/")
        base = self.folder(parent)
        out: bytes | str
        if isinstance(base, str):
            out = base
        else:
            found = self._walk(base, [name], True)
            out = found if isinstance(found, str) else found.rel if stat.S_ISDIR(found.st.st_mode) else MISSING
        if len(self._folders) >= FOLDER_CACHE:
            self._folders.clear()
        self._folders[rel] = out
        return out

    def _walk(self, base: bytes, todo: list[bytes], follow_last: bool) -> Found | str:
        """Walk ``todo`` (path components, link text allowed) from the real folder ``base``."""
        done = base.split(b"/") if base else []
        stack = todo[::-1]
        links = 0
        st: os.stat_result | None = None
        while stack:
            part = stack.pop()
            if part in (b"", b"."):
                continue
            if part == b"..":
                if not done:
                    return OUTSIDE  # above the root: never looked at
                done.pop()
                st = None
                continue
            path = self._prefix + b"/".join([*done, part])
            try:
                st = os.lstat(path)
            except (FileNotFoundError, NotADirectoryError):
                return MISSING
            except OSError:
                return UNREADABLE
            # A link is followed when more follows it ("link/": it must be a folder) or when asked to.
            if stat.S_ISLNK(st.st_mode) and (stack or follow_last):
                links += 1
                if links > MAX_LINKS:
                    return LOOP
                try:
                    target = os.readlink(path)
                except OSError:
                    return UNREADABLE
                if target.startswith(b"/"):
                    inner = self.inside(target)
                    if inner is None:
                        return OUTSIDE
                    done = []
                    target = inner
                stack.extend(target.split(b"/")[::-1])
                st = None
                continue
            if stack and not stat.S_ISDIR(st.st_mode):
                return MISSING  # a file used as a folder
            done.append(part)
        rel = b"/".join(done)
        if st is None:
            try:
                st = os.lstat(self.local(rel))
            except OSError:
                return UNREADABLE
        return Found(rel, st)

    # -- lookups in the walk's terms --------------------------------------------------------------

    def entry(self, rel: bytes, headers: bool) -> Facts:
        """What a walk would have said about ``rel`` (a link not followed): under ``thumbs/`` no folder
        link is entered (the walk lists ``thumbs/`` and never follows a link below it), and a folder that
        cannot be listed makes its files unreadable; elsewhere (old layouts, not walked) the folder is
        resolved inside the root and the name looked up in it."""
        folder, _, name = rel.rpartition(b"/")
        if folder == THUMBS or folder.startswith(THUMBS + b"/"):
            listed = self._listed_folder(folder)
            if listed is not True:
                return NOT_THERE if listed == MISSING else (-1, UNREADABLE_DIR)
            real = folder
        else:
            resolved = self.folder(folder)
            if isinstance(resolved, str):
                if resolved == OUTSIDE:
                    warn_once(log, f"dir:{folder!r}", "not following %r: it leads outside the media root", folder)
                return NOT_THERE if resolved == MISSING else (-1, UNREADABLE_DIR)
            real = resolved
        path = self.local(real + b"/" + name if real else name)
        try:
            st = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            return NOT_THERE
        except OSError:
            return UNREADABLE_ENTRY
        return self._facts(path, st, headers, link_flag=True)

    def _listed_folder(self, rel: bytes) -> bool | str:
        """True when the walk would list ``rel`` (a folder under ``thumbs/``): every folder below
        ``thumbs/`` a real folder (``O_NOFOLLOW``) that can be opened; else ``MISSING`` or ``UNREADABLE``."""
        hit = self._listed.get(rel)
        if hit is not None:
            return hit
        parent, _, _ = rel.rpartition(b"/")
        out = self._listed_folder(parent) if rel != THUMBS else True
        if out is True:
            # thumbs/ itself is listed as the walk lists it, following a link there; nothing below it.
            flags = O_DIR if rel == THUMBS else O_DIR | os.O_NOFOLLOW
            try:
                os.close(os.open(self.local(rel), flags))
            except (FileNotFoundError, NotADirectoryError):
                out = MISSING
            except OSError as exc:
                # ELOOP: a link, which the walk lists as an entry and never enters.
                out = MISSING if exc.errno == errno.ELOOP else UNREADABLE
        if len(self._listed) >= FOLDER_CACHE:
            self._listed.clear()
        self._listed[rel] = out
        return out

    def follow(self, rel: bytes, headers: bool) -> Facts:
        """The facts of what the link at ``rel`` leads to: unreadable when it leads outside the root (its
        target never looked at), not there when it dangles, loops or names a folder."""
        found = self.resolve(rel, follow_last=True)
        if found == OUTSIDE:
            warn_once(log, f"symlink:{rel!r}", "not following symlink %r: it points outside the media root", rel)
            return UNREADABLE_ENTRY
        if isinstance(found, str):
            return NOT_THERE
        return self._facts(self.local(found.rel), found.st, headers, link_flag=False)

    def facts(self, rel: bytes, headers: bool) -> tuple[Facts, Facts]:
        """``entry`` and, for a link, what it leads to (else the entry again)."""
        entry = self.entry(rel, headers)
        if entry[1] == SYMLINK:
            return entry, self.follow(rel, headers)
        return entry, entry

    @staticmethod
    def _facts(path: bytes, st: os.stat_result, headers: bool, link_flag: bool) -> Facts:
        mode = st.st_mode
        if stat.S_ISLNK(mode) and link_flag:
            return st.st_size, SYMLINK
        if stat.S_ISDIR(mode):
            return NOT_THERE  # a folder is not a thumbnail: the walk would have gone into it instead
        # Only regular files are opened: a FIFO would block, a device is not a thumbnail.
        if headers and st.st_size and stat.S_ISREG(mode):
            return st.st_size, FILE | head_flag(path)
        return st.st_size, FILE
