"""``regenerate --kind person`` end to end: face thumbnails lost on disk, listed by the scan, asked for
through ``PUT /api/people/{id}`` (the simulated Immich, as each release answers), confirmed by the
``PersonGenerateThumbnail`` job in the thumbnail queue, written by a worker as Immich's would, and
verified on disk and in the ledger."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

from immich_thumbnail_exporter.config import Config, load_config
from immich_thumbnail_exporter.demo.embedded import EmbeddedValkey
from immich_thumbnail_exporter.demo.seed import Plan
from immich_thumbnail_exporter.demo.simulation.api import SimulatedApi
from immich_thumbnail_exporter.demo.simulation.worker import SimulatedWorker
from immich_thumbnail_exporter.findings import ProblemStore
from immich_thumbnail_exporter.remediation.ledger import Ledger
from immich_thumbnail_exporter.remediation.people import PeopleOptions, regenerate_people
from immich_thumbnail_exporter.remediation.report import RunReport
from immich_thumbnail_exporter.scan.run import run_scan
from immich_thumbnail_exporter.sources.immich_api import ImmichApi
from immich_thumbnail_exporter.sources.postgres import PostgresSource
from immich_thumbnail_exporter.sources.redis import RedisSource
from tests.conftest import Immich, wait_for

pytestmark = pytest.mark.asyncio

API_KEY = "test-api-key"
ERA = "v1.136+"


@pytest_asyncio.fixture
async def imm(immich_factory: Callable[..., Any]) -> Immich:
    result: Immich = await immich_factory(ERA, Plan(assets=40, persons=4, person_thumbnail_missing=2))
    return result


@pytest_asyncio.fixture
async def fake(imm: Immich, valkey: EmbeddedValkey) -> AsyncIterator[SimulatedApi]:
    api = SimulatedApi(imm.dsn, valkey.url, {API_KEY: None})
    await api.start()
    try:
        yield api
    finally:
        await api.stop()


def config_for(imm: Immich, fake: SimulatedApi, valkey: EmbeddedValkey, state: Path) -> Config:
    return load_config(None, environ={}, overrides={
        "database.url": imm.dsn, "media.root": imm.media, "checks.verify_headers": True,
        "immich.url": fake.url, "immich.api_key": API_KEY, "redis.url": valkey.url,
        "remediation.state_dir": str(state)})


async def run(config: Config, opts: PeopleOptions, state: Path) -> tuple[RunReport, int]:
    """A scan, then one people run on its problems; returns the report and the scan's person problems."""
    pg = PostgresSource(config.database)
    store = ProblemStore()
    ledger = Ledger(str(state))
    api = ImmichApi(config.immich)
    redis = RedisSource(config.redis)
    report = RunReport("apply")
    try:
        await run_scan(pg, config, store)
        found = sum(1 for p in store if p.kind == "person")
        await regenerate_people(config, pg, report, opts, problems=store, ledger=ledger, api=api, redis=redis)
        return report, found
    finally:
        store.close()
        ledger.close()
        await api.close()
        await redis.close()
        await pg.close()


def existing(paths: Iterable[str]) -> list[str]:
    return [p for p in paths if os.path.exists(p)]


async def thumbnail_paths(imm: Immich, people: set[str]) -> dict[str, str]:
    conn = await asyncpg.connect(imm.dsn, timeout=10)
    try:
        rows = await conn.fetch('SELECT id::text, "thumbnailPath" FROM person WHERE id = ANY($1::uuid[])',
                                [uuid.UUID(p) for p in people])
    finally:
        await conn.close()
    # Stored absolute under /data (v1.136+) or relative to /usr/src/app ("upload/thumbs/...") before.
    return {r[0]: imm.media + (r[1][len("/data"):] if r[1].startswith("/data/") else r[1][len("upload"):])
            for r in rows}


@pytest.mark.parametrize(("build", "release"), [
    ("v1.136+", "v1.137.3"),
    ("v1.132.3", "v1.132.3"),  # asset_faces, relative paths, the job named generate-person-thumbnail
    ("v3.1.0", "v3.1.0"),
])
async def test_lost_face_thumbnails_are_remade_and_verified(
    immich_factory: Callable[..., Any], valkey: EmbeddedValkey, tmp_path: Path, build: str, release: str
) -> None:
    imm: Immich = await immich_factory(build, Plan(assets=40, persons=4, person_thumbnail_missing=2))
    fake = SimulatedApi(imm.dsn, valkey.url, {API_KEY: None}, release=release)
    await fake.start()
    try:
        await remade_and_verified(imm, fake, valkey, tmp_path)
    finally:
        await fake.stop()


async def remade_and_verified(imm: Immich, fake: SimulatedApi, valkey: EmbeddedValkey, tmp_path: Path) -> None:
    lost = set(imm.expected.person_thumbnails_missing)
    assert len(lost) == 2 and lost <= set(imm.expected.person_faces)
    paths = await thumbnail_paths(imm, lost)
    assert await asyncio.to_thread(existing, paths.values()) == []
    config = config_for(imm, fake, valkey, tmp_path)
    worker = SimulatedWorker(imm.dsn, imm.media, valkey.url, delay=0.05, concurrency=2)
    await worker.start()
    try:
        report, found = await run(config, PeopleOptions(apply=True, wait=True, rate=50.0, wait_seconds=30.0), tmp_path)
    finally:
        await worker.stop()
    assert found == 2
    assert {p: (r.result, r.kinds) for p, r in report.rows.items()} == {p: ("fixed", ("person",)) for p in lost}
    assert report.requests["accepted"] == 2
    # Asked with each person's current feature face, and the worker wrote exactly those.
    assert sorted(fake.person_updates) == sorted((p, imm.expected.person_faces[p]) for p in lost)
    assert sorted(worker.persons) == sorted(lost)
    assert sorted(await asyncio.to_thread(existing, paths.values())) == sorted(paths.values())
    ledger = Ledger(str(tmp_path))
    try:
        entries = ledger.get(lost)
    finally:
        ledger.close()
    assert {p: (e.state, e.kinds, bool(e.job_id)) for p, e in entries.items()} == {
        p: ("fixed", frozenset({"person"}), True) for p in lost}

    # A second run finds nothing left to do.
    report, found = await run(config, PeopleOptions(apply=True, wait=True, rate=50.0), tmp_path)
    assert found == 0 and not report.rows and not report.requests


async def test_a_job_nobody_runs_is_the_reason(
    imm: Immich, fake: SimulatedApi, valkey: EmbeddedValkey, tmp_path: Path
) -> None:
    """No worker on the thumbnail queue: each request is accepted and its job confirmed, and the report
    says the job is waiting rather than calling the face thumbnail fixed or its request lost."""
    lost = set(imm.expected.person_thumbnails_missing)
    config = config_for(imm, fake, valkey, tmp_path)
    report, _ = await run(config, PeopleOptions(apply=True, wait=True, rate=50.0, wait_seconds=1.0), tmp_path)
    assert {p: (r.result, r.why) for p, r in report.rows.items()} == {p: ("waiting", "job_waiting") for p in lost}
    ledger = Ledger(str(tmp_path))
    try:
        entries = ledger.get(lost)
    finally:
        ledger.close()
    assert all(e.state == "submitted" and e.job_id and e.why == "job_waiting" for e in entries.values()), entries

    # The worker comes back: the next run checks the open attempts and settles them as fixed.
    worker = SimulatedWorker(imm.dsn, imm.media, valkey.url, delay=0.05, concurrency=2)
    await worker.start()
    try:
        await wait_for(lambda: len(worker.persons) >= len(lost), timeout=30)
        report, _ = await run(config, PeopleOptions(apply=True, wait=True, rate=50.0), tmp_path)
    finally:
        await worker.stop()
    assert {p: r.result for p, r in report.rows.items()} == dict.fromkeys(lost, "fixed")
    assert len(fake.person_updates) == len(lost)  # nothing asked twice
