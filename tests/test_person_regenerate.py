"""``regenerate --kind person`` end to end: face thumbnails lost on disk, listed by the scan, asked for
through ``PUT /api/people/{id}`` (the simulated Immich, as each release answers), confirmed by the
``PersonGenerateThumbnail`` job in the thumbnail queue, written by a worker as Immich's would, and
verified on disk and in the ledger."""

from __future__ import annotations

import asyncio
import json
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
from immich_thumbnail_exporter.demo.seed import Plan, jpeg
from immich_thumbnail_exporter.demo.simulation.api import ApiKey, SimulatedApi
from immich_thumbnail_exporter.demo.simulation.worker import SimulatedWorker
from immich_thumbnail_exporter.findings import ProblemStore
from immich_thumbnail_exporter.remediation.jobwatch import JobWatch
from immich_thumbnail_exporter.remediation.ledger import Ledger
from immich_thumbnail_exporter.remediation.people import PeopleOptions, regenerate_people
from immich_thumbnail_exporter.remediation.report import RunReport
from immich_thumbnail_exporter.remediation.rounds import Remediator
from immich_thumbnail_exporter.scan.run import run_scan
from immich_thumbnail_exporter.sources.immich_api import ImmichApi
from immich_thumbnail_exporter.sources.postgres import PostgresSource
from immich_thumbnail_exporter.sources.redis import RedisSource
from immich_thumbnail_exporter.vocabulary import PERSON_THUMBNAIL_JOB_NAMES
from tests.conftest import Immich, wait_for
from tests.remediation_kit import cli

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
        watch = JobWatch(redis, config.redis.prefix, PERSON_THUMBNAIL_JOB_NAMES)
        await regenerate_people(config, pg, report, opts, problems=store, ledger=ledger, api=api, watch=watch)
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


async def test_the_demos_command_remakes_the_face_thumbnails(
    imm: Immich, fake: SimulatedApi, valkey: EmbeddedValkey, tmp_path: Path
) -> None:
    """``regenerate --kind person`` run the way ``demo`` prints it (environment variables, then the command
    line), against the simulated Immich and its worker: every lost face thumbnail is fixed, and no asset
    request is sent."""
    lost = set(imm.expected.person_thumbnails_missing)
    state = tmp_path / "state"
    env = {"DB_URL": imm.dsn, "IMMICH_URL": fake.url, "REDIS_URL": valkey.url, "IMMICH_API_KEY": API_KEY}
    worker = SimulatedWorker(imm.dsn, imm.media, valkey.url, delay=0.05, concurrency=2)
    await worker.start()
    try:
        code, out, err = await cli("regenerate", "--kind", "person", "--media.root", imm.media,
                                   "--state-dir", str(state), "--apply", "--wait", env=env)
    finally:
        await worker.stop()
    assert code == 0, (out, err)
    assert "Traceback" not in err
    # The key was checked for face thumbnails (PUT /api/people/{id} needs person.update), not regeneration.
    assert "face thumbnails: " in err
    assert "Regeneration: applied" in out
    lines = {line.split()[0]: line.split()[1] for line in out.splitlines() if line[:36] in lost}
    assert lines == dict.fromkeys(lost, "fixed"), out
    assert sorted(fake.person_updates) == sorted((p, imm.expected.person_faces[p]) for p in lost)
    assert fake.posts == []  # no asset request: a person id is never sent as an asset's


async def test_mixed_kinds_run_both_flows_and_keep_them_apart(
    imm: Immich, fake: SimulatedApi, valkey: EmbeddedValkey, tmp_path: Path
) -> None:
    """``--kind preview --kind person``: the assets' flow and the people's, one report; a dry run asks
    nothing. Then applied: the people's ledger rows are never taken for assets by a later asset run."""
    lost = set(imm.expected.person_thumbnails_missing)
    env = {"DB_URL": imm.dsn, "IMMICH_URL": fake.url, "REDIS_URL": valkey.url, "IMMICH_API_KEY": API_KEY}
    state = tmp_path / "state"
    code, out, err = await cli("regenerate", "--kind", "preview", "--kind", "person", "--media.root", imm.media,
                               "--state-dir", str(state), "--format", "json", env=env)
    assert code == 0, err
    rows = {r["asset_id"]: r for r in json.loads(out)["assets"]}
    people = {a: r for a, r in rows.items() if r["kinds"] == ["person"]}
    assert {a: r["result"] for a, r in people.items()} == dict.fromkeys(lost, "would_submit")
    assets = {a: r for a, r in rows.items() if a not in people}
    assert assets and all(set(r["kinds"]) <= {"preview"} for r in assets.values()), assets
    assert fake.posts == [] and fake.person_updates == []

    # Applied without a worker: people's attempts stay open in the ledger; a preview-only run after it
    # neither sends nor settles them.
    code, out, err = await cli("regenerate", "--kind", "person", "--media.root", imm.media, "--state-dir",
                               str(state), "--apply", "--format", "json", env=env)
    assert code == 0, err
    assert len(fake.person_updates) == len(lost)
    code, out, err = await cli("regenerate", "--kind", "preview", "--media.root", imm.media, "--state-dir",
                               str(state), "--apply", "--format", "json", env=env)
    assert code in (0, 1), err
    rows = {r["asset_id"]: r for r in json.loads(out)["assets"]}
    assert not set(rows) & lost
    assert not {a for _, ids in fake.posts for a in ids} & lost
    ledger = Ledger(str(state))
    try:
        assert {p: (e.state, e.kinds) for p, e in ledger.get(lost).items()} == {
            p: ("submitted", frozenset({"person"})) for p in lost}
    finally:
        ledger.close()


async def test_serve_remakes_face_thumbnails_when_person_is_a_kind(
    imm: Immich, fake: SimulatedApi, valkey: EmbeddedValkey, tmp_path: Path
) -> None:
    """``remediation.kinds`` with ``person``: serve's rounds ask for the lost face thumbnails under the same
    ledger and rate limit, verify them fixed, and never send a person's id as an asset's."""
    lost = set(imm.expected.person_thumbnails_missing)
    config = load_config(None, environ={}, overrides={
        "database.url": imm.dsn, "media.root": imm.media, "checks.verify_headers": True,
        "immich.url": fake.url, "immich.api_key": API_KEY, "redis.url": valkey.url,
        "remediation.enabled": True, "remediation.kinds": "preview, person", "remediation.interval": "1s",
        "remediation.verify_after": "2s", "remediation.confirm_within": "3s",
        "remediation.requests_per_second": 50, "remediation.state_dir": str(tmp_path)})
    pg = PostgresSource(config.database)
    remediator = Remediator(config, pg, None)
    worker = SimulatedWorker(imm.dsn, imm.media, valkey.url, delay=0.05, concurrency=2)
    await worker.start()
    rounds: list[object] = []

    async def fixed() -> bool:
        rounds.append(await remediator.round())
        assert remediator.ledger is not None
        entries = remediator.ledger.get(lost)
        return {p: e.state for p, e in entries.items()} == dict.fromkeys(lost, "fixed")

    try:
        await wait_for(fixed, timeout=60, interval=0.5)
        verified = dict(remediator.verified)
    finally:
        await worker.stop()
        await remediator.close()
        await pg.close()
    assert sorted(fake.person_updates) == sorted((p, imm.expected.person_faces[p]) for p in lost)
    assert not {a for _, ids in fake.posts for a in ids} & lost
    assert verified.get("fixed", 0) >= len(lost)
    assert remediator.requests["accepted"] >= len(lost)


@pytest.mark.parametrize(("kinds", "permissions", "refused"), [
    (("person",), ("asset.read",), "face thumbnails: refused: the API key lacks permission person.update"),
    (("preview",), ("person.update",), "regeneration: refused: the API key lacks permission all"),
    (("preview", "person"), ("person.update",), "regeneration: refused: the API key lacks permission all"),
])
async def test_the_key_is_checked_for_what_the_run_asks(
    imm: Immich, valkey: EmbeddedValkey, tmp_path: Path, kinds: tuple[str, ...], permissions: tuple[str, ...],
    refused: str,
) -> None:
    """Face thumbnails need ``person.update`` (``PUT /api/people/{id}``), asset kinds the regeneration
    route's permission: a key without what the run asks for stops it before anything is sent."""
    (person, *_) = sorted(imm.expected.person_thumbnails_missing)
    conn = await asyncpg.connect(imm.dsn, timeout=10)
    try:
        owner = await conn.fetchval('SELECT "ownerId"::text FROM person WHERE id = $1', uuid.UUID(person))
    finally:
        await conn.close()
    fake = SimulatedApi(imm.dsn, valkey.url, {"k": ApiKey(owner, permissions, admin=False)}, release="v3.1.0")
    await fake.start()
    try:
        args = [a for k in kinds for a in ("--kind", k)]
        code, out, err = await cli("regenerate", *args, "--apply", "--media.root", imm.media, "--state-dir",
                                   str(tmp_path), env={"DB_URL": imm.dsn, "IMMICH_URL": fake.url,
                                                       "IMMICH_API_KEY": "k", "REDIS_URL": valkey.url})
    finally:
        await fake.stop()
    assert code == 2, (out, err)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and refused in errors[0] and "nothing was sent" in errors[0], err
    assert fake.posts == [] and fake.person_updates == []


async def test_a_replaced_feature_face_original_is_the_reason(
    imm: Immich, fake: SimulatedApi, valkey: EmbeddedValkey, tmp_path: Path
) -> None:
    """A person still broken after its last attempt: its feature face's original is read, and when it is
    not the file Immich stored, that is the reason in the report and the ledger."""
    from tests.test_original import stored_original

    person = sorted(imm.expected.person_thumbnails_missing)[0]
    face = imm.expected.person_faces[person]
    original = await stored_original(imm, face, jpeg(3000))
    await asyncio.to_thread(original.write_bytes, jpeg(3001))
    config = config_for(imm, fake, valkey, tmp_path)
    # No worker: the job waits, the (short) window passes, and the one attempt allowed is over.
    opts = PeopleOptions(apply=True, wait=True, rate=50.0, wait_seconds=1.0, retry_after=0.5, max_attempts=1)
    report, _ = await run(config, opts, tmp_path)
    row = report.rows[person]
    assert (row.result, row.why, row.reason) == ("gave_up", "original_checksum_mismatch", "attempts_exhausted"), row
    assert f"its feature face's asset {face}" in row.detail and "is not the file Immich stored" in row.detail
    ledger = Ledger(str(tmp_path))
    try:
        entry = ledger.get([person])[person]
    finally:
        ledger.close()
    assert (entry.state, entry.why) == ("gave_up", "original_checksum_mismatch"), entry
