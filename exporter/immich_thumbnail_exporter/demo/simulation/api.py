"""The simulated Immich's HTTP API: what the exporter calls, answered the way Immich answers it.

``POST /api/assets/jobs {"name": "regenerate-thumbnail", "assetIds": [...]}`` checks the key, then that
the key's user owns every asset (Immich's ``asset.update`` access: one foreign asset refuses the whole
request with 400), then queues one ``AssetGenerateThumbnails`` job ``{"id": <asset>}`` per asset with
``addBulk`` on the ``thumbnailGeneration`` queue (prefix ``immich_bull``, attempts 3, removeOnComplete,
not removeOnFail) and answers 204, which says nothing about any worker.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
from aiohttp import web
from bullmq import Queue

PREFIX = "immich_bull"
QUEUE = "thumbnailGeneration"
JOB_NAME = "AssetGenerateThumbnails"
# Immich's default job options for every queue.
JOB_OPTS: dict[str, Any] = {"attempts": 3, "removeOnComplete": True, "removeOnFail": False}
QUEUE_NAMES = ("thumbnailGeneration", "metadataExtraction", "videoConversion", "faceDetection",
               "facialRecognition", "smartSearch", "duplicateDetection", "backgroundTask", "storageTemplateMigration",
               "migration", "search", "sidecar", "library", "notifications")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(status: int, message: str) -> web.Response:
    names = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 500: "Internal Server Error"}
    return web.json_response({"message": message, "error": names.get(status, ""), "statusCode": status},
                             status=status)


class SimulatedApi:
    """Immich's API on 127.0.0.1 (a free port), backed by the demo's database and Valkey.

    ``keys`` maps each API key to its user's id; None stands for a key whose user cannot be told (a
    test's shortcut: ``users/me`` answers 403 and ownership is not checked).

    Knobs for what goes wrong: ``mode`` (``ok``, ``401``, ``403``, ``500``); ``fail_after`` (answer 500
    once that many requests were accepted); ``me_allowed`` (False: ``users/me`` answers 403, as for a key
    without ``user.read``); ``drop`` (assets for which a request is accepted and nothing is queued, as
    Immich v3.0.0 did) and ``drop_first`` (the same, for the first request naming the asset only).
    """

    def __init__(
        self, dsn: str, redis_url: str, keys: dict[str, str | None], version: tuple[int, int, int] = (1, 137, 3)
    ) -> None:
        self.dsn = dsn
        self.redis_url = redis_url
        self.keys = dict(keys)
        self.version = version
        self.mode = "ok"
        self.fail_after: int | None = None
        self.me_allowed = True
        self.drop: set[str] = set()
        self.drop_first: set[str] = set()
        self.posts: list[tuple[float, list[str]]] = []
        self.accepted = 0
        self.queued = 0
        self.queue = Queue(QUEUE, {"prefix": PREFIX, "connection": redis_url, "defaultJobOptions": JOB_OPTS})
        self._queues: dict[str, Queue] = {QUEUE: self.queue}
        self._seen: set[str] = set()
        self._pool: asyncpg.Pool | None = None
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        self._pool = await asyncpg.create_pool(self.dsn, min_size=1, max_size=2, timeout=10)
        app = web.Application()
        app.router.add_get("/api/server/ping", self._ping)
        app.router.add_get("/api/server/version", self._version)
        app.router.add_get("/api/users/me", self._authed(self._me))
        app.router.add_get("/api/jobs", self._authed(self._jobs))
        app.router.add_get("/api/queues", self._authed(self._queues_v2))
        app.router.add_post("/api/assets/jobs", self._authed(self._asset_jobs))
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await asyncio.wait_for(self._runner.cleanup(), 10)
        for queue in self._queues.values():
            await asyncio.wait_for(queue.close(), 10)
        if self._pool is not None:
            await asyncio.wait_for(self._pool.close(), 10)

    def submissions(self) -> Counter[str]:
        """How often each asset was named in a request (accepted or not)."""
        return Counter(a for _, ids in self.posts for a in ids)

    # -- handlers ----------------------------------------------------------------------------------
    def _authed(self, handler: Callable[[web.Request, str | None], Awaitable[web.Response]]) -> Handler:
        async def wrapped(request: web.Request) -> web.Response:
            key = request.headers.get("x-api-key", "")
            if key not in self.keys:
                return _error(401, "Invalid API key")
            return await handler(request, self.keys[key])

        return wrapped

    async def _ping(self, request: web.Request) -> web.Response:
        return web.json_response({"res": "pong"})

    async def _version(self, request: web.Request) -> web.Response:
        major, minor, patch = self.version
        return web.json_response({"major": major, "minor": minor, "patch": patch})

    async def _me(self, request: web.Request, user: str | None) -> web.Response:
        if not self.me_allowed or user is None:
            return _error(403, "Missing required permission: user.read")
        assert self._pool is not None
        table = "user" if self.version >= (1, 137, 0) else "users"
        row = await self._pool.fetchrow(f'SELECT email, name FROM "{table}" WHERE id = $1', uuid.UUID(user),
                                        timeout=10)
        email, name = (row["email"], row["name"]) if row else ("", "")
        return web.json_response({"id": user, "email": email, "name": name, "isAdmin": True})

    async def _counts(self, name: str) -> tuple[dict[str, int], bool]:
        queue = self._queues.get(name)
        if queue is None:
            queue = self._queues[name] = Queue(name, {"prefix": PREFIX, "connection": self.redis_url})
        counts = await queue.getJobCounts("active", "completed", "failed", "delayed", "waiting", "paused")
        return {k: int(v or 0) for k, v in counts.items()}, bool(await queue.isPaused())

    async def _jobs(self, request: web.Request, user: str | None) -> web.Response:
        """``GET /api/jobs`` (before v2.4, deprecated after)."""
        out = {}
        for name in QUEUE_NAMES:
            counts, paused = await self._counts(name)
            out[name] = {"jobCounts": counts, "queueStatus": {"isActive": counts["active"] > 0, "isPaused": paused}}
        return web.json_response(out)

    async def _queues_v2(self, request: web.Request, user: str | None) -> web.Response:
        """``GET /api/queues`` (v2.4 and later)."""
        if self.version < (2, 4, 0):
            return _error(404, "Cannot GET /api/queues")
        out = []
        for name in QUEUE_NAMES:
            counts, paused = await self._counts(name)
            out.append({"name": name, "isPaused": paused, "statistics": counts})
        return web.json_response(out)

    async def _asset_jobs(self, request: web.Request, user: str | None) -> web.Response:
        body = await request.json()
        ids = [str(a) for a in body.get("assetIds", [])]
        self.posts.append((time.time(), ids))
        mode = "500" if self.fail_after is not None and self.accepted >= self.fail_after else self.mode
        if mode == "401":
            return _error(401, "Invalid user token")
        if mode == "403":
            return _error(403, "Missing required permission: asset.update")
        if mode == "500":
            return _error(500, "Internal server error")
        if body.get("name") != "regenerate-thumbnail":
            return _error(400, "name must be one of the AssetJobName values")
        if not await self._owns(user, ids):
            # utils/access.ts requireAccess: one id outside the allowed set refuses the whole request.
            return _error(400, "Not found or no asset.update access")
        jobs = []
        for a in ids:
            first = a not in self._seen
            self._seen.add(a)
            if a in self.drop or (first and a in self.drop_first):
                continue  # accepted, nothing queued: what Immich v3.0.0 did
            jobs.append({"name": JOB_NAME, "data": {"id": a}})
        if jobs:
            await asyncio.wait_for(self.queue.addBulk(jobs), 10)
        self.accepted += 1
        self.queued += len(jobs)
        return web.Response(status=204)

    async def _owns(self, user: str | None, ids: list[str]) -> bool:
        """Immich's owner access for ``asset.update`` (``AssetAccess.checkOwnerAccess`` in
        server/src/repositories/access.repository.ts): the key's user owns the asset, and the asset is
        not ``locked`` unless the session is elevated by a PIN, which an API key never is. ``user`` None
        (a test's shortcut) checks only the locked rule."""
        assert self._pool is not None
        table = "asset" if self.version >= (1, 137, 0) else "assets"
        try:
            wanted = [uuid.UUID(a) for a in ids]
        except ValueError:
            return False
        locked = await self._pool.fetchval(
            "SELECT count(*) > 0 FROM information_schema.columns WHERE table_name = $1 AND column_name = 'visibility'",
            table, timeout=10)
        rule = " AND visibility::text <> 'locked'" if locked else ""
        rows = await self._pool.fetch(
            f'SELECT id FROM "{table}" WHERE id = ANY($1) AND ($2::uuid IS NULL OR "ownerId" = $2){rule}',
            wanted, uuid.UUID(user) if user is not None else None, timeout=10)
        return len(rows) == len(set(wanted))
