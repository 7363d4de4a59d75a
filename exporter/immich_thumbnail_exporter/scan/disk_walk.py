"""The disk side of the file check: every entry under ``thumbs/`` in bytewise path order, walked by
helper processes (``scan/walk_child.py``, standard library only, at low priority).

At a million assets, listing 356k folders and ``lstat`` of 2M files is 60% of the CPU a scan needs, so
the walk runs in two helper processes, each taking every other ``thumbs/<owner>/<xx>`` subtree, reading
each folder in bulk (``listdir``, ``lstat`` mapped in C) and working ahead into a bounded buffer while
PostgreSQL counts and sorts. They send frames (paths joined by NUL, sizes, flags) that cost the exporter a
``split``. Nothing here touches the file system in the event loop: the two top levels are listed in the
media pool (``sources/media.py``), the rest in the helpers (or in the pool when they cannot be started).

On a hung mount a helper can be stuck in the kernel where even SIGKILL waits for the mount: it is then
reported, held in the media pool (the filesystem source is down while it lives) and waited for, never
replaced: no walk starts while one is stuck, so there is never more than one pair. A helper that sends
nothing for ``stall`` seconds fails the walk, and the folder it was on is handed to the filesystem probe.

The helpers are this process's children, and asyncio's child watcher is the one that waits for them.
``asyncio.subprocess.Process.kill`` polls the child first (``Popen.send_signal``), which reaps it when it
has just exited and the watcher has not yet seen it: the watcher's own wait then fails and asyncio logs
"Unknown child process pid ..., will report returncode 255". So a helper is signalled through a pidfd
(or by pid while asyncio has not reported its exit), which never waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
from array import array
from collections.abc import AsyncIterator, Iterator

from immich_thumbnail_exporter.logs import warn_once
from immich_thumbnail_exporter.scan import walk_child as _walker
from immich_thumbnail_exporter.scan.walk_child import UNREADABLE_DIR, Frame, list_level, walk_tree
from immich_thumbnail_exporter.sources.media import POOL, MediaStuck, media_call, media_stuck, process_alive

log = logging.getLogger(__name__)

THUMBS = b"thumbs"
# How far each walker may work ahead of the merge.
WALKER_BUFFER = 32 << 20
WALKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "walk_child.py")
WALKER_RUNNABLE = bool(sys.executable) and os.path.exists(WALKER)
# Started through ``nice`` when there is one, so that even the interpreter's start-up (tens of
# milliseconds, every scan) runs at the walker's low priority; the walker lowers its own otherwise.
WALKER_COMMAND = (
    [nice, "-n", "10", sys.executable, "-I", "-S", WALKER] if (nice := shutil.which("nice"))
    else [sys.executable, "-I", "-S", WALKER]
)


# Seconds a helper may send nothing while it is waited for before the walk is called stuck.
STALL = 30.0
# Seconds a killed helper is given to exit before it is reported stuck and left to the kernel.
EXIT_WAIT = 5.0
# Helpers that outlived their kill, each with the task that waits for it (so it is reaped once it exits).
_stuck: dict[int, asyncio.Task[None]] = {}


class WalkerError(OSError):
    """A walker process died (it never fails for an unreadable file or folder: those are entries)."""


def default_walkers() -> int:
    return max(1, min(2, os.cpu_count() or 1))


class _Child:
    """A walker process and a pidfd for it: signalled without ever being waited for here."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.pidfd: int | None = None
        with contextlib.suppress(AttributeError, OSError):  # no pidfds (not Linux, or before 5.3)
            self.pidfd = os.pidfd_open(proc.pid)

    def kill(self) -> None:
        if self.proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            if self.pidfd is not None:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            else:
                os.kill(self.proc.pid, signal.SIGKILL)

    def release(self) -> None:
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None


class DiskWalk:
    """Every entry under ``thumbs/`` in bytewise path order, as frames ``(paths, sizes, flags)``.

    The first two levels (``thumbs/``, ``thumbs/<owner>/``) are listed here, in the media pool; each
    directory below them (``thumbs/<owner>/<xx>``, a 256th of an owner's files) is a unit walked by a
    helper process, units dealt round-robin so the helpers take turns and work in parallel. Files found
    on the first two levels (rare: strays, old flat layouts) are stat-ed while planning. Without helper
    processes (``workers=0``, or when they cannot be started) the units are walked in the media pool instead.
    """

    def __init__(self, root: bytes, verify_headers: bool = False, workers: int | None = None,
                 buffer_bytes: int = WALKER_BUFFER, sizes: bool = True, stall: float = STALL) -> None:
        self.root = root
        self.stall = stall
        self.verify_headers = verify_headers
        # Header checks read every file: sizes come with them.
        self.sizes = sizes or verify_headers
        self.workers = default_walkers() if workers is None else workers
        self.buffer_bytes = buffer_bytes
        self._segments: list[Frame | int] = []
        self._units: list[bytes] = []
        self._children: list[_Child] = []
        self._started = False
        self._closed = False

    async def _plan(self) -> None:
        """List ``thumbs/`` and ``thumbs/<x>/``: the entries found there, and the units below them. One
        listing per worker-thread call (a few dozen in all), the event loop free in between."""
        headers = self.verify_headers
        inline: list[tuple[bytes, int, int]] = []

        def flush() -> None:
            if inline:
                paths = [p for p, _, _ in inline]
                self._segments.append((paths, array("q", [s for _, s, _ in inline]), bytes(f for _, _, f in inline)))
                inline.clear()

        top = await media_call(list_level, self.root, THUMBS, headers)
        if top is None:
            inline.append((THUMBS + b"/", 0, UNREADABLE_DIR))
            flush()
            return
        for key, size, flag in top[1]:
            if flag >= 0:
                inline.append((THUMBS + b"/" + key, size, flag))
                continue
            rel = THUMBS + b"/" + key[:-1]
            level = await media_call(list_level, self.root, rel, headers)
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
        # A helper of an earlier walk still stuck in the kernel: no second pair beside it.
        why = media_stuck()
        if why is not None:
            raise MediaStuck(why)
        await self._plan()
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
                self._children.append(_Child(proc))
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
        proc = self._children[k % self.workers].proc
        out = proc.stdout
        assert out is not None
        size = _walker.FRAME.size
        while True:
            try:
                unit, count, blob, last = _walker.decode(await asyncio.wait_for(out.readexactly(size), self.stall))
                body = await asyncio.wait_for(out.readexactly(blob + 9 * count), self.stall)
            except asyncio.IncompleteReadError:
                raise WalkerError(f"file walker exited unexpectedly: {await self._stderr(proc)}") from None
            except TimeoutError:
                folder = self._folder(k)
                POOL.suspect(folder)
                raise MediaStuck(f"the file walker got no answer from {folder} for {self.stall:.0f}s") from None
            except asyncio.CancelledError:
                # Cut short (the round's deadline) while waiting on this folder: the probe looks into it.
                POOL.suspect(self._folder(k))
                raise
            if unit != k:
                raise WalkerError(f"file walker out of step: unit {unit}, expected {k}")
            if count:
                sizes = array("q")
                sizes.frombytes(body[blob : blob + 8 * count])
                prefix = self._units[k] + b"/"
                yield [prefix + p for p in body[:blob].split(b"\0")], sizes, body[blob + 8 * count :]
            if last:
                return

    def _folder(self, k: int) -> str:
        return os.fsdecode(self.root + b"/" + self._units[k])

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
                while (walked := await media_call(_next_frame, gen, timeout=self.stall)) is not None:
                    yield walked

    @property
    def processes(self) -> list[asyncio.subprocess.Process]:
        return [c.proc for c in self._children]

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        children, self._children = self._children, []
        for child in children:
            child.kill()
        waits = [asyncio.ensure_future(child.proc.wait()) for child in children]
        try:
            if waits:
                # Together: a stop is bounded by one EXIT_WAIT however many helpers there are.
                await asyncio.wait(waits, timeout=EXIT_WAIT)
        finally:
            for child, waiting in zip(children, waits, strict=True):
                if waiting.done():
                    child.release()
                else:
                    waiting.cancel()
                    _hold_stuck(child)


def _hold_stuck(child: _Child) -> None:
    """A killed helper that does not exit is in the kernel, waiting on the mount: say so once, keep the
    filesystem source down while it lives, and reap it when the mount lets it go."""
    pid = child.proc.pid
    what = f"file walker pid {pid} does not exit after SIGKILL: stuck in the kernel on the media folder"
    log.warning("%s; no new file check starts until it is gone", what)
    POOL.hold(pid, what, lambda: process_alive(pid))

    async def reap() -> None:
        t0 = asyncio.get_running_loop().time()
        try:
            await child.proc.wait()
        finally:
            POOL.release(pid)
            _stuck.pop(pid, None)
            child.release()
        log.info("file walker pid %d exited after %.0fs more", pid, asyncio.get_running_loop().time() - t0)

    _stuck[pid] = asyncio.get_running_loop().create_task(reap(), name=f"reap-walker-{pid}")


def stuck_walkers() -> list[int]:
    """Helpers that outlived their kill and are still waited for."""
    return list(_stuck)


def _next_frame(frames: Iterator[Frame]) -> Frame | None:
    return next(frames, None)
