"""What Immich will not do for an API key, and a ledger whose disk fills: locked assets are never sent, a
batch Immich refuses is halved until the refused asset stands alone, and a full state folder is said on
every round and in ``regenerate``'s report.

Against the demo's simulated Immich (which refuses a locked asset, and with it the whole request, as
Immich's ``requireAccess`` does) and a real small tmpfs for the state folder: no disk is mocked.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml

from immich_thumbnail_exporter.collectors.remediation import RemediationCollection
from immich_thumbnail_exporter.config import Config
from immich_thumbnail_exporter.demo.embedded import EmbeddedValkey
from immich_thumbnail_exporter.demo.simulation.api import SimulatedApi
from immich_thumbnail_exporter.remediation.engine import regenerate
from immich_thumbnail_exporter.remediation.ledger import Ledger
from immich_thumbnail_exporter.remediation.room import free_room, room_warning, round_room
from immich_thumbnail_exporter.remediation.submit import submit_batch
from immich_thumbnail_exporter.sources.immich_api import ImmichApi
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
    problem_assets,
    results,
    thumbnail_worker,
)

pytestmark = pytest.mark.asyncio
__all__ = ["fake", "imm"]  # fixtures used by name

REFUSED = "Not found or no asset.update access"


async def lock(imm: Immich, asset_id: str) -> None:
    """Move an asset to Immich's locked folder (what the app does with the PIN)."""
    conn = await asyncpg.connect(imm.dsn, timeout=10)
    try:
        await conn.execute("UPDATE asset SET visibility = 'locked' WHERE id = $1", uuid.UUID(asset_id), timeout=10)
    finally:
        await conn.close()


@contextlib.contextmanager
def small_disk(path: Path, size: str = "4m") -> Iterator[Path]:
    """A real tmpfs of ``size`` mounted at ``path`` (the tests run as root)."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True,
                   capture_output=True, timeout=30)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True, timeout=30)


def fill(disk: Path) -> Path:
    """Write a file until the filesystem has no room left."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    chunk = b"\0" * 4096
    try:
        while True:
            try:
                os.write(fd, chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                break
    finally:
        os.close(fd)
    assert free_room(str(disk)) == 0
    return filler


def serve_config(imm: Immich, fake: SimulatedApi, valkey: EmbeddedValkey, state: Path, **more: Any) -> Config:
    return make_config(imm, fake, state, valkey.url, **{
        "checks.verify_headers": True, "intervals.files": "1h", "remediation.enabled": True,
        "remediation.interval": "1h", "remediation.verify_after": "1h", "remediation.confirm_within": "2s",
        "remediation.requests_per_second": 50, **more,
    })


@contextlib.asynccontextmanager
async def collection(config: Config) -> AsyncIterator[RemediationCollection]:
    pg = PostgresSource(config.database)
    coll = RemediationCollection(config, pg)
    try:
        yield coll
    finally:
        await coll.close()
        await pg.close()


# -- locked assets and refused batches -------------------------------------------------------------------


async def test_a_locked_asset_is_skipped_and_every_other_fixed(
    imm: Immich, fake: SimulatedApi, valkey: EmbeddedValkey, tmp_path: Path
) -> None:
    fixable, _, _ = await expected_sets(imm)
    locked = sorted(fixable)[1]
    await lock(imm, locked)
    assert locked in await problem_assets(imm)  # the scan counts it like any other
    config = make_config(imm, fake, tmp_path, valkey.url)
    async with thumbnail_worker(imm, valkey):
        report = await regenerate(config, options(tmp_path, apply=True, wait=True))
    assert results(report)["fixed"] == fixable - {locked}
    row = report.rows[locked]
    assert (row.result, row.reason) == ("skipped", "locked")
    assert "locked folder" in row.detail and "PIN" in row.detail
    # No request twice, none for the locked asset, none refused.
    assert fake.submissions() == Counter({a: 1 for a in fixable - {locked}})
    assert report.requests["rejected"] == 0 and report.exit_code() == 0
    assert not await problem_assets(imm) & (fixable - {locked})
    assert locked not in ledger_rows(tmp_path)


async def test_a_refused_batch_is_halved_until_the_refused_asset_stands_alone(
    imm: Immich, fake: SimulatedApi, valkey: EmbeddedValkey, tmp_path: Path
) -> None:
    fixable, _, _ = await expected_sets(imm)
    ids = sorted(fixable)[:9]
    refused = ids[5]
    await lock(imm, refused)  # locked after the exporter looked: Immich refuses every request naming it
    config = make_config(imm, fake, tmp_path, valkey.url)
    ledger, api = Ledger(str(tmp_path)), ImmichApi(config.immich)
    try:
        outcome = await submit_batch(api, ledger, {a: {"preview"} for a in ids}, max_attempts=3)
        entries = ledger.get(ids)
    finally:
        await api.close()
        ledger.close()
    assert outcome.refused == {refused: REFUSED}
    assert sorted(outcome.submitted) == sorted(set(ids) - {refused})
    # 9 -> (4 | 5) -> the 5 -> (2 | 3) -> the 2 -> (1 | 1): four refused requests, three accepted.
    posts = [p for _, p in fake.posts]
    assert [len(p) for p in posts if refused in p] == [9, 5, 2, 1]
    accepted = [p for p in posts if refused not in p]
    assert outcome.accepted_requests == accepted
    assert Counter(a for p in accepted for a in p) == Counter({a: 1 for a in ids if a != refused})
    assert outcome.requests == Counter({"accepted": 3, "rejected": 4})
    # Every request was in the ledger before it was sent; the refused asset's claim was released.
    assert outcome.claimed_at <= min(t for t, _ in fake.posts)
    assert all(entries[a].state == "submitted" and entries[a].first_submitted == outcome.claimed_at
               for a in ids if a != refused)
    e = entries[refused]
    assert (e.state, e.attempts, e.last_outcome, e.detail) == ("error", 0, "refused", REFUSED)


async def test_serve_never_sends_a_locked_asset(
    imm: Immich, fake: SimulatedApi, valkey: EmbeddedValkey, tmp_path: Path
) -> None:
    fixable, _, _ = await expected_sets(imm)
    locked = sorted(fixable)[0]
    await lock(imm, locked)
    config = serve_config(imm, fake, valkey, tmp_path, **{"remediation.verify_after": "2s"})
    async with thumbnail_worker(imm, valkey), collection(config) as coll:
        out = await coll.collect()
        assert out.error is None, out.error
        assert coll.last is not None and coll.last.locked == 1

        async def all_fixed() -> bool:
            outcome = await coll.collect()
            assert outcome.error is None, outcome.error
            return coll.verified.get("fixed", 0) == len(fixable) - 1

        await wait_for(all_fixed, timeout=60, interval=0.2)
    assert fake.submissions() == Counter({a: 1 for a in fixable - {locked}})
    assert locked not in ledger_rows(tmp_path)


# -- the ledger's disk -----------------------------------------------------------------------------------


async def test_a_full_ledger_disk_fails_every_round_until_a_write_succeeds(
    imm: Immich, fake: SimulatedApi, valkey: EmbeddedValkey, tmp_path: Path
) -> None:
    with small_disk(tmp_path / "state") as disk:
        config = serve_config(imm, fake, valkey, disk)
        async with collection(config) as coll:  # no worker: the requests stay in flight
            first = await coll.collect()
            assert first.error is None, first.error
            assert coll.last is not None and coll.last.submitted > 0
            filler = fill(disk)
            coll.remediator._full_next = 0.0  # the next round is a full one: it writes, and fails
            failed = await coll.collect()
            assert failed.error is not None and "database or disk is full" in failed.error
            # The short rounds in between write nothing of their own; they still say the disk is full.
            for _ in range(3):
                short = await coll.collect()
                assert not coll.remediator.last_full
                assert short.error is not None and "database or disk is full" in short.error, short.error
            filler.unlink()
            back = await coll.collect()
            assert not coll.remediator.last_full
            assert back.error is None, back.error
            assert coll.ledger is not None and coll.ledger.failed is None


class FillingApi(SimulatedApi):
    """The simulated Immich, and a disk that fills as soon as it has taken the first request."""

    def __init__(self, *args: Any, disk: Path, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.disk = disk
        self.filler: Path | None = None

    async def _asset_jobs(self, request: Any, *args: Any) -> Any:
        response = await super()._asset_jobs(request, *args)
        if self.filler is None:
            self.filler = fill(self.disk)
        return response


async def test_regenerate_reports_what_it_sent_before_the_disk_filled(
    imm: Immich, valkey: EmbeddedValkey, tmp_path: Path
) -> None:
    fixable, _, _ = await expected_sets(imm)
    with small_disk(tmp_path / "state") as disk:
        api = FillingApi(imm.dsn, valkey.url, {API_KEY: None}, disk=disk)
        await api.start()
        try:
            config = make_config(imm, api, disk, valkey.url)
            report = await regenerate(config, options(disk, apply=True, batch_size=2))
        finally:
            await api.stop()
        assert api.filler is not None
        api.filler.unlink()
        rows = ledger_rows(disk)
    (sent,) = [ids for _, ids in api.posts]
    assert len(sent) == 2 and set(sent) <= fixable
    assert report.exit_code() == 2
    (error,) = report.errors
    assert "database or disk is full" in error and "the 1 request(s) sent before (2 asset(s)" in error
    assert report.sent == [sent]
    # What was sent is listed, and recorded (its answer could not be written: still "submitting", which
    # the next run verifies and never resends early); nothing else was claimed or sent.
    by = results(report)
    assert by["submitted"] == set(sent)
    assert all("recorded in the ledger" in report.rows[a].detail for a in sent)
    assert {a: rows[a]["state"] for a in rows} == dict.fromkeys(sent, "submitting")
    assert by["not_submitted"] == fixable - set(sent)


async def test_check_config_warns_when_the_state_folder_has_less_room_than_a_round(
    imm: Immich, fake: SimulatedApi, valkey: EmbeddedValkey, tmp_path: Path
) -> None:
    with small_disk(tmp_path / "state", "1m") as disk:
        config = serve_config(imm, fake, valkey, disk, **{"remediation.max_per_round": 200})
        assert round_room(200) > 1024 * 1024
        warning = room_warning(config)
        assert warning is not None and "KiB free, a remediation round may need" in warning
        (tmp_path / "config.yml").write_text(yaml.safe_dump({
            "database": {"url": imm.dsn}, "media": {"root": imm.media},
            "immich": {"url": fake.url, "api_key": API_KEY},
            "remediation": {"enabled": True, "state_dir": str(disk), "max_per_round": 200},
        }))
        code, out, err = await cli("check-config", "--config.file", str(tmp_path / "config.yml"), env={})
        assert code == 0, (out, err)
        assert f"warning: {warning}" in out
    with small_disk(tmp_path / "big", "64m") as disk:
        assert room_warning(serve_config(imm, fake, valkey, disk)) is None
