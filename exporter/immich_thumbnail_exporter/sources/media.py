"""The media folder as a source: every blocking call on it runs here, in a pool of its own.

A hung NFS server (or any hung mount) blocks ``stat`` in the kernel for as long as it hangs, and a thread
doing it cannot be cancelled. asyncio's default executor is shared with name resolution (``localhost``,
when PostgreSQL or Redis reconnects), bcrypt checks of basic auth and ``asyncio.run``'s exit, which waits
for it: one stuck ``stat`` per round used to fill it, and then nothing else worked and no command exited.
So media calls go to one daemon thread of their own, and:

* a call that does not finish within its ``timeout`` makes the pool *stuck*: the thread is left where it
  is (never joined, never replaced: the process exits without it) and every later call fails at once,
  until the stuck one returns. One stuck thread at most, however long the hang lasts;
* a call waits behind the one running (no second thread), and fails as soon as that one is stuck;
* other stuck work (a file-walker process that outlives its kill) is *held* here, and folders a walk
  was cut short on are *suspects* the probe looks into: the filesystem source is down while any of it
  still hangs, so a hang below ``thumbs/<owner>/<xx>/``, which the probe's own look at ``thumbs/`` never
  meets, still takes the source down rather than failing every files round at its deadline.

``media_call`` is the API for every module that touches the media folder (the scan, the capacity
collection's ``statvfs``): ``await media_call(fn, *args, timeout=...)``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from immich_thumbnail_exporter.sources.postgres import SourceError

log = logging.getLogger(__name__)

T = TypeVar("T")

# One call's bound when the caller names none: a single listing or a batch of ``lstat``s, which a
# healthy mount, even a slow NFS one, answers in well under this.
CALL_TIMEOUT = 10.0
# Entries of a suspect folder that the probe ``lstat``s (a hang below it shows on the first).
SUSPECT_ENTRIES = 16


class MediaStuck(SourceError):
    """The media folder does not answer: a call did not finish in time, or an earlier one is still stuck."""

    def __init__(self, message: str) -> None:
        super().__init__("filesystem", message)


@dataclass
class _Job:
    fn: Callable[[], Any]
    future: concurrent.futures.Future[Any]
    timeout: float
    name: str
    started: float | None = None


class MediaPool:
    """One daemon thread that runs media calls one after the other; see the module docstring."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._running: _Job | None = None
        self._held: dict[object, tuple[str, Callable[[], bool]]] = {}
        self._suspects: dict[str, float] = {}

    # -- the worker ---------------------------------------------------------------------------------
    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._work, name="media", daemon=True)
                self._thread.start()

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if not job.future.set_running_or_notify_cancel():
                continue  # its caller gave up before it started
            job.started = time.monotonic()
            self._running = job
            try:
                result = job.fn()
            except BaseException as exc:
                job.future.set_exception(exc)
            else:
                job.future.set_result(result)
            finally:
                self._running = None
                if job.started is not None and time.monotonic() - job.started > job.timeout:
                    log.info("media folder answers again: %s returned after %.0fs",
                             job.name, time.monotonic() - job.started)

    # -- state --------------------------------------------------------------------------------------
    def stuck(self) -> str | None:
        """Why media work is stuck now (a call past its time, a walker that will not exit), or None."""
        job = self._running
        if job is not None and job.started is not None:
            waited = time.monotonic() - job.started
            if waited > job.timeout:
                return f"a call on the media folder ({job.name}) has not returned for {waited:.0f}s"
        for key, (what, alive) in list(self._held.items()):
            if alive():
                return what
            # Gone without anyone releasing it (its event loop ended first): nothing is stuck any more.
            self._held.pop(key, None)
        return None

    def hold(self, key: object, what: str, alive: Callable[[], bool]) -> None:
        """Stuck work outside the pool (a walker process in the kernel): the source is down until it is
        released or ``alive()`` says it is gone."""
        self._held[key] = (what, alive)

    def release(self, key: object) -> None:
        self._held.pop(key, None)

    def suspect(self, folder: str) -> None:
        """A folder a walk was cut short on: the probe looks into it until it answers."""
        self._suspects.setdefault(folder, time.monotonic())

    @property
    def suspects(self) -> list[str]:
        return list(self._suspects)

    def cleared(self, folder: str) -> None:
        self._suspects.pop(folder, None)

    @property
    def threads(self) -> int:
        return 1 if self._thread is not None and self._thread.is_alive() else 0

    # -- calls --------------------------------------------------------------------------------------
    async def call(self, fn: Callable[..., T], *args: Any, timeout: float = CALL_TIMEOUT) -> T:
        why = self.stuck()
        if why is not None:
            raise MediaStuck(why)
        name = str(getattr(fn, "__qualname__", None) or getattr(fn, "__name__", "call"))
        job = _Job(lambda: fn(*args), concurrent.futures.Future(), timeout, name)
        self._ensure_thread()
        self._jobs.put(job)
        waiting = asyncio.wrap_future(job.future)
        try:
            while True:
                done, _ = await asyncio.wait({waiting}, timeout=self._next_check(job))
                if done:
                    return waiting.result()  # type: ignore[no-any-return]
                if job.started is not None and time.monotonic() - job.started > timeout:
                    raise MediaStuck(f"the media folder did not answer within {timeout:.0f}s ({name})")
                why = self.stuck()
                if why is not None and job.started is None:
                    raise MediaStuck(why)
        finally:
            if not waiting.done():
                # Not started: it never will. Started: it runs on, stuck, and nobody waits for it.
                job.future.cancel()
                waiting.cancel()

    def _next_check(self, job: _Job) -> float:
        now = time.monotonic()
        if job.started is not None:
            return max(0.01, job.started + job.timeout - now + 0.01)
        # Queued: look again shortly (it may have started, with a deadline of its own), and at the latest
        # when the call ahead of it becomes stuck.
        ahead = self._running
        if ahead is not None and ahead.started is not None:
            return min(0.25, max(0.01, ahead.started + ahead.timeout - now + 0.01))
        return 0.05


POOL = MediaPool()


async def media_call(fn: Callable[..., T], *args: Any, timeout: float = CALL_TIMEOUT) -> T:
    """Run ``fn(*args)`` (blocking, on the media folder) in the media pool; at most ``timeout`` seconds
    once it has started. Raises ``MediaStuck`` (a ``SourceError`` of ``filesystem``) when it does not
    finish in time or the pool is stuck on an earlier call."""
    return await POOL.call(fn, *args, timeout=timeout)


def media_stuck() -> str | None:
    """Why media work is stuck now, or None."""
    return POOL.stuck()


def media_suspects() -> list[str]:
    """Folders a walk was cut short on, which the probe has not yet seen answer."""
    return POOL.suspects


def process_alive(pid: int) -> bool:
    """The process exists and is not a zombie (one that has exited but is not yet reaped is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2 :][:1] != b"Z"


# -- the filesystem probe ---------------------------------------------------------------------------


def media_identity(root: str) -> tuple[int, int]:
    """Check the media folder is there and readable; return the identity of its thumbs/ folder.

    An unmounted volume looks like an empty folder: we refuse to call every thumbnail missing when the
    folder itself is gone, so a missing ``thumbs`` folder is an error of the filesystem source.
    """
    thumbs = os.path.join(root, "thumbs")
    try:
        st = os.stat(thumbs)
        names = os.listdir(thumbs)
    except FileNotFoundError:
        if not os.path.isdir(root):
            raise SourceError("filesystem", f"media root {root} does not exist") from None
        raise SourceError(
            "filesystem", f"{thumbs} does not exist: is media.root the folder Immich mounts at /data?"
        ) from None
    except OSError as exc:
        raise SourceError("filesystem", f"cannot read {thumbs}: {exc.strerror or exc}") from None
    # Immich keeps a .immich marker in every media folder and refuses to start without it: a thumbs/
    # without one is an empty mount point or a wrong path, not a library whose thumbnails all vanished.
    if ".immich" not in names:
        raise SourceError(
            "filesystem",
            f"{thumbs}/.immich (Immich's mount marker) is missing: is the media folder mounted at {root}?",
        )
    return st.st_dev, st.st_ino


def look_into(folder: str) -> None:
    """List a suspect folder and ``lstat`` its first entries (a hang below it shows there)."""
    try:
        with os.scandir(folder) as it:
            for k, entry in enumerate(it):
                if k >= SUSPECT_ENTRIES:
                    break
                entry.stat(follow_symlinks=False)
                if entry.is_dir(follow_symlinks=False):
                    with os.scandir(entry.path) as inner:
                        next(inner, None)
    except OSError:
        pass  # gone or unreadable: the walk reports that as entries, it is not a hang


async def probe_filesystem(root: str, timeout: float) -> tuple[int, int]:
    """The identity of ``root/thumbs`` (see ``media_identity``), then a look into every suspect folder.

    Raises ``SourceError("filesystem")`` naming the media root when it is not usable or does not answer.
    """
    try:
        identity = await media_call(media_identity, root, timeout=timeout)
        for folder in POOL.suspects:
            await media_call(look_into, folder, timeout=timeout)
            POOL.cleared(folder)
    except MediaStuck as exc:
        raise SourceError("filesystem", f"media root {root} does not answer: {exc}") from None
    return identity
