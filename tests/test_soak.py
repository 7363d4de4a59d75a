"""Load and soak: 100 concurrent scrapers for a minute while the collections run thousands of rounds.

The exporter runs in this process; the scrapers run in another (``tests/loadgen.py``), on loopback, so
their sockets are not counted as ours. After a warm-up, memory (RSS), file descriptors, asyncio tasks,
threads, PostgreSQL sessions and Redis connections must stay flat within a tolerance.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any

import pytest

from immich_thumbnail_exporter.app import Exporter
from immich_thumbnail_exporter.demo.embedded import EmbeddedValkey
from immich_thumbnail_exporter.demo.seed import Plan
from tests.conftest import ROOT, Immich
from tests.faultkit import Resources, exporter_connections, until, walker_children, write_report
from tests.helpers import fetch, running_exporter
from tests.test_faults import redis_connections

pytestmark = pytest.mark.asyncio

SCRAPERS = 100
SECONDS = 60.0
WARM_UP = 15.0
POOL = 2
# Growth allowed after the warm-up. RSS: the allocator keeps what the busiest moment needed, and
# 100 in-flight renders are not all equally big; a leak of one object per round would be far more.
RSS_SLACK = 24 * 1024 * 1024
FD_SLACK = 4
TASK_SLACK = 6
THREAD_SLACK = 2
ROUNDS_SECONDS = 30.0
ROUNDS_MAX = 6000
ROUNDS_WARM_UP_SECONDS = 5.0  # before the baseline sample
ROUNDS_RSS_SLACK = 8 * 1024 * 1024
REPORT: list[str] = []


@dataclass(frozen=True)
class Sample:
    t: float
    res: Resources
    pg: int
    redis: int


async def test_scrapers_and_rounds_without_growth(immich_factory: Any, valkey: EmbeddedValkey) -> None:
    from bullmq import Queue

    imm: Immich = await immich_factory("v1.136+", Plan(assets=60))
    queue = Queue("thumbnailGeneration", {"connection": valkey.url, "prefix": "immich_bull"})
    for _ in range(3):
        await queue.add("AssetGenerateThumbnails", {"id": str(uuid.uuid4())}, {"removeOnComplete": True})
    await queue.close()
    flags = {
        "media.root": imm.media,
        "database.pool_size": POOL,
        # The background loops run once at start; this test drives the rounds itself.
        "intervals.inventory": "1h", "intervals.files": "1h", "intervals.queues": "1h",
    }
    env = {**imm.env(), "REDIS_URL": valkey.url}
    async with running_exporter(flags, env=env) as (ex, url):
        status, _, _ = await fetch(url + "/metrics")
        assert status == 200
        idle = Resources.now()
        load, series = await _under_load(ex, imm, valkey, url)
        # The scrapers are gone: their sockets and handler tasks must be too.
        await until(lambda: Resources.now().fds <= idle.fds and Resources.now().tasks <= idle.tasks, 15)
        after_load = Resources.now()
        rounds, soak = await _rounds(ex, imm, valkey)
    _check_load(load, series, idle, after_load)
    _check_rounds(rounds, soak, after_load)


async def _sample(imm: Immich, valkey: EmbeddedValkey, t0: float) -> Sample:
    return Sample(time.monotonic() - t0, Resources.now(), await exporter_connections(imm.postgres, imm.database),
                  await redis_connections(valkey))


async def _under_load(
    ex: Exporter, imm: Immich, valkey: EmbeddedValkey, url: str
) -> tuple[dict[str, Any], list[Sample]]:
    """100 scrapers for a minute; the collections keep running rounds meanwhile."""
    load = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / "tests" / "loadgen.py"), url + "/metrics", str(SCRAPERS), str(SECONDS),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    series: list[Sample] = []
    t0 = time.monotonic()
    next_sample = 0.0
    failures: list[str] = []
    waiting = asyncio.ensure_future(load.communicate())
    while not waiting.done():
        for collection in ex.runner.collections:
            result = await ex.runner.run_once(collection)
            if not result.success and len(failures) < 5:
                failures.append(f"{collection.name}: {result.error}")
        if time.monotonic() - t0 >= next_sample:
            next_sample = time.monotonic() - t0 + 2.0
            series.append(await _sample(imm, valkey, t0))
    out, err = await waiting
    assert load.returncode == 0, err.decode()[-2000:]
    assert not failures, failures
    return json.loads(out), series


async def _rounds(ex: Exporter, imm: Immich, valkey: EmbeddedValkey) -> tuple[dict[str, int], list[Sample]]:
    """Collection rounds back to back, each collection in its own loop as under serve: thousands."""
    rounds = {c.name: 0 for c in ex.runner.collections}
    series: list[Sample] = []
    walkers: list[int] = []
    t0 = time.monotonic()

    async def loop(collection: Any) -> None:
        while time.monotonic() - t0 < ROUNDS_SECONDS and sum(rounds.values()) < ROUNDS_MAX:
            result = await ex.runner.run_once(collection)
            assert result.success, result.error
            rounds[collection.name] += 1

    async def sampler() -> None:
        await asyncio.sleep(ROUNDS_WARM_UP_SECONDS)
        while time.monotonic() - t0 < ROUNDS_SECONDS and sum(rounds.values()) < ROUNDS_MAX:
            series.append(await _sample(imm, valkey, t0))
            walkers.append(len(walker_children()))
            await asyncio.sleep(2.0)

    await asyncio.gather(sampler(), *(loop(c) for c in ex.runner.collections))
    # One scan's helper processes at a time, and none left behind once the rounds stop.
    assert max(walkers, default=0) <= 2, walkers
    await until(lambda: not walker_children(), 10)
    series.append(await _sample(imm, valkey, t0))
    return rounds, series


def _fmt(series: list[Sample]) -> str:
    return "; ".join(
        f"{s.t:.0f}s {s.res.rss / 2**20:.1f}MiB {s.res.fds}fd {s.res.tasks}t {s.res.threads}th {s.pg}pg {s.redis}r"
        for s in series
    )


def _check_load(stats: dict[str, Any], series: list[Sample], idle: Resources, after: Resources) -> None:
    warm = [s for s in series if s.t >= WARM_UP]
    assert len(warm) >= 5, series
    base, peak_rss = warm[0].res.rss, max(s.res.rss for s in warm)
    lines = [
        f"{SCRAPERS} scrapers for {SECONDS:.0f}s: {stats['requests']} scrapes "
        f"({stats['requests'] / SECONDS:.0f}/s), {stats['errors']} errors, p50 {stats['p50'] * 1000:.1f} ms, "
        f"p99 {stats['p99'] * 1000:.1f} ms, max {stats['max'] * 1000:.1f} ms",
        f"rss after warm-up {base / 2**20:.1f} MiB, peak {peak_rss / 2**20:.1f} MiB; idle before {idle}, "
        f"after the scrapers left {after}",
        f"postgres sessions max {max(s.pg for s in series)} (pool {POOL}), redis connections max "
        f"{max(s.redis for s in series)}",
        "samples: " + _fmt(series),
    ]
    REPORT.extend(lines)
    write_report("soak", REPORT)
    assert stats["errors"] == 0, stats["first_errors"]
    assert set(stats["statuses"]) == {"200"}, stats["statuses"]
    assert stats["p99"] < 1.0, stats
    assert peak_rss - base <= RSS_SLACK, lines
    # While scraped: one socket and at most a couple of tasks per scraper, and nothing more over time.
    assert max(s.res.fds for s in warm) <= idle.fds + SCRAPERS + FD_SLACK, lines
    assert max(s.res.tasks for s in warm) <= idle.tasks + 2 * SCRAPERS + TASK_SLACK, lines
    assert max(s.res.threads for s in warm) <= warm[0].res.threads + THREAD_SLACK, lines
    assert max(s.pg for s in series) <= POOL, lines
    assert max(s.redis for s in series) <= 4, lines


def _check_rounds(rounds: dict[str, int], series: list[Sample], idle: Resources) -> None:
    """``idle``: the process before the rounds. While three rounds are in flight there are a few more
    tasks, pipes (the walker processes') and executor threads; once they stop, exactly as many as before."""
    base, end = series[0], series[-1]
    lines = [
        "rounds: " + ", ".join(f"{k} {v}" for k, v in rounds.items()) + f" ({sum(rounds.values())} in all) "
        f"in {end.t:.0f}s",
        f"after {ROUNDS_WARM_UP_SECONDS:.0f}s -> end: rss {base.res.rss / 2**20:.1f} -> {end.res.rss / 2**20:.1f} MiB, "
        f"fds {base.res.fds} -> {end.res.fds}, tasks {base.res.tasks} -> {end.res.tasks}, threads "
        f"{base.res.threads} -> {end.res.threads}, pg {base.pg} -> {end.pg}, redis {base.redis} -> {end.redis}",
        "samples: " + _fmt(series),
    ]
    REPORT.extend(lines)
    write_report("soak", REPORT)
    assert sum(rounds.values()) >= 2000, lines
    assert end.res.rss - base.res.rss <= ROUNDS_RSS_SLACK, lines
    assert max(s.res.fds for s in series) <= idle.fds + 8, lines  # two walkers' pipes at most
    assert max(s.res.tasks for s in series) <= idle.tasks + 3 * TASK_SLACK, lines
    assert max(s.res.threads for s in series) <= idle.threads + 6, lines  # the executor's cap
    assert (end.res.fds, end.res.tasks) == (idle.fds, idle.tasks), (lines, idle)
    assert end.res.threads <= idle.threads + THREAD_SLACK, (lines, idle)
    assert max(s.pg for s in series) <= POOL and max(s.redis for s in series) <= 4, lines


# -- a long run of thumbnail jobs: the follower and the checker stay bounded ----------------------------

JOBS_SECONDS = 45.0
JOBS_PER_SECOND = 150
JOBS_WARM_UP = 10.0
JOBS_RSS_SLACK = 12 * 1024 * 1024
MAX_TRACKED = 300  # small, so the run goes through the map many times over (and evicts)

PRODUCER = """
import asyncio, json, sys, time
from bullmq import Queue

async def main():
    url, seconds, rate, ids = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
    queue = Queue("thumbnailGeneration", {"connection": url, "prefix": "immich_bull"})
    opts = {"attempts": 3, "removeOnComplete": True, "removeOnFail": False}
    added, t0 = 0, time.monotonic()
    while time.monotonic() - t0 < seconds:
        batch = [{"name": "AssetGenerateThumbnails", "data": {"id": ids[(added + i) % len(ids)]}, "opts": opts}
                 for i in range(rate // 10)]
        await queue.addBulk(batch)
        added += len(batch)
        await asyncio.sleep(max(0.0, t0 + added / rate - time.monotonic()))
    await queue.close()
    print(added, flush=True)

asyncio.run(main())
"""


async def test_a_long_run_of_jobs_stays_bounded(immich_factory: Any, valkey: EmbeddedValkey, tmp_path: Any) -> None:
    """Thousands of thumbnail jobs through Immich-like Node workers for most of a minute, more than they
    keep up with: every finished job is counted exactly once, and memory, tasks, the job map (smaller than
    the backlog) and the check queue stay bounded."""
    from immich_thumbnail_exporter.collectors.job_verification import JobVerificationCollection, Limits
    from immich_thumbnail_exporter.config import load_config
    from immich_thumbnail_exporter.sources.postgres import PostgresSource
    from tests.test_job_verification import healthy_and_fixable, immich_worker

    imm: Immich = await immich_factory("v1.136+", Plan(assets=120))
    healthy, fixable = await healthy_and_fixable(imm)
    ids = healthy[:60] + fixable + [str(uuid.uuid4()) for _ in range(20)]
    config = load_config(None, environ={"REDIS_URL": valkey.url, "DB_URL": imm.dsn},
                         overrides={"media.root": imm.media, "intervals.queues": "2s"})
    pg = PostgresSource(config.database)
    limits = Limits(checks_per_second=400, max_pending=2000, settle=0.2)
    col = JobVerificationCollection(config, pg, limits)
    col.events.jobs.limit = MAX_TRACKED  # the one job map, shared by every follower of the event reader
    series: list[tuple[float, Resources, int, int]] = []
    before = Resources.now()
    try:
        await col.collect()
        await until(lambda: col.follower.following, 10)
        # About 100 jobs a second between them, fewer than are added: a backlog grows past the map's size.
        slow = {"CONCURRENCY": "8", "JOB_DELAY_MS": "150"}
        with immich_worker(valkey, tmp_path, **slow), immich_worker(valkey, tmp_path, **slow):
            producer = await asyncio.create_subprocess_exec(
                sys.executable, "-c", PRODUCER, valkey.url, str(JOBS_SECONDS), str(JOBS_PER_SECOND), json.dumps(ids),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )
            done = asyncio.ensure_future(producer.communicate())
            t0 = time.monotonic()
            while not done.done():
                await col.collect()
                series.append((time.monotonic() - t0, Resources.now(), len(col.events.jobs), len(col.verifier.pending)))
                await asyncio.wait({done}, timeout=2.0)
            out, err = await done
            assert producer.returncode == 0, err.decode()[-2000:]
            added = int(out.decode().split()[-1])

            def settled() -> bool:
                return sum(col.verifier.counts.values()) >= added and not col.verifier.pending

            with contextlib.suppress(AssertionError):  # the counts are checked below, with the figures
                await until(settled, 60, 0.2)
        counts = {r: n for (_, _, r), n in col.verifier.counts.items()}
    finally:
        await col.close()
        await pg.close()
    end = Resources.now()
    warm = [s for s in series if s[0] >= JOBS_WARM_UP]
    lines = [
        f"{added} thumbnail jobs in {JOBS_SECONDS:.0f}s through two Immich-like Node workers: {counts}; "
        f"reader {col.events.stats}, {col.events.jobs.evicted} evicted; follower {col.follower.stats}; "
        f"checker {col.verifier.batches} batches, {col.verifier.shed} shed",
        "samples: " + "; ".join(f"{t:.0f}s {r.rss / 2**20:.1f}MiB {r.tasks}t {tr}map {p}pending"
                               for t, r, tr, p in series),
    ]
    REPORT.extend(lines)
    write_report("soak", REPORT)
    assert len(warm) >= 5, lines
    assert added >= JOBS_SECONDS * JOBS_PER_SECOND * 0.8, lines
    # Every finished job counted once, under one result (the producer's jobs only: nothing else runs).
    assert sum(counts.values()) == added, lines
    assert counts.get("not_checked", 0) <= 0.05 * added, lines
    assert max(tr for _, _, tr, _ in series) <= MAX_TRACKED, lines
    assert col.events.jobs.evicted > 0, lines  # the bound was reached, and held
    assert max(p for _, _, _, p in series) <= limits.max_pending, lines
    assert max(r.rss for _, r, _, _ in warm) - warm[0][1].rss <= JOBS_RSS_SLACK, lines
    assert max(r.tasks for _, r, _, _ in warm) <= warm[0][1].tasks + TASK_SLACK, lines
    assert end.tasks <= before.tasks, (lines, before, end)  # closed: its two tasks are gone
