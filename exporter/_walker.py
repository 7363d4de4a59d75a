"""The disk side of the file check: list and stat directory trees in bytewise path order.

Standard library only: besides being imported by ``exporter.files``, this file is run as a helper
process (``python -I _walker.py ROOT HEADERS BUFFER``) so that its system calls and per-file Python work
(about 3 µs a file, 15 µs a directory on a small VM: most of a scan's CPU) run beside the exporter, not
under its GIL, where they would delay scrapes. The helper lowers its own priority (``nice``).

Protocol: the parent writes the units to walk on stdin, each a directory path relative to ROOT, NUL
separated, then closes it. The helper writes, for each unit in order, frames of up to ``MAX_ENTRIES``
entries (``FRAME`` header, the paths NUL-joined, the sizes as int64, one flag byte per entry); the
unit's last frame has ``last`` set. A writer thread drains a bounded queue (``BUFFER`` bytes), so the
helper can work ahead while PostgreSQL is still sorting, without unbounded memory.

Entry order is the order of whole relative paths compared as bytes, which is ``COLLATE "C"`` order: a
directory is sorted under its name plus ``/``. A directory that cannot be listed gives one entry, its
path plus ``/`` with flag ``UNREADABLE_DIR``, which sorts before anything inside it.
"""

from __future__ import annotations

import contextlib
import os
import queue
import stat
import struct
import sys
import threading
from array import array
from collections.abc import Callable, Iterator

FILE, SYMLINK, UNREADABLE_DIR, UNREADABLE_FILE = 0, 1, 2, 3
# With header checks: the file's first bytes do not match its extension, or could not be read.
HEAD_BAD, HEAD_UNREADABLE = 16, 32
KIND_MASK = 15
MARKER = b".immich"
MAX_ENTRIES = 2048
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
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
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


class _Dir:
    """One directory being walked: how to list it and stat its entries.

    ``by_fd`` (the helper processes): open each directory relative to its parent and ``fstatat`` each
    name relative to it, which saves the kernel a path walk per call. Otherwise (in the exporter
    itself) every call names the absolute path, as audit hooks and readers of ``strace`` expect.
    """

    __slots__ = ("fd", "path")

    def __init__(self, path: bytes, fd: int | None) -> None:
        self.path = path
        self.fd = fd

    @staticmethod
    def open(path: bytes, name: bytes, parent: _Dir | None, by_fd: bool) -> _Dir:
        if not by_fd:
            return _Dir(path, None)
        if parent is None or parent.fd is None:
            return _Dir(path, os.open(path, O_DIR))
        return _Dir(path, os.open(name, O_DIR, dir_fd=parent.fd))

    def keys(self) -> list[bytes]:
        with os.scandir(self.fd if self.fd is not None else self.path) as it:
            return _keys(it)

    def lstat(self, name: bytes) -> os.stat_result:
        if self.fd is not None:
            return os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        return os.lstat(self.path + b"/" + name)

    def head(self, name: bytes) -> int:
        return head_flag(name, self.fd) if self.fd is not None else head_flag(self.path + b"/" + name)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def walk_tree(
    root: bytes, rel: bytes, headers: bool, by_fd: bool = False, max_entries: int = MAX_ENTRIES
) -> Iterator[Frame]:
    """Every file under ``root/rel`` (a directory), in bytewise order of relative path, as frames."""
    paths: list[bytes] = []
    sizes: array[int] = array("q")
    flags = bytearray()
    try:
        top = _Dir.open(root + b"/" + rel, b"", None, by_fd)
        keys = top.keys()
    except OSError:
        yield [rel + b"/"], array("q", [0]), bytes([UNREADABLE_DIR])
        return
    # One level per directory being listed: (directory, prefix, sorted keys, next position).
    stack: list[tuple[_Dir, bytes, list[bytes], list[int]]] = [(top, rel + b"/", keys, [0])]
    try:
        while stack:
            d, prefix, keys, pos = stack[-1]
            i, n = pos[0], len(keys)
            descended = False
            while i < n:
                key = keys[i]
                i += 1
                if key[-1] == 47:  # b"/": a directory
                    sub: _Dir | None = None
                    try:
                        sub = _Dir.open(d.path + b"/" + key[:-1], key[:-1], d, by_fd)
                        sub_keys = sub.keys()
                    except OSError:
                        if sub is not None:
                            sub.close()
                        paths.append(prefix + key)
                        sizes.append(0)
                        flags.append(UNREADABLE_DIR)
                        continue
                    pos[0] = i
                    stack.append((sub, prefix + key, sub_keys, [0]))
                    descended = True
                    break
                if key == MARKER:
                    continue
                try:
                    st = d.lstat(key)
                except OSError:
                    paths.append(prefix + key)
                    sizes.append(0)
                    flags.append(UNREADABLE_FILE)
                    continue
                paths.append(prefix + key)
                sizes.append(st.st_size)
                if stat.S_ISLNK(st.st_mode):
                    flags.append(SYMLINK)
                elif headers and st.st_size:
                    flags.append(d.head(key))
                else:
                    flags.append(FILE)
                if len(paths) >= max_entries:
                    yield paths, sizes, bytes(flags)
                    paths, sizes, flags = [], array("q"), bytearray()
            if not descended:
                d.close()
                stack.pop()
    finally:
        for d, *_ in stack:
            d.close()
    if paths:
        yield paths, sizes, bytes(flags)


def list_level(
    root: bytes, rel: bytes, headers: bool = False
) -> tuple[list[bytes], list[tuple[bytes, int, int]]] | None:
    """One directory, for the plan: (its subdirectory names, its entries in order), or None when it
    cannot be listed. Entries are ``(key, size, flag)``; a subdirectory keeps its place as
    ``(name + b"/", -1, -1)``."""
    path = root + b"/" + rel
    try:
        keys = _Dir(path, None).keys()
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
        elif headers and st.st_size:
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
          write: Callable[[bytes], object]) -> None:
    units = [u for u in read_units().split(b"\0") if u]
    # Frames are about 100 bytes an entry: a queue of frames bounded to roughly ``buffer_bytes``.
    frames: queue.Queue[bytes | None] = queue.Queue(max(4, buffer_bytes // (MAX_ENTRIES * 100)))
    failed: list[BaseException] = []

    def writer() -> None:
        try:
            while (chunk := frames.get()) is not None:
                write(chunk)
        except BaseException as exc:  # the parent went away: stop walking
            failed.append(exc)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    for line in units:
        index_text, _, rel = line.partition(b" ")
        index = int(index_text)
        pending: Frame | None = None
        for frame in walk_tree(root, rel, headers, by_fd=True):
            if failed:
                return
            if pending is not None:
                frames.put(encode(index, pending, False))
            pending = frame
        frames.put(encode(index, pending or ([], array("q"), b""), True))
    frames.put(None)
    thread.join()


def main(argv: list[str]) -> int:
    root, headers, buffer_bytes = os.fsencode(argv[0]), argv[1] == "1", int(argv[2])
    with contextlib.suppress(OSError):
        os.nice(10)  # the file check can wait; Immich and the exporter's scrapes should not
    out = sys.stdout.buffer
    try:
        serve(root, headers, buffer_bytes, sys.stdin.buffer.read, out.write)
        out.flush()
    except BrokenPipeError:
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
