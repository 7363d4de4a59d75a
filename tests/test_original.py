"""Why an asset stayed broken, from its original: a real regeneration run against the simulated Immich,
then ``remediation.original.check_originals`` on what is still broken.

An asset whose original was replaced by other bytes (a valid JPEG, just not the one Immich stored) stays
broken after its attempts; the original check says its content does not match ``asset.checksum``, while
an untouched original of another asset reads as sound.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from pathlib import Path

import asyncpg
import pytest

from immich_thumbnail_exporter.demo.embedded import EmbeddedValkey
from immich_thumbnail_exporter.demo.seed import jpeg
from immich_thumbnail_exporter.demo.simulation.api import SimulatedApi
from immich_thumbnail_exporter.remediation.engine import regenerate
from immich_thumbnail_exporter.remediation.original import check_originals
from immich_thumbnail_exporter.scan.targeted import media_mapper
from immich_thumbnail_exporter.sources.postgres import PostgresSource
from tests.conftest import Immich
from tests.remediation_kit import expected_sets, fake, imm, make_config, options, thumbnail_worker

pytestmark = pytest.mark.asyncio
__all__ = ["fake", "imm"]  # fixtures used by name


async def stored_original(imm: Immich, asset_id: str, content: bytes) -> Path:
    """Give the asset an original with ``content`` and the checksum Immich would have stored for it."""
    conn = await asyncpg.connect(imm.dsn, timeout=10)
    try:
        stored = await conn.fetchval('SELECT "originalPath" FROM asset WHERE id = $1', uuid.UUID(asset_id))
        await conn.execute("UPDATE asset SET checksum = $1 WHERE id = $2", hashlib.sha1(content).digest(),
                           uuid.UUID(asset_id))
    finally:
        await conn.close()
    local = Path(imm.media + stored[len("/data"):])
    await asyncio.to_thread(local.parent.mkdir, parents=True, exist_ok=True)
    await asyncio.to_thread(local.write_bytes, content)
    return local


async def test_a_replaced_original_is_why_the_asset_stays_broken(
    imm: Immich, fake: SimulatedApi, valkey: EmbeddedValkey, tmp_path: Path
) -> None:
    fixable, _, _ = await expected_sets(imm)
    swapped, sound = sorted(fixable)[:2]
    original = await stored_original(imm, swapped, jpeg(3000))
    await stored_original(imm, sound, jpeg(2000))
    # Restored from the wrong backup: a good JPEG, not the one Immich stored.
    await asyncio.to_thread(original.write_bytes, jpeg(3001))

    config = make_config(imm, fake, tmp_path, valkey.url)
    # Immich's job runs and cannot make thumbnails from it: the jobs finish and nothing is written.
    async with thumbnail_worker(imm, valkey, writes=False) as worker:
        report = await regenerate(config, options(tmp_path, apply=True, wait=True, retry_after=60, max_attempts=1,
                                                  assets=(swapped,)))
    row = report.rows[swapped]
    assert row.result in ("gave_up", "still_missing"), row
    assert swapped in worker.processed  # it was asked for, queued and run: not a request problem

    pg = PostgresSource(config.database)
    try:
        schema = await pg.schema()
        mapper = await media_mapper(pg, config.media)
        verdicts = await check_originals(pg, schema, mapper, [swapped, sound, str(uuid.uuid4()), "nope"])
    finally:
        await pg.close()
    assert set(verdicts) == {swapped, sound}  # an id that names no asset has no original
    assert verdicts[swapped].code == "original_checksum_mismatch", verdicts[swapped]
    assert verdicts[swapped].media == "image jpeg" and verdicts[swapped].checksum_checked
    assert "is not the file Immich stored" in verdicts[swapped].detail
    assert verdicts[sound].code == "original_ok", verdicts[sound]
