"""``demo``: a post-restore Immich on embedded PostgreSQL and Valkey, and the exporter serving it.

It reproduces the restore report: about 254 assets in the singular schema era, a handful broken in each
way (files gone while their rows remain, empty and corrupt files, missing rows, no thumbhash, no job
status, orphans, an original that is gone), regeneration jobs sitting in Redis with no worker to take
them, and jobs for assets the restored database no longer has. Then it serves the exporter on it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import shutil
import signal
import sys
import tempfile
import uuid
from typing import Any

from immich_thumbnail_exporter.app import Exporter
from immich_thumbnail_exporter.config import load_config
from immich_thumbnail_exporter.demo.embedded import EmbeddedError, EmbeddedPostgres, EmbeddedValkey
from immich_thumbnail_exporter.demo.seed import Expected, Plan, create_database, seed
from immich_thumbnail_exporter.exposition.http import parse_listen_address
from immich_thumbnail_exporter.exposition.webconfig import load_web_config

log = logging.getLogger(__name__)

PREFIX = "immich_bull"
QUEUE = "thumbnailGeneration"
# Immich's default job options (docs/immich-schema.md, f).
JOB_OPTS: dict[str, Any] = {"attempts": 3, "removeOnComplete": True, "removeOnFail": False}


async def add_stuck_jobs(redis_url: str, asset_ids: list[str], orphan_ids: list[str]) -> int:
    """Regeneration requests Immich accepted (HTTP 204) that no worker will ever take."""
    try:
        from bullmq import Queue
    except ImportError:
        log.warning("the bullmq package is not installed: the demo runs without queued jobs")
        return 0
    queue = Queue(QUEUE, {"prefix": PREFIX, "connection": redis_url})
    try:
        for asset_id in [*asset_ids, *orphan_ids]:
            await asyncio.wait_for(queue.add("AssetGenerateThumbnails", {"id": asset_id}, JOB_OPTS), 10)
    finally:
        await asyncio.wait_for(queue.close(), 10)
    return len(asset_ids) + len(orphan_ids)


def _summary(url: str, exp: Expected, jobs: int, dsn: str, media: str) -> str:
    missing = sum(exp.missing.values())
    return f"""
Immich thumbnail exporter demo is running: {url}/

  a restored Immich (schema v1.136+, {exp.assets['image']} images and {exp.assets['video']} videos)
  {missing} broken thumbnail-type files or rows, {exp.orphaned_files} orphaned files, \
{exp.originals_missing} originals gone
  {jobs} regeneration jobs waiting in Valkey with no worker (some for assets no longer in the database)

Look at:
  {url}/metrics                     immich_asset_files_missing, immich_queue_*, immich_exporter_source_up
  {url}/problems?kind=preview       the broken assets, as JSON
  immich-thumbnail-exporter scan    (with DB_URL and --media.root below) the same as a report

  DB_URL={dsn}
  --media.root {media}

Press Ctrl-C to stop and clean up.
"""


async def _run(args: argparse.Namespace) -> int:
    workdir = tempfile.mkdtemp(prefix="immich-exporter-demo-")
    pg = EmbeddedPostgres(f"{workdir}/postgres")
    vk = EmbeddedValkey()
    exporter: Exporter | None = None
    try:
        print("starting PostgreSQL and Valkey ...", file=sys.stderr)
        await asyncio.to_thread(pg.start)
        await asyncio.to_thread(vk.start)
        await create_database(pg.dsn, "immich")
        dsn = pg.dsn_for("immich")
        media = f"{workdir}/media"
        exp = await seed(dsn, media, "v1.136+", Plan(assets=args.assets))
        stuck = sorted(exp.problem_asset_ids)[:6]
        orphans = [str(uuid.UUID(int=0xDEAD0000 + i, version=4)) for i in range(4)]
        jobs = await add_stuck_jobs(vk.url, stuck, orphans)
        config = load_config(
            None,
            environ={},
            overrides={
                "database.url": dsn,
                "media.root": media,
                "redis.url": vk.url,
                "checks.verify_headers": True,
                "checks.check_originals": True,
                "intervals.queues": "5s",
                "intervals.inventory": "30s",
                "intervals.files": "1m",
                "log.level": args.log_level,
                "log.format": args.log_format,
            },
        )
        host, port = parse_listen_address(args.listen_address)
        exporter = Exporter(config, load_web_config(None), host, port)
        try:
            await exporter.start()
        except OSError as exc:
            print(f"error: cannot listen on {args.listen_address}: {exc.strerror or exc} "
                  "(choose another with --web.listen-address)", file=sys.stderr)
            return 2
        for _ in range(100):
            if exporter.store.ready:
                break
            await asyncio.sleep(0.1)
        shown_host = host or "127.0.0.1"
        print(_summary(f"http://{shown_host}:{exporter.bound_port}", exp, jobs, dsn, media))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        print("stopping ...", file=sys.stderr)
        return 0
    except EmbeddedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if exporter is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(exporter.stop(), 10)
        vk.cleanup()
        pg.stop()
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def run_demo(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_run(args))
    except KeyboardInterrupt:
        return 130
