"""Faults under a running exporter, with real processes: PostgreSQL stopped, killed and frozen (also in
the middle of a file check), the media folder unmounted in the middle of a scan, Immich's API hanging.

In every case ``/metrics`` keeps answering within its budget (each scrape is timed), ``source_up`` tells
the truth, series that only a dead source fed disappear, no collection piles up behind a hung one, the
exporter never holds more PostgreSQL sessions than its pool, and it recovers by itself within one
interval of the backend returning. Intervals are short here only.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import shutil
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, BinaryIO

import aiohttp
import asyncpg
import pytest
import pytest_asyncio
from aiohttp import web

from immich_thumbnail_exporter.app import Exporter
from immich_thumbnail_exporter.demo.embedded import EmbeddedPostgres, EmbeddedValkey, free_port
from immich_thumbnail_exporter.demo.seed import Plan
from immich_thumbnail_exporter.demo.simulation.api import ApiKey, SimulatedApi
from immich_thumbnail_exporter.scan import run as scanner
from immich_thumbnail_exporter.sources.media import media_stuck
from immich_thumbnail_exporter.sources.postgres import APPLICATION_NAME
from tests.conftest import Immich, make_immich
from tests.faultkit import (
    HANG_ALL,
    HANG_LEAVES,
    HangMount,
    Resources,
    Watch,
    dedicated_postgres,
    exporter_connections,
    freeze,
    fuse_missing,
    hang_mount,
    thaw,
    until,
    walker_children,
    watching,
    write_report,
)
from tests.helpers import Calls, fetch, rounds, run_cli, running_exporter, samples

pytestmark = pytest.mark.asyncio

POOL = 2
INTERVALS = {"inventory": 2.0, "files": 3.0, "queues": 1.0}  # queues sets the probe interval: 1s
# Detection: one probe interval plus the connect timeout. Recovery: a probe interval plus one round.
DETECT = INTERVALS["queues"] + 2.0 + 3.0
RECOVER = max(INTERVALS.values()) + 2.0
REPORT: list[str] = []


@pytest.fixture(scope="module")
def fault_pg() -> Iterator[EmbeddedPostgres]:
    pg = dedicated_postgres()
    try:
        yield pg
    finally:
        thaw(pg)
        pg.cleanup()
        write_report("faults", REPORT)


@pytest_asyncio.fixture
async def imm(fault_pg: EmbeddedPostgres) -> AsyncIterator[Immich]:
    if not fault_pg.running:
        fault_pg.start()
    made = await make_immich(fault_pg, "v1.136+")
    yield made
    shutil.rmtree(made.media, ignore_errors=True)


def overrides(imm: Immich, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "media.root": imm.media,
        "intervals.inventory": f"{INTERVALS['inventory']}s",
        "intervals.files": f"{INTERVALS['files']}s",
        "intervals.queues": f"{INTERVALS['queues']}s",
        "database.pool_size": POOL,
        "database.connect_timeout": "2s",
        "database.statement_timeout": "10s",
    }
    out.update(extra)
    return out


def healthy(w: Watch) -> bool:
    return (w.up("postgres") == 1 and w.up("filesystem") == 1
            and w.has("immich_assets") and w.has("immich_thumbnail_files"))


async def settle(ex: Exporter, w: Watch, imm: Immich) -> Resources:
    """Wait until everything is up and both collections have published; return the resource baseline."""
    await until(lambda: healthy(w), 30)
    await until(lambda: ex.store.result("files") is not None and ex.store.result("files").success, 30)
    async with Calls(ex.runner, "probe") as probes:  # a probe round after that, for the baseline
        await probes.wait(1)
    return Resources.now()


async def held_over(ex: Exporter, collections: tuple[str, ...], n: int, check: Callable[[], bool], why: str) -> None:
    """Over ``n`` more rounds of each of ``collections``, every one failed, ``check()`` holds after each:
    "still down a while" counted in the rounds that could have shown something again, not in seconds."""
    async def one(collection: str) -> None:
        for i in range(n):
            result = await rounds(ex.store, collection, 1)
            assert not result.success, (collection, i, result)
            assert check(), f"{why}: not so after failed round {i + 1} of {collection}"

    await asyncio.gather(*(one(c) for c in collections))


async def assert_bounded_connections(imm: Immich) -> int:
    """The exporter's sessions on this server, once the server is answering: never above its pool."""
    async def ok() -> bool:
        return await exporter_connections(imm.postgres, imm.database) <= POOL

    await until(ok, 15, 0.2)
    return await exporter_connections(imm.postgres, imm.database)


def no_pile_up(w: Watch, base: Resources) -> None:
    # One loop per collection and one probe loop exist whatever happens. While a backend hangs, a round
    # in flight holds a few more for a bounded time (its deadline's wrapper task, the clean-up of a
    # dropped client, at most a couple of rounds' worth); the executor's threads are capped.
    assert w.max_tasks <= base.tasks + 8, (w.max_tasks, base.tasks)
    assert w.max_threads <= base.threads + 6, (w.max_threads, base.threads)
    # The file check's walker processes: one scan's worth, plus those of a scan cut short being reaped.
    assert w.max_walkers <= 4, w.max_walkers


@pytest.fixture(autouse=True)
def no_walker_left() -> Iterator[None]:
    """Once the exporter has stopped, none of its file-walker processes is left, not even a zombie."""
    yield
    deadline = time.monotonic() + 15
    while walker_children() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not walker_children(), walker_children()


async def outage(
    imm: Immich, fault: Callable[[], None], restore: Callable[[], None], label: str, held: int = 2
) -> None:
    """Run the exporter, apply ``fault``, check what it shows, ``restore``, check it recovers."""
    async with running_exporter(overrides(imm), env=imm.env()) as (ex, url), watching(url) as w:
        base = await settle(ex, w, imm)
        fault()
        detected = await until(lambda: w.up("postgres") == 0, DETECT)
        # Everything fed by PostgreSQL is gone; the media folder is still known to be fine.
        await until(lambda: not w.has("immich_assets") and not w.has("immich_thumbnail_files"), DETECT)
        assert w.up("filesystem") == 1
        assert w.has("immich_exporter_build_info")
        # Stay down over several failed rounds (retries with backoff): nothing piles up, scrapes stay fast.
        await held_over(ex, ("inventory", "files"), held,
                        lambda: w.up("postgres") == 0 and not w.has("immich_assets"), "postgres down, series hidden")
        restore()
        recovered = await until(lambda: healthy(w), RECOVER)
        conns = await assert_bounded_connections(imm)
        w.check()
        no_pile_up(w, base)
        REPORT.append(
            f"{label}: down detected in {detected:.2f}s, recovered {recovered:.2f}s after the backend "
            f"returned; {w.summary()}; tasks {base.tasks}->{w.max_tasks} max, threads {base.threads}->"
            f"{w.max_threads} max, walker processes {w.max_walkers} max; exporter sessions after recovery "
            f"{conns} (pool {POOL})"
        )


async def test_postgres_stopped_and_restarted(imm: Immich) -> None:
    await outage(imm, imm.postgres.stop, imm.postgres.start, "postgres stopped")


async def test_postgres_killed_and_restarted(imm: Immich) -> None:
    await outage(imm, imm.postgres.kill, imm.postgres.start, "postgres SIGKILL")


async def test_postgres_frozen(imm: Immich) -> None:
    await outage(imm, lambda: freeze(imm.postgres), lambda: thaw(imm.postgres), "postgres frozen", held=3)


# -- in the middle of a file check --------------------------------------------------------------------


def hook_reconcile(monkeypatch: pytest.MonkeyPatch, after_rows: int, action: Callable[[], None]) -> dict[str, int]:
    """Make the files collection call ``action`` once, in the middle of its merge (after a few batches)."""
    real = scanner.reconcile
    state = {"fired": 0, "scans": 0, "armed": 0}

    async def reconcile(*args: Any, **kwargs: Any) -> None:
        state["scans"] += 1
        outer = kwargs.pop("progress", None)

        def progress(stats: Any) -> None:
            if state["armed"] and not state["fired"] and stats.rows >= after_rows:
                state["fired"] = 1
                action()
            if outer is not None:
                outer(stats)

        await real(*args, progress=progress, **kwargs)

    monkeypatch.setattr(scanner, "reconcile", reconcile)
    return state


@pytest.fixture(scope="module")
def big(fault_pg: EmbeddedPostgres) -> Iterator[Immich]:
    """A library big enough that its file check takes many cursor batches (shared: tests put back what
    they move)."""
    if not fault_pg.running:
        fault_pg.start()
    made = asyncio.run(make_immich(fault_pg, "v1.136+", Plan(assets=800)))
    yield made
    shutil.rmtree(made.media, ignore_errors=True)


@pytest.fixture
def running_pg(big: Immich) -> Immich:
    if not big.postgres.running:
        big.postgres.start()
    return big


async def test_postgres_frozen_in_the_middle_of_a_file_check(
    running_pg: Immich, monkeypatch: pytest.MonkeyPatch
) -> None:
    big = running_pg
    state = hook_reconcile(monkeypatch, 500, lambda: freeze(big.postgres))
    extra = {"database.fetch_size": 100, "intervals.files": "4s"}
    async with running_exporter(overrides(big, **extra), env=big.env()) as (ex, url), watching(url) as w:
        base = await settle(ex, w, big)
        state["armed"] = 1
        await until(lambda: state["fired"], 30)
        detected = await until(lambda: w.up("postgres") == 0, DETECT)
        await until(lambda: not w.has("immich_assets") and not w.has("immich_thumbnail_files"), DETECT)
        # The interrupted scan never published: its deadline ended it, and nothing from it is shown.
        await until(lambda: not ex.store.result("files").success, 10)
        files = ex.store.result("files")
        assert files is not None and files.error
        await held_over(ex, ("files",), 2, lambda: not w.has("immich_thumbnail_files"), "file series hidden")
        thaw(big.postgres)
        recovered = await until(lambda: healthy(w), RECOVER + 4)
        conns = await assert_bounded_connections(big)
        w.check()
        no_pile_up(w, base)
        REPORT.append(
            f"postgres frozen mid file check (after 500 rows): down in {detected:.2f}s, files error "
            f"{files.error!r}, recovered {recovered:.2f}s after thaw; {w.summary()}; sessions {conns}"
        )


def put_back(aside: str, path: str) -> None:
    """Undo a move (when a test failed half way)."""
    if os.path.isdir(aside):
        if os.path.isdir(path) and not os.listdir(path):
            os.rmdir(path)
        os.rename(aside, path)


async def test_media_root_unmounted_in_the_middle_of_a_scan(
    running_pg: Immich, monkeypatch: pytest.MonkeyPatch
) -> None:
    big = running_pg
    root = big.media
    aside = root + ".unmounted"

    def unmount() -> None:
        # What an unmounted volume looks like: the mount point is there, empty.
        os.rename(root, aside)
        os.mkdir(root)

    def remount() -> None:
        os.rmdir(root)
        os.rename(aside, root)

    state = hook_reconcile(monkeypatch, 500, unmount)
    extra = {"database.fetch_size": 100, "intervals.files": "4s"}
    try:
        async with running_exporter(overrides(big, **extra), env=big.env()) as (ex, url), watching(url) as w:
            base = await settle(ex, w, big)
            done = ex.store.result("files")
            state["armed"] = 1
            await until(lambda: state["fired"], 30)
            await until(lambda: ex.store.result("files") is not done, 10)
            files = ex.store.result("files")
            assert files is not None and not files.success
            # The check at the end of the scan sees the folder is not the one it started on: discarded.
            assert files.error and files.error.startswith("filesystem:"), files.error
            assert "does not exist" in files.error or "changed during the scan" in files.error, files.error
            detected = await until(lambda: w.up("filesystem") == 0, DETECT)
            assert not w.has("immich_thumbnail_files") and not w.has("immich_thumbnail_orphaned_files")
            # The database is fine: its own series stay.
            assert w.up("postgres") == 1 and w.has("immich_assets")
            await held_over(ex, ("files",), 2,
                            lambda: w.up("filesystem") == 0 and not w.has("immich_thumbnail_files"),
                            "filesystem down, file series hidden")
            remount()
            recovered = await until(lambda: healthy(w), RECOVER + 4)
            w.check()
            no_pile_up(w, base)
            REPORT.append(
                f"media root unmounted mid scan: scan discarded ({files.error!r}), filesystem down in "
                f"{detected:.2f}s, recovered {recovered:.2f}s after remount; {w.summary()}"
            )
    finally:
        put_back(aside, root)


@pytest.mark.parametrize("how", ["gone", "replaced"])
async def test_thumbs_folder_gone_or_replaced_in_the_middle_of_a_scan(
    running_pg: Immich, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    big = running_pg
    thumbs = os.path.join(big.media, "thumbs")
    aside = thumbs + ".away"

    def fault() -> None:
        os.rename(thumbs, aside)
        if how == "replaced":
            os.mkdir(thumbs)  # another (empty) volume mounted in its place

    state = hook_reconcile(monkeypatch, 500, fault)
    extra = {"database.fetch_size": 100, "intervals.files": "4s"}
    try:
        async with running_exporter(overrides(big, **extra), env=big.env()) as (ex, url), watching(url) as w:
            await settle(ex, w, big)
            done = ex.store.result("files")
            state["armed"] = 1
            await until(lambda: state["fired"], 30)
            await until(lambda: ex.store.result("files") is not done, 10)
            files = ex.store.result("files")
            # The half-walked scan is discarded, never published as "everything after this is missing".
            assert files is not None and not files.success and not files.parts, files
            # An empty folder in its place has no .immich mount marker, which is caught as well as the change.
            wants = ("does not exist",) if how == "gone" else ("changed during the scan", "mount marker")
            assert any(want in (files.error or "") for want in wants), files.error
            if how == "gone" or "mount marker" in (files.error or ""):
                await until(lambda: w.up("filesystem") == 0, DETECT)
                assert not w.has("immich_thumbnail_files")
            put_back(aside, thumbs)
            recovered = await until(lambda: healthy(w) and ex.store.result("files").success, RECOVER + 4)
            w.check()
            REPORT.append(f"thumbs/ {how} mid scan: {files.error!r}; recovered {recovered:.2f}s; {w.summary()}")
    finally:
        put_back(aside, thumbs)


# -- Redis frozen, Immich's API hanging ---------------------------------------------------------------


@pytest.fixture(scope="module")
def fault_valkey() -> Iterator[EmbeddedValkey]:
    server = EmbeddedValkey()
    server.start()
    try:
        yield server
    finally:
        thaw(server)
        server.cleanup()


async def add_waiting_jobs(valkey: EmbeddedValkey, n: int) -> None:
    """An empty Valkey, then ``n`` jobs waiting in thumbnailGeneration (no worker)."""
    import redis.asyncio as aioredis
    from bullmq import Queue

    client = aioredis.Redis.from_url(valkey.url)
    await client.flushall()
    await client.aclose()

    queue = Queue("thumbnailGeneration", {"connection": valkey.url, "prefix": "immich_bull"})
    try:
        for _ in range(n):
            await queue.add("AssetGenerateThumbnails", {"id": str(uuid.uuid4())}, {"removeOnComplete": True})
    finally:
        await queue.close()


async def redis_connections(valkey: EmbeddedValkey) -> int:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(valkey.url, decode_responses=True, socket_timeout=5)
    try:
        return sum(1 for c in await client.client_list() if c.get("name") == "immich-thumbnail-exporter")
    finally:
        await client.aclose()


def queue_jobs(w: Watch) -> float | None:
    return w.last.get(("immich_queue_jobs", (("queue", "thumbnailGeneration"), ("state", "waiting"))))


async def test_redis_frozen(imm: Immich, fault_valkey: EmbeddedValkey) -> None:
    await add_waiting_jobs(fault_valkey, 3)
    flags = overrides(imm, **{"redis.timeout": "1s"})
    env = {**imm.env(), "REDIS_URL": fault_valkey.url}
    async with running_exporter(flags, env=env) as (ex, url), watching(url) as w:
        base = await settle(ex, w, imm)
        await until(lambda: w.up("redis") == 1 and queue_jobs(w) == 3, 20)
        base = Resources.now()
        freeze(fault_valkey)
        try:
            detected = await until(lambda: w.up("redis") == 0, DETECT)
            await until(lambda: queue_jobs(w) is None, DETECT)
            # PostgreSQL and the media folder are fine: their series stay.
            assert w.up("postgres") == 1 and w.has("immich_assets") and w.has("immich_thumbnail_files")
            await held_over(ex, ("queues",), 3, lambda: w.up("redis") == 0 and queue_jobs(w) is None,
                            "redis down, queue series hidden")
        finally:
            thaw(fault_valkey)
        recovered = await until(lambda: w.up("redis") == 1 and queue_jobs(w) == 3, RECOVER)
        await until(lambda: redis_connections(fault_valkey), 10)  # answering again
        conns = 0

        async def bounded() -> bool:
            nonlocal conns
            conns = await redis_connections(fault_valkey)
            return conns <= 4

        await until(bounded, 15, 0.2)
        w.check()
        no_pile_up(w, base)
        REPORT.append(
            f"redis frozen: down in {detected:.2f}s, recovered {recovered:.2f}s after thaw; {w.summary()}; "
            f"tasks {base.tasks}->{w.max_tasks} max, threads {base.threads}->{w.max_threads} max; "
            f"redis connections after recovery {conns} (client max 4)"
        )


class HangingImmich:
    """The simulated Immich (v2.4), held: every request is accepted and then waits, unanswered, until
    ``answer()``. The gate wraps the one fake's request dispatcher before it starts serving (a test's
    hook, not a second fake), and counts what waits behind it."""

    def __init__(self, redis_url: str) -> None:
        self.fake = SimulatedApi(None, redis_url, {"k": ApiKey(None, ("all",), admin=True)}, release="v2.4")
        self._release = asyncio.Event()
        self.in_flight = 0
        self.max_in_flight = 0
        self.requests = 0
        dispatch = self.fake._dispatch

        async def gated(request: web.Request) -> web.StreamResponse:
            self.requests += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                while not self._release.is_set():
                    # A request whose client gave up (closed its connection) is no longer in flight:
                    # aiohttp does not cancel the handler of a dropped connection, so look.
                    transport = request.transport
                    if transport is None or transport.is_closing():
                        return web.Response(status=408)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._release.wait(), 0.05)
            finally:
                self.in_flight -= 1
            return await dispatch(request)

        setattr(self.fake, "_dispatch", gated)  # noqa: B010 - start() routes every request through it

    @property
    def url(self) -> str:
        return self.fake.url

    def answer(self) -> None:
        self._release.set()


@pytest_asyncio.fixture
async def hanging_immich(fault_valkey: EmbeddedValkey) -> AsyncIterator[HangingImmich]:
    hung = HangingImmich(fault_valkey.url)
    await hung.fake.start()
    try:
        yield hung
    finally:
        hung.answer()
        await hung.fake.stop()


@pytest.mark.parametrize("with_redis", [False, True], ids=["api-only", "api-and-redis"])
async def test_immich_api_hanging(
    imm: Immich, fault_valkey: EmbeddedValkey, hanging_immich: HangingImmich, with_redis: bool
) -> None:
    # The fake counts the same BullMQ queues: 2 waiting when Redis is read too, 7 when only the API tells.
    await add_waiting_jobs(fault_valkey, 2 if with_redis else 7)
    flags = overrides(imm, **{"immich.timeout": "2s", "redis.timeout": "1s", "intervals.queues": "2s"})
    env = {**imm.env(), "IMMICH_URL": hanging_immich.url, "IMMICH_API_KEY": "k"}
    if with_redis:
        env["REDIS_URL"] = fault_valkey.url
    async with running_exporter(flags, env=env) as (ex, url), watching(url) as w:
        await until(lambda: w.up("postgres") == 1 and w.has("immich_assets"), 30)
        base = Resources.now()
        await until(lambda: ex.store.result("queues") is not None, 10)
        # Every round ends by its deadline (plus a margin for a busy machine), however long the API hangs.
        queues = next(c for c in ex.runner.collections if c.name == "queues")
        for _ in range(4):
            result = await rounds(ex.store, "queues", 1)
            assert result.duration < queues.timeout + 1.0, result
        assert w.up("immich_api") == 0
        if with_redis:
            # Redis gives the queue series; the hung API takes nothing away from them.
            assert w.up("redis") == 1 and queue_jobs(w) == 2
        else:
            assert not w.has("immich_queue_jobs")
        # Nothing piles up behind the hung requests: the client's connection cap holds.
        assert hanging_immich.max_in_flight <= 4, hanging_immich.max_in_flight
        no_pile_up(w, base)
        hanging_immich.answer()
        recovered = await until(lambda: w.up("immich_api") == 1, RECOVER)
        if not with_redis:  # the API's own queue counts are back
            await until(lambda: queue_jobs(w) == 7, RECOVER)
        w.check()
        REPORT.append(
            f"immich API hanging ({'with' if with_redis else 'without'} redis): {hanging_immich.requests} "
            f"requests, at most {hanging_immich.max_in_flight} in flight; recovered {recovered:.2f}s; "
            f"{w.summary()}"
        )


# -- the media folder unreadable (as an unprivileged process would find it) ---------------------------


def _missing_by_reason(w: Watch, reason: str) -> float:
    return sum(v for (name, labels), v in w.last.items()
               if name == "immich_asset_files_missing" and ("reason", reason) in labels)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root and setpriv to drop CAP_DAC_OVERRIDE (root reads through chmod 000)")
async def test_media_unreadable(imm: Immich, tmp_path: Any) -> None:
    """``serve`` without the capabilities that let root read anything: a folder it cannot read makes its
    thumbnails ``file_unreadable`` (never ``file_missing``); an unreadable ``thumbs/`` takes the
    filesystem source down. Both recover by themselves."""
    cfg = tmp_path / "config.yml"
    cfg.write_text("intervals: {inventory: 2s, files: 2s, queues: 1s}\n")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DB_", "REDIS_", "IMMICH_"))}
    env["DB_URL"] = imm.dsn
    proc = await asyncio.create_subprocess_exec(
        "setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--",
        sys.executable, "-m", "immich_thumbnail_exporter", "serve", "--config.file", str(cfg),
        "--media.root", imm.media, "--web.listen-address", f"127.0.0.1:{port}", env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    thumbs = os.path.join(imm.media, "thumbs")
    owner = os.path.join(thumbs, sorted(d for d in os.listdir(thumbs) if not d.startswith("."))[0])
    url = f"http://127.0.0.1:{port}"

    async def listening() -> bool:
        try:
            return (await fetch(url + "/healthz"))[0] == 200
        except (aiohttp.ClientError, OSError):
            return False

    try:
        await until(listening, 30, 0.2)
        async with watching(url) as w:
            await until(lambda: healthy(w), 30)
            unreadable0, missing0 = _missing_by_reason(w, "file_unreadable"), _missing_by_reason(w, "file_missing")
            os.chmod(owner, 0)
            await until(lambda: _missing_by_reason(w, "file_unreadable") > unreadable0 + 50, 15)
            # Unreadable is not missing: nothing is called gone that could not be looked at (the missing
            # files in that folder are unreadable now too).
            assert _missing_by_reason(w, "file_missing") <= missing0
            assert w.up("filesystem") == 1
            os.chmod(owner, 0o755)
            os.chmod(thumbs, 0)
            await until(lambda: w.up("filesystem") == 0 and not w.has("immich_thumbnail_files"), DETECT)
            assert w.up("postgres") == 1 and w.has("immich_assets")
            os.chmod(thumbs, 0o755)
            recovered = await until(lambda: healthy(w) and _missing_by_reason(w, "file_unreadable") == unreadable0,
                                    RECOVER + 2)
            w.check()
            REPORT.append(f"media unreadable (serve without CAP_DAC_OVERRIDE): one owner's folder -> "
                          f"file_unreadable, file_missing not up; thumbs/ -> filesystem down; recovered "
                          f"{recovered:.2f}s; {w.summary()}")
    finally:
        os.chmod(owner, 0o755)
        os.chmod(thumbs, 0o755)
        if proc.returncode is None:
            proc.terminate()
        _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert b"Traceback" not in err, err.decode()[-2000:]


async def test_postgres_frozen_while_every_pooled_session_is_busy(
    running_pg: Immich, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file check holds the only pooled session when the server freezes, with production-like
    deadlines (a minute): the probe cannot borrow a session, yet source_up must turn 0 within seconds,
    not when the scan's deadline ends."""
    big = running_pg
    state = hook_reconcile(monkeypatch, 500, lambda: freeze(big.postgres))
    extra = {"database.fetch_size": 100, "database.pool_size": 1, "database.statement_timeout": "60s",
             "intervals.files": "60s", "intervals.inventory": "60s"}
    async with running_exporter(overrides(big, **extra), env=big.env()) as (ex, url), watching(url) as w:
        await until(lambda: healthy(w), 30)
        base = Resources.now()
        state["armed"] = 1
        ex.runner._wake["files"].set()  # the next scan now, not in a minute
        await until(lambda: state["fired"], 30)
        try:
            detected = await until(lambda: w.up("postgres") == 0, DETECT)
            await until(lambda: not w.has("immich_assets") and not w.has("immich_thumbnail_files"), DETECT)
        finally:
            thaw(big.postgres)
        recovered = await until(lambda: healthy(w), RECOVER + 4)
        conns = await assert_bounded_connections(big)
        assert conns <= 1
        w.check()
        no_pile_up(w, base)
        REPORT.append(f"postgres frozen while the only pooled session scans (deadlines 60s): down in "
                      f"{detected:.2f}s, recovered {recovered:.2f}s after thaw; {w.summary()}; sessions {conns}")


# -- a hung media mount (FUSE) and a stepped wall clock -----------------------------------------------
# The media folder is a FUSE passthrough that hangs on demand like a hard NFS mount (tests/faultkit.py):
# every call, or only below thumbs/<owner>/<xx>/. Hangs last only as long as their checks need.

HANG_ROUNDS = 4  # failed files rounds the whole mount stays hung for under serve
HANG_REPORT: list[str] = []


@pytest.fixture
def hung_media(imm: Immich, tmp_path: Any) -> Iterator[HangMount]:
    why = fuse_missing()
    if why is not None:
        if os.environ.get("CI"):
            pytest.fail(f"FUSE is needed here (scripts/install-system-deps.sh installs it): {why}")
        pytest.skip(why)
    with hang_mount(imm.media, str(tmp_path / "mnt")) as mount:
        yield mount
    write_report("hang", HANG_REPORT)


def by_name(dsn_or_url: str) -> str:
    """The same server, reached by host name: reconnecting then needs name resolution (a thread)."""
    return dsn_or_url.replace("127.0.0.1", "localhost")


async def kill_postgres_sessions(imm: Immich) -> int:
    conn = await asyncpg.connect(imm.postgres.dsn, timeout=5)
    try:
        return len(await conn.fetch(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1 AND datname = $2",
            APPLICATION_NAME, imm.database, timeout=5))
    finally:
        await conn.close()


async def kill_redis_clients(valkey: EmbeddedValkey) -> int:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(valkey.url, decode_responses=True, socket_timeout=5)
    try:
        ids = [c["id"] for c in await client.client_list() if c.get("name") == "immich-thumbnail-exporter"]
        for cid in ids:
            await client.client_kill_filter(_id=cid)
        return len(ids)
    finally:
        await client.aclose()


def files_ok(ex: Exporter) -> bool:
    result = ex.store.result("files")
    return result is not None and result.success


def files_series(w: Watch) -> bool:
    return w.has("immich_thumbnail_files")


async def test_whole_media_mount_hung_under_serve(
    imm: Immich, fault_valkey: EmbeddedValkey, hung_media: HangMount
) -> None:
    """Every call on the media mount hangs: scrapes stay fast, the filesystem source goes down with its
    series, one thread at most is stuck (none borrowed from asyncio's pool), and PostgreSQL and Redis,
    reached by host name, reconnect while it hangs. Everything is back once the mount answers."""
    await add_waiting_jobs(fault_valkey, 3)
    flags = overrides(imm, **{"media.root": hung_media.root, "redis.timeout": "1s", "intervals.files": "2s"})
    env = {"DB_URL": by_name(imm.dsn), "REDIS_URL": by_name(fault_valkey.url)}
    async with running_exporter(flags, env=env) as (ex, url), watching(url, budget=0.5) as w:
        await settle(ex, w, imm)
        await until(lambda: w.up("redis") == 1 and queue_jobs(w) == 3, 20)
        # Threads in normal operation include a watcher thread per walker process while a files round
        # runs: the baseline is the most seen over a healthy round, not a count between two rounds.
        done = ex.store.produced("files") or 0
        await until(lambda: (ex.store.produced("files") or 0) > done and files_ok(ex), 15)
        base = Resources.now()
        base_threads = max(w.max_threads, base.threads)
        w.max_threads = 0
        hung_media.hang(HANG_ALL)
        t_hang = time.monotonic()
        down = await until(lambda: w.up("filesystem") == 0, 15)
        await until(lambda: not files_series(w), 5)
        # The database and Redis are fine: their series stay.
        assert w.up("postgres") == 1 and w.has("immich_assets") and queue_jobs(w) == 3
        # Their connections cut while the mount still hangs: they come back (name resolution works).
        inventory_mark = ex.store.produced("inventory")
        queues_mark = ex.store.produced("queues")
        pg_killed = await kill_postgres_sessions(imm)
        redis_killed = await kill_redis_clients(fault_valkey)
        assert pg_killed >= 1 and redis_killed >= 1, (pg_killed, redis_killed)

        def reconnected() -> bool:
            inv, q = ex.store.result("inventory"), ex.store.result("queues")
            return bool(inv and inv.success and (ex.store.produced("inventory") or 0) > (inventory_mark or 0)
                        and q and q.success and (ex.store.produced("queues") or 0) > (queues_mark or 0)
                        and w.up("postgres") == 1 and w.up("redis") == 1 and queue_jobs(w) == 3)

        reconnect = await until(reconnected, 20)
        # Every named connection was killed, so any there now is a new one. (A round already in flight at
        # the kill can finish after the marks above without having reconnected: wait for the connection.)
        await until(lambda: exporter_connections(imm.postgres, imm.database), 20)
        await until(lambda: redis_connections(fault_valkey), 20)
        # Several more files rounds, each refused at once while the mount hangs: counted in rounds.
        await held_over(ex, ("files",), HANG_ROUNDS, lambda: w.up("filesystem") == 0 and not files_series(w),
                        "a series of the hung mount came back")
        hung_for = time.monotonic() - t_hang
        files = ex.store.result("files")
        assert files is not None and not files.success and files.error and "filesystem" in files.error, files
        stuck_threads = [t.name for t in threading.enumerate() if t.name == "media"]
        hung_media.answer()
        recovered = await until(lambda: healthy(w) and files_ok(ex), 40)
        w.check()
        grown = w.max_threads - base_threads
        assert grown <= 2, (base_threads, w.max_threads)
        assert len(stuck_threads) <= 1, stuck_threads
        assert w.max_walkers <= 2, w.max_walkers
        HANG_REPORT.append(
            f"whole mount hung {hung_for:.0f}s ({HANG_ROUNDS} failed files rounds) under serve: "
            f"filesystem down in {down:.2f}s; postgres and "
            f"redis by host name reconnected {reconnect:.2f}s after their connections were killed "
            f"({pg_killed} sessions, {redis_killed} clients); threads {base_threads}->{w.max_threads} max "
            f"(+{grown}), media threads {len(stuck_threads)}, walkers {w.max_walkers} max; recovered "
            f"{recovered:.2f}s after it answered; {w.summary()}"
        )


def _log_file(path: str) -> BinaryIO:
    return open(path, "wb")


async def serve_process(imm: Immich, root: str, cfg: Any, env_extra: dict[str, str] | None = None,
                        ) -> tuple[asyncio.subprocess.Process, str, Any]:
    """``serve`` as a process of its own (signals, exit, its children): returns it, its URL, its log file."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DB_", "REDIS_", "IMMICH_"))}
    env.update({"DB_URL": imm.dsn, **(env_extra or {})})
    log_file = _log_file(str(cfg) + ".log")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "immich_thumbnail_exporter", "serve", "--config.file", str(cfg),
        "--media.root", root, "--web.listen-address", f"127.0.0.1:{port}", env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=log_file,
    )
    url = f"http://127.0.0.1:{port}"

    async def listening() -> bool:
        try:
            return (await fetch(url + "/healthz"))[0] == 200
        except (aiohttp.ClientError, OSError):
            return False

    await until(listening, 30, 0.2)
    return proc, url, log_file


async def test_leaf_folders_hung_under_serve(imm: Immich, hung_media: HangMount, tmp_path: Any) -> None:
    """Only thumbs/<owner>/<xx>/ hangs (the probe's look at thumbs/ is fine): at most one pair of walker
    processes ever, the failure is reported (files round failed, filesystem down), and SIGTERM ends
    ``serve`` within 15 s while it still hangs."""
    cfg = tmp_path / "config.yml"
    cfg.write_text("intervals: {inventory: 2s, files: 2s, queues: 1s}\n")
    proc, url, log_file = await serve_process(imm, hung_media.root, cfg)
    try:
        async with watching(url, budget=0.5) as w:
            await until(lambda: healthy(w), 30)
            hung_media.hang(HANG_LEAVES)
            most = 0

            def sample() -> int:
                nonlocal most
                most = max(most, len(walker_children(proc.pid)))
                return most

            def reported() -> bool:
                sample()
                failed = w.last.get(("immich_exporter_collection_success", (("collection", "files"),))) == 0
                return failed and w.up("filesystem") == 0 and not files_series(w)

            down = await until(reported, 30)
            t0 = time.monotonic()
            while time.monotonic() - t0 < 6:  # more rounds: still no second pair
                assert sample() <= 2, walker_children(proc.pid)
                assert w.up("filesystem") == 0
                await asyncio.sleep(0.1)
        assert most <= 2, most
        t_term = time.monotonic()
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 15)
        exit_after = time.monotonic() - t_term
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        log_file.close()
    log = (tmp_path / "config.yml.log").read_text(errors="replace")
    assert "Traceback" not in log, log[-2000:]
    assert "files failed" in log and "does not answer" in log, log[-2000:]
    HANG_REPORT.append(f"leaf folders hung under serve: reported (files failed, filesystem down) in {down:.2f}s; "
                       f"walker processes {most} max; SIGTERM exit in {exit_after:.2f}s while still hung")


async def test_leaf_folders_hung_and_walkers_unkillable(
    imm: Immich, hung_media: HangMount, caplog: pytest.LogCaptureFixture
) -> None:
    """As above, but a killed walker stays in the kernel (state D) until the mount answers, as on a FUSE
    mount whose daemon hangs: it is reported, held (the filesystem source stays down), waited for and
    never replaced; once the mount answers it is reaped and everything recovers."""
    flags = overrides(imm, **{"media.root": hung_media.root, "intervals.files": "2s"})
    caplog.set_level("INFO", logger="immich_thumbnail_exporter")
    async with running_exporter(flags, env=imm.env()) as (ex, url), watching(url, budget=0.5) as w:
        await settle(ex, w, imm)
        hung_media.hang(HANG_LEAVES, killable=False)
        held = await until(lambda: "does not exit after SIGKILL" in (media_stuck() or ""), 30)
        assert any(state == "D" for _, state in walker_children()), walker_children()
        await until(lambda: w.up("filesystem") == 0 and not files_series(w), 10)
        # Rounds go on failing at once: no second pair of walkers beside the stuck one.
        await held_over(ex, ("files",), 2, lambda: len(walker_children()) <= 2 and w.up("filesystem") == 0,
                        "a second pair of walkers, or the filesystem source back up")
        hung_media.answer()
        recovered = await until(lambda: healthy(w) and files_ok(ex) and not walker_children(), 40)
        w.check()
        assert w.max_walkers <= 2, w.max_walkers
    assert "does not exit after SIGKILL" in caplog.text and "exited after" in caplog.text, caplog.text[-2000:]
    HANG_REPORT.append(f"leaf folders hung, walkers unkillable: walker held as stuck after {held:.2f}s, walker "
                       f"processes {w.max_walkers} max; recovered {recovered:.2f}s after the mount answered")


@pytest.mark.parametrize("command", [["scan", "--no-progress"], ["check-config"], ["regenerate"]])
async def test_commands_on_a_hung_mount_exit_2(imm: Immich, hung_media: HangMount, command: list[str]) -> None:
    hung_media.hang(HANG_ALL)
    t0 = time.monotonic()
    result = await asyncio.to_thread(
        run_cli, *command, "--media.root", hung_media.root, env=imm.env(), timeout=40
    )
    took = time.monotonic() - t0
    assert result.returncode == 2, (result.returncode, result.stdout[-1000:], result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if hung_media.root in line]
    assert len(lines) == 1 and "does not answer" in lines[0], result.stderr
    HANG_REPORT.append(f"{command[0]} on a hung mount: exit 2 in {took:.2f}s: {lines[0]}")


def libfaketime() -> str | None:
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketimeMT.so.1"))
    return found[0] if found else None


def stamp(parsed: dict[tuple[str, tuple[tuple[str, str], ...]], float], collection: str) -> float | None:
    return parsed.get(("immich_exporter_collection_last_success_timestamp_seconds", (("collection", collection),)))


async def test_wall_clock_stepped_back_and_forward(imm: Immich, tmp_path: Any) -> None:
    """``serve`` under libfaketime: its wall clock stepped back 10 minutes, then forward 20, as NTP would
    (the monotonic clock untouched). Every series stays through new rounds of every collection; only the
    ``*_timestamp_seconds`` values move, and no value is ever negative."""
    lib = libfaketime()
    if lib is None:
        if os.environ.get("CI"):
            pytest.fail("libfaketime is needed here (scripts/install-system-deps.sh installs Debian's faketime)")
        pytest.skip("no libfaketime (Debian's faketime)")
    clock = tmp_path / "clock"
    clock.write_text("+0\n")
    cfg = tmp_path / "config.yml"
    # A files deadline with room: libfaketime slows every clock read, and a round cut short by its
    # deadline would hide its series for a reason that is not the clock's.
    cfg.write_text("intervals: {inventory: 3s, files: 6s, queues: 1s}\n")
    faked = {"LD_PRELOAD": lib, "FAKETIME_TIMESTAMP_FILE": str(clock), "FAKETIME_CACHE_DURATION": "1",
             "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
    proc, url, log_file = await serve_process(imm, imm.media, cfg, faked)
    seen: list[str] = []
    try:
        async with watching(url) as w:
            await until(lambda: healthy(w) and stamp(w.last, "files") and stamp(w.last, "inventory"), 30)
            first = stamp(w.last, "files") or 0.0
            await until(lambda: (stamp(w.last, "files") or 0.0) > first and healthy(w), 15)
            series = set(w.last)
            for step, offset in (("back 10 min", -600), ("forward 20 min", +600)):
                before = {c: stamp(w.last, c) or 0.0 for c in ("inventory", "files")}
                clock.write_text(f"{offset:+d}\n")

                def stepped(before: dict[str, float] = before, offset: int = offset) -> bool:
                    now = {c: stamp(w.last, c) for c in before}
                    return all(v is not None and (v - before[c]) * offset > 500 for c, v in now.items())

                # A new round of each collection finished under the stepped clock...
                await until(stepped, 30)
                # ...and through the next rounds every series is there, none negative.
                t0 = time.monotonic()
                while time.monotonic() - t0 < 3:
                    parsed = samples((await fetch(url + "/metrics"))[1])
                    gone = series - set(parsed)
                    assert not gone, (step, gone)
                    negative = {k: v for k, v in parsed.items() if v < 0}
                    assert not negative, (step, negative)
                    await asyncio.sleep(0.1)
                seen.append(step)
            # Latency is not what this checks (libfaketime itself costs time): every scrape answered.
            assert not w.failures, w.failures[:5]
    finally:
        if proc.returncode is None:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 15)
        log_file.close()
    log = (tmp_path / "config.yml.log").read_text(errors="replace")
    assert "Traceback" not in log, log[-2000:]
    HANG_REPORT.append(f"wall clock stepped {' then '.join(seen)} under serve: {len(series)} series kept, "
                       f"none negative")
    write_report("hang", HANG_REPORT)
