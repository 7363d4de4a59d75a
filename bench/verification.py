"""``python -m bench.verification``: what verifying finished thumbnail jobs costs, against the file check.

    python -m bench.verification                   # 10,000 jobs on the cached 10,000-asset library
    python -m bench.verification --jobs 20000 --size 100000

Prints figures, asserts nothing. Three measurements on the same library (``bench.dataset``):

* **check**: ``--jobs`` finished jobs handed to the verification's checker (the bounded queue, the rate
  limit set out of the way, batches of 200): CPU seconds of this process (its threads included) and the
  database queries it sent, counted by PostgreSQL (``pg_stat_database.xact_commit`` of the library's
  database: each of our queries is its own transaction, and so is asyncpg's reset of a connection going
  back to the pool), per thousand jobs;
* **follow**: the same number of jobs through a Valkey as BullMQ writes them (hash, ``added``, ``active``,
  then ``completed`` and the hash deleted, 1,000 jobs a second), written by a child process, followed by
  the live follower in this one: its CPU seconds per thousand jobs, and how many it learned in time;
* **file check**: one full scan of the library (``bench.child scan``: exporter and walker CPU), the cost
  the verification must stay well under.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg

from bench import CACHE
from bench.dataset import DATABASE, open_dataset
from bench.measure import measure_scan
from immich_thumbnail_exporter.collectors.job_verification import JobVerificationCollection, Limits
from immich_thumbnail_exporter.config import load_config
from immich_thumbnail_exporter.demo.embedded import EmbeddedValkey
from immich_thumbnail_exporter.sources.bullmq_follow import FinishedJob, JobFollower
from immich_thumbnail_exporter.sources.postgres import PostgresSource
from immich_thumbnail_exporter.vocabulary import THUMBNAIL_JOBS_BY_QUEUE

QUEUE = "thumbnailGeneration"
JOB = "AssetGenerateThumbnails"

WRITER = """
import json, sys, time, redis
url, ids = sys.argv[1], json.loads(sys.stdin.read())
r = redis.Redis.from_url(url)
base, chunk, rate = "immich_bull:thumbnailGeneration", 100, 1000.0
t0, n = time.monotonic(), 0
for start in range(0, len(ids), chunk):
    part = list(enumerate(ids[start:start + chunk], start + 1))
    now = int(time.time() * 1000)
    with r.pipeline(transaction=False) as p:
        for job_id, asset in part:
            p.hset(f"{base}:{job_id}", mapping={"name": "AssetGenerateThumbnails", "timestamp": now,
                                                "data": json.dumps({"id": asset})})
            p.xadd(f"{base}:events", {"event": "added", "jobId": job_id, "name": "AssetGenerateThumbnails"})
        p.execute()
    time.sleep(0.02)
    with r.pipeline(transaction=False) as p:
        for job_id, _ in part:
            p.xadd(f"{base}:events", {"event": "active", "jobId": job_id, "prev": "waiting"})
        p.execute()
    time.sleep(0.02)
    with r.pipeline(transaction=False) as p:
        for job_id, _ in part:
            p.delete(f"{base}:{job_id}")
            p.xadd(f"{base}:events", {"event": "completed", "jobId": job_id, "returnvalue": "null"})
        p.execute()
    n += len(part)
    time.sleep(max(0.0, t0 + n / rate - time.monotonic()))
print(n, flush=True)
"""


async def _commits(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        # Statistics are sent to the cumulative views when a session's transaction ends: clear our own cache
        # so the figure is current, and read it in a transaction of its own (counted, then subtracted).
        await conn.execute("SELECT pg_stat_clear_snapshot()")
        return int(await conn.fetchval("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"))
    finally:
        await conn.close()


async def _asset_ids(dsn: str, n: int) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT id::text FROM asset ORDER BY id LIMIT $1", n)
    finally:
        await conn.close()
    ids = [str(r[0]) for r in rows]
    return [ids[i % len(ids)] for i in range(n)]


async def until_checked(col: JobVerificationCollection, jobs: int) -> None:
    """Poll (10 ms) until the checker has taken every job: the figure includes no waiting of ours."""
    for _ in range(360_000):
        if col.verifier.checked >= jobs:
            return
        await asyncio.sleep(0.01)
    raise RuntimeError("the checker did not finish within an hour")


async def measure_check(dsn: str, media: str, valkey_url: str, jobs: int) -> dict[str, Any]:
    ids = await _asset_ids(dsn, jobs)
    config = load_config(None, environ={"DB_URL": dsn, "REDIS_URL": valkey_url},
                         overrides={"media.root": media, "log.level": "warn"})
    pg = PostgresSource(config.database)
    limits = Limits(checks_per_second=1e6, max_pending=jobs, settle=0.0)
    col = JobVerificationCollection(config, pg, limits)
    try:
        await col.prepare()  # schema and media location: once per process, not per job
        await pg.close()  # its statistics flushed now, not counted below; the pool opens again when used
        await asyncio.sleep(0.5)
        before = await _commits(dsn)
        now = time.monotonic()
        for i, asset in enumerate(ids):
            col.verifier.add(FinishedJob(QUEUE, str(i), JOB, asset, False, 0), now)
        cpu0, t0 = time.process_time(), time.monotonic()
        col.start()
        await until_checked(col, jobs)
        cpu, wall = time.process_time() - cpu0, time.monotonic() - t0
    finally:
        await col.close()
        await pg.close()  # a session's statistics reach pg_stat_database at the latest when it ends
    await asyncio.sleep(0.5)
    # Minus the two transactions of the session that read ``before``.
    queries = await _commits(dsn) - before - 2
    results = {r: n for (_, _, r), n in sorted(col.verifier.counts.items())}
    return {"jobs": jobs, "cpu_seconds": cpu, "wall_seconds": wall, "queries": queries,
            "batches": col.verifier.batches, "results": results}


async def measure_follow(dsn: str, media: str, valkey_url: str, jobs: int) -> dict[str, Any]:
    ids = await _asset_ids(dsn, jobs)
    config = load_config(None, environ={"DB_URL": dsn, "REDIS_URL": valkey_url},
                         overrides={"media.root": media, "log.level": "warn"})
    pg = PostgresSource(config.database)
    col = JobVerificationCollection(config, pg, Limits(checks_per_second=0.001, max_pending=0))
    # A follower of the same reader that keeps what it sees: the steps are driven here, not by a task.
    follower = JobFollower(col.events, THUMBNAIL_JOBS_BY_QUEUE)
    finished: list[FinishedJob] = []
    try:
        await col.events.step()  # the streams' current ends
        writer = await asyncio.create_subprocess_exec(
            sys.executable, "-c", WRITER, valkey_url, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        assert writer.stdin is not None
        writer.stdin.write(json.dumps(ids).encode())
        writer.stdin.close()
        done = asyncio.ensure_future(writer.communicate())
        cpu0, t0 = time.process_time(), time.monotonic()
        while len(finished) < jobs and time.monotonic() - t0 < jobs / 100 + 30:
            await col.events.step()
            finished.extend(follower.take())
        cpu, wall = time.process_time() - cpu0, time.monotonic() - t0
        _, err = await done
        if writer.returncode != 0:
            raise RuntimeError(err.decode(errors="replace")[-2000:])
        learned = sum(1 for f in finished if f.asset_id is not None)
        return {"jobs": jobs, "finished": len(finished), "learned": learned, "cpu_seconds": cpu,
                "wall_seconds": wall, "entries": col.events.stats.entries,
                "hash_reads": col.events.stats.hash_reads}
    finally:
        follower.close()
        await col.close()
        await pg.close()


def per_thousand(value: float, jobs: int) -> float:
    return value * 1000 / jobs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.verification", description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=10_000, help="assets in the library (bench.dataset)")
    parser.add_argument("--cache", default=str(CACHE))
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    ds = open_dataset(args.size, Path(args.cache), log=lambda m: print(m, file=sys.stderr))
    pg = ds.postgres()
    pg.start()
    valkey = EmbeddedValkey()
    valkey.start()
    try:
        dsn = pg.dsn_for(DATABASE)
        print(f"[{args.size:,} assets] checking {args.jobs:,} finished jobs", file=sys.stderr)
        check = asyncio.run(measure_check(dsn, str(ds.media), valkey.url, args.jobs))
        print(f"[{args.size:,} assets] following {args.jobs:,} jobs through Valkey", file=sys.stderr)
        follow = asyncio.run(measure_follow(dsn, str(ds.media), valkey.url, args.jobs))
        print(f"[{args.size:,} assets] one file check, for comparison", file=sys.stderr)
        scan = asyncio.run(measure_scan(ds, pg, 1))
    finally:
        valkey.cleanup()
        pg.stop()
    jobs = args.jobs
    scan_cpu = scan.cpu_seconds[0] + scan.walker_cpu_seconds[0]
    print(f"verification of {jobs:,} finished thumbnail jobs, library of {args.size:,} assets")
    print(f"  check   CPU {check['cpu_seconds']:.2f} s ({per_thousand(check['cpu_seconds'], jobs):.3f} s per 1000 "
          f"jobs), {check['queries']} database queries ({per_thousand(check['queries'], jobs):.1f} per 1000 "
          f"jobs) in {check['batches']} batches, {check['wall_seconds']:.2f} s wall; {check['results']}")
    print(f"  follow  CPU {follow['cpu_seconds']:.2f} s ({per_thousand(follow['cpu_seconds'], jobs):.3f} s per "
          f"1000 jobs) for {follow['entries']:,} stream entries and {follow['hash_reads']:,} hash reads; "
          f"{follow['learned']:,} of {follow['finished']:,} finished jobs' assets learned in time")
    total = check["cpu_seconds"] + follow["cpu_seconds"]
    print(f"  file check of the whole library: CPU {scan_cpu:.2f} s (exporter {scan.cpu_seconds[0]:.2f} + "
          f"walkers {scan.walker_cpu_seconds[0]:.2f}), {scan.seconds[0]:.2f} s wall")
    per_k = per_thousand(total, jobs)
    print(f"  per 1,000 finished jobs: {per_k:.3f} s CPU (check + follow) and "
          f"{per_thousand(check['queries'], jobs):.1f} queries, {per_k / scan_cpu:.1%} of one file check of "
          f"these {args.size:,} assets; the file check grows with the library, the verification with the jobs")
    if args.json:
        Path(args.json).write_text(json.dumps({"check": check, "follow": follow, "scan_cpu_seconds": scan_cpu}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
