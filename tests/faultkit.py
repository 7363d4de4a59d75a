"""Tools for the reliability tests: a dedicated PostgreSQL, a scraper that times every request while
faults happen, process-resource counts, and whole-server freezes.

``freeze`` stops (SIGSTOP) an embedded server and each of its children: PostgreSQL's postmaster and every
backend (separate processes), which is what ``docker pause`` does to a database container.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from immich_thumbnail_exporter.demo.embedded import EmbeddedPostgres, _Process
from immich_thumbnail_exporter.scan.disk_walk import WALKER
from immich_thumbnail_exporter.sources.postgres import APPLICATION_NAME
from tests.helpers import samples


def dedicated_postgres(password_auth: bool = False) -> EmbeddedPostgres:
    """A PostgreSQL of our own (we stop, kill and freeze it). With ``password_auth``, every role but
    ``postgres`` must give its password (scram-sha-256), so rotation can really be tested."""
    pg = EmbeddedPostgres()
    pg.init()
    if password_auth:
        hba = pg.datadir / "data" / "pg_hba.conf"
        hba.write_text(
            "local all postgres trust\n"
            "host all postgres 127.0.0.1/32 trust\n"
            "host all all 127.0.0.1/32 scram-sha-256\n"
        )
    pg.start()
    return pg


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid``, from /proc."""
    out: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:  # gone since it was listed
            continue
        # The ppid follows the command name, which is in parentheses and may hold spaces.
        fields = stat[stat.rindex(b")") + 2 :].split()
        if int(fields[1]) == pid:
            out.append(int(entry))
    return out


def _signal_all(server: _Process, sig: int) -> None:
    """Signal the server, then each of its children: PostgreSQL's backends are processes of their own
    (each in its own session, so no process group holds them) that answer on their own."""
    proc = server.proc
    if proc is None or proc.poll() is not None:
        return
    for pid in [proc.pid, *child_pids(proc.pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def freeze(server: _Process) -> None:
    """SIGSTOP the server and every backend of it, as ``docker pause`` would: connections stay open but
    nothing answers."""
    _signal_all(server, signal.SIGSTOP)


def thaw(server: _Process) -> None:
    _signal_all(server, signal.SIGCONT)


async def exporter_connections(pg: EmbeddedPostgres, database: str | None = None) -> int:
    """Sessions the exporter holds on this server (pg_stat_activity, by application_name)."""
    conn = await asyncpg.connect(pg.dsn, timeout=5)
    try:
        query = "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1"
        args: list[Any] = [APPLICATION_NAME]
        if database is not None:
            query += " AND datname = $2"
            args.append(database)
        return int(await conn.fetchval(query, *args, timeout=5))
    finally:
        await conn.close()


def walker_children(parent: int | None = None) -> list[tuple[int, str]]:
    """The file-walker helper processes that ``parent`` (this process by default) started, as (pid, state):
    ``Z`` is a zombie, ``D`` waits in the kernel."""
    out = []
    for pid in child_pids(os.getpid() if parent is None else parent):
        try:
            with open(f"/proc/{pid}/stat", "rb") as fh:
                stat = fh.read()
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmdline = fh.read()
        except OSError:  # gone since it was listed
            continue
        if os.fsencode(WALKER) in cmdline.split(b"\0"):
            out.append((pid, stat[stat.rindex(b")") + 2 :].split()[0].decode()))
    return out


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class Resources:
    tasks: int
    threads: int
    fds: int
    rss: int

    @classmethod
    def now(cls) -> Resources:
        return cls(len(asyncio.all_tasks()), threading.active_count(), fd_count(), rss_bytes())


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Watch:
    """Scrapes ``/metrics`` back to back while a fault happens; records latency and what it said."""

    url: str
    budget: float = 1.0
    latencies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    last: dict[tuple[str, tuple[tuple[str, str], ...]], float] = field(default_factory=dict)
    max_tasks: int = 0
    max_threads: int = 0
    max_walkers: int = 0
    _stop: bool = False

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while not self._stop:
                t0 = time.monotonic()
                try:
                    async with session.get(self.url + "/metrics") as resp:
                        text = await resp.text()
                        status = resp.status
                except Exception as exc:  # a scrape that fails is a finding, not a test crash
                    self.failures.append(f"{type(exc).__name__}: {exc}")
                    await asyncio.sleep(0.05)
                    continue
                took = time.monotonic() - t0
                self.latencies.append(took)
                if status != 200:
                    self.failures.append(f"HTTP {status}")
                else:
                    self.last = samples(text)
                self.max_tasks = max(self.max_tasks, len(asyncio.all_tasks()))
                self.max_threads = max(self.max_threads, threading.active_count())
                self.max_walkers = max(self.max_walkers, len(walker_children()))
                await asyncio.sleep(0.05)

    def up(self, source: str) -> float | None:
        return self.last.get(("immich_exporter_source_up", (("source", source),)))

    def has(self, name: str) -> bool:
        return any(key[0] == name for key in self.last)

    @property
    def p99(self) -> float:
        return percentile(self.latencies, 0.99)

    def check(self) -> None:
        assert not self.failures, self.failures[:5]
        assert self.latencies, "no scrape finished"
        slow = [t for t in self.latencies if t >= self.budget]
        assert not slow, f"{len(slow)} of {len(self.latencies)} scrapes took {self.budget}s or more: {slow[:5]}"

    def summary(self) -> str:
        return (f"{len(self.latencies)} scrapes, p50 {percentile(self.latencies, 0.5) * 1000:.1f} ms, "
                f"p99 {self.p99 * 1000:.1f} ms, max {max(self.latencies, default=0) * 1000:.1f} ms")


@contextlib.asynccontextmanager
async def watching(url: str, budget: float = 1.0) -> AsyncIterator[Watch]:
    watch = Watch(url, budget)
    task = asyncio.create_task(watch.run(), name="test-watch")
    try:
        yield watch
    finally:
        watch._stop = True
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 15)


async def until(predicate: Any, timeout: float, interval: float = 0.05) -> float:
    """Poll until ``predicate()`` is truthy; return the seconds it took."""
    t0 = time.monotonic()
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


@contextlib.contextmanager
def moved_away(path: str) -> Iterator[str]:
    """Rename ``path`` aside for the duration (an unmounted volume), and put it back."""
    aside = path + ".away"
    os.rename(path, aside)
    try:
        yield aside
    finally:
        if os.path.isdir(path) and not os.listdir(path):
            os.rmdir(path)
        if os.path.exists(aside):
            os.rename(aside, path)


def write_report(name: str, lines: list[str]) -> None:
    """Figures for the issue note, next to pytest's cache (never asserted on)."""
    out = Path(__file__).resolve().parent.parent / ".pytest_cache" / "reliability"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.txt").write_text("\n".join(lines) + "\n")


# -- a media mount that can be made to hang (FUSE) ----------------------------------------------------

# Hang modes: every call on the mount, or only below the leaf folders ``thumbs/<owner>/<xx>/`` (what
# the probe's look at ``thumbs/`` never meets; only the file walk does).
HANG_ALL, HANG_LEAVES, HANG_UNKILLABLE = "all", "leaves", "unkillable"
SIGKILL_BIT = 1 << (signal.SIGKILL - 1)


def _sigkill_pending(tid: int) -> bool:
    """Whether the thread ``tid`` has a SIGKILL pending (it is being killed, or its process is exiting)."""
    try:
        with open(f"/proc/{tid}/status") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return True  # gone: nobody waits for the answer any more
    pending = [int(line.split()[1], 16) for line in lines if line.startswith(("SigPnd:", "ShdPnd:"))]
    return any(mask & SIGKILL_BIT for mask in pending)


def hangfs_main(argv: list[str]) -> None:
    """The FUSE daemon (a process of its own, so the test process never waits on its own mount):
    ``SOURCE MOUNTPOINT``; reads ``all`` / ``leaves`` / ``unkillable`` / ``answer`` lines on stdin, says
    ``ok`` after each.

    A read-only passthrough of SOURCE. While hung, a call waits like one on a hard NFS mount: for ever,
    except that a fatal signal ends it (the NFS client's waits are killable). A FUSE request that the
    daemon has read is otherwise waited out by the kernel even after SIGKILL, which no NFS client does,
    so the daemon answers ``EINTR`` once the caller has SIGKILL pending, and not for any other signal.
    ``unkillable`` (until ``answer``) drops that courtesy: callers then wait in the kernel (state ``D``)
    even after SIGKILL, as they would on a FUSE mount whose daemon hangs.
    """
    import errno
    import sys as _sys

    from fuse import FUSE, FuseOSError, Operations, fuse_get_context  # type: ignore[import-untyped]

    source, mountpoint = argv
    answered = threading.Event()
    answered.set()
    mode = {"now": "", "killable": True}

    class HangFS(Operations):  # type: ignore[misc]
        def _gate(self, path: str) -> None:
            if answered.is_set():
                return
            parts = path.strip("/").split("/")
            if mode["now"] == HANG_LEAVES and not (parts[0] == "thumbs" and len(parts) >= 4):
                return
            tid = fuse_get_context()[2]
            while not answered.wait(0.05):
                if mode["killable"] and _sigkill_pending(tid):
                    raise FuseOSError(errno.EINTR)

        def _real(self, path: str) -> str:
            return os.path.join(source, path.lstrip("/"))

        def getattr(self, path: str, fh: Any = None) -> dict[str, Any]:
            self._gate(path)
            try:
                st = os.lstat(self._real(path))
            except OSError as exc:
                raise FuseOSError(exc.errno) from None
            keys = ("st_atime", "st_ctime", "st_gid", "st_mode", "st_mtime", "st_nlink", "st_size", "st_uid")
            return {k: getattr(st, k) for k in keys}

        def readdir(self, path: str, fh: Any) -> list[str]:
            self._gate(path)
            try:
                return [".", "..", *os.listdir(self._real(path))]
            except OSError as exc:
                raise FuseOSError(exc.errno) from None

        def readlink(self, path: str) -> str:
            self._gate(path)
            try:
                return os.readlink(self._real(path))
            except OSError as exc:
                raise FuseOSError(exc.errno) from None

        def access(self, path: str, amode: int) -> None:
            self._gate(path)
            if not os.access(self._real(path), amode):
                raise FuseOSError(errno.EACCES)

        def open(self, path: str, flags: int) -> int:
            self._gate(path)
            try:
                return os.open(self._real(path), flags)
            except OSError as exc:
                raise FuseOSError(exc.errno) from None

        def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
            self._gate(path)
            return os.pread(fh, size, offset)

        def release(self, path: str, fh: int) -> None:
            os.close(fh)

        def statfs(self, path: str) -> dict[str, Any]:
            self._gate(path)
            st = os.statvfs(self._real(path))
            keys = ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree", "f_files", "f_flag",
                    "f_frsize", "f_namemax")
            return {k: getattr(st, k) for k in keys}

    def control() -> None:
        for line in _sys.stdin:
            cmd = line.strip()
            if cmd in (HANG_ALL, HANG_LEAVES):
                mode["now"] = cmd
                answered.clear()
            elif cmd == HANG_UNKILLABLE:
                mode["killable"] = False
            elif cmd == "answer":
                mode["killable"] = True
                answered.set()
            print("ok", flush=True)
        answered.set()  # the test is gone: never leave a caller hanging

    threading.Thread(target=control, daemon=True).start()
    print("ok", flush=True)
    # No kernel caching of names or attributes: a hang shows on the very next call.
    FUSE(HangFS(), mountpoint, foreground=True, ro=True, nothreads=False,
         attr_timeout=0, entry_timeout=0, negative_timeout=0)


def fuse_missing() -> str | None:
    """Why a FUSE mount cannot be made here, or None (CI installs all of it: scripts/install-system-deps.sh)."""
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if shutil.which("fusermount") is None and shutil.which("fusermount3") is None:
        return "no fusermount (Debian's fuse3)"
    try:
        import fuse  # noqa: F401
    except (ImportError, OSError) as exc:  # fusepy raises OSError without libfuse.so.2
        return f"fusepy cannot load libfuse (Debian's libfuse2): {exc}"
    return None


class HangMount:
    """A passthrough of a media folder at ``root``, which ``hang()`` makes hang and ``answer()`` releases."""

    def __init__(self, source: str, mountpoint: str) -> None:
        self.source = source
        self.root = mountpoint
        self.proc: subprocess.Popen[str] | None = None

    def _say(self, cmd: str | None = None) -> None:
        assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
        if cmd is not None:
            self.proc.stdin.write(cmd + "\n")
            self.proc.stdin.flush()
        line = self.proc.stdout.readline().strip()
        assert line == "ok", f"hang mount daemon said {line!r}"

    def mount(self) -> None:
        os.makedirs(self.root, exist_ok=True)
        repo = Path(__file__).resolve().parent.parent
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "import sys; from tests.faultkit import hangfs_main; hangfs_main(sys.argv[1:])",
             self.source, self.root],
            cwd=repo, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        self._say()
        deadline = time.monotonic() + 15
        while not os.path.ismount(self.root):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the FUSE passthrough did not mount at {self.root}")
            time.sleep(0.05)

    def hang(self, mode: str = HANG_ALL, killable: bool = True) -> None:
        if not killable:
            self._say(HANG_UNKILLABLE)
        self._say(mode)

    def answer(self) -> None:
        self._say("answer")

    def unmount(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(Exception):
                self.answer()
        tool = shutil.which("fusermount") or shutil.which("fusermount3") or "fusermount"
        subprocess.run([tool, "-u", "-z", self.root], capture_output=True, timeout=30, check=False)
        if self.proc is not None:
            if self.proc.stdin is not None:
                with contextlib.suppress(OSError):
                    self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
            if self.proc.stdout is not None:
                self.proc.stdout.close()


@contextlib.contextmanager
def hang_mount(source: str, mountpoint: str) -> Iterator[HangMount]:
    """Mount a hangable passthrough of ``source``; always unmounted (``fusermount -u -z``) on the way out."""
    mount = HangMount(source, mountpoint)
    try:
        mount.mount()
        yield mount
    finally:
        mount.unmount()
