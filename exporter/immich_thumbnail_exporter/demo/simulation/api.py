"""The simulated Immich's HTTP API: the routes the exporter calls, answered as a given Immich release
answers them (``releases.py`` says which routes exist and what each one requires, with its sources).

Per request, in the order Immich's ``AuthGuard`` and ``AuthService.authenticate`` apply them: a path the
release does not have is a 404 whatever the key; a missing or unknown key is a 401; a non-admin key on an
admin route is a 403 ``Forbidden``; a key without the route's permission is a 403 ``Missing required
permission: <name>``. Then the route's own checks (owner access) and, for ``POST /api/assets/jobs``, one
BullMQ job per asset on ``thumbnailGeneration`` with the release's job name and Immich's job options.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import asyncpg
from aiohttp import web

from immich_thumbnail_exporter.demo.simulation.releases import (
    Release,
    Route,
    granted,
    release_for,
    required,
    routes,
)

if TYPE_CHECKING:
    from bullmq import Queue

PREFIX = "immich_bull"
QUEUE = "thumbnailGeneration"
JOB_NAME = "AssetGenerateThumbnails"  # v1.137+; ``SimulatedApi.asset_job`` is the release's own
# Immich's default job options for every queue (server/src/repositories/job.repository.ts, through v3).
JOB_OPTS: dict[str, Any] = {"attempts": 3, "removeOnComplete": True, "removeOnFail": False}
# job.repository.ts getJobOptions: face thumbnails jump the queue.
PERSON_JOB_OPTS: dict[str, Any] = {**JOB_OPTS, "priority": 1}
# server/src/enum.ts AssetJobName, in the order class-validator's IsEnum lists them.
ASSET_JOB_NAMES = ("refresh-faces", "refresh-metadata", "regenerate-thumbnail", "transcode-video")
QUEUE_NAMES = release_for("v1.137.3").queues  # kept for importers; a SimulatedApi uses its release's list
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.IGNORECASE)
REASONS = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
           500: "Internal Server Error"}


@dataclass(frozen=True)
class ApiKey:
    """An Immich API key: its user (None: a test's key whose user cannot be told), that user's admin flag,
    and the permissions it was created with (``all`` grants everything)."""

    user: str | None
    permissions: tuple[str, ...] = ("all",)
    admin: bool = True
    name: str = "simulated key"
    id: str = field(default_factory=lambda: str(uuid.uuid4()))


class SimulatedApi:
    """Immich's API on 127.0.0.1 (a free port), backed by the demo's database and Valkey.

    ``keys`` maps each API key to an ``ApiKey`` or, the older short form, to its user's id (a key with
    ``all`` whose user is an admin; None: a key whose user cannot be told, for which ``users/me`` answers
    403 and ownership is not checked). ``release`` (``"v2.4"``, ``"v3.2.2"``, ...) picks what the API looks
    like; without it, ``version`` does (default v1.137.3).

    Knobs for what goes wrong: ``mode`` (``ok``, ``401``, ``403``, ``500``: every asset-jobs request answers
    that); ``fail_after`` (answer 500 once that many requests were accepted); ``me_allowed`` (False:
    ``users/me`` answers 403 as for a key without ``user.read``); ``drop`` (assets for which a request is
    accepted and nothing is queued) and ``drop_first`` (the same, for the first request naming the asset);
    ``queue_nothing`` (every asset-jobs request answers 204 and queues nothing: Immich v3.0.0, issue
    #29450); ``delay`` (seconds every queue-status answer takes); ``version_doc`` (what
    ``/api/server/version`` answers instead).
    """

    def __init__(
        self,
        dsn: str | None,
        redis_url: str,
        keys: dict[str, Any],
        version: tuple[int, int, int] = (1, 137, 3),
        *,
        release: str | None = None,
        prerelease: int | None = None,
        queue_nothing: bool = False,
    ) -> None:
        from bullmq import Queue  # the demo extra; imported here so that importing this module never fails

        self.dsn = dsn
        self.redis_url = redis_url
        self.keys: dict[str, Any] = dict(keys)
        self.release: Release = release_for(release if release is not None else version)
        self.version = self.release.version if release is not None else version
        self.prerelease = prerelease
        self.asset_job = self.release.asset_job
        self.person_job = self.release.person_job
        self.mode = "ok"
        self.fail_after: int | None = None
        self.me_allowed = True
        self.queue_nothing = queue_nothing
        self.drop: set[str] = set()
        self.drop_first: set[str] = set()
        self.delay = 0.0
        self.version_doc: Any = None
        self.hits: Counter[str] = Counter()
        self.posts: list[tuple[float, list[str]]] = []
        self.person_updates: list[tuple[str, str | None]] = []
        self.accepted = 0
        self.queued = 0
        self.queue: Queue = Queue(QUEUE, {"prefix": PREFIX, "connection": redis_url, "defaultJobOptions": JOB_OPTS})
        self._queues: dict[str, Queue] = {QUEUE: self.queue}
        self._routes = routes(self.release)
        self._seen: set[str] = set()
        self._pool: asyncpg.Pool | None = None
        self._tables = {"asset": "asset", "user": "user", "face": "asset_face"}
        self._locked_rule = False
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        if self.dsn is not None:
            self._pool = await asyncpg.create_pool(self.dsn, min_size=1, max_size=2, timeout=10)
            await self._detect_tables()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
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

    def key(self, token: str) -> ApiKey | None:
        value = self.keys.get(token, ...)
        if value is ...:
            return None
        return value if isinstance(value, ApiKey) else ApiKey(user=value)

    async def _detect_tables(self) -> None:
        """Singular names from v1.137 (migration StandardizeNames), plural before; ``visibility`` (and so
        the locked state) from v1.133."""
        assert self._pool is not None

        async def first(*names: str) -> str:
            for name in names:
                if await self._pool.fetchval("SELECT to_regclass($1) IS NOT NULL", f'public."{name}"', timeout=10):  # type: ignore[union-attr]
                    return name
            return names[0]

        self._tables = {"asset": await first("asset", "assets"), "user": await first("user", "users"),
                        "face": await first("asset_face", "asset_faces")}
        self._locked_rule = bool(await self._pool.fetchval(
            "SELECT count(*) > 0 FROM information_schema.columns WHERE table_name = $1 AND column_name = 'visibility'",
            self._tables["asset"], timeout=10))

    # -- the guard ----------------------------------------------------------------------------------
    def _error(self, status: int, message: str | list[str]) -> web.Response:
        """Immich's error body. v1/v2 put the correlation id in the body; v3 moved it to the
        ``X-Correlation-ID`` header (the v3 migration notes)."""
        correlation = secrets.token_hex(4)
        body: dict[str, Any] = {"message": message, "error": REASONS.get(status, ""), "statusCode": status}
        headers = {}
        if self.release.version >= (3, 0, 0):
            headers["X-Correlation-ID"] = correlation
        else:
            body["correlationId"] = correlation
        return web.json_response(body, status=status, headers=headers)

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        self.hits[request.path] += 1
        for route in self._routes:
            match = re.fullmatch(route.pattern, request.path)
            if route.method == request.method and match:
                break
        else:
            # Nest's router, before any guard: a route the release does not have, whatever the key.
            return self._error(404, f"Cannot {request.method} {request.path}")
        if route.public:
            return await self._handle(route, request, None, match.groupdict())
        # auth.service.ts validate(): no credentials, then validateApiKey().
        token = request.headers.get("x-api-key", "")
        if not token:
            return self._error(401, "Authentication required")
        key = self.key(token)
        if key is None:
            return self._error(401, "Invalid API key")
        # auth.service.ts authenticate(): the admin check comes before the permission check.
        if route.admin and not key.admin:
            return self._error(403, "Forbidden")
        need = required(self.release, route)
        if not granted(key.permissions, need):
            return self._error(403, f"Missing required permission: {need}")
        return await self._handle(route, request, key, match.groupdict())

    async def _handle(self, route: Route, request: web.Request, key: ApiKey | None,
                      params: dict[str, str]) -> web.StreamResponse:
        if route.name == "ping":
            return web.json_response({"res": "pong"})
        if route.name == "version":
            return self._version()
        assert key is not None
        if route.name == "me":
            return await self._me(key)
        if route.name == "api_key_me":
            return web.json_response(self._key_doc(key))
        if route.name == "api_key":
            return self._api_key(params["id"])
        if route.name in ("jobs", "queues"):
            await asyncio.sleep(self.delay)
            return await (self._jobs() if route.name == "jobs" else self._queues_v2())
        if route.name == "asset_jobs":
            return await self._asset_jobs(request, key, route)
        return await self._person_update(request, key, params["id"])

    # -- handlers ----------------------------------------------------------------------------------
    def _version(self) -> web.Response:
        if self.version_doc is not None:
            return web.json_response(self.version_doc)
        major, minor, patch = self.version
        doc: dict[str, Any] = {"major": major, "minor": minor, "patch": patch}
        if self.release.prerelease:  # ServerVersionResponseDto.prerelease, from SDK 3.0.0
            doc["prerelease"] = self.prerelease
        return web.json_response(doc)

    async def _me(self, key: ApiKey) -> web.Response:
        if not self.me_allowed or key.user is None:
            return self._error(403, "Missing required permission: user.read")
        email, name = "", ""
        if self._pool is not None:
            row = await self._pool.fetchrow(f'SELECT email, name FROM "{self._tables["user"]}" WHERE id = $1',
                                            uuid.UUID(key.user), timeout=10)
            if row:
                email, name = row["email"], row["name"]
        return web.json_response({"id": key.user, "email": email, "name": name, "isAdmin": key.admin})

    @staticmethod
    def _key_doc(key: ApiKey) -> dict[str, Any]:
        # api-key.service.ts getMine -> APIKeyResponseDto.
        stamp = "2026-01-01T00:00:00.000Z"
        return {"id": key.id, "name": key.name, "createdAt": stamp, "updatedAt": stamp,
                "permissions": list(key.permissions)}

    def _api_key(self, key_id: str) -> web.Response:
        # UUIDParamDto, then api-key.service.ts getById ("API Key not found").
        if not UUID_RE.match(key_id):
            return self._error(400, ["id must be a UUID"])
        for token in self.keys:
            key = self.key(token)
            if key is not None and key.id == key_id:
                return web.json_response(self._key_doc(key))
        return self._error(400, "API Key not found")

    async def _counts(self, name: str) -> tuple[dict[str, int], bool]:
        from bullmq import Queue

        queue = self._queues.get(name)
        if queue is None:
            queue = self._queues[name] = Queue(name, {"prefix": PREFIX, "connection": self.redis_url})
        counts = await queue.getJobCounts("active", "completed", "failed", "delayed", "waiting", "paused")
        return {k: int(v or 0) for k, v in counts.items()}, bool(await queue.isPaused())

    async def _jobs(self) -> web.Response:
        """``GET /api/jobs`` (before v2.4; ``getQueuesLegacy`` after)."""
        out = {}
        for name in self.release.queues:
            counts, paused = await self._counts(name)
            out[name] = {"jobCounts": counts, "queueStatus": {"isActive": counts["active"] > 0, "isPaused": paused}}
        return web.json_response(out)

    async def _queues_v2(self) -> web.Response:
        """``GET /api/queues`` (v2.4 and later)."""
        out = []
        for name in self.release.queues:
            counts, paused = await self._counts(name)
            out.append({"name": name, "isPaused": paused, "statistics": counts})
        return web.json_response(out)

    async def _asset_jobs(self, request: web.Request, key: ApiKey, route: Route) -> web.Response:
        body = await request.json()
        ids = [str(a) for a in body.get("assetIds", [])]
        self.posts.append((time.time(), ids))
        mode = "500" if self.fail_after is not None and self.accepted >= self.fail_after else self.mode
        if mode == "401":
            return self._error(401, "Invalid API key")
        if mode == "403":
            return self._error(403, f"Missing required permission: {required(self.release, route) or 'all'}")
        if mode == "500":
            return self._error(500, "Internal server error")
        # AssetJobsDto (class-validator before v3).
        if body.get("name") not in ASSET_JOB_NAMES:
            return self._error(400, ["name must be one of the following values: " + ", ".join(ASSET_JOB_NAMES)])
        if not all(UUID_RE.match(a) for a in ids):
            return self._error(400, ["each value in assetIds must be a UUID"])
        if not await self._owned(key.user, ids):
            # utils/access.ts requireAccess: one id outside the allowed set refuses the whole request.
            return self._error(400, "Not found or no asset.update access")
        jobs = []
        for a in ids:
            first = a not in self._seen
            self._seen.add(a)
            if self.queue_nothing or a in self.drop or (first and a in self.drop_first):
                continue  # accepted, nothing queued: what Immich v3.0.0 did (issue #29450)
            # asset.service.ts run(): one job per asset, data {id}; queueAll -> addBulk.
            jobs.append({"name": self.asset_job, "data": {"id": a}})
        if jobs:
            await asyncio.wait_for(self.queue.addBulk(jobs), 10)
        self.accepted += 1
        self.queued += len(jobs)
        return web.Response(status=204)

    async def _owned(self, user: str | None, ids: list[str]) -> bool:
        """Owner access (``AssetAccess.checkOwnerAccess``, server/src/repositories/access.repository.ts,
        used for ``asset.update``): the key's user owns the asset, and the asset is not ``locked``
        unless the session was elevated by a PIN, which an API key never is. ``user`` None (a test's
        shortcut) checks only the locked rule; without a database nothing is checked."""
        if self._pool is None or not ids:
            return True
        rule = " AND visibility::text <> 'locked'" if self._locked_rule else ""
        rows = await self._pool.fetch(
            f'SELECT id FROM "{self._tables["asset"]}" WHERE id = ANY($1) AND ($2::uuid IS NULL OR "ownerId" = $2)'
            f"{rule}", [uuid.UUID(a) for a in ids], uuid.UUID(user) if user is not None else None, timeout=10)
        return len(rows) == len(set(ids))

    async def _person_update(self, request: web.Request, key: ApiKey, person_id: str) -> web.Response:
        """``PUT /api/people/{id}`` (person.service.ts ``update``): person.update access on the person, then,
        with ``featureFaceAssetId``, asset.read access on that asset and a face of this person on it; the
        feature face is set and ``PersonGenerateThumbnail {id}`` queued whenever ``featureFaceAssetId`` is
        given, even when it names the face already featured (the service compares nothing)."""
        if not UUID_RE.match(person_id):
            return self._error(400, ["id must be a UUID"])
        body = await request.json()
        asset_id = body.get("featureFaceAssetId")
        self.person_updates.append((person_id, asset_id))
        if self._pool is None:
            return self._error(500, "Internal server error")
        face_t, asset_t = self._tables["face"], self._tables["asset"]
        person = await self._pool.fetchrow(
            'SELECT id::text, "ownerId"::text AS owner, name, "thumbnailPath" AS path, "isHidden" AS hidden, '
            '"isFavorite" AS favorite FROM person WHERE id = $1', uuid.UUID(person_id), timeout=10)
        # access.repository.ts PersonAccess.checkOwnerAccess: the person's owner only.
        if person is None or (key.user is not None and person["owner"] != key.user):
            return self._error(400, "Not found or no person.update access")
        face_id = None
        if asset_id is not None:
            if not isinstance(asset_id, str) or not UUID_RE.match(asset_id):
                return self._error(400, ["featureFaceAssetId must be a UUID"])
            # asset.read: owner access (not locked), or album / partner access (not simulated).
            if not await self._owned(key.user, [asset_id]):
                return self._error(400, "Not found or no asset.read access")
            # person.repository.ts getForFeatureFaceUpdate: a face of this person on that asset, online.
            face_id = await self._pool.fetchval(
                f'SELECT f.id FROM "{face_t}" f JOIN "{asset_t}" a ON a.id = f."assetId" AND NOT a."isOffline" '
                f'WHERE f."assetId" = $1 AND f."personId" = $2 LIMIT 1',
                uuid.UUID(asset_id), uuid.UUID(person_id), timeout=10)
            if face_id is None:
                return self._error(400, "Invalid assetId for feature face or asset is offline")
            await self._pool.execute('UPDATE person SET "faceAssetId" = $1 WHERE id = $2', face_id,
                                     uuid.UUID(person_id), timeout=10)
            await asyncio.wait_for(self.queue.add(self.person_job, {"id": person_id}, PERSON_JOB_OPTS), 10)
            self.queued += 1
        return web.json_response({
            "id": person["id"], "name": person["name"], "birthDate": None, "thumbnailPath": person["path"],
            "isHidden": person["hidden"], "isFavorite": person["favorite"],
        })
