"""The queue collection on a real Valkey, with jobs made by real BullMQ (Python, and Node as Immich runs it)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from bullmq import Queue, Worker
from prometheus_client.core import Metric

from immich_thumbnail_exporter.collectors.base import Outcome
from immich_thumbnail_exporter.collectors.queues import QueueCollection
from immich_thumbnail_exporter.config import Config, load_config
from immich_thumbnail_exporter.demo.embedded import EmbeddedPostgres, EmbeddedValkey, valkey_binary
from immich_thumbnail_exporter.sources.bullmq import worker_queue
from immich_thumbnail_exporter.sources.connections import check_connections
from immich_thumbnail_exporter.sources.postgres import PostgresSource
from immich_thumbnail_exporter.sources.redis import CLIENT_NAME, EVENTS_CLIENT_NAME
from immich_thumbnail_exporter.vocabulary import JOB_OUTCOMES, is_asset_job
from tests.conftest import ROOT, Immich, make_immich, wait_for
from tests.faultkit import freeze, thaw
from tests.helpers import fetch, running_exporter, samples, value

PREFIX = "immich_bull"
QUEUE = "thumbnailGeneration"
JOB = "AssetGenerateThumbnails"
OPTS = {"removeOnComplete": True, "removeOnFail": False}
NODE_DIR = ROOT / "tests" / "node"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


# -- fixtures and helpers --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def immich_db(postgres: EmbeddedPostgres) -> Immich:
    """One seeded Immich database for the tests that only need the orphan check to have a database."""
    return asyncio.run(make_immich(postgres, "v1.136+"))


def make_config(valkey: EmbeddedValkey, immich: Immich, **overrides: Any) -> Config:
    env = {"REDIS_URL": valkey.url, "DB_URL": immich.dsn}
    flags = {"intervals.queues": "2s"}
    flags.update({k: str(v) for k, v in overrides.items()})
    return load_config(None, environ=env, overrides=flags)


@contextlib.asynccontextmanager
async def collection(config: Config) -> AsyncIterator[QueueCollection]:
    pg = PostgresSource(config.database)
    col = QueueCollection(config, pg)
    # Tests add queues between rounds: look for them every round.
    col.discovery_interval = 0.0
    try:
        yield col
    finally:
        await col.close()
        await pg.close()


@contextlib.asynccontextmanager
async def bull_queue(valkey: EmbeddedValkey, name: str = QUEUE) -> AsyncIterator[Queue]:
    queue = Queue(name, {"connection": valkey.url, "prefix": PREFIX})
    try:
        yield queue
    finally:
        await queue.close()


async def add_jobs(queue: Queue, asset_ids: list[str], name: str = JOB) -> list[str]:
    ids = []
    for asset in asset_ids:
        job = await queue.add(name, {"id": asset}, OPTS)
        ids.append(str(job.id))
    return ids


def flat(outcome: Outcome, now: float | None = None) -> Samples:
    """Every sample the outcome's parts would show at ``now`` (dynamic families included)."""
    now = time.time() if now is None else now
    fams: list[Metric] = []
    for part in outcome.parts:
        fams.extend(part.families)
        if part.dynamic is not None:
            fams.extend(part.dynamic(now))
    out: Samples = {}
    for fam in fams:
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def helps(outcome: Outcome) -> dict[str, str]:
    return {f.name: f.documentation for p in outcome.parts for f in p.families}


def needs(outcome: Outcome, metric: str) -> frozenset[str]:
    for part in outcome.parts:
        if any(f.name == metric for f in part.families):
            return part.needs
        if part.dynamic is not None and any(f.name == metric for f in part.dynamic(time.time())):
            return part.needs
    raise AssertionError(f"{metric} is in no part")


def jobs(s: Samples, state: str, queue: str = QUEUE) -> float | None:
    return value(s, "immich_queue_jobs", queue=queue, state=state)


def finished(s: Samples, outcome: str, job: str = JOB, queue: str = QUEUE) -> float:
    return value(s, "immich_jobs_finished_total", queue=queue, job_name=job, outcome=outcome) or 0.0


def accepted(s: Samples, job: str = JOB, queue: str = QUEUE) -> float:
    return value(s, "immich_jobs_accepted_total", queue=queue, job_name=job) or 0.0


def raw(valkey: EmbeddedValkey) -> redis.Redis:
    return redis.Redis.from_url(valkey.url, decode_responses=True)


def events_key(queue: str = QUEUE) -> str:
    return f"{PREFIX}:{queue}:events"


def new_ids(n: int) -> list[str]:
    return [str(uuid.uuid4()) for _ in range(n)]


async def collect_ok(col: QueueCollection) -> Outcome:
    outcome = await asyncio.wait_for(col.collect(), col.timeout + 1)
    assert outcome.sources.get("redis") is True, outcome.sources
    return outcome


# -- unit-sized checks -----------------------------------------------------------------------------


def test_worker_connection_names() -> None:
    b64 = {"dGh1bWJuYWlsR2VuZXJhdGlvbg==": QUEUE}
    queues = {QUEUE}
    assert worker_queue("immich_bull:dGh1bWJuYWlsR2VuZXJhdGlvbg==", PREFIX, b64, queues) == QUEUE
    assert worker_queue("immich_bull:dGh1bWJuYWlsR2VuZXJhdGlvbg==:w:microservices", PREFIX, b64, queues) == QUEUE
    assert worker_queue("immich_bull:thumbnailGeneration", PREFIX, b64, queues) == QUEUE
    assert worker_queue("immich_bull:thumbnailGeneration:w:x", PREFIX, b64, queues) == QUEUE
    assert worker_queue("immich_bull:other", PREFIX, b64, queues) is None
    assert worker_queue("other_bull:thumbnailGeneration", PREFIX, b64, queues) is None
    assert worker_queue("immich-thumbnail-exporter", PREFIX, b64, queues) is None


def test_asset_job_names() -> None:
    for name in ("AssetGenerateThumbnails", "generate-thumbnails", "generate-preview", "AssetEncodeVideo"):
        assert is_asset_job(name), name
    for name in ("PersonGenerateThumbnail", "AssetGenerateThumbnailsQueueAll", "FacialRecognition",
                 "AssetDelete", None, ""):
        assert not is_asset_job(name), name


# -- depth, pause, age, workers --------------------------------------------------------------------


@pytest.mark.asyncio
async def test_waiting_jobs_without_a_worker(valkey: EmbeddedValkey, immich_db: Immich) -> None:
    config = make_config(valkey, immich_db)
    async with collection(config) as col, bull_queue(valkey) as queue:
        await add_jobs(queue, immich_db.expected.asset_ids[:3])
        first = await collect_ok(col)
        s = flat(first)
        assert jobs(s, "waiting") == 3
        for state in ("active", "delayed", "prioritized", "paused", "failed", "completed"):
            assert jobs(s, state) == 0, state
        assert value(s, "immich_queue_paused", queue=QUEUE) == 0
        assert value(s, "immich_queue_workers", queue=QUEUE) == 0
        assert value(s, "immich_queue_stalled_jobs", queue=QUEUE) == 0
        assert value(s, "immich_queue_orphaned_jobs", queue=QUEUE) == 0
        # Jobs added before the first round are history: not counted.
        assert accepted(s) == 0

        # The age is computed when Prometheus scrapes, from the job's timestamp.
        now = time.time()
        age = value(flat(first, now), "immich_queue_oldest_job_age_seconds", queue=QUEUE, state="waiting")
        later = value(flat(first, now + 60), "immich_queue_oldest_job_age_seconds", queue=QUEUE, state="waiting")
        assert age is not None and later is not None
        assert 0 <= age < 30
        assert later == pytest.approx(age + 60)
        assert value(flat(first), "immich_queue_oldest_job_age_seconds", queue=QUEUE, state="active") == 0
        assert needs(first, "immich_queue_jobs") == {"redis"}
        assert needs(first, "immich_queue_oldest_job_age_seconds") == {"redis"}
        assert needs(first, "immich_queue_orphaned_jobs") == {"redis", "postgres"}
        assert needs(first, "immich_jobs_accepted") == {"redis"}

        await add_jobs(queue, immich_db.expected.asset_ids[3:5])
        s = flat(await collect_ok(col))
        assert jobs(s, "waiting") == 5
        assert accepted(s) == 2
        assert finished(s, "completed") == finished(s, "success") == 0


@pytest.mark.asyncio
async def test_paused_queue(valkey: EmbeddedValkey, immich_db: Immich) -> None:
    config = make_config(valkey, immich_db)
    async with collection(config) as col, bull_queue(valkey) as queue:
        await add_jobs(queue, immich_db.expected.asset_ids[:2])
        await queue.pause()
        s = flat(await collect_ok(col))
        assert value(s, "immich_queue_paused", queue=QUEUE) == 1
        # Waiting (or, with older BullMQ, paused) jobs are still there, and still age.
        assert (jobs(s, "waiting") or 0) + (jobs(s, "paused") or 0) == 2
        assert value(s, "immich_queue_oldest_job_age_seconds", queue=QUEUE, state="waiting") is not None
        await queue.resume()
        s = flat(await collect_ok(col))
        assert value(s, "immich_queue_paused", queue=QUEUE) == 0


# -- events: exact counters ------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_worker_outcomes_are_counted_exactly(valkey: EmbeddedValkey, immich_db: Immich) -> None:
    config = make_config(valkey, immich_db)
    ids = immich_db.expected.asset_ids
    plan = {ids[0]: "success", ids[1]: "success", ids[2]: "failed", ids[3]: "skipped", ids[4]: "throw",
            ids[5]: None, ids[6]: {"not": "a status"}}
    done = asyncio.Event()
    processed: list[str] = []

    async def process(job: Any, token: str) -> Any:
        asset = job.data["id"]
        processed.append(asset)
        if len(processed) == len(plan):
            done.set()
        result = plan[asset]
        if result == "throw":
            raise RuntimeError("thumbnail failed")
        return result

    async with collection(config) as col, bull_queue(valkey) as queue:
        await collect_ok(col)  # no queue yet: the queue appears while we watch, so all its events count
        await add_jobs(queue, list(plan)[:3])
        s = flat(await collect_ok(col))
        assert accepted(s) == 3
        worker = Worker(QUEUE, process, {"connection": valkey.url, "prefix": PREFIX})
        try:
            await wait_for(lambda: len(processed) >= 3, 15)
            mid = flat(await collect_ok(col))  # a round in the middle: nothing may be counted twice
            await add_jobs(queue, list(plan)[3:])
            await asyncio.wait_for(done.wait(), 15)
            await wait_for(lambda: raw(valkey).llen(f"{PREFIX}:{QUEUE}:active") == 0, 10)
            s = flat(await collect_ok(col))
            assert value(s, "immich_queue_workers", queue=QUEUE) >= 1  # Python bullmq: one per connection
        finally:
            await worker.close()
        assert sum(finished(mid, o) for o in JOB_OUTCOMES) <= 3
        assert accepted(s) == 7
        # A status passed through is the outcome; None (Immich's processor) and a value that is no status
        # are "completed": nothing was reported. A thrown error is "error".
        assert finished(s, "success") == 2
        assert finished(s, "completed") == 2
        assert finished(s, "failed") == 1
        assert finished(s, "skipped") == 1
        assert finished(s, "error") == 1
        assert value(s, "immich_job_wait_seconds_count", queue=QUEUE, job_name=JOB) == 7
        assert value(s, "immich_job_run_seconds_count", queue=QUEUE, job_name=JOB) == 7
        assert value(s, "immich_job_run_seconds_bucket", queue=QUEUE, job_name=JOB, le="+Inf") == 7
        assert jobs(s, "failed") == 1  # removeOnFail: false keeps the thrown one
        assert jobs(s, "completed") == 0  # removeOnComplete: true
        assert value(s, "immich_exporter_queue_events_lost_total", queue=QUEUE) == 0
        # Further rounds with no new events change nothing.
        again = flat(await collect_ok(col))
        for key, v in s.items():
            if key[0].startswith(("immich_jobs_", "immich_job_")):
                assert again[key] == v, key


@pytest.mark.asyncio
async def test_restart_counts_nothing_twice(valkey: EmbeddedValkey, immich_db: Immich) -> None:
    config = make_config(valkey, immich_db)
    ids = immich_db.expected.asset_ids
    async with bull_queue(valkey) as queue:
        await add_jobs(queue, ids[:1])
        async with collection(config) as first:
            await collect_ok(first)
            await add_jobs(queue, ids[1:4])
            s1 = flat(await collect_ok(first))
            assert accepted(s1) == 3
        # A new collection (an exporter restart) starts at the stream's end: the 4 events already in the
        # stream are not counted again; its counters start at 0.
        async with collection(config) as second:
            s2 = flat(await collect_ok(second))
            assert accepted(s2) == 0
            await add_jobs(queue, ids[4:6])
            s2 = flat(await collect_ok(second))
            assert accepted(s2) == 2
            assert accepted(s1) + accepted(s2) == 6 - 1  # the job before the first start is history


@pytest.mark.asyncio
async def test_trimmed_stream_counts_lost_events(valkey: EmbeddedValkey, immich_db: Immich) -> None:
    config = make_config(valkey, immich_db)
    client = raw(valkey)

    def added_then_trimmed(n: int, maxlen: int) -> None:
        """``n`` jobs' entries (added + waiting, as BullMQ writes them) and a trim, in one transaction: the
        reader, woken only once it is done, can never have read what was trimmed."""
        with client.pipeline(transaction=True) as pipe:
            for job_id in new_ids(n):
                pipe.xadd(events_key(), {"event": "added", "jobId": job_id, "name": JOB})
                pipe.xadd(events_key(), {"event": "waiting", "jobId": job_id})
            pipe.xtrim(events_key(), maxlen=maxlen, approximate=False)
            pipe.execute()

    async with collection(config) as col, bull_queue(valkey) as queue:
        await collect_ok(col)
        await add_jobs(queue, new_ids(5))  # 10 entries: added + waiting per job
        s = flat(await collect_ok(col))
        assert accepted(s) == 5
        assert value(s, "immich_exporter_queue_events_lost_total", queue=QUEUE) == 0

        added_then_trimmed(10, 4)  # 20 unread entries, of which 16 are trimmed
        s = flat(await collect_ok(col))
        assert value(s, "immich_exporter_queue_events_lost_total", queue=QUEUE) == 16
        assert accepted(s) == 5 + 2  # the two "added" among the 4 entries left

        added_then_trimmed(3, 0)  # 6 unread entries, all trimmed
        s = flat(await collect_ok(col))
        assert value(s, "immich_exporter_queue_events_lost_total", queue=QUEUE) == 16 + 6
        assert accepted(s) == 7

        await add_jobs(queue, new_ids(1))
        s = flat(await collect_ok(col))
        assert accepted(s) == 8
        assert value(s, "immich_exporter_queue_events_lost_total", queue=QUEUE) == 22


@pytest.mark.asyncio
async def test_recreated_stream_is_followed_from_its_start(valkey: EmbeddedValkey, immich_db: Immich) -> None:
    config = make_config(valkey, immich_db)
    client = raw(valkey)
    async with collection(config) as col, bull_queue(valkey) as queue:
        await add_jobs(queue, new_ids(4))
        await collect_ok(col)
        await add_jobs(queue, new_ids(3))
        assert accepted(flat(await collect_ok(col))) == 3
        # Redis loses everything (restart without persistence, FLUSHALL); Immich queues new jobs.
        client.flushall()
        await add_jobs(queue, new_ids(2))
        s = flat(await collect_ok(col))
        assert accepted(s) == 5
        assert value(s, "immich_exporter_queue_events_lost_total", queue=QUEUE) == 0
        client.flushall()
        s = flat(await collect_ok(col))  # a round sees the stream gone ...
        await add_jobs(queue, new_ids(1))  # ... and the new one from its first entry
        s = flat(await collect_ok(col))
        assert accepted(s) == 6


@pytest.mark.asyncio
async def test_malformed_and_unknown_events(valkey: EmbeddedValkey, immich_db: Immich) -> None:
    config = make_config(valkey, immich_db)
    client = raw(valkey)
    async with collection(config) as col, bull_queue(valkey) as queue:
        await collect_ok(col)
        await add_jobs(queue, new_ids(1))
        client.xadd(events_key(), {"no": "event field"})
        client.xadd(events_key(), {"event": "completed", "returnvalue": '"success"'})  # no jobId
        client.xadd(events_key(), {"event": "completed", "jobId": "9999", "returnvalue": "not json"})
        client.xadd(events_key(), {"event": "completed", "jobId": "9997"})  # no return value at all
        client.xadd(events_key(), {"event": "failed", "jobId": "9998", "failedReason": "x"})
        client.xadd(events_key(), {"event": "something-new", "jobId": "1"})
        outcome = await collect_ok(col)
        s = flat(outcome)
        assert accepted(s) == 1
        assert finished(s, "completed", job="unknown") == 2
        assert finished(s, "error", job="unknown") == 1
        assert col.events is not None and col.events.stats.malformed == 2


# -- stalled and orphaned --------------------------------------------------------------------------

STALL_WORKER = textwrap.dedent("""
    import asyncio, sys
    from bullmq import Worker

    async def process(job, token):
        print("started", flush=True)
        await asyncio.sleep(3600)

    async def main():
        Worker(sys.argv[2], process, {"connection": sys.argv[1], "prefix": sys.argv[3],
                                      "lockDuration": 1500, "stalledInterval": 3600000})
        await asyncio.sleep(3600)

    asyncio.run(main())
""")


def start_stall_worker(valkey: EmbeddedValkey) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", STALL_WORKER, valkey.url, QUEUE, PREFIX],
        stdout=subprocess.PIPE, text=True, start_new_session=True,
    )


@pytest.mark.asyncio
async def test_worker_killed_mid_job_is_stalled(valkey: EmbeddedValkey, immich_db: Immich) -> None:
    config = make_config(valkey, immich_db)
    async with collection(config) as col, bull_queue(valkey) as queue:
        await add_jobs(queue, immich_db.expected.asset_ids[:2])
        proc = start_stall_worker(valkey)
        try:
            assert proc.stdout is not None
            line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 20)
            assert line.strip() == "started"
            s = flat(await collect_ok(col))
            assert jobs(s, "active") == 1
            assert value(s, "immich_queue_stalled_jobs", queue=QUEUE) == 0  # the live worker holds the lock
            assert value(s, "immich_queue_workers", queue=QUEUE) >= 1
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(10)

        async def stalled() -> bool:
            s = flat(await collect_ok(col))
            return value(s, "immich_queue_stalled_jobs", queue=QUEUE) == 1

        await wait_for(stalled, 15, 0.5)  # the 1.5 s lock expires and nobody renews it
        s = flat(await collect_ok(col))
        assert jobs(s, "active") == 1
        assert jobs(s, "waiting") == 1
        assert value(s, "immich_queue_workers", queue=QUEUE) == 0
        active_age = value(s, "immich_queue_oldest_job_age_seconds", queue=QUEUE, state="active")
        assert active_age is not None and active_age > 1


@pytest.mark.asyncio
async def test_orphaned_jobs(valkey: EmbeddedValkey, immich_factory: Callable[..., Any]) -> None:
    immich: Immich = await immich_factory()
    real = immich.expected.asset_ids[:3]
    missing = new_ids(2)
    config = make_config(valkey, immich)
    async with collection(config) as col, bull_queue(valkey) as queue:
        await add_jobs(queue, real + missing)
        await add_jobs(queue, new_ids(1), name="PersonGenerateThumbnail")  # a person id: not an asset
        await add_jobs(queue, ["not-a-uuid"])
        outcome = await collect_ok(col)
        s = flat(outcome)
        assert outcome.sources["postgres"] is True
        assert value(s, "immich_queue_orphaned_jobs", queue=QUEUE) == 2
        assert "Sampled" not in helps(outcome)["immich_queue_orphaned_jobs"]

    # A small sample says so in the help text.
    small = make_config(valkey, immich, **{"redis.orphan_sample": 3})
    async with collection(small) as col:
        outcome = await collect_ok(col)
        assert "Sampled" in helps(outcome)["immich_queue_orphaned_jobs"]
        orphaned = value(flat(outcome), "immich_queue_orphaned_jobs", queue=QUEUE)
        assert orphaned is not None and orphaned <= 2


@pytest.mark.asyncio
async def test_busy_database_is_not_an_outage(valkey: EmbeddedValkey, immich_db: Immich) -> None:
    config = make_config(valkey, immich_db)
    async with collection(config) as col, bull_queue(valkey) as queue:
        await add_jobs(queue, new_ids(2) + immich_db.expected.asset_ids[:1])
        outcome = await collect_ok(col)
        assert value(flat(outcome), "immich_queue_orphaned_jobs", queue=QUEUE) == 2
        # The file check holds every pooled connection for its whole scan.
        async with col.pg.connection(), col.pg.connection():
            outcome = await collect_ok(col)
            assert "postgres" not in outcome.sources
            assert outcome.error is None
            assert value(flat(outcome), "immich_queue_orphaned_jobs", queue=QUEUE) == 2  # the last check's
            col._last_orphans = (time.monotonic() - 3600, {QUEUE: 2})
            outcome = await collect_ok(col)
            assert value(flat(outcome), "immich_queue_orphaned_jobs", queue=QUEUE) is None  # too old to show
        outcome = await collect_ok(col)
        assert outcome.sources["postgres"] is True


@pytest.mark.asyncio
async def test_orphan_check_without_database(valkey: EmbeddedValkey, immich_db: Immich) -> None:
    config = load_config(None, environ={"REDIS_URL": valkey.url, "DB_URL": "postgresql://nobody@127.0.0.1:1/x"},
                         overrides={"intervals.queues": "2s", "database.connect_timeout": "1s"})
    async with collection(config) as col, bull_queue(valkey) as queue:
        await add_jobs(queue, new_ids(2))
        outcome = await collect_ok(col)
        assert isinstance(outcome.sources["postgres"], str)
        s = flat(outcome)
        assert jobs(s, "waiting") == 2  # the Redis-only series are still there
        assert value(s, "immich_queue_orphaned_jobs", queue=QUEUE) is None


# -- Node BullMQ, as Immich runs it ----------------------------------------------------------------


def node_modules() -> Path:
    path = NODE_DIR / "node_modules" / "bullmq"
    if not path.exists():
        pytest.fail(
            f"{path} is missing: run `npm ci --prefix tests/node` first (the test command does this); "
            "the Node BullMQ worker proves that Immich's base64-named worker connections are counted"
        )
    return path


@contextlib.contextmanager
def node_worker(valkey: EmbeddedValkey, **env: str) -> Iterator[subprocess.Popen[str]]:
    node_modules()
    full = {**os.environ, "REDIS_URL": valkey.url, "QUEUE": QUEUE, "PREFIX": PREFIX, **env}
    proc = subprocess.Popen(["node", str(NODE_DIR / "worker.mjs")], env=full, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        yield proc
    finally:
        stop_worker(proc)


def stop_worker(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM (the worker closes itself), then SIGKILL if it takes more than 10 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


async def read_line(proc: subprocess.Popen[str], timeout: float = 20) -> str:
    assert proc.stdout is not None
    line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), timeout)
    if not line and proc.stderr is not None:
        raise AssertionError(f"node worker exited: {proc.stderr.read()}")
    return line.strip()


@pytest.mark.asyncio
async def test_node_worker_is_counted(valkey: EmbeddedValkey, immich_db: Immich) -> None:
    config = make_config(valkey, immich_db)
    async with collection(config) as col, bull_queue(valkey) as queue:
        await add_jobs(queue, new_ids(1))
        await collect_ok(col)
        with node_worker(valkey, RETURN_VALUE='"skipped"', WORKER_NAME="microservices") as proc:
            assert await read_line(proc) == "ready"
            names = [c["name"] for c in raw(valkey).client_list()]
            assert "immich_bull:dGh1bWJuYWlsR2VuZXJhdGlvbg==:w:microservices" in names
            s = flat(await collect_ok(col))
            assert value(s, "immich_queue_workers", queue=QUEUE) == 1
            await add_jobs(queue, new_ids(1))
            assert (await read_line(proc)).startswith("done")
            assert (await read_line(proc)).startswith("done")
            await wait_for(lambda: raw(valkey).llen(f"{PREFIX}:{QUEUE}:active") == 0, 10)
            s = flat(await collect_ok(col))
            # Both finished jobs count. The one queued before the first round has no "added" event we
            # read: its name comes from its hash if we saw it start, else it is job_name="unknown".
            assert finished(s, "skipped") + finished(s, "skipped", job="unknown") == 2
            assert finished(s, "skipped") >= 1
            assert accepted(s) == 1
        with node_worker(valkey) as unnamed:  # no worker name: "<prefix>:<base64>" alone
            assert await read_line(unnamed) == "ready"
            s = flat(await collect_ok(col))
            assert value(s, "immich_queue_workers", queue=QUEUE) == 1
        s = flat(await collect_ok(col))
        assert value(s, "immich_queue_workers", queue=QUEUE) == 0


@pytest.mark.asyncio
async def test_immich_v3_integrity_queue_and_named_worker(valkey: EmbeddedValkey, immich_db: Immich) -> None:
    """Immich v3's integrityCheck queue is followed even without the meta key SCAN looks for, and a
    named Node worker (``<prefix>:<base64(queue)>:w:<name>``) running several jobs at once counts once."""
    integrity = "integrityCheck"
    raw(valkey).lpush(f"{PREFIX}:{integrity}:wait", "1")  # no meta key: found by its known name only
    config = make_config(valkey, immich_db)
    async with collection(config) as col:
        s = flat(await collect_ok(col))
        assert jobs(s, "waiting", queue=integrity) == 1
        assert value(s, "immich_queue_workers", queue=integrity) == 0
        with node_worker(valkey, QUEUE=integrity, WORKER_NAME="microservices", CONCURRENCY="5") as proc:
            assert await read_line(proc) == "ready"
            b64 = "aW50ZWdyaXR5Q2hlY2s="
            names = [c["name"] for c in raw(valkey).client_list()]
            assert names.count(f"{PREFIX}:{b64}:w:microservices") == 1, names
            s = flat(await collect_ok(col))
            assert value(s, "immich_queue_workers", queue=integrity) == 1
            assert value(s, "immich_queue_workers", queue=QUEUE) is None  # not a queue here


# -- Redis settings, permissions and outages -------------------------------------------------------


@pytest.mark.asyncio
async def test_acl_user_password_file_and_client_list_refused(
    valkey: EmbeddedValkey, immich_db: Immich, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    admin = raw(valkey)
    user = f"exporter{uuid.uuid4().hex[:8]}"
    admin.acl_setuser(user, enabled=True, passwords=["+first"], keys=["*"], commands=["+@all", "-client|list"])
    secret = tmp_path / "redis-password"
    secret.write_text("first\n")
    try:
        config = load_config(None, environ={
            "REDIS_HOSTNAME": "127.0.0.1", "REDIS_PORT": str(valkey.port), "REDIS_USERNAME": user,
            "REDIS_PASSWORD_FILE": str(secret), "DB_URL": immich_db.dsn,
        }, overrides={"intervals.queues": "2s"})
        caplog.set_level(logging.WARNING, logger="immich_thumbnail_exporter.sources.bullmq")
        async with collection(config) as col, bull_queue(valkey) as queue:
            await add_jobs(queue, new_ids(1))
            s = flat(await collect_ok(col))
            assert jobs(s, "waiting") == 1
            assert value(s, "immich_queue_workers", queue=QUEUE) is None  # refused: left out
            await collect_ok(col)
            refusals = [r for r in caplog.records if "CLIENT LIST" in r.getMessage()]
            assert len(refusals) == 1, [r.getMessage() for r in refusals]

            # Rotate the password: the file is read again when the client reconnects.
            admin.acl_setuser(user, enabled=True, passwords=["-first", "+second"])
            secret.write_text("second\n")
            admin.execute_command("CLIENT", "KILL", "USER", user)
            states = [(await col.collect()).sources["redis"] for _ in range(2)]
            # The first round after the kill may only find its connection closed; the next reconnects.
            assert states[-1] is True, states

            # REDIS_URL naming the user, the password from REDIS_PASSWORD_FILE.
            url_config = load_config(None, environ={
                "REDIS_URL": f"redis://{user}@127.0.0.1:{valkey.port}/0", "REDIS_PASSWORD_FILE": str(secret),
                "DB_URL": immich_db.dsn,
            }, overrides={"intervals.queues": "2s"})
            async with collection(url_config) as by_url:
                assert jobs(flat(await collect_ok(by_url)), "waiting") == 1

            secret.write_text("wrong\n")
            admin.execute_command("CLIENT", "KILL", "USER", user)
            states = [(await col.collect()).sources["redis"] for _ in range(2)]
            assert "authentication failed" in str(states[-1]), states
            assert "wrong" not in str(states)
    finally:
        admin.acl_deluser(user)


@pytest.mark.asyncio
async def test_unreachable_and_frozen_redis(valkey: EmbeddedValkey, immich_db: Immich) -> None:
    closed = load_config(None, environ={"REDIS_HOSTNAME": "127.0.0.1", "REDIS_PORT": "1", "DB_URL": immich_db.dsn},
                         overrides={"intervals.queues": "2s"})
    async with collection(closed) as col:
        outcome = await col.collect()
        assert "connection refused" in str(outcome.sources["redis"])
        assert outcome.parts == ()
        assert outcome.error

    config = make_config(valkey, immich_db, **{"redis.timeout": "1s"})
    async with collection(config) as col, bull_queue(valkey) as queue:
        await add_jobs(queue, new_ids(1))
        await collect_ok(col)
        freeze(valkey)
        try:
            t0 = time.monotonic()
            outcome = await col.collect()
            assert time.monotonic() - t0 < col.timeout + 0.5
            assert isinstance(outcome.sources["redis"], str)
        finally:
            thaw(valkey)
        await wait_for(lambda: _redis_up(col), 10, 0.2)


@pytest.fixture
def socket_valkey(tmp_path: Path) -> Iterator[Path]:
    """A Valkey listening on a unix socket only (REDIS_SOCKET)."""
    sock = tmp_path / "valkey.sock"
    server = subprocess.Popen(
        [valkey_binary(), "--port", "0", "--unixsocket", str(sock), "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        yield sock
    finally:
        server.terminate()
        server.wait(10)


@pytest.mark.asyncio
async def test_unix_socket(immich_db: Immich, socket_valkey: Path) -> None:
    config = load_config(None, environ={"REDIS_SOCKET": str(socket_valkey), "REDIS_DBINDEX": "2",
                                        "DB_URL": immich_db.dsn})
    client = redis.Redis(unix_socket_path=str(socket_valkey), db=2)
    client.hset(f"{PREFIX}:{QUEUE}:meta", "opts.maxLenEvents", "10000")
    client.lpush(f"{PREFIX}:{QUEUE}:wait", "1", "2")
    async with collection(config) as col:
        outcome = await collect_ok(col)
        assert jobs(flat(outcome), "waiting") == 2


async def _redis_up(col: QueueCollection) -> bool:
    return (await col.collect()).sources.get("redis") is True


async def _exporter_connections(valkey: EmbeddedValkey, name: str = CLIENT_NAME) -> int:
    """The exporter's connections named ``name`` in CLIENT LIST."""
    client = aioredis.Redis.from_url(valkey.url, decode_responses=True)
    try:
        return sum(1 for c in await client.client_list() if c.get("name") == name)
    finally:
        await client.aclose()


@pytest.mark.asyncio
async def test_redis_outage_under_a_running_exporter(valkey: EmbeddedValkey, immich_db: Immich) -> None:
    env = {"REDIS_URL": valkey.url, "DB_URL": immich_db.dsn}
    flags = {"intervals.queues": "1s", "collectors.files": "false", "redis.timeout": "1s"}
    async with bull_queue(valkey) as queue:
        await add_jobs(queue, new_ids(2))
    slowest = 0.0

    async def scrape(base: str) -> Samples:
        nonlocal slowest
        t0 = time.monotonic()
        status, text, _ = await fetch(f"{base}/metrics")
        slowest = max(slowest, time.monotonic() - t0)
        assert status == 200
        return samples(text)

    try:
        async with running_exporter(flags, env) as (ex, base):
            async def redis_up(expected: float) -> bool:
                s = await scrape(base)
                return value(s, "immich_exporter_source_up", source="redis") == expected

            await wait_for(lambda: redis_up(1.0), 20, 0.2)
            await wait_for(lambda: _has_waiting(scrape(base), 2), 10, 0.2)
            tasks_before = len(asyncio.all_tasks())

            valkey.stop()
            await wait_for(lambda: redis_up(0.0), 20, 0.2)
            s = await scrape(base)
            assert jobs(s, "waiting") is None  # never shown as current while Redis is down
            for _ in range(5):  # several failing rounds (each a new result), scraped: nothing piles up
                await next_round(ex, "queues")
                await scrape(base)
            assert len(asyncio.all_tasks()) <= tasks_before + 2

            valkey.start()  # same port, empty (no persistence)
            async with bull_queue(valkey) as queue:
                await add_jobs(queue, new_ids(3))
            await wait_for(lambda: redis_up(1.0), 20, 0.2)
            await wait_for(lambda: _has_waiting(scrape(base), 3), 20, 0.2)
            assert await _exporter_connections(valkey) <= 4
            # The restarted server lost its streams; the new one is followed from its start.
            await wait_for(lambda: _accepted_is(scrape(base), 3), 10, 0.2)
            assert len(asyncio.all_tasks()) <= tasks_before + 2
            s = await scrape(base)
            assert value(s, "immich_exporter_collection_success", collection="queues") == 1
    finally:
        if not valkey.running:
            valkey.start()
    assert slowest < 1.0, f"/metrics took {slowest:.2f}s at worst"


async def next_round(ex: Any, collection: str) -> None:
    """Wait until the collection publishes its next round (a round counter, not a sleep)."""
    last = ex.store.result(collection)
    await wait_for(lambda: ex.store.result(collection) is not last, 20, 0.05)


async def _accepted_is(pending: Any, n: int) -> bool:
    return accepted(await pending) == n


async def _has_waiting(pending: Any, n: int) -> bool:
    s = await pending
    return jobs(s, "waiting") == n


@pytest.mark.asyncio
async def test_serve_with_remediation_holds_one_event_stream_connection(
    valkey: EmbeddedValkey, immich_db: Immich, tmp_path: Path
) -> None:
    """With remediation enabled (face thumbnails too), ``serve`` holds one event-stream connection, whatever
    the number of followers: the job counters, job verification and regeneration's two watches (asset
    jobs, ``PersonGenerateThumbnail`` jobs) share one reader."""
    env = {"REDIS_URL": valkey.url, "DB_URL": immich_db.dsn}
    flags = {
        "intervals.queues": "1s", "collectors.files": "false", "media.root": immich_db.media,
        "immich.url": "http://127.0.0.1:1", "immich.api_key": "not-used", "remediation.enabled": True,
        "remediation.interval": "1s", "remediation.state_dir": str(tmp_path / "state"),
        "remediation.kinds": "thumbnail, preview, person",
    }
    async with bull_queue(valkey) as queue:
        await add_jobs(queue, new_ids(1))
        async with running_exporter(flags, env) as (ex, base):
            readers = {id(c.events) for c in ex.runner.collections if getattr(c, "events", None) is not None}
            assert len(readers) == 1, [c.name for c in ex.runner.collections]
            reader = next(c.events for c in ex.runner.collections if getattr(c, "events", None) is not None)
            # Counters, job verification, regeneration's two watches: four followers of the one reader.
            await wait_for(lambda: reader.subscribers >= 4, 20, 0.1)
            await wait_for(lambda: reader.stats.steps >= 5, 20, 0.1)
            # Everything added is delivered (to every follower) through that one connection.
            await add_jobs(queue, new_ids(2))
            await wait_for(lambda: _accepted_is(fetch_samples(base), 2), 20, 0.2)
            assert await _exporter_connections(valkey, EVENTS_CLIENT_NAME) == 1
            assert reader.stats.entries >= 4


async def fetch_samples(base: str) -> Samples:
    status, text, _ = await fetch(f"{base}/metrics")
    assert status == 200
    return samples(text)


# -- check-config ----------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_check_connections(valkey: EmbeddedValkey, immich_db: Immich, capsys: pytest.CaptureFixture[str]) -> None:
    async with bull_queue(valkey) as queue:
        await add_jobs(queue, new_ids(1))
    assert await check_connections(make_config(valkey, immich_db)) == []
    out = capsys.readouterr().out
    assert "ok: redis" in out and "1 BullMQ queues" in out

    bad = load_config(None, environ={"REDIS_URL": "redis://127.0.0.1:1/0", "DB_URL": immich_db.dsn})
    problems = await check_connections(bad)
    assert len(problems) == 1 and problems[0].startswith("redis: ") and "connection refused" in problems[0]

    none = load_config(None, environ={"DB_URL": immich_db.dsn})
    assert await check_connections(none) == []


def test_check_config_prints_no_python_warning(valkey: EmbeddedValkey, immich_db: Immich) -> None:
    """check-config's Redis path, run with every warning an error: no UserWarning from the client."""
    env = {**os.environ, "REDIS_URL": valkey.url, "DB_URL": immich_db.dsn, "PYTHONWARNINGS": "error"}
    proc = subprocess.run([sys.executable, "-W", "error", "-m", "immich_thumbnail_exporter", "check-config"],
                          env=env, capture_output=True, text=True, timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "ok: redis" in output
    assert "Warning" not in output and "Traceback" not in output, output
