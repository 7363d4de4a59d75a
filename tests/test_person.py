"""Face (person) thumbnails lost in a restore: counted exactly, listed, and judged one by one.

Immich's "Missing" job queues only people whose ``thumbnailPath`` is ``''``; a face thumbnail whose file
was lost while its path remained is never remade. The file check judges ``person."thumbnailPath"`` with
the one file rule (``immich_person_thumbnails_missing{reason}``, ``/problems?kind=person``), and the
targeted check (``check_people``) agrees with it person by person. Real PostgreSQL, the era's
hand-written schema and Immich's real ones (``asset_faces`` before v1.136, ``asset_face`` after).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest
from bullmq import Queue, Worker

from immich_thumbnail_exporter.config import load_config
from immich_thumbnail_exporter.demo.embedded import EmbeddedValkey
from immich_thumbnail_exporter.demo.seed import jpeg
from immich_thumbnail_exporter.findings import ProblemStore
from immich_thumbnail_exporter.output.scan_report import write_csv, write_json, write_table
from immich_thumbnail_exporter.remediation.jobwatch import JobWatch
from immich_thumbnail_exporter.remediation.people import PeopleOptions, regenerate_people
from immich_thumbnail_exporter.remediation.report import RunReport
from immich_thumbnail_exporter.scan.run import run_scan
from immich_thumbnail_exporter.scan.targeted import check_people, media_mapper
from immich_thumbnail_exporter.sources.postgres import PostgresSource
from immich_thumbnail_exporter.sources.redis import RedisSource
from immich_thumbnail_exporter.vocabulary import PERSON_THUMBNAIL_JOB_NAMES
from tests.conftest import Immich, wait_for
from tests.helpers import fetch, running_exporter, samples, value

pytestmark = pytest.mark.asyncio


@dataclass
class Faces:
    """People planted beside the seeded ones: person id -> the reason expected (None: sound)."""

    expected: dict[str, str | None] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)
    blank: list[str] = field(default_factory=list)
    # person id -> (its feature face's asset id, that asset's original path); empty without a face table.
    faces: dict[str, tuple[str, str]] = field(default_factory=dict)
    owner: str = ""

    def counts(self) -> Counter[str]:
        return Counter(r for r in self.expected.values() if r is not None)


async def plant_faces(imm: Immich) -> Faces:
    """People whose face thumbnails are missing, empty, corrupt, a link out of the media root, sound, with
    no path yet, and with a path that escapes the media location; each with a feature face where the
    schema has a face table."""
    conn = await asyncpg.connect(imm.dsn, timeout=10)
    out = Faces()
    try:
        tables = {r[0] for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
        assets = "asset" if "asset" in tables else "assets"
        face_table = "asset_face" if "asset_face" in tables else "asset_faces" if "asset_faces" in tables else None
        seeded = await conn.fetchrow('SELECT "ownerId"::text, "thumbnailPath" FROM person LIMIT 1')
        assert seeded is not None
        owner, sample = seeded[0], seeded[1]
        out.owner = owner
        prefix = sample[: sample.index("thumbs/")]
        originals = await conn.fetch(
            f'SELECT id::text, "originalPath" FROM {assets} WHERE "deletedAt" IS NULL ORDER BY id LIMIT 8')
        plan: list[tuple[str, str | None]] = [
            ("missing", "file_missing"), ("empty", "file_empty"), ("corrupt", "file_corrupt"),
            ("outside", "file_unreadable"), ("sound", None), ("missing2", "file_missing"),
        ]
        for n, (what, reason) in enumerate(plan):
            pid = str(uuid.uuid4())
            rel = f"thumbs/{owner}/{pid[:2]}/{pid[2:4]}/{pid}.jpeg"
            full = os.path.join(imm.media, rel)
            os.makedirs(os.path.dirname(full), exist_ok=True)
            if what == "empty":
                open(full, "wb").close()  # noqa: ASYNC230 - a test fixture, one small file
            elif what == "corrupt":
                with open(full, "wb") as fh:  # noqa: ASYNC230
                    fh.write(b"this is not a jpeg at all" * 10)
            elif what == "outside":
                os.symlink("/etc/hostname", full)
            elif what == "sound":
                with open(full, "wb") as fh:  # noqa: ASYNC230
                    fh.write(jpeg(800))
            await conn.execute('INSERT INTO person (id, "ownerId", "thumbnailPath") VALUES ($1, $2, $3)',
                               uuid.UUID(pid), uuid.UUID(owner), prefix + rel)
            out.expected[pid] = reason
            if face_table is not None:
                asset_id, original = originals[n % len(originals)]
                face = uuid.uuid4()
                await conn.execute(f'INSERT INTO {face_table} (id, "assetId", "personId") VALUES ($1, $2, $3)',
                                   face, uuid.UUID(asset_id), uuid.UUID(pid))
                await conn.execute('UPDATE person SET "faceAssetId" = $1 WHERE id = $2', face, uuid.UUID(pid))
                out.faces[pid] = (asset_id, original)
        for _ in range(1):
            pid = str(uuid.uuid4())
            out.blank.append(pid)
            await conn.execute('INSERT INTO person (id, "ownerId", "thumbnailPath") VALUES ($1, $2, $3)',
                               uuid.UUID(pid), uuid.UUID(owner), "")
            pid = str(uuid.uuid4())
            out.refused.append(pid)
            await conn.execute('INSERT INTO person (id, "ownerId", "thumbnailPath") VALUES ($1, $2, $3)',
                               uuid.UUID(pid), uuid.UUID(owner), prefix + "thumbs/../../../etc/hostname")
    finally:
        await conn.close()
    return out


@pytest.mark.parametrize("build", ["v1.136+", "v1.132.3", "v3.1.0"])
async def test_face_thumbnails_counted_listed_and_checked_one_by_one(
    immich_factory: Callable[..., Any], build: str
) -> None:
    imm: Immich = await immich_factory(build)
    faces = await plant_faces(imm)
    config = load_config(None, environ={}, overrides={
        "database.url": imm.dsn, "media.root": imm.media, "checks.verify_headers": True})
    pg = PostgresSource(config.database)
    store = ProblemStore()
    try:
        result = await run_scan(pg, config, store)
        stats = result.stats
        assert stats is not None
        # Counted exactly, by reason; the blank path is Immich's own "Missing" job's, not counted.
        assert stats.person_missing == faces.counts(), stats.person_missing
        assert stats.refused["person"] == len(faces.refused)
        # Face thumbnails are never an asset kind's files, bytes or problems.
        assert stats.missing == Counter({k: n for k, n in imm.expected.missing.items() if k[1] != "no_record"})
        assert {k: stats.files[k] for k in stats.files} == dict(imm.expected.files)
        listed = {p.asset_id: p for p in store if p.kind == "person"}
        assert {pid: p.reason for pid, p in listed.items()} == {
            pid: r for pid, r in faces.expected.items() if r is not None}
        for pid, p in listed.items():
            assert p.owner_id == faces.owner and p.asset_type == "person" and p.path and p.path.endswith(".jpeg")
            if faces.faces:
                assert p.original_path == faces.faces[pid][1]
                assert p.original_exists is not None
            else:
                assert p.original_path is None and p.original_exists is None

        # The scan's report shows them: a summary line, the rows (table, JSON, CSV), and no person counted
        # as an asset regeneration can fix.
        table, doc, rows = io.StringIO(), io.StringIO(), io.StringIO()
        write_table(result, table)
        write_json(result, doc)
        write_csv(store, rows)
        total = sum(faces.counts().values())
        assert f"Face (person) thumbnails missing or broken: {total} (" in table.getvalue()
        summary = json.loads(doc.getvalue())["summary"]
        reasons = ("file_missing", "file_empty", "file_corrupt", "file_unreadable")
        assert summary["person_thumbnails_missing"] == {r: faces.counts()[r] for r in reasons}
        assert sum(1 for line in rows.getvalue().splitlines() if ",person,person," in line) == total
        assert summary["regeneration"]["assets"]["can_fix"] == len(
            {p.asset_id for p in store if p.kind != "person" and p.original_exists is not False
             and p.reason != "file_unreadable"})

        # The targeted check: the same verdict, person by person, and nothing for what is not a person.
        schema = await pg.schema()
        mapper = await media_mapper(pg, config.media)
        ids = [*faces.expected, *faces.blank, *faces.refused, str(uuid.uuid4()), "not-a-uuid"]
        verdicts = await check_people(pg, schema, mapper, ids)
        assert list(verdicts) == ids
        for pid, reason in faces.expected.items():
            v = verdicts[pid]
            assert v.exists and [r for _, r, _ in v.problems] == ([reason] if reason else []), (pid, v)
            assert v.written == (reason is None) and v.eligible
            if faces.faces:
                assert v.face_asset_id == faces.faces[pid][0]
                assert v.original_exists == listed[pid].original_exists if pid in listed else True
        assert [r for _, r, _ in verdicts[faces.blank[0]].problems] == ["no_record"]
        assert [r for _, r, _ in verdicts[faces.refused[0]].problems] == ["path_refused"]
        assert not verdicts[ids[-2]].exists and not verdicts[ids[-1]].exists
        assert not verdicts[ids[-2]].eligible  # a job naming no person: job verification's asset_missing
    finally:
        store.close()
        await pg.close()


async def test_face_thumbnails_in_metrics_and_problems(immich_factory: Callable[..., Any]) -> None:
    imm: Immich = await immich_factory("v3.1.0")
    faces = await plant_faces(imm)
    overrides = {"media.root": imm.media, "checks.verify_headers": True}
    async with running_exporter(overrides, env=imm.env()) as (exporter, url):
        await wait_for(lambda: exporter.store.ready, timeout=60)
        status, text, _ = await fetch(f"{url}/metrics")
        assert status == 200
        parsed = samples(text)
        for reason in ("file_missing", "file_empty", "file_corrupt", "file_unreadable"):
            got = value(parsed, "immich_person_thumbnails_missing", reason=reason)
            assert got == faces.counts()[reason], (reason, got)
        assert value(parsed, "immich_exporter_paths_refused", kind="person") == len(faces.refused)

        status, body, headers = await fetch(f"{url}/problems?kind=person")
        assert status == 200
        rows = json.loads(body)
        assert int(headers["X-Total-Count"]) == len(rows) == sum(faces.counts().values())
        assert {r["asset_id"]: r["reason"] for r in rows} == {
            pid: r for pid, r in faces.expected.items() if r is not None}
        assert all(r["kind"] == "person" and r["asset_type"] == "person" for r in rows)
        assert {r["original_path"] for r in rows} <= {o for _, o in faces.faces.values()}
        status, body, _ = await fetch(f"{url}/problems?kind=person&reason=file_corrupt")
        assert [r["asset_id"] for r in json.loads(body)] == [
            pid for pid, r in faces.expected.items() if r == "file_corrupt"]
        # Asset kinds still list assets only.
        status, body, _ = await fetch(f"{url}/problems?kind=thumbnail")
        assert all(r["asset_type"] in ("image", "video") for r in json.loads(body))
        status, _, _ = await fetch(f"{url}/problems?kind=face")
        assert status == 400


async def test_person_jobs_are_followed_in_the_event_stream(valkey: EmbeddedValkey) -> None:
    """A ``JobWatch`` for ``PersonGenerateThumbnail`` (a subscriber of the one event reader, beside the
    assets' watch, on one connection): a job naming an expected person confirms it and its completion is
    seen; a job of another name, or for a person nobody asked for, confirms nothing, and the person whose
    window ends with only an asset job naming its id is ``not_queued``."""
    config = load_config(None, environ={}, overrides={"database.url": "postgresql://unused/x", "redis.url": valkey.url})
    source = RedisSource(config.redis)
    queue = Queue("thumbnailGeneration", {"connection": valkey.url, "prefix": "immich_bull"})
    wanted, other, never = str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4())
    assets = JobWatch(source, "immich_bull")
    watch = JobWatch(source, "immich_bull", PERSON_THUMBNAIL_JOB_NAMES)
    try:
        assert watch.reader is assets.reader and watch.reader.subscribers == 2
        await watch.start()
        watch.expect([wanted], 30.0)
        watch.expect([never], 0.5)
        opts = {"removeOnComplete": True, "removeOnFail": False, "priority": 1}
        await queue.add("AssetGenerateThumbnails", {"id": never}, opts)  # an asset job naming the same id
        await queue.add("PersonGenerateThumbnail", {"id": other}, opts)
        job = await queue.add("PersonGenerateThumbnail", {"id": wanted}, opts)
        await wait_for(lambda: _polled(watch, wanted), timeout=20)
        seen = watch.job_of(wanted)
        assert seen is not None and seen.job_id == str(job.id)
        assert watch.job_of(other) is None and watch.job_of(never) is None
        settled: list[str] = []
        await wait_for(lambda: _settled(watch, settled), timeout=20)
        assert settled == [never]

        done = asyncio.Event()

        async def process(job: Any, token: str) -> None:
            done.set()
            return None

        worker = Worker("thumbnailGeneration", process, {"connection": valkey.url, "prefix": "immich_bull"})
        try:
            await wait_for(done.is_set, timeout=20)
            await wait_for(lambda: _finished(watch, wanted), timeout=20)
        finally:
            await worker.close()
        finished = watch.job_of(wanted)
        assert finished is not None and finished.outcome == "completed"
    finally:
        await queue.close()
        await source.close()
    assert watch.reader.subscribers == 0


async def _polled(watch: JobWatch, person: str) -> bool:
    await watch.poll(block=0.2)
    return watch.job_of(person) is not None


async def _settled(watch: JobWatch, settled: list[str]) -> bool:
    await watch.poll(block=0.1)
    settled.extend(sorted((await watch.settle()).not_queued))
    return not watch.pending


async def _finished(watch: JobWatch, person: str) -> bool:
    await watch.poll(block=0.2)
    job = watch.job_of(person)
    return job is not None and job.finished


@pytest.mark.parametrize("build", ["v1.136+", "v3.1.0"])
async def test_dry_run_says_what_it_would_ask_for(immich_factory: Callable[..., Any], build: str) -> None:
    imm: Immich = await immich_factory(build)
    faces = await plant_faces(imm)
    config = load_config(None, environ={}, overrides={
        "database.url": imm.dsn, "media.root": imm.media, "checks.verify_headers": True})
    pg = PostgresSource(config.database)
    store = ProblemStore()
    report = RunReport("dry_run")
    try:
        await run_scan(pg, config, store)
        await regenerate_people(config, pg, report, PeopleOptions(people=(faces.blank[0],)), problems=store)
    finally:
        store.close()
        await pg.close()
    got = {pid: (r.result, r.why) for pid, r in report.rows.items()}
    want: dict[str, tuple[str, str | None]] = {}
    for pid, reason in faces.expected.items():
        if reason == "file_unreadable":
            want[pid] = ("skipped", None)  # the exporter cannot read it: a request would not change that
        elif reason is not None:
            want[pid] = ("would_submit", None) if faces.faces else ("skipped", "no_face")
    want[faces.blank[0]] = ("skipped", None)  # Immich's own "Missing" job makes an empty path's thumbnail
    assert got == want
    assert all(r.kinds == ("person",) for r in report.rows.values())
    if faces.faces:
        row = report.rows[next(p for p, r in faces.expected.items() if r == "file_missing")]
        assert faces.faces[row.asset_id][0] in row.detail  # the feature face's asset it would name
