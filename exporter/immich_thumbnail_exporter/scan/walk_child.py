"""The disk side of the file check: list and stat directory trees in bytewise path order.

Standard library only: besides being imported by ``immich_thumbnail_exporter.scan.disk_walk``, this file is run as a
helper process (``python -I -S walk_child.py ROOT HEADERS BUFFER [SIZES]``) so that its system calls and per-file Python
work (about 3 µs a file, 12 µs a directory on a small VM: most of a scan's CPU) run beside the exporter,
not under its GIL, where they would delay scrapes. The helper lowers its own priority (``nice``).

Protocol: the parent writes the units to walk on stdin, each ``<index> <directory relative to ROOT>``,
NUL separated, then closes it. The helper writes, for each unit in order, frames of up to
``MAX_ENTRIES`` entries (``FRAME`` header, the paths relative to the unit's directory NUL-joined, the
sizes as int64, one flag byte per entry); the unit's last frame has ``last`` set. A writer thread drains
a bounded queue (``BUFFER`` bytes), so the helper can work ahead while PostgreSQL is still sorting,
without unbounded memory.

Without sizes (``SIZES`` ``0``, ``checks.file_sizes: false``) a folder of regular files is read with
``scandir`` alone: the entry types come with the listing, no ``lstat`` per file (half the walk's CPU), and
each size is sent as ``SIZE_UNKNOWN`` (1: present, never judged empty). A folder holding anything else
(a link, a FIFO, a directory) is read with ``lstat`` as usual.

Entry order is the order of whole relative paths compared as bytes, which is ``COLLATE "C"`` order: a
directory is sorted under its name plus ``/``. A directory that cannot be listed gives one entry, its
path plus ``/`` with flag ``UNREADABLE_DIR``, which sorts before anything inside it.
"""

from __future__ import annotations

import contextlib
import operator
import os
import queue
import stat
import struct
import sys
import threading
from array import array
from collections.abc import Callable, Iterator
from typing import Literal

FILE, SYMLINK, UNREADABLE_DIR, UNREADABLE_FILE = 0, 1, 2, 3
# With header checks: the file's first bytes do not match its extension, or could not be read.
HEAD_BAD, HEAD_UNREADABLE = 16, 32
KIND_MASK = 15
MARKER = b".immich"
MAX_ENTRIES = 2048
# Sent for a regular file whose size was not read (walk without sizes): never empty, never missing.
SIZE_UNKNOWN = 1
FRAME = struct.Struct("<IIIB")  # unit index, entries, length of the NUL-joined paths, last frame of unit
O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

Frame = tuple[list[bytes], "array[int]", bytes]


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


def head_flag(name: bytes, dir_fd: int | None = None) -> int:
    """Read a file's first bytes (never through a link) and compare them with its extension."""
    ext = name.rsplit(b".", 1)[-1].decode("ascii", "replace").lower() if b"." in name else ""
    try:
        # O_NONBLOCK: never wait on a FIFO or device that took a thumbnail's name.
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            head = os.read(fd, 16)
        finally:
            os.close(fd)
    except OSError:
        return HEAD_UNREADABLE
    return HEAD_BAD if header_ok(ext, head) is False else 0


def _keys(it: Iterator[os.DirEntry[str]] | Iterator[os.DirEntry[bytes]]) -> list[bytes]:
    """The sorted entry keys of a directory listing: names, directories with a trailing ``/``."""
    enc = os.fsencode
    keys = [enc(e.name) + b"/" if e.is_dir(follow_symlinks=False) else enc(e.name) for e in it]
    keys.sort()
    return keys


def walk_tree(
    root: bytes, rel: bytes, headers: bool, by_fd: bool = False, max_entries: int = MAX_ENTRIES,
    sizes: bool = True,
) -> Iterator[Frame]:
    """Every file under ``root/rel`` (a directory), in bytewise order of relative path, as frames.

    The top directory (``thumbs/<owner>/<xx>``: all subdirectories) is listed with ``scandir``, whose
    entry types need no ``stat``. Below it directories hold files, so each is read in bulk: ``listdir``,
    a sort, and ``lstat`` of every name mapped in C; only a directory found among them, or a name that
    fails, sends that directory down the entry-by-entry path.

    ``by_fd`` (the helper processes only): ``chdir`` into the top directory so that every ``lstat`` names
    one or two path components, which saves the kernel a path walk per file, and give paths relative to
    ``rel + "/"`` (half the bytes to send; the unreadable top itself is then the empty path). In the
    exporter itself every call names the absolute path (the working directory is the process's, and audit
    hooks expect it), and paths are relative to ``root``.

    ``sizes=False`` (only without ``headers``, which reads every file anyway): folders of files are read
    with ``scandir`` and no ``lstat`` (see the module docstring).
    """
    read_files = _read_files if sizes or headers else _scan_files
    top_prefix = b"" if by_fd else rel + b"/"
    out = _Out(max_entries)
    top_path = root + b"/" + rel
    try:
        if by_fd:
            # O_NOFOLLOW: a directory swapped for a link since it was listed is not entered.
            fd = os.open(top_path, O_DIR)
            try:
                os.fchdir(fd)
            finally:
                os.close(fd)
        with os.scandir(b"." if by_fd else top_path) as it:
            keys = _keys(it)
    except OSError:
        yield [top_prefix], array("q", [0]), bytes([UNREADABLE_DIR])
        return
    # Depth first, in key order: a stack of (absolute path, relative prefix, sorted keys, next position).
    stack: list[tuple[bytes, bytes, list[bytes], int]] = [(top_path, top_prefix, keys, 0)]
    while stack:
        path, prefix, keys, i = stack.pop()
        # Children of the top directory are named relative to it (the working directory, with by_fd).
        near = by_fd and path is top_path
        while i < len(keys):
            key = keys[i]
            i += 1
            if key[-1] != 47:  # b"/": a file (or anything that is not a directory)
                if key != MARKER:
                    out.entry(prefix + key, path + b"/" + key, headers)
                    if out.full:
                        yield out.take()
                continue
            sub_path, sub_prefix = path + b"/" + key[:-1], prefix + key
            sub_keys = read_files(sub_path, key[:-1] if near else None, sub_prefix, out, headers)
            if sub_keys is None:  # done in bulk
                if out.full:
                    yield out.take()
                continue
            if sub_keys is False:
                out.add(sub_prefix, 0, UNREADABLE_DIR)
                continue
            stack.append((path, prefix, keys, i))
            stack.append((sub_path, sub_prefix, sub_keys, 0))
            break
    if out.paths:
        yield out.take()


class _Out:
    """The entries of the frame being filled."""

    __slots__ = ("flags", "max", "paths", "sizes")

    def __init__(self, max_entries: int) -> None:
        self.max = max_entries
        self.paths: list[bytes] = []
        self.sizes: array[int] = array("q")
        self.flags = bytearray()

    @property
    def full(self) -> bool:
        return len(self.paths) >= self.max

    def take(self) -> Frame:
        frame = (self.paths, self.sizes, bytes(self.flags))
        self.paths, self.sizes, self.flags = [], array("q"), bytearray()
        return frame

    def add(self, rel: bytes, size: int, flag: int) -> None:
        self.paths.append(rel)
        self.sizes.append(size)
        self.flags.append(flag)

    def entry(self, rel: bytes, path: bytes, headers: bool) -> None:
        """One non-directory entry, on its own (``lstat`` by absolute path)."""
        try:
            st = os.lstat(path)
        except OSError:
            self.add(rel, 0, UNREADABLE_FILE)
            return
        if stat.S_ISLNK(st.st_mode):
            self.add(rel, st.st_size, SYMLINK)
        else:
            # Only regular files are opened: a FIFO would block, a device is not a thumbnail.
            self.add(rel, st.st_size, head_flag(path) if headers and st.st_size and stat.S_ISREG(st.st_mode) else FILE)


def _read_files(
    path: bytes, near: bytes | None, prefix: bytes, out: _Out, headers: bool
) -> list[bytes] | Literal[False] | None:
    """Read a directory expected to hold files only, into ``out``: None when done that way; its sorted
    keys when it holds directories (or a name could not be stat-ed) and must be walked entry by entry;
    False when it cannot be listed. ``near``: its name relative to the working directory, to list and
    stat it by (one or two path components for the kernel to walk instead of the whole path)."""
    base = near if near is not None else path
    try:
        names = os.listdir(base)
    except OSError:
        return False
    if MARKER in names:
        names.remove(MARKER)
    names.sort()
    base_slash = base + b"/"
    named = [base_slash + n for n in names]
    try:
        sts = list(map(os.lstat, named))
    except OSError:
        sts = None
    modes = list(map(_MODE, sts)) if sts is not None else []
    # The usual leaf: regular files only, one check in C for "no directory, no link, nothing odd".
    plain = sts is not None and all(map(stat.S_ISREG, modes))
    if not plain and (sts is None or any(map(stat.S_ISDIR, modes))):
        # Directories inside (or a name that went away): key them, and walk entry by entry.
        keys = []
        for name in names:
            try:
                is_dir = stat.S_ISDIR(os.lstat(path + b"/" + name).st_mode)
            except OSError:
                is_dir = False
            keys.append(name + b"/" if is_dir else name)
        keys.sort()
        return keys
    assert sts is not None
    # In a helper process the names to stat are already the ones to send (relative to the unit).
    out.paths.extend(named if base_slash == prefix else [prefix + n for n in names])
    out.sizes.extend(map(_SIZE, sts))
    if not plain or headers:
        for name, st, mode in zip(names, sts, modes, strict=True):
            if stat.S_ISLNK(mode):
                out.flags.append(SYMLINK)
            elif headers and st.st_size and stat.S_ISREG(mode):
                # By absolute path, never through the (relative) directory name: opened O_NOFOLLOW.
                out.flags.append(head_flag(path + b"/" + name))
            else:
                out.flags.append(FILE)
    else:
        out.flags.extend(bytes(len(names)))  # FILE is 0
    return None


def _scan_files(
    path: bytes, near: bytes | None, prefix: bytes, out: _Out, headers: bool
) -> list[bytes] | Literal[False] | None:
    """``_read_files`` without sizes, for a folder of regular files (the usual leaf): their types come
    with the listing (``d_type``), so none is ``lstat``-ed. A folder holding anything else (a link, a
    directory, a FIFO: rare) is read by ``_read_files`` instead, with sizes."""
    base = near if near is not None else path
    try:
        with os.scandir(base) as it:
            entries = list(it)
    except OSError:
        return False
    # No links among them, so ``is_file`` follows nothing: a plain type check, mapped in C.
    if any(map(_IS_LINK, entries)) or not all(map(_IS_FILE, entries)):
        return _read_files(path, near, prefix, out, headers)
    names = sorted(map(_NAME, entries))
    if MARKER in names:
        names.remove(MARKER)
    base_slash = base + b"/"
    out.paths.extend([base_slash + n for n in names] if base_slash == prefix else [prefix + n for n in names])
    out.sizes.extend(_UNKNOWN_SIZES * len(names))
    out.flags.extend(bytes(len(names)))  # FILE is 0
    return None


_IS_LINK, _IS_FILE = os.DirEntry.is_symlink, os.DirEntry.is_file
_NAME = operator.attrgetter("name")
_MODE, _SIZE = operator.attrgetter("st_mode"), operator.attrgetter("st_size")
_UNKNOWN_SIZES = array("q", [SIZE_UNKNOWN])


def list_level(
    root: bytes, rel: bytes, headers: bool = False
) -> tuple[list[bytes], list[tuple[bytes, int, int]]] | None:
    """One directory, for the plan: (its subdirectory names, its entries in order), or None when it
    cannot be listed. Entries are ``(key, size, flag)``; a subdirectory keeps its place as
    ``(name + b"/", -1, -1)``."""
    path = root + b"/" + rel
    try:
        with os.scandir(path) as it:
            keys = _keys(it)
    except OSError:
        return None
    dirs: list[bytes] = []
    entries: list[tuple[bytes, int, int]] = []
    for key in keys:
        if key[-1] == 47:
            dirs.append(key[:-1])
            entries.append((key, -1, -1))
            continue
        if key == MARKER:
            continue
        try:
            st = os.lstat(path + b"/" + key)
        except OSError:
            entries.append((key, 0, UNREADABLE_FILE))
            continue
        if stat.S_ISLNK(st.st_mode):
            flag = SYMLINK
        elif headers and st.st_size and stat.S_ISREG(st.st_mode):
            flag = head_flag(path + b"/" + key)
        else:
            flag = FILE
        entries.append((key, st.st_size, flag))
    return dirs, entries


def encode(unit: int, frame: Frame, last: bool) -> bytes:
    paths, sizes, flags = frame
    blob = b"\0".join(paths)
    return b"".join((FRAME.pack(unit, len(paths), len(blob), last), blob, sizes.tobytes(), flags))


def decode(header: bytes) -> tuple[int, int, int, bool]:
    unit, count, blob, last = FRAME.unpack(header)
    return unit, count, blob, bool(last)


def serve(root: bytes, headers: bool, buffer_bytes: int, read_units: Callable[[], bytes],
          write: Callable[[bytes], object], sizes: bool = True) -> None:
    units = [u for u in read_units().split(b"\0") if u]
    # Frames are about 60 bytes an entry: a queue of frames bounded to roughly ``buffer_bytes``.
    frames: queue.Queue[bytes | None] = queue.Queue(max(4, buffer_bytes // (MAX_ENTRIES * 60)))
    failed: list[BaseException] = []

    def writer() -> None:
        while (chunk := frames.get()) is not None:
            if failed:
                continue  # keep draining: the walk must never block on a full queue
            try:
                write(chunk)
            except BaseException as exc:  # the parent went away (EPIPE): stop walking
                failed.append(exc)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        for line in units:
            index_text, _, rel = line.partition(b" ")
            index = int(index_text)
            pending: Frame | None = None
            for frame in walk_tree(root, rel, headers, by_fd=True, sizes=sizes):
                if failed:
                    raise BrokenPipeError(str(failed[0]))
                if pending is not None:
                    frames.put(encode(index, pending, False))
                pending = frame
            frames.put(encode(index, pending or ([], array("q"), b""), True))
    finally:
        frames.put(None)
        thread.join()


def main(argv: list[str]) -> int:
    root, headers, buffer_bytes = os.fsencode(argv[0]), argv[1] == "1", int(argv[2])
    sizes = len(argv) < 4 or argv[3] == "1"
    with contextlib.suppress(OSError):
        # The file check can wait; Immich and the exporter's scrapes should not (started through
        # ``nice -n 10`` already, when the system has it).
        if os.getpriority(os.PRIO_PROCESS, 0) < 10:
            os.setpriority(os.PRIO_PROCESS, 0, 10)
    out = sys.stdout.buffer
    try:
        serve(root, headers, buffer_bytes, sys.stdin.buffer.read, out.write, sizes)
        out.flush()
    except BrokenPipeError:
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
