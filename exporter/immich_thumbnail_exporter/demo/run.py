"""``demo``: a post-restore Immich on embedded PostgreSQL and Valkey, a simulated Immich beside it, and
the exporter serving it.

It reproduces the restore report: about 254 assets in the singular schema era, a handful broken in each
way (files gone while their rows remain, empty and corrupt files, missing rows, no thumbhash, no job
status, orphans, an original that is gone), regeneration jobs sitting in Redis with no worker to take
them, and jobs for assets the restored database no longer has.

The simulated Immich (``demo/simulation/``) answers the API like Immich, with one API key per user. Its
thumbnail worker starts ``WORKER_AFTER`` seconds in: first the exporter shows jobs stuck with no worker,
then the worker takes them (writing most assets' files, completing the orphans' jobs with null, doing
nothing for one flaky asset's first job). The demo prints the ``regenerate --apply --wait`` command that
fixes the rest, including the flaky asset on its second attempt and an asset whose first request Immich
accepts and queues nothing for, as v3.0.0 did. One asset sits in the Locked folder with its thumbnail
gone: Immich never lets an API key reach it, so regenerate skips it and says why. One person's face
thumbnail is gone while its row remains: ``regenerate --kind person`` has Immich remake it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import secrets
import shlex
import shutil
import sys
import tempfile
import uuid

import asyncpg

from immich_thumbnail_exporter.app import Exporter, until_stopped
from immich_thumbnail_exporter.config import load_config
from immich_thumbnail_exporter.demo.embedded import EmbeddedError, EmbeddedPostgres, EmbeddedValkey
from immich_thumbnail_exporter.demo.seed import Expected, Plan, create_database, seed
from immich_thumbnail_exporter.demo.simulation.api import JOB_NAME, ApiKey, SimulatedApi
from immich_thumbnail_exporter.demo.simulation.worker import SimulatedWorker
from immich_thumbnail_exporter.exposition.http import parse_listen_address
from immich_thumbnail_exporter.exposition.webconfig import load_web_config

log = logging.getLogger(__name__)

# Seconds of "no worker" before the simulated Immich's worker starts.
WORKER_AFTER = 60.0
# Each simulated thumbnail job takes this long.
JOB_SECONDS = 0.5
# The retry window the printed regenerate command uses (the default, remediation.verify_after, is 5m).
RETRY_AFTER = "20s"


async def fixable_assets(dsn: str, media: str, problem_ids: set[str]) -> list[str]:
    """Problem assets regeneration can fix: the original is there and no thumbnail is a symlink."""
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        ids = [uuid.UUID(a) for a in problem_ids]
        originals = await conn.fetch('SELECT id::text, "originalPath" FROM asset WHERE id = ANY($1)', ids)
        files = await conn.fetch('SELECT "assetId"::text, path FROM asset_file WHERE "assetId" = ANY($1)', ids)
    finally:
        await conn.close()

    def unfixable() -> set[str]:
        def local(stored: str) -> str:
            return media + stored.removeprefix("/data")

        lost = {r[0] for r in originals if not os.path.exists(local(r[1]))}
        return lost | {r[0] for r in files if os.path.islink(local(r[1]))}

    return sorted(problem_ids - await asyncio.to_thread(unfixable))


async def users(dsn: str) -> list[tuple[str, str]]:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        return [(str(r[0]), str(r[1])) for r in await conn.fetch('SELECT id, email FROM "user" ORDER BY email')]
    finally:
        await conn.close()


def _program() -> str:
    argv0 = sys.argv[0] if sys.argv else ""
    if os.path.basename(argv0) == "immich-thumbnail-exporter":
        return shlex.quote(os.path.abspath(argv0))
    return f"{shlex.quote(sys.executable)} -m immich_thumbnail_exporter"


def _summary(url: str, exp: Expected, jobs: int, env: dict[str, str], media: str, state: str,
             keys: list[tuple[str, str, int]], face_keys: list[str]) -> str:
    missing = sum(exp.missing.values())
    exports = " \\\n    ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    commands = "\n".join(
        f"  # as {email} ({n} problem asset(s) of theirs)\n"
        f"  IMMICH_API_KEY={key} {_program()} regenerate --media.root {shlex.quote(media)} \\\n"
        f"    --state-dir {shlex.quote(state)} --apply --wait --retry-after {RETRY_AFTER}"
        for key, email, n in keys
    )
    faces = "\n".join(
        f"  IMMICH_API_KEY={key} {_program()} regenerate --kind person --media.root {shlex.quote(media)} \\\n"
        f"    --state-dir {shlex.quote(state)} --apply --wait"
        for key in face_keys
    )
    return f"""
Immich thumbnail exporter demo is running: {url}/

  a restored Immich (schema v1.136+, {exp.assets['image']} images and {exp.assets['video']} videos)
  {missing} broken thumbnail-type files or rows, {exp.orphaned_files} orphaned files, \
{exp.originals_missing} originals gone
  {len(exp.locked_asset_ids)} of them in the Locked folder (no API key may regenerate it: skipped, with why),
  {len(exp.person_thumbnails_missing)} face (person) thumbnail file gone while its row remains
  {jobs} regeneration jobs waiting in Valkey with no worker (some for assets no longer in the database);
  the simulated Immich's thumbnail worker starts in {WORKER_AFTER:.0f}s and takes them

Look at:
  {url}/metrics                     immich_queue_workers, immich_queue_jobs, immich_queue_oldest_job_age_seconds
                                        first; then immich_jobs_finished_total and the files series
  {url}/problems?kind=preview       the broken assets, as JSON

Fix the rest: regenerate asks the simulated Immich, confirms each job was queued, waits, and says why
anything is still broken. Immich lets a key regenerate only its own user's assets: one command per user.

  export {exports}
{commands}

And the face thumbnails (Immich remakes one when its feature face is set again):
{faces}

Then the restore report, one self-contained file (the scan, free space, the queues and every attempt):

  {_program()} report --media.root {shlex.quote(media)} --state-dir {shlex.quote(state)} \\
    --format html --output restore-report.html

Press Ctrl-C to stop and clean up.
"""


async def _run(args: argparse.Namespace) -> int:
    workdir = tempfile.mkdtemp(prefix="immich-exporter-demo-")
    pg = EmbeddedPostgres(f"{workdir}/postgres")
    vk = EmbeddedValkey()
    exporter: Exporter | None = None
    api: SimulatedApi | None = None
    worker: SimulatedWorker | None = None
    worker_task: asyncio.Task[None] | None = None
    try:
        print("starting PostgreSQL and Valkey ...", file=sys.stderr)
        await asyncio.to_thread(pg.start)
        await asyncio.to_thread(vk.start)
        await create_database(pg.dsn, "immich")
        dsn = pg.dsn_for("immich")
        media, state = f"{workdir}/media", f"{workdir}/state"
        exp = await seed(dsn, media, "v1.136+", Plan(assets=args.assets, locked_thumbnail_missing=1,
                                                     person_thumbnail_missing=1))
        # The locked asset stays broken until someone unlocks it: no job is queued for it.
        stuck = sorted(exp.problem_asset_ids - exp.locked_asset_ids)[:6]
        orphans = [str(uuid.UUID(int=0xDEAD0000 + i, version=4)) for i in range(4)]
        later = [a for a in await fixable_assets(dsn, media, exp.problem_asset_ids - exp.locked_asset_ids)
                 if a not in stuck]
        # One API key per Immich user, made now: (key, user id, email).
        keys = [(f"demo-{secrets.token_hex(12)}", user, email) for user, email in await users(dsn)]
        # Keys with "all", as Immich's web UI makes by default; the first user is the admin.
        api = SimulatedApi(dsn, vk.url, {key: ApiKey(user, ("all",), admin=n == 0, name="demo")
                                         for n, (key, user, _) in enumerate(keys)})
        # The flaky asset's first job does nothing; Immich queues nothing for the other's first request.
        if later:
            api.drop_first = {later[-1]}
        await api.start()
        await asyncio.wait_for(api.queue.addBulk(
            [{"name": JOB_NAME, "data": {"id": a}} for a in [*stuck, *orphans]]), 10)
        worker = SimulatedWorker(dsn, media, vk.url, delay=JOB_SECONDS, flaky=set(later[:1]))
        config = load_config(
            None,
            environ={},
            overrides={
                "database.url": dsn,
                "media.root": media,
                "redis.url": vk.url,
                "immich.url": api.url,
                "immich.api_key": keys[0][0],
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
        owned = await _problems_per_owner(dsn, exp.problem_asset_ids)
        faces = await _people_owners(dsn, exp.person_thumbnails_missing)
        env = {"DB_URL": dsn, "REDIS_URL": vk.url, "IMMICH_URL": api.url}
        print(_summary(f"http://{shown_host}:{exporter.bound_port}", exp, len(stuck) + len(orphans), env, media,
                       state, [(key, email, owned.get(user, 0)) for key, user, email in keys],
                       [key for key, user, _ in keys if user in faces]))
        worker_task = asyncio.create_task(_start_worker_later(worker))
        await until_stopped()
        print("stopping ...", file=sys.stderr)
        return 0
    except EmbeddedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if worker_task is not None:
            worker_task.cancel()
            with contextlib.suppress(BaseException):
                await worker_task
        for part in (exporter, worker, api):
            if part is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(part.stop(), 15)
        vk.cleanup()
        pg.stop()
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


async def _problems_per_owner(dsn: str, problem_ids: set[str]) -> dict[str, int]:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        rows = await conn.fetch('SELECT "ownerId"::text, count(*) FROM asset WHERE id = ANY($1) GROUP BY 1',
                                [uuid.UUID(a) for a in problem_ids])
    finally:
        await conn.close()
    return {str(r[0]): int(r[1]) for r in rows}


async def _people_owners(dsn: str, people: set[str]) -> set[str]:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        rows = await conn.fetch('SELECT DISTINCT "ownerId"::text FROM person WHERE id = ANY($1)',
                                [uuid.UUID(p) for p in people], timeout=10)
    finally:
        await conn.close()
    return {str(r[0]) for r in rows}


async def _start_worker_later(worker: SimulatedWorker) -> None:
    await asyncio.sleep(WORKER_AFTER)
    await worker.start()
    print("the simulated Immich's thumbnail worker is up: the stuck jobs run now "
          "(immich_queue_workers{queue=\"thumbnailGeneration\"} 1)", file=sys.stderr)


def run_demo(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_run(args))
    except KeyboardInterrupt:
        return 130
