"""The one simulated Immich (``demo/simulation/``) answers as each Immich release does, and the exporter's
key check (``sources/immich_access.py``) agrees with it: a key with exactly the documented permissions
regenerates, a key one permission short is refused before anything is sent, naming the permission.

Real PostgreSQL (the seeded demo schema), real Valkey, real BullMQ jobs; the HTTP API is the one fake.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import pytest_asyncio

from immich_thumbnail_exporter.config import load_config
from immich_thumbnail_exporter.demo.embedded import EmbeddedValkey
from immich_thumbnail_exporter.demo.seed import Plan
from immich_thumbnail_exporter.demo.simulation.api import JOB_OPTS, PERSON_JOB_OPTS, ApiKey, SimulatedApi
from immich_thumbnail_exporter.demo.simulation.releases import release_for
from immich_thumbnail_exporter.demo.simulation.worker import SimulatedWorker
from immich_thumbnail_exporter.sources.immich_access import FACES, QUEUE_FALLBACK, REGENERATION, key_access
from immich_thumbnail_exporter.sources.immich_api import ImmichApi
from tests.conftest import Immich, wait_for
from tests.remediation_kit import ERA

pytestmark = pytest.mark.asyncio

# The releases the project supports, and the fewest permissions a key needs there to regenerate
# (docs/permissions.md). v1.132-v1.135: the route declares none and an API key is checked only
# against a declared one; v1.136-v3.1: an undeclared route requires "all"; v3.2: job.create.
SUPPORTED = ("v1.132", "v1.135", "v2.4", "v2.7", "v3.1", "v3.2")
REGENERATE_NEEDS: dict[str, tuple[str, ...]] = {
    "v1.132": (), "v1.135": (), "v2.4": ("all",), "v2.7": ("all",), "v3.1": ("all",), "v3.2": ("job.create",),
}
# One permission short of that (v1.13x: nothing to be short of; a key still has to name something).
SHORT: dict[str, tuple[str, ...]] = {
    "v1.132": ("asset.read",), "v1.135": ("asset.read",), "v2.4": ("job.create", "asset.update"),
    "v2.7": ("job.create", "asset.update"), "v3.1": ("job.create", "asset.update"), "v3.2": ("asset.update",),
}
PLAN = Plan(assets=40, locked_thumbnail_missing=1, person_thumbnail_missing=1)


@pytest_asyncio.fixture
async def imm(immich_factory: Any) -> Immich:
    result: Immich = await immich_factory(ERA, PLAN)
    return result


async def _owner_assets(imm: Immich) -> tuple[str, list[str]]:
    conn = await asyncpg.connect(imm.dsn, timeout=10)
    try:
        owner = str(await conn.fetchval('SELECT "ownerId"::text FROM asset ORDER BY id LIMIT 1', timeout=10))
        ids = [r[0] for r in await conn.fetch(
            """SELECT id::text FROM asset WHERE "ownerId" = $1 AND visibility::text = 'timeline' ORDER BY id LIMIT 3""",
            uuid.UUID(owner), timeout=10)]
    finally:
        await conn.close()
    return owner, ids


async def _call(url: str, method: str, path: str, key: str | None = None, body: Any = None) -> tuple[int, Any]:
    headers = {"x-api-key": key} if key else {}
    async with aiohttp.ClientSession() as session, session.request(
        method, f"{url}{path}", json=body, headers=headers, timeout=aiohttp.ClientTimeout(10)
    ) as resp:
        text = await resp.text()
        return resp.status, (await resp.json()) if text else None


@pytest_asyncio.fixture
async def fake_factory(imm: Immich, valkey: EmbeddedValkey) -> AsyncIterator[Any]:
    made: list[SimulatedApi] = []

    async def make(release: str, keys: dict[str, Any], **kw: Any) -> SimulatedApi:
        api = SimulatedApi(imm.dsn, valkey.url, keys, release=release, **kw)
        await api.start()
        made.append(api)
        return api

    yield make
    for api in made:
        await api.stop()


async def _waiting(api: SimulatedApi) -> int:
    return int((await api.queue.getJobCounts("waiting"))["waiting"])


# -- error texts, admin checks and routes per release ------------------------------------------------------


@pytest.mark.parametrize("release", SUPPORTED)
async def test_routes_and_error_texts(imm: Immich, fake_factory: Any, release: str) -> None:
    owner, _ = await _owner_assets(imm)
    keys = {"admin": ApiKey(owner, ("all",), admin=True), "user": ApiKey(owner, ("all",), admin=False),
            "narrow": ApiKey(owner, ("asset.read",), admin=True)}
    api = await fake_factory(release, keys)
    rel = release_for(release)
    # A bad key: the API-key text, never the session text.
    status, doc = await _call(api.url, "GET", "/api/users/me", "nope")
    assert (status, doc["message"], doc["error"]) == (401, "Invalid API key", "Unauthorized")
    # A route the release does not have: 404 whatever the key, a good one or none.
    for key in ("admin", "nope", None):
        status, doc = await _call(api.url, "GET", "/api/queues", key)
        assert status == (200 if rel.queues_route and key == "admin" else 404 if not rel.queues_route else 401)
        if not rel.queues_route:
            assert doc["message"] == "Cannot GET /api/queues"
    # A non-admin on an admin route: Forbidden, before any permission is looked at.
    status, doc = await _call(api.url, "GET", "/api/jobs", "user")
    assert (status, doc["message"]) == (403, "Forbidden")
    status, doc = await _call(api.url, "GET", "/api/jobs", "admin")
    assert status == 200 and set(doc) == set(rel.queues)
    # users/me: user.read from v1.137; nothing declared before (any key).
    status, doc = await _call(api.url, "GET", "/api/users/me", "narrow")
    if rel.version >= (1, 137, 0):
        assert (status, doc["message"]) == (403, "Missing required permission: user.read")
    else:
        assert status == 200 and doc["id"] == owner and doc["isAdmin"] is True
    # server/version: prerelease from v3.0 only; no key needed.
    status, doc = await _call(api.url, "GET", "/api/server/version")
    assert status == 200 and ("prerelease" in doc) == (rel.version >= (3, 0, 0))
    # v3 moved the correlation id from the body to a header.
    status, doc = await _call(api.url, "GET", "/api/users/me", "nope")
    assert ("correlationId" in doc) == (rel.version < (3, 0, 0))


@pytest.mark.parametrize("release", SUPPORTED)
async def test_api_keys_me(imm: Immich, fake_factory: Any, release: str) -> None:
    owner, _ = await _owner_assets(imm)
    keys = {"k": ApiKey(owner, ("asset.read", "person.update"), admin=False),
            "all": ApiKey(owner, ("all",))}
    api = await fake_factory(release, keys)
    status, doc = await _call(api.url, "GET", "/api/api-keys/me", "k")
    if release_for(release).api_keys_me:
        # Any valid key reads itself, whatever its permissions (permission: false).
        assert status == 200 and doc["permissions"] == ["asset.read", "person.update"]
    else:
        # Before v2.4 "me" is a key id on GET /api-keys/:id (apiKey.read), and not a UUID.
        assert (status, doc["message"]) == (403, "Missing required permission: apiKey.read")
        status, doc = await _call(api.url, "GET", "/api/api-keys/me", "all")
        assert (status, doc["message"]) == (400, ["id must be a UUID"])


# -- regeneration: the documented permissions work, one short is refused before anything is sent ---------


@pytest.mark.parametrize("release", SUPPORTED)
async def test_documented_permissions_regenerate(imm: Immich, fake_factory: Any, release: str) -> None:
    owner, ids = await _owner_assets(imm)
    needs = REGENERATE_NEEDS[release] or ("asset.read",)
    api = await fake_factory(release, {"k": ApiKey(owner, needs, admin=False)})
    access = await _access(api, "k")
    assert access.feature(REGENERATION).allowed is True
    status, _ = await _call(api.url, "POST", "/api/assets/jobs", "k",
                            {"name": "regenerate-thumbnail", "assetIds": ids})
    assert status == 204
    jobs = await api.queue.getJobs(["waiting"])
    assert sorted(j.data["id"] for j in jobs) == sorted(ids)
    assert {j.name for j in jobs} == {release_for(release).asset_job}
    assert all(j.opts.get("attempts") == JOB_OPTS["attempts"] for j in jobs)


@pytest.mark.parametrize("release", SUPPORTED)
async def test_one_permission_short_is_refused_first(
    imm: Immich, fake_factory: Any, release: str, tmp_path: Any
) -> None:
    owner, ids = await _owner_assets(imm)
    api = await fake_factory(release, {"k": ApiKey(owner, SHORT[release], admin=False)})
    rel = release_for(release)
    status, doc = await _call(api.url, "POST", "/api/assets/jobs", "k",
                              {"name": "regenerate-thumbnail", "assetIds": ids})
    if not REGENERATE_NEEDS[release]:
        assert status == 204  # nothing to be short of: any key may ask (v1.132-v1.135)
        return
    missing = REGENERATE_NEEDS[release][0]
    assert (status, doc["message"]) == (403, f"Missing required permission: {missing}")
    assert await _waiting(api) == 0
    access = await _access(api, "k")
    feature = access.feature(REGENERATION)
    assert rel.api_keys_me and feature.allowed is False and feature.missing == missing
    assert f"lacks permission {missing}" in feature.line
    # regenerate --apply stops before its first request, exit 2, with that line.
    from tests.remediation_kit import cli

    posts = len(api.posts)
    code, out, err = await cli("regenerate", "--apply", "--media.root", imm.media, "--state-dir", str(tmp_path),
                               env={"DB_URL": imm.dsn, "IMMICH_URL": api.url, "IMMICH_API_KEY": "k"})
    assert code == 2, (out, err)
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"regeneration: refused: the API key lacks permission {missing}" in errors[0], err
    assert len(api.posts) == posts


async def _access(api: SimulatedApi, key: str) -> Any:
    config = load_config(None, environ={"DB_URL": "postgresql://nobody@127.0.0.1:1/none", "IMMICH_URL": api.url,
                                        "IMMICH_API_KEY": key})
    client = ImmichApi(config.immich)
    try:
        return await key_access(client)
    finally:
        await client.close()


@pytest.mark.parametrize("release", SUPPORTED)
async def test_queue_fallback_and_faces_per_key(imm: Immich, fake_factory: Any, release: str) -> None:
    owner, _ = await _owner_assets(imm)
    rel = release_for(release)
    queue_perm = "queue.read" if rel.queues_route else "job.read"
    api = await fake_factory(release, {
        "reader": ApiKey(owner, (queue_perm, "user.read"), admin=True),
        "faces": ApiKey(owner, ("person.update", "user.read"), admin=False),
    })
    reader, faces = await _access(api, "reader"), await _access(api, "faces")
    if rel.api_keys_me:
        assert reader.feature(QUEUE_FALLBACK).allowed is True
        assert (faces.feature(QUEUE_FALLBACK).allowed, faces.feature(QUEUE_FALLBACK).missing) == (False, queue_perm)
        assert faces.feature(FACES).allowed is True
        assert (reader.feature(FACES).allowed, reader.feature(FACES).missing) == (False, "person.update")
    else:
        # v1.13x cannot tell a key its permissions; GET /api/jobs declares none there: admin is enough.
        assert reader.permissions is None and reader.is_admin is True
        assert reader.feature(QUEUE_FALLBACK).allowed is True
        assert (faces.feature(QUEUE_FALLBACK).allowed, faces.feature(QUEUE_FALLBACK).missing) == (False, "admin")
        assert faces.feature(FACES).allowed is None
    # What the check said is what the API does.
    route = "/api/queues" if rel.queues_route else "/api/jobs"
    assert (await _call(api.url, "GET", route, "reader"))[0] == 200
    assert (await _call(api.url, "GET", route, "faces"))[0] == 403


# -- owner access, locked assets, whole-batch refusal -----------------------------------------------------


@pytest.mark.parametrize("release", ["v1.135", "v3.2"])
async def test_a_locked_asset_sinks_its_whole_batch(imm: Immich, fake_factory: Any, release: str) -> None:
    owner, ids = await _owner_assets(imm)
    locked = sorted(imm.expected.locked_asset_ids)
    assert len(locked) == 1
    conn = await asyncpg.connect(imm.dsn, timeout=10)
    try:
        locked_owner = await conn.fetchval('SELECT "ownerId"::text FROM asset WHERE id = $1', uuid.UUID(locked[0]))
        mine = [r[0] for r in await conn.fetch(
            """SELECT id::text FROM asset WHERE "ownerId" = $1 AND visibility::text = 'timeline' LIMIT 2""",
            uuid.UUID(locked_owner))]
    finally:
        await conn.close()
    api = await fake_factory(release, {"k": ApiKey(locked_owner, ("all",))})
    status, doc = await _call(api.url, "POST", "/api/assets/jobs", "k",
                              {"name": "regenerate-thumbnail", "assetIds": [*mine, locked[0]]})
    assert (status, doc["message"]) == (400, "Not found or no asset.update access")
    assert await _waiting(api) == 0
    # Another user's asset does the same; without them the owner's batch is queued, one job per asset.
    other = [a for a in ids if a not in mine] if owner != locked_owner else []
    if other:
        status, _ = await _call(api.url, "POST", "/api/assets/jobs", "k",
                                {"name": "regenerate-thumbnail", "assetIds": [*mine, other[0]]})
        assert status == 400
    status, _ = await _call(api.url, "POST", "/api/assets/jobs", "k",
                            {"name": "regenerate-thumbnail", "assetIds": mine})
    assert status == 204 and await _waiting(api) == len(mine)


async def test_v3_0_0_answers_204_and_queues_nothing(imm: Immich, fake_factory: Any) -> None:
    owner, ids = await _owner_assets(imm)
    api = await fake_factory("v3.0", {"k": ApiKey(owner)}, queue_nothing=True)
    status, _ = await _call(api.url, "POST", "/api/assets/jobs", "k", {"name": "regenerate-thumbnail",
                                                                        "assetIds": ids})
    assert status == 204 and api.accepted == 1
    assert await _waiting(api) == 0  # issue #29450: only a job in Redis proves a request was queued


# -- face thumbnails ------------------------------------------------------------------------------------


@pytest.mark.parametrize("release", ["v1.135", "v2.4", "v3.2"])
async def test_people_update_queues_the_face_job_and_the_worker_writes_it(
    imm: Immich, fake_factory: Any, valkey: EmbeddedValkey, release: str
) -> None:
    (person, asset), = [(p, a) for p, a in imm.expected.person_faces.items()
                        if p in imm.expected.person_thumbnails_missing]
    conn = await asyncpg.connect(imm.dsn, timeout=10)
    try:
        owner, path = await conn.fetchrow('SELECT "ownerId"::text, "thumbnailPath" FROM person WHERE id = $1',
                                          uuid.UUID(person))
    finally:
        await conn.close()
    local = imm.media + path[len("/data"):]
    api = await fake_factory(release, {"k": ApiKey(owner, ("person.update",), admin=False),
                                       "short": ApiKey(owner, ("person.read", "asset.read"), admin=False)})
    status, doc = await _call(api.url, "PUT", f"/api/people/{person}", "short", {"featureFaceAssetId": asset})
    assert (status, doc["message"]) == (403, "Missing required permission: person.update")
    # An asset without a face of this person is refused with Immich's text.
    status, doc = await _call(api.url, "PUT", f"/api/people/{person}", "k",
                              {"featureFaceAssetId": str(uuid.uuid4())})
    assert status == 400
    # The same feature face again: person.service.ts queues the job whenever featureFaceAssetId is given.
    for _ in range(2):
        status, doc = await _call(api.url, "PUT", f"/api/people/{person}", "k", {"featureFaceAssetId": asset})
        assert status == 200 and doc["id"] == person
    jobs = await api.queue.getJobs(["prioritized", "waiting"])
    assert [(j.name, j.data) for j in jobs] == [(release_for(release).person_job, {"id": person})] * 2
    assert all(j.opts.get("priority") == PERSON_JOB_OPTS["priority"] for j in jobs)
    worker = SimulatedWorker(imm.dsn, imm.media, valkey.url, delay=0.0)
    await worker.start()
    try:
        await wait_for(lambda: len(worker.persons) == 2, timeout=30)
    finally:
        await worker.stop()
    data = Path(local).read_bytes()  # noqa: ASYNC240 - one small file, after the worker stopped
    assert data[:3] == b"\xff\xd8\xff" and data[-2:] == b"\xff\xd9"
