"""Why an asset stayed broken, from its original: a real regeneration run against the simulated Immich,
then ``remediation.original.check_originals`` on what is still broken.

An asset whose original was replaced by other bytes (a valid JPEG, just not the one Immich stored) stays
broken after its attempts; the original check says its content does not match ``asset.checksum``, while
an untouched original of another asset reads as sound.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from dataclasses import replace
from pathlib import Path

import asyncpg
import pytest

from immich_thumbnail_exporter.demo.embedded import EmbeddedValkey
from immich_thumbnail_exporter.demo.seed import jpeg
from immich_thumbnail_exporter.demo.simulation.api import SimulatedApi
from immich_thumbnail_exporter.remediation.engine import regenerate
from immich_thumbnail_exporter.remediation.original import check_originals
from immich_thumbnail_exporter.remediation.rounds import Remediator
from immich_thumbnail_exporter.scan.targeted import media_mapper
from immich_thumbnail_exporter.sources.postgres import PostgresSource
from tests.conftest import Immich, wait_for
from tests.remediation_kit import (
    API_KEY,
    cli,
    expected_sets,
    fake,
    imm,
    ledger_rows,
    make_config,
    options,
    thumbnail_worker,
)

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
    # The run says why: its original is not the file Immich stored; the ledger keeps it.
    assert row.why == "original_checksum_mismatch", row
    assert "is not the file Immich stored" in row.detail, row
    assert ledger_rows(tmp_path)[swapped]["why"] == "original_checksum_mismatch"

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


async def test_regenerate_says_the_original_does_not_match_its_checksum(
    imm: Immich, fake: SimulatedApi, valkey: EmbeddedValkey, tmp_path: Path
) -> None:
    """The command line: the asset stays broken after its attempt, and the report's line for it (table)
    and its ``why`` code (JSON) say that its original is not the file Immich stored."""
    fixable, _, _ = await expected_sets(imm)
    swapped = sorted(fixable)[0]
    original = await stored_original(imm, swapped, jpeg(3000))
    await asyncio.to_thread(original.write_bytes, jpeg(3001))
    env = {"DB_URL": imm.dsn, "IMMICH_URL": fake.url, "IMMICH_API_KEY": API_KEY, "REDIS_URL": valkey.url}
    args = ("regenerate", "--media.root", imm.media, "--state-dir", str(tmp_path), "--asset", swapped, "--apply",
            "--wait", "--retry-after", "60s", "--max-attempts", "1", "--timeout", "60s")
    async with thumbnail_worker(imm, valkey, writes=False) as worker:
        code, out, err = await cli(*args, "--format", "json", env=env)
    assert code == 1, (out, err)
    assert swapped in worker.processed
    (row,) = [r for r in json.loads(out)["assets"] if r["asset_id"] == swapped]
    assert (row["result"], row["why"]) == ("gave_up", "original_checksum_mismatch"), row
    assert "is not the file Immich stored" in row["detail"]

    # The next run (the table): given up earlier, and still saying why.
    code, out, err = await cli(*args, env=env)
    assert code == 1, (out, err)
    (line,) = [line for line in out.splitlines() if line.startswith(swapped)]
    assert line.split()[1] == "gave_up", line
    assert "is not the file Immich stored" in line and "its SHA-1" in line, line


async def test_serve_keeps_the_original_as_the_reason_in_its_ledger(
    imm: Immich, fake: SimulatedApi, valkey: EmbeddedValkey, tmp_path: Path
) -> None:
    """serve's remediation: once the attempt is over and the asset still broken, its original is read;
    the ledger's ``why`` is the original's when it is broken, the job's otherwise. An asset whose
    original is broken is given up at once (asking again cannot help); the other waits for its retry."""
    fixable, _, _ = await expected_sets(imm)
    swapped, sound = sorted(fixable)[:2]
    original = await stored_original(imm, swapped, jpeg(3000))
    await stored_original(imm, sound, jpeg(2000))
    await asyncio.to_thread(original.write_bytes, jpeg(3001))
    config = make_config(imm, fake, tmp_path, valkey.url, **{
        "checks.verify_headers": True, "remediation.enabled": True, "remediation.interval": "1s",
        "remediation.verify_after": "30s", "remediation.confirm_within": "3s", "remediation.max_attempts": 3,
        "remediation.requests_per_second": 50})
    pg = PostgresSource(config.database)
    remediator = Remediator(config, pg, None)

    async def settled() -> bool:
        await remediator.round()
        rows = ledger_rows(tmp_path)
        return (swapped in rows and rows[swapped]["state"] == "gave_up" and sound in rows
                and rows[sound]["state"] == "still_missing")

    try:
        async with thumbnail_worker(imm, valkey, writes=False):
            await wait_for(settled, timeout=60, interval=0.5)
    finally:
        await remediator.close()
        await pg.close()
    rows = ledger_rows(tmp_path)
    assert rows[swapped]["why"] == "original_checksum_mismatch", dict(rows[swapped])
    assert "is not the file Immich stored" in rows[swapped]["why_text"]
    assert rows[sound]["why"] == "no_effect", dict(rows[sound])
    assert rows[swapped]["attempts"] == 1 and "is not the file Immich stored" in rows[swapped]["gave_up_reason"]
    assert fake.submissions()[swapped] == 1


async def test_regenerate_gives_up_when_the_original_is_why(
    imm: Immich, fake: SimulatedApi, valkey: EmbeddedValkey, tmp_path: Path
) -> None:
    """Attempts left, and the asset still broken when the run ends: its original is not the file Immich
    stored, so the one decision gives it up with that reason, and the next run asks nothing."""
    fixable, _, _ = await expected_sets(imm)
    swapped = sorted(fixable)[0]
    original = await stored_original(imm, swapped, jpeg(3000))
    await asyncio.to_thread(original.write_bytes, jpeg(3001))
    config = make_config(imm, fake, tmp_path, valkey.url)
    opts = options(tmp_path, apply=True, wait=True, retry_after=60, max_attempts=3, timeout=5, assets=(swapped,))
    async with thumbnail_worker(imm, valkey, writes=False):
        report = await regenerate(config, opts)
        row = report.rows[swapped]
        assert (row.result, row.reason, row.why) == ("gave_up", "original_checksum_mismatch",
                                                     "original_checksum_mismatch"), row
        assert row.attempts == 1
        rows = ledger_rows(tmp_path)
        assert (rows[swapped]["state"], rows[swapped]["why"]) == ("gave_up", "original_checksum_mismatch")
        again = await regenerate(config, replace(opts, wait=False))
    assert again.rows[swapped].result == "gave_up"
    assert again.rows[swapped].why == "original_checksum_mismatch"
    assert fake.submissions()[swapped] == 1
