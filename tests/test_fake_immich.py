"""The one simulated Immich (``demo/simulation/``) answers as Immich does: checked here against what
Immich's source says, so that the tests built on it prove something."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import asyncpg
import pytest
import pytest_asyncio

from immich_thumbnail_exporter.demo.embedded import EmbeddedValkey
from immich_thumbnail_exporter.demo.simulation.api import SimulatedApi
from tests.conftest import Immich
from tests.remediation_kit import ERA, PLAN

KEY = "owner-key"

pytestmark = pytest.mark.asyncio


@pytest_asyncio.fixture
async def imm(immich_factory: Any) -> Immich:
    result: Immich = await immich_factory(ERA, PLAN)
    return result


async def _owner_assets(imm: Immich) -> tuple[str, list[str]]:
    conn = await asyncpg.connect(imm.dsn, timeout=10)
    try:
        owner = await conn.fetchval('SELECT "ownerId"::text FROM asset LIMIT 1', timeout=10)
        ids = [r[0] for r in await conn.fetch(
            """SELECT id::text FROM asset WHERE "ownerId" = $1 AND visibility::text = 'timeline' ORDER BY id LIMIT 3""",
            uuid.UUID(owner), timeout=10)]
    finally:
        await conn.close()
    return owner, ids


async def _post(url: str, key: str, body: Any) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.post(
        f"{url}/api/assets/jobs", json=body, headers={"x-api-key": key}, timeout=aiohttp.ClientTimeout(10)
    ) as resp:
        text = await resp.text()
        return resp.status, (await resp.json()) if text else None


@pytest_asyncio.fixture
async def owned(imm: Immich, valkey: EmbeddedValkey) -> AsyncIterator[tuple[SimulatedApi, list[str]]]:
    owner, ids = await _owner_assets(imm)
    api = SimulatedApi(imm.dsn, valkey.url, {KEY: owner})
    await api.start()
    try:
        yield api, ids
    finally:
        await api.stop()


async def test_a_locked_asset_sinks_its_whole_batch(imm: Immich, owned: tuple[SimulatedApi, list[str]]) -> None:
    api, ids = owned
    conn = await asyncpg.connect(imm.dsn, timeout=10)
    try:
        await conn.execute("UPDATE asset SET visibility = 'locked' WHERE id = $1", uuid.UUID(ids[0]), timeout=10)
    finally:
        await conn.close()
    status, doc = await _post(api.url, KEY, {"name": "regenerate-thumbnail", "assetIds": ids})
    assert (status, doc["message"]) == (400, "Not found or no asset.update access")
    assert await api.queue.getJobCounts("waiting") == {"waiting": 0}
    # Without the locked asset the same owner's batch is accepted and queued, one job per asset.
    status, _ = await _post(api.url, KEY, {"name": "regenerate-thumbnail", "assetIds": ids[1:]})
    assert status == 204
    assert await asyncio.wait_for(api.queue.getJobCounts("waiting"), 10) == {"waiting": 2}
