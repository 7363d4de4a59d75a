"""Verified outcomes of thumbnail jobs: real Node BullMQ workers behaving as Immich's do, a real Valkey, a
real PostgreSQL with a seeded post-restore Immich, and the files on disk.

The worker is Immich's processor in miniature (``tests/node/worker.mjs`` with ``IMMICH=1``): it runs a
handler, catches its errors and completes every job with null, so BullMQ's outcome says nothing; only
the verification can tell written from no effect.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from bullmq import Queue

from immich_thumbnail_exporter import timing
from immich_thumbnail_exporter.collectors.job_verification import JobVerificationCollection, Limits, Verifier, verdict
from immich_thumbnail_exporter.collectors.queues import QueueCollection
from immich_thumbnail_exporter.config import Config, load_config
from immich_thumbnail_exporter.demo.embedded import EmbeddedValkey
from immich_thumbnail_exporter.demo.seed import PERSON_SIZE, THUMB_SIZE, Plan, jpeg, webp
from immich_thumbnail_exporter.scan.verdict import AssetVerdict
from immich_thumbnail_exporter.sources.bullmq_follow import FinishedJob
from immich_thumbnail_exporter.sources.postgres import PostgresSource
from immich_thumbnail_exporter.sources.redis import EVENTS_CLIENT_NAME
from immich_thumbnail_exporter.vocabulary import VERIFY_RESULTS
from tests.conftest import Immich, wait_for
from tests.helpers import fetch, running_exporter, samples
from tests.test_queues import (
    NODE_DIR,
    PREFIX,
    QUEUE,
    Samples,
    _exporter_connections,
    flat,
    node_modules,
    raw,
    stop_worker,
    value,
)

JOB = "AssetGenerateThumbnails"
EDITOR = "editor"
EDIT_JOB = "AssetEditThumbnailGeneration"
PERSON_JOB = "PersonGenerateThumbnail"
OPTS = {"attempts": 3, "removeOnComplete": True, "removeOnFail": False}


# -- helpers ---------------------------------------------------------------------------------------


def make_config(valkey: EmbeddedValkey, imm: Immich, **overrides: Any) -> Config:
    flags = {"intervals.queues": "2s", "media.root": imm.media}
    flags.update({k: str(v) for k, v in overrides.items()})
    return load_config(None, environ={"REDIS_URL": valkey.url, "DB_URL": imm.dsn}, overrides=flags)


@contextlib.asynccontextmanager
async def verification(config: Config, limits: Limits | None = None) -> AsyncIterator[JobVerificationCollection]:
    pg = PostgresSource(config.database)
    col = JobVerificationCollection(config, pg, limits or Limits(settle=0.2))
    try:
        await col.collect()  # starts the follower and the checker
        await wait_for(lambda: col.follower.following, 10)
        yield col
    finally:
        await col.close()
        await pg.close()


def verified(s: Samples, result: str, job: str = JOB, queue: str = QUEUE) -> float | None:
    return value(s, "immich_thumbnail_jobs_verified_total", queue=queue, job_name=job, result=result)


def results(s: Samples, job: str = JOB, queue: str = QUEUE) -> dict[str, float | None]:
    return {r: verified(s, r, job, queue) for r in VERIFY_RESULTS}


async def settled(col: JobVerificationCollection, total: int, timeout: float = 30) -> Samples:
    """The collection's samples once ``total`` jobs have a result and nothing is pending."""

    async def done() -> Samples | None:
        s = flat(await col.collect())
        n = sum(v for (name, _), v in s.items() if name == "immich_thumbnail_jobs_verified_total")
        return s if n >= total and not col.verifier.pending else None

    return await wait_for(done, timeout, 0.2)  # type: ignore[no-any-return]


@contextlib.contextmanager
def immich_worker(valkey: EmbeddedValkey, logs: Path, **env: str) -> Iterator[subprocess.Popen[bytes]]:
    """A Node worker behaving as Immich's processor; its output goes to files (never a full pipe)."""
    node_modules()
    logs.mkdir(parents=True, exist_ok=True)
    out, err = logs / f"worker-{uuid.uuid4().hex[:6]}.out", logs / "worker.err"
    # Immich's quickest path ("not found") still queries its database before it returns: a few ms.
    full = {**os.environ, "REDIS_URL": valkey.url, "QUEUE": QUEUE, "PREFIX": PREFIX, "IMMICH": "1",
            "JOB_DELAY_MS": "10", **env}
    with open(out, "wb") as stdout, open(err, "ab") as stderr:
        proc = subprocess.Popen(["node", str(NODE_DIR / "worker.mjs")], env=full, stdout=stdout, stderr=stderr,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while b"ready" not in out.read_bytes():
            assert proc.poll() is None, f"node worker exited: {err.read_text()}"
            assert time.monotonic() < deadline, "node worker not ready in 20s"
            time.sleep(0.05)
        yield proc
    finally:
        stop_worker(proc)


async def file_rows(imm: Immich, asset_ids: list[str]) -> dict[str, list[tuple[str, str]]]:
    """(kind, local path) of each asset's thumbnail-type rows, mapped from /data to the media folder."""
    conn = await asyncpg.connect(imm.dsn)
    try:
        rows = await conn.fetch(
            "SELECT \"assetId\"::text AS a, type, path FROM asset_file WHERE \"assetId\" = ANY($1::uuid[]) "
            "AND type IN ('thumbnail', 'preview', 'fullsize')", asset_ids)
    finally:
        await conn.close()
    out: dict[str, list[tuple[str, str]]] = {a: [] for a in asset_ids}
    for r in rows:
        out[r["a"]].append((r["type"], imm.media + r["path"].removeprefix("/data")))
    return out


async def healthy_and_fixable(imm: Immich) -> tuple[list[str], list[str]]:
    """Assets whose files are all there (by the seed's own record, not the exporter's rule), and problem
    assets whose rows are all there but whose thumbnail file is missing (a job that writes it fixes them)."""
    problems = imm.expected.problem_asset_ids
    rows = await file_rows(imm, imm.expected.asset_ids)
    healthy = [a for a in imm.expected.asset_ids if a not in problems
               and {k for k, _ in rows[a]} >= {"thumbnail", "preview"} and all(".." not in p for _, p in rows[a])]
    fixable = [a for a in sorted(problems)
               if {k for k, _ in rows[a]} == {"thumbnail", "preview"}
               and not _present(dict(rows[a])["thumbnail"]) and _present(dict(rows[a])["preview"])]
    return healthy, fixable


def _present(path: str) -> bool:
    return os.path.lexists(path)


async def face_thumbnails(imm: Immich) -> dict[str, str]:
    """Each person's face thumbnail: person id -> its local path (stored under /data, v1.136+)."""
    conn = await asyncpg.connect(imm.dsn)
    try:
        rows = await conn.fetch('SELECT id::text AS p, "thumbnailPath" AS path FROM person '
                                "WHERE \"thumbnailPath\" <> ''")
    finally:
        await conn.close()
    return {r["p"]: imm.media + r["path"].removeprefix("/data") for r in rows}


# -- the rule ----------------------------------------------------------------------------------------


def test_verdicts() -> None:
    assert verdict(AssetVerdict("a", exists=False)) == "asset_missing"
    assert verdict(AssetVerdict("a", exists=True, eligible=False, problems=[("thumbnail", "no_record", None)])) \
        == "asset_missing"  # hidden or trashed: Immich makes none
    assert verdict(AssetVerdict("a", exists=True, eligible=True)) == "written"
    assert verdict(AssetVerdict("a", True, True, problems=[("preview", "file_missing", "/p")])) == "no_effect"
    assert verdict(AssetVerdict("a", True, True, problems=[("thumbnail", "path_refused", "/../x")])) == "not_checked"
    both = [("thumbnail", "path_refused", "/../x"), ("preview", "file_empty", "/p")]
    assert verdict(AssetVerdict("a", True, True, problems=both)) == "no_effect"


def test_the_bounded_queue_sheds_and_the_rate_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    now = 1000.0
    clock = [now]
    # The rate limiter keeps time.monotonic(); the test moves that clock with the ``now`` it passes.
    monkeypatch.setattr(timing.time, "monotonic", lambda: clock[0])
    full = Verifier(Limits(checks_per_second=10, max_pending=5, settle=0.0))
    for i in range(12):
        full.add(FinishedJob(QUEUE, str(i), JOB, str(uuid.uuid4()), False, 0), now)
    full.add(FinishedJob(QUEUE, "x", JOB, None, False, 0), now)  # its asset was never learned
    assert len(full.pending) == 5
    assert full.counts == {(QUEUE, JOB, "not_checked"): 7 + 1} and full.shed == 7

    rate = Verifier(Limits(checks_per_second=2, batch=10, settle=0.0))
    for i in range(10):
        rate.add(FinishedJob(QUEUE, str(i), JOB, str(uuid.uuid4()), False, 0), now)
    assert len(rate.take(now)) == 2  # a one-second burst at 2 a second
    assert len(rate.take(now)) == 0
    clock[0] = now + 0.5
    assert len(rate.take(now + 0.5)) == 1
    clock[0] = now + 60
    assert len(rate.take(now + 60)) == 2  # an idle minute does not save up more than a second's worth
    clock[0] = now

    # A job that waits longer than max_age is counted not_checked, never checked late.
    old = Verifier(Limits(max_age=5, settle=0.0))
    old.add(FinishedJob(QUEUE, "1", JOB, str(uuid.uuid4()), False, 0), now)
    assert old.take(now + 6) == [] and old.counts == {(QUEUE, JOB, "not_checked"): 1}
    # ... and a job is not checked before it settled.
    early = Verifier(Limits(settle=1.0))
    early.add(FinishedJob(QUEUE, "1", JOB, str(uuid.uuid4()), False, 0), now)
    assert early.take(now + 0.5) == [] and len(early.take(now + 1.0)) == 1


# -- the real thing --------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_every_result_with_exact_counts(valkey: EmbeddedValkey, immich_factory: Any, tmp_path: Path) -> None:
    imm: Immich = await immich_factory("v1.136+")
    healthy, fixable = await healthy_and_fixable(imm)
    assert len(healthy) >= 3 and len(fixable) >= 3, (len(healthy), len(fixable))
    fixed, broken = fixable[0], fixable[1:3]
    plan = {a: [[p, base64.b64encode(webp(THUMB_SIZE)).decode()] for _, p in (await file_rows(imm, [a]))[a]
                if not _present(p)] for a in [fixed]}
    plan.update({a: [] for a in healthy[:3]})  # the handler succeeds and writes nothing new
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    config = make_config(valkey, imm)
    queues_pg = PostgresSource(config.database)
    queues = QueueCollection(config, queues_pg)
    queues.discovery_interval = 0.0
    thumbs = Queue(QUEUE, {"connection": valkey.url, "prefix": PREFIX})
    editor = Queue(EDITOR, {"connection": valkey.url, "prefix": PREFIX})
    try:
        await queues.collect()  # the event counters start here
        async with verification(config) as col:
            with immich_worker(valkey, tmp_path, WRITE_PLAN=str(tmp_path / "plan.json")), \
                    immich_worker(valkey, tmp_path, QUEUE=EDITOR, WRITE_PLAN=str(tmp_path / "plan.json")):
                for asset in [*healthy[:3], fixed, *broken, str(uuid.uuid4()), str(uuid.uuid4())]:
                    await thumbs.add(JOB, {"id": asset}, OPTS)
                await thumbs.add(JOB, {"id": "not-a-uuid"}, OPTS)  # data naming no asset: not checked
                await thumbs.add(PERSON_JOB, {"id": str(uuid.uuid4())}, OPTS)  # a face job: no such person
                await thumbs.add("AssetGenerateThumbnailsQueueAll", {"force": False}, OPTS)  # not per asset
                await editor.add(EDIT_JOB, {"id": healthy[0]}, OPTS)
                await editor.add("AssetEditApply", {"id": healthy[0]}, OPTS)  # the editor's other work
                # A job whose hash is gone before anyone could read it (the exporter's view after an outage).
                raw(valkey).xadd(f"{PREFIX}:{QUEUE}:events", {"event": "added", "jobId": "9000", "name": JOB})
                raw(valkey).xadd(f"{PREFIX}:{QUEUE}:events", {"event": "completed", "jobId": "9000",
                                                             "returnvalue": "null"})
                s = await settled(col, 12)
                await wait_for(lambda: raw(valkey).llen(f"{PREFIX}:{QUEUE}:wait") == 0, 10)
        # Three healthy assets and the one the handler wrote; two whose job changed nothing; two assets the
        # database does not have; a job without an asset and one whose data was gone.
        assert results(s) == {"written": 4, "no_effect": 2, "asset_missing": 2, "not_checked": 2}
        assert results(s, EDIT_JOB, EDITOR) == {"written": 1, "no_effect": 0, "asset_missing": 0, "not_checked": 0}
        assert results(s, PERSON_JOB) == {"written": 0, "no_effect": 0, "asset_missing": 1, "not_checked": 0}
        assert not {j for (n, lab), _ in s.items() if n.startswith("immich_thumbnail_jobs")
                    for k, j in lab if k == "job_name"} - {JOB, EDIT_JOB, PERSON_JOB}
        assert _present(plan[fixed][0][0])
        # BullMQ's own view: every job completed, no status reported.
        q = flat(await queues.collect())
        finished = value(q, "immich_jobs_finished_total", queue=QUEUE, job_name=JOB, outcome="completed")
        assert finished == 9 + 1  # the nine real ones and the one whose hash was gone
        assert value(q, "immich_jobs_finished_total", queue=QUEUE, job_name=JOB, outcome="success") is None
    finally:
        await thumbs.close()
        await editor.close()
        await queues.close()
        await queues_pg.close()


@pytest.mark.asyncio
async def test_face_thumbnail_jobs_are_verified(valkey: EmbeddedValkey, immich_factory: Any, tmp_path: Path) -> None:
    """``PersonGenerateThumbnail`` jobs (data ``{"id": personId}``) on an Immich-like worker: the person whose
    face thumbnail the handler writes counts written, the one whose handler fails (caught, the job completes
    with null) no_effect, by the person file check, under the face job's own name."""
    imm: Immich = await immich_factory("v1.136+", Plan(assets=12, persons=4, person_thumbnail_missing=2))
    paths = await face_thumbnails(imm)
    lost = sorted(p for p, path in paths.items() if not _present(path))
    assert len(lost) == 2, paths
    fixed, broken = lost
    plan = {fixed: [[paths[fixed], base64.b64encode(jpeg(PERSON_SIZE)).decode()]]}  # nothing for ``broken``
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    config = make_config(valkey, imm)
    thumbs = Queue(QUEUE, {"connection": valkey.url, "prefix": PREFIX})
    try:
        async with verification(config) as col:
            with immich_worker(valkey, tmp_path, WRITE_PLAN=str(tmp_path / "plan.json")):
                for person in (fixed, broken):
                    await thumbs.add(PERSON_JOB, {"id": person}, OPTS)
                s = await settled(col, 2)
        assert results(s, PERSON_JOB) == {"written": 1, "no_effect": 1, "asset_missing": 0, "not_checked": 0}
        assert results(s)["written"] is None  # no asset job ran: no asset series
        assert _present(paths[fixed]) and not _present(paths[broken])
    finally:
        await thumbs.close()


@pytest.mark.asyncio
async def test_overload_counts_not_checked(valkey: EmbeddedValkey, immich_factory: Any, tmp_path: Path) -> None:
    """More jobs finish than the checker may take: the bounded queue holds 3, the rest are not_checked."""
    imm: Immich = await immich_factory("v1.136+")
    healthy, _ = await healthy_and_fixable(imm)
    config = make_config(valkey, imm)
    thumbs = Queue(QUEUE, {"connection": valkey.url, "prefix": PREFIX})
    try:
        async with verification(config, Limits(checks_per_second=0.001, max_pending=3, settle=0)) as col:
            with immich_worker(valkey, tmp_path, CONCURRENCY="4"):
                for asset in healthy[:20]:
                    await thumbs.add(JOB, {"id": asset}, OPTS)
                await wait_for(lambda: len(col.verifier.pending) + col.verifier.shed >= 20, 20)
                s = flat(await col.collect())
        assert verified(s, "not_checked") == 17
        assert len(col.verifier.pending) == 3 and col.verifier.shed == 17
        assert verified(s, "written") == 0
    finally:
        await thumbs.close()


@pytest.mark.asyncio
async def test_redis_outage_and_busy_database(valkey: EmbeddedValkey, immich_factory: Any, tmp_path: Path) -> None:
    imm: Immich = await immich_factory("v1.136+")
    healthy, _ = await healthy_and_fixable(imm)
    config = make_config(valkey, imm, **{"redis.timeout": "1s"})
    try:
        async with verification(config) as col:
            first = await col.collect()
            assert first.sources.get("redis") is True
            valkey.stop()
            await wait_for(lambda: _redis_state(col, str), 15, 0.3)
            outcome = await col.collect()
            assert outcome.error and "redis" in outcome.error
            tasks = len(asyncio.all_tasks())
            failures = col.events.stats.failures
            # Several failed steps of the reader (capped backoff): they pile nothing up.
            await wait_for(lambda: col.events.stats.failures >= failures + 3, 20, 0.1)
            assert len(asyncio.all_tasks()) <= tasks + 1
            valkey.start()
            await wait_for(lambda: _redis_state(col, bool), 40, 0.3)
            thumbs = Queue(QUEUE, {"connection": valkey.url, "prefix": PREFIX})
            try:
                # The file check holds every connection: checks wait, none is lost or guessed.
                async with col.pg.connection(), col.pg.connection():
                    with immich_worker(valkey, tmp_path):
                        await thumbs.add(JOB, {"id": healthy[0]}, OPTS)
                        await wait_for(lambda: len(col.verifier.pending) == 1, 20)
                        waits = col.verifier.waits
                        await wait_for(lambda: col.verifier.waits >= waits + 2, 10, 0.1)  # two checker turns
                        assert len(col.verifier.pending) == 1 and col.verifier.checked == 0
                s = await settled(col, 1)
            finally:
                await thumbs.close()
            assert results(s) == {"written": 1, "no_effect": 0, "asset_missing": 0, "not_checked": 0}
            assert (await col.collect()).error is None
    finally:
        if not valkey.running:
            valkey.start()


async def _redis_state(col: JobVerificationCollection, kind: type) -> bool:
    await asyncio.sleep(0)
    state = col.events.state
    return isinstance(state, kind) and (kind is not bool or state is True)


@pytest.mark.asyncio
async def test_job_between_two_rounds_is_verified(
    valkey: EmbeddedValkey, immich_factory: Any, tmp_path: Path
) -> None:
    """A job added and completed between two 15 s rounds, its hash gone a moment later, is verified."""
    imm: Immich = await immich_factory("v1.136+")
    healthy, fixable = await healthy_and_fixable(imm)
    flags = {"media.root": imm.media, "intervals.queues": "15s", "collectors.files": "false",
             "intervals.inventory": "1h"}
    env = {**imm.env(), "REDIS_URL": valkey.url}
    thumbs = Queue(QUEUE, {"connection": valkey.url, "prefix": PREFIX})
    try:
        async with running_exporter(flags, env) as (ex, url):
            await wait_for(lambda: ex.store.ready, 30)
            col = next(c for c in ex.runner.collections if isinstance(c, JobVerificationCollection))
            await wait_for(lambda: col.follower.following, 10)
            round_before = ex.store.result("queues")
            assert round_before is not None
            with immich_worker(valkey, tmp_path):
                t0 = time.time()
                jobs = [await thumbs.add(JOB, {"id": a}, OPTS) for a in (healthy[0], fixable[0])]
                await wait_for(lambda: raw(valkey).exists(*[f"{PREFIX}:{QUEUE}:{j.id}" for j in jobs]) == 0, 5, 0.05)
                took = time.time() - t0
            assert took < 2.0, f"the jobs took {took:.1f}s"
            assert ex.store.result("queues") is round_before, "a queue round ran: the test proves nothing"

            async def scraped() -> Samples | None:
                _, text, _ = await fetch(f"{url}/metrics")
                s = samples(text)
                return s if verified(s, "written") is not None and (verified(s, "written") or 0) >= 1 else None

            s = await wait_for(scraped, 40, 0.5)
            assert results(s) == {"written": 1, "no_effect": 1, "asset_missing": 0, "not_checked": 0}
            assert value(s, "immich_exporter_source_up", source="filesystem") == 1
            # The queue rounds' connection, and the one event-stream connection the follower shares.
            assert await _exporter_connections(valkey) <= 1
            assert await _exporter_connections(valkey, EVENTS_CLIENT_NAME) == 1
    finally:
        await thumbs.close()
