"""The simulated Immich's thumbnail worker, as far as the exporter can see it: the queue, the database,
the files.

Like Immich's ``JobService.onJobRun`` it calls the job's handler, catches and logs the handler's errors
("Unable to run job handler (AssetGenerateThumbnails): ...") and returns nothing, so BullMQ records every
job as completed with ``null``. The handler:

* an asset that is not in the database: "Thumbnail generation failed for asset <id>: not found";
* an original that is gone: an error ("Input file is missing");
* a *flaky* asset (``flaky``): its first job does nothing at all (the restore report's asset that a
  second request fixed);
* otherwise, after ``delay`` seconds of "work", writes a webp thumbnail and a jpeg preview (and rewrites a
  fullsize file the asset has) where its ``asset_file`` rows say, adding the rows that are missing.

A face-thumbnail job (``PersonGenerateThumbnail {"id": personId}``, ``generate-person-thumbnail`` before
v1.137) writes a small JPEG where the person's ``thumbnailPath`` says, setting a path first when it is
empty (``thumbs/<owner>/<id[0:2]>/<id[2:4]>/<id>.jpeg``, as Immich's StorageCore names it).

It writes to the demo's own database and media folder: it plays Immich, never the exporter.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from typing import TYPE_CHECKING, Any

import asyncpg

from immich_thumbnail_exporter.demo.seed import FULLSIZE_SIZE, PERSON_SIZE, PREVIEW_SIZE, THUMB_SIZE, jpeg, webp
from immich_thumbnail_exporter.demo.simulation.api import PREFIX, QUEUE

if TYPE_CHECKING:
    from bullmq import Worker

log = logging.getLogger(__name__)

# Every release's names (releases.py): the worker plays whichever Immich queued the job.
ASSET_JOBS = frozenset({"AssetGenerateThumbnails", "generate-thumbnails"})
PERSON_JOBS = frozenset({"PersonGenerateThumbnail", "generate-person-thumbnail"})


class SimulatedWorker:
    def __init__(
        self,
        dsn: str,
        media_root: str,
        redis_url: str,
        *,
        delay: float = 0.3,
        writes: bool = True,
        flaky: set[str] | None = None,
        name: str = "microservices",
        concurrency: int = 2,
    ) -> None:
        self.dsn = dsn
        self.media_root = media_root.rstrip("/")
        self.redis_url = redis_url
        self.delay = delay
        self.writes = writes  # False: every job completes and nothing is written (a broken Immich)
        self.flaky = set(flaky or ())
        self.name = name
        self.concurrency = concurrency
        self.processed: list[str] = []  # asset (and person) ids, in the order their jobs ran
        self.persons: list[str] = []  # person ids whose face thumbnail was written
        self.outcomes: dict[str, str] = {}  # asset -> what its last job did (written, no_effect, not_found, error)
        self._pool: asyncpg.Pool | None = None
        self._worker: Worker | None = None
        self._tables: tuple[str, str, str] = ("asset", "asset_file", "/data")

    async def start(self) -> None:
        from bullmq import Worker  # the demo extra

        self._pool = await asyncpg.create_pool(self.dsn, min_size=1, max_size=2, timeout=10)
        singular = await self._pool.fetchval("SELECT to_regclass('asset_file') IS NOT NULL", timeout=10)
        # Paths are absolute under /data from v1.137, relative to /usr/src/app ("upload/...") before.
        self._tables = ("asset", "asset_file", "/data") if singular else ("assets", "asset_files", "upload")
        self._worker = Worker(QUEUE, self.process, {
            "prefix": PREFIX, "connection": self.redis_url, "concurrency": self.concurrency, "name": self.name,
        })

    async def stop(self) -> None:
        if self._worker is not None:
            await asyncio.wait_for(self._worker.close(), 15)
        if self._pool is not None:
            await asyncio.wait_for(self._pool.close(), 10)

    async def process(self, job: Any, token: str) -> None:
        asset_id = str((job.data or {}).get("id", ""))
        try:
            self.outcomes[asset_id] = await self.handle(job.name, asset_id)
        except Exception as exc:  # Immich's processor catches everything and still completes the job
            log.error("Unable to run job handler (%s): %s", job.name, exc)
            self.outcomes[asset_id] = "error"
        self.processed.append(asset_id)
        return None

    async def handle(self, name: str, asset_id: str) -> str:
        if name in PERSON_JOBS:
            return await self.handle_person(asset_id)
        if name not in ASSET_JOBS:
            return "skipped"
        await asyncio.sleep(self.delay)
        assert self._pool is not None
        assets, files, _ = self._tables
        try:
            aid = uuid.UUID(asset_id)
        except ValueError:
            return "not_found"
        async with self._pool.acquire() as conn:
            asset = await conn.fetchrow(f'SELECT "ownerId"::text AS owner, "originalPath" AS original '
                                        f'FROM "{assets}" WHERE id = $1', aid, timeout=10)
            if asset is None:
                log.warning("Thumbnail generation failed for asset %s: not found", asset_id)
                return "not_found"
            if asset_id in self.flaky:
                self.flaky.discard(asset_id)
                return "no_effect"
            if not self.writes:
                return "no_effect"
            original = self._local(asset["original"])
            if original is None or not await asyncio.to_thread(os.path.exists, original):
                raise RuntimeError(f"Input file is missing: {asset['original']}")
            rows = {r["type"]: r["path"] for r in await conn.fetch(
                f'SELECT type, path FROM "{files}" WHERE "assetId" = $1', aid, timeout=10)}
            folder = f"{self._tables[2]}/thumbs/{asset['owner']}/{asset_id[:2]}/{asset_id[2:4]}"
            sep = "_" if self._tables[2] == "/data" else "-"
            for kind, ext in (("thumbnail", "webp"), ("preview", "jpeg")):
                if kind not in rows:
                    rows[kind] = f"{folder}/{asset_id}{sep}{kind}.{ext}"
                    await conn.execute(f'INSERT INTO "{files}" ("assetId", type, path) VALUES ($1, $2, $3)',
                                       aid, kind, rows[kind], timeout=10)
        await asyncio.to_thread(self._write, rows)
        return "written"

    async def handle_person(self, person_id: str) -> str:
        await asyncio.sleep(self.delay)
        assert self._pool is not None
        try:
            pid = uuid.UUID(person_id)
        except ValueError:
            return "not_found"
        row = await self._pool.fetchrow('SELECT "ownerId"::text AS owner, "thumbnailPath" AS path FROM person '
                                        "WHERE id = $1", pid, timeout=10)
        if row is None:
            log.warning("Person %s not found", person_id)
            return "not_found"
        path = row["path"]
        if not path:
            path = f"{self._tables[2]}/thumbs/{row['owner']}/{person_id[:2]}/{person_id[2:4]}/{person_id}.jpeg"
            await self._pool.execute('UPDATE person SET "thumbnailPath" = $1 WHERE id = $2', path, pid, timeout=10)
        local = self._local(path)
        if local is None:
            raise RuntimeError(f"thumbnail path outside the media folder: {path}")
        await asyncio.to_thread(self._write_file, local, jpeg(PERSON_SIZE))
        self.persons.append(person_id)
        return "written"

    @staticmethod
    def _write_file(local: str, data: bytes) -> None:
        os.makedirs(os.path.dirname(local), exist_ok=True)
        if os.path.islink(local):
            os.unlink(local)
        with open(local, "wb") as fh:
            fh.write(data)

    def _local(self, stored: str | None) -> str | None:
        """Where a stored path lies in the demo's media folder; None for one that would leave it."""
        prefix = self._tables[2]
        if not stored or not stored.startswith(prefix + "/"):
            return None
        rel = stored[len(prefix) + 1:]
        if any(part in ("", ".", "..") for part in rel.split("/")):
            return None
        return f"{self.media_root}/{rel}"

    def _write(self, rows: dict[str, str]) -> None:
        sizes = {"thumbnail": THUMB_SIZE, "preview": PREVIEW_SIZE, "fullsize": FULLSIZE_SIZE}
        for kind, path in rows.items():
            local = self._local(path)
            if local is None or kind not in sizes:
                continue
            os.makedirs(os.path.dirname(local), exist_ok=True)
            if os.path.islink(local):
                os.unlink(local)
            with open(local, "wb") as fh:
                fh.write(webp(sizes[kind]) if path.endswith(".webp") else jpeg(sizes[kind]))
