"""Regeneration says why: a job must appear for every accepted asset, and every asset still broken at the
end has the reason the queue shows (no worker, paused, no effect, not queued). ``serve``'s remediation
verifies its own requests and records the same reasons.

Against the demo's simulated Immich (the aiohttp API is the only double; the queue is real BullMQ in a
real Valkey, the worker a real BullMQ worker on the seeded PostgreSQL database and media folder).
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis
from bullmq import Queue

from immich_thumbnail_exporter.collectors.remediation import RemediationCollection
from immich_thumbnail_exporter.demo.embedded import EmbeddedValkey
from immich_thumbnail_exporter.demo.simulation.api import PREFIX, QUEUE, SimulatedApi
from immich_thumbnail_exporter.output.regenerate_report import report_dict, write_table
from immich_thumbnail_exporter.remediation.engine import regenerate
from immich_thumbnail_exporter.remediation.jobwatch import JobSeen
from immich_thumbnail_exporter.remediation.ledger import FILENAME, Ledger
from immich_thumbnail_exporter.remediation.why import Why, clock, explain
from immich_thumbnail_exporter.sources.bullmq_queue import JobState, QueueHealth
from tests.conftest import Immich, wait_for
from tests.helpers import fetch, running_exporter, samples, value
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
    thumbnail_worker,
)
from tests.test_security import REDIS_ACL

pytestmark = pytest.mark.asyncio
__all__ = ["fake", "imm"]  # fixtures used by name


def env(imm: Immich, fake: SimulatedApi, valkey: EmbeddedValkey) -> dict[str, str]:
    return {"DB_URL": imm.dsn, "IMMICH_URL": fake.url, "IMMICH_API_KEY": API_KEY, "REDIS_URL": valkey.url}


async def job_asset(valkey: EmbeddedValkey, job_id: str) -> str | None:
    client = aioredis.Redis.from_url(valkey.url, decode_responses=True)
    try:
        data = await client.hget(f"{PREFIX}:{QUEUE}:{job_id}", "data")
    finally:
        await client.aclose()
    return None if data is None else re.sub(r'^\{"id":\s*"([^"]+)"\}$', r"\1", data)


# -- regenerate -------------------------------------------------------------------------------------------


async def _none_broken(imm: Immich, assets: Iterable[str]) -> bool:
    return not await problem_assets(imm) & set(assets)


async def test_accepted_but_not_queued_is_said_and_retried(
    imm: Immich, fake: SimulatedApi, valkey: EmbeddedValkey, tmp_path: Path
) -> None:
    fixable, _, _ = await expected_sets(imm)
    dropped, queued = sorted(fixable)[:2], sorted(fixable)[2:4]
    fake.drop = set(dropped)  # Immich v3.0.0: 204, and no job
    args = ["regenerate", "--apply", "--confirm-within", "2s", "--media.root", imm.media,
            "--state-dir", str(tmp_path)]
    for a in [*dropped, *queued]:
        args += ["--asset", a]
    started = time.monotonic()
    code, out, err = await cli(*args, env=env(imm, fake, valkey))
    assert code == 1, (out, err)  # something is known to be still broken
    assert time.monotonic() - started < 60
    lines = {line.split()[0]: line for line in out.splitlines() if line[:36] in (*dropped, *queued)}
    for a in dropped:
        assert lines[a].split()[1] == "not_queued"
        assert "Immich answered 204 but queued nothing (attempt 1 of 3)" in lines[a]
    for a in queued:
        assert lines[a].split()[1] == "submitted"
        assert "Immich accepted the request and queued job" in lines[a]
    assert "not queued 2" in out
    rows = ledger_rows(tmp_path)
    assert {a: (rows[a]["state"], rows[a]["why"], rows[a]["job_id"]) for a in dropped} == {
        a: ("not_queued", "not_queued", None) for a in dropped}
    for a in queued:  # the confirmed job is in the queue and names the asset
        assert rows[a]["state"] == "submitted" and await job_asset(valkey, rows[a]["job_id"]) == a

    # A dry run right away: nothing is due yet, and each says why its last attempt ended.
    config = make_config(imm, fake, tmp_path, valkey.url)
    report = await regenerate(config, options(tmp_path, assets=tuple(dropped)))
    for a in dropped:
        row = report.rows[a]
        assert (row.result, row.why) == ("waiting", "not_queued"), row
        assert row.detail.endswith("; Immich answered 204 but queued nothing")

    # Retried by the same rules as the rest: once its window is over, up to the attempt limit. One more
    # asset's first request is dropped too; its second is queued and fixes it.
    late = sorted(fixable)[4]
    fake.drop_first = {late}
    async with thumbnail_worker(imm, valkey):
        # The first run's queued jobs are taken first: the run below must find those assets fixed already.
        await wait_for(lambda: _none_broken(imm, queued), timeout=60, interval=0.3)
        report = await regenerate(config, options(tmp_path, apply=True, wait=True, retry_after=0.5, max_attempts=2,
                                                  confirm_within=1.5, assets=(*dropped, late)))
    for a in dropped:
        row = report.rows[a]
        assert (row.result, row.attempts, row.why) == ("gave_up", 2, "not_queued")
        assert row.detail == "Immich answered 204 but queued nothing after 2 attempt(s)"
    fixed = report.rows[late]
    assert (fixed.result, fixed.attempts) == ("fixed", 2)
    assert "the one before: Immich answered 204 but queued nothing" in fixed.detail
    assert fake.submissions() == Counter({**{a: 2 for a in dropped}, **{a: 1 for a in queued}, late: 2})
    assert report.exit_code() == 1
    # The first run's queued assets were fixed by the worker meanwhile: this run says so.
    assert all(report.rows[a].detail == "fixed since an earlier run asked" for a in queued)
    doc = report_dict(report)
    assert doc["summary"]["gave_up"] == 2 and doc["summary"]["fixed"] == 3


async def test_a_queue_without_worker_is_the_reason(
    imm: Immich, fake: SimulatedApi, valkey: EmbeddedValkey, tmp_path: Path
) -> None:
    fixable, _, _ = await expected_sets(imm)
    config = make_config(imm, fake, tmp_path, valkey.url)
    report = await regenerate(config, options(tmp_path, apply=True, wait=True, retry_after=30, timeout=2,
                                              confirm_within=2))
    assert {a for a, r in report.rows.items() if r.result == "still_missing"} == fixable
    positions = []
    for a in fixable:
        row = report.rows[a]
        assert row.why == "no_worker", row
        match = re.search(r"its job has waited \d+s, position (\d+) of (\d+) in thumbnailGeneration, "
                          r"which has no live worker", row.detail)
        assert match, row.detail
        assert int(match.group(2)) == len(fixable)
        positions.append(int(match.group(1)))
    assert sorted(positions) == list(range(1, len(fixable) + 1))
    rows = ledger_rows(tmp_path)
    assert {rows[a]["why"] for a in fixable} == {"no_worker"}
    assert all("no live worker" in rows[a]["why_text"] for a in fixable)

    class Out:
        text = ""

        def write(self, s: str) -> None:
            self.text += s

    out = Out()
    write_table(report, out)  # type: ignore[arg-type]
    assert out.text.count("which has no live worker") == len(fixable)
    assert f"still missing {len(fixable)}" in out.text


async def test_a_paused_queue_is_the_reason(
    imm: Immich, fake: SimulatedApi, valkey: EmbeddedValkey, tmp_path: Path
) -> None:
    fixable, _, _ = await expected_sets(imm)
    queue = Queue(QUEUE, {"prefix": PREFIX, "connection": valkey.url})
    await queue.pause()  # an admin paused thumbnail generation in Immich's job page
    try:
        config = make_config(imm, fake, tmp_path, valkey.url)
        async with thumbnail_worker(imm, valkey) as worker:  # a live worker: the pause is what holds the jobs
            report = await regenerate(config, options(tmp_path, apply=True, wait=True, retry_after=30, timeout=2,
                                                      confirm_within=2))
            assert worker.processed == []
    finally:
        await queue.close()
    for a in fixable:
        row = report.rows[a]
        assert (row.result, row.why) == ("still_missing", "queue_paused"), row
        assert "the thumbnailGeneration queue is paused: its job has waited" in row.detail


async def test_a_job_that_ran_without_effect_is_settled_at_once(
    imm: Immich, fake: SimulatedApi, valkey: EmbeddedValkey, tmp_path: Path
) -> None:
    fixable, _, _ = await expected_sets(imm)
    flaky, last_try = sorted(fixable)[:2]
    config = make_config(imm, fake, tmp_path, valkey.url)
    async with thumbnail_worker(imm, valkey, flaky={flaky, last_try}):
        # The first job does nothing: the asset is asked for again once its window (1s) is over.
        report = await regenerate(config, options(tmp_path, apply=True, wait=True, retry_after=1.0,
                                                  assets=(flaky,)))
        row = report.rows[flaky]
        assert (row.result, row.attempts) == ("fixed", 2), row
        assert "the one before: Immich ran its job (finished at" in row.detail
        (first, second), _ = zip(*[(at, ids) for at, ids in fake.posts if flaky in ids], strict=True)
        assert second - first >= 1.0

        # With no attempt left, a job that finished without writing the files settles it at once: no
        # waiting for its 60s window.
        started = time.monotonic()
        report = await regenerate(config, options(tmp_path, apply=True, wait=True, retry_after=60, max_attempts=1,
                                                  assets=(last_try,)))
        assert time.monotonic() - started < 30
    row = report.rows[last_try]
    assert (row.result, row.why) == ("gave_up", "no_effect"), row
    assert "after 1 attempt(s): Immich ran its job (finished at" in row.detail
    assert ledger_rows(tmp_path)[last_try]["state"] == "gave_up"


async def test_explain_says_where_the_job_is() -> None:
    now = 1_000_000.0
    ms = int((now - 120) * 1000)
    idle = QueueHealth(paused=False, workers=1)
    cases = [
        (JobState("7", "active", added_ms=ms, started_ms=ms, locked=False), idle, "job_stalled",
         "its job is active but stalled: no worker holds its lock (started 2m ago)"),
        (JobState("7", "active", added_ms=ms, started_ms=ms, locked=True), idle, "job_active",
         "its job is running (started 2m ago)"),
        (JobState("7", "failed", added_ms=ms, finished_ms=ms, failed_reason="ENOSPC"), idle, "job_failed",
         f"its job failed at {clock(now - 120)}: ENOSPC"),
        (JobState("7", "delayed", added_ms=ms), idle, "job_delayed",
         "its job waits for a retry after an error (added 2m ago)"),
        (JobState("7", "waiting", added_ms=ms, position=3, of=9), idle, "job_waiting",
         "its job has waited 2m, position 3 of 9 in thumbnailGeneration, 1 live worker(s)"),
        (JobState("7", "waiting", added_ms=ms, position=3, of=9), QueueHealth(False, None), "job_waiting",
         "its job has waited 2m, position 3 of 9 in thumbnailGeneration, live workers unknown (the server "
         "refuses CLIENT LIST)"),
        (JobState("7", "gone"), idle, "no_effect",
         "its job has left the queue (Immich removes finished jobs) and the files are still missing"),
        (None, idle, "no_job", "no job names it in the thumbnailGeneration queue"),
    ]
    for state, health, code, text in cases:
        why = explain(state, None, health, now)
        assert (why.code, why.text) == (code, text)
    seen = JobSeen("7", "a", now - 200, finished_at=now - 60, outcome="completed")
    why = explain(None, seen, idle, now)
    assert (why.code, why.text) == (
        "no_effect", f"Immich ran its job (finished at {clock(now - 60)}) and the files are still missing")
    seen = JobSeen("7", "a", now - 200, finished_at=now - 60, outcome="failed", failed_reason="boom")
    assert explain(None, seen, idle, now) == Why("job_failed", f"its job failed at {clock(now - 60)}: boom")


async def test_a_version_1_ledger_is_read_and_upgraded(tmp_path: Path) -> None:
    """A ledger written before job ids and reasons were kept: read as it is, upgraded when written."""
    db = sqlite3.connect(tmp_path / FILENAME)
    db.executescript("""
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO meta VALUES ('schema_version', '1');
        CREATE TABLE asset (asset_id TEXT PRIMARY KEY, state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
            kinds TEXT NOT NULL DEFAULT '', first_submitted REAL, last_submitted REAL, last_checked REAL,
            last_outcome TEXT, detail TEXT, gave_up_reason TEXT, fixed_at REAL, updated REAL NOT NULL);
        CREATE INDEX asset_state ON asset (state, last_submitted);
        INSERT INTO asset VALUES ('a', 'submitted', 1, 'preview', 10, 10, NULL, 'accepted', NULL, NULL, NULL, 10);
        INSERT INTO asset VALUES ('b', 'still_missing', 2, 'thumbnail', 5, 8, 9, 'still_missing', 'x', NULL, NULL, 9);
    """)
    db.close()
    readonly = Ledger.open_existing(str(tmp_path))
    assert readonly is not None
    got = readonly.get(["a", "b"])
    assert (got["a"].state, got["a"].job_id, got["a"].why) == ("submitted", None, None)
    assert (got["b"].state, got["b"].attempts, got["b"].kinds) == ("still_missing", 2, {"thumbnail"})
    readonly.close()
    columns = {r[1] for r in sqlite3.connect(tmp_path / FILENAME).execute("PRAGMA table_info(asset)")}
    assert "job_id" not in columns  # reading changed nothing

    ledger = Ledger(str(tmp_path))
    ledger.queued({"a": "42"}, 11)
    assert ledger.get(["a"])["a"].job_id == "42"
    assert ledger.record("b", "fixed", "all files present", 20) == "fixed"
    ledger.close()
    db = sqlite3.connect(tmp_path / FILENAME)
    assert db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == ("2",)
    assert db.execute("SELECT state, attempts, job_id FROM asset WHERE asset_id = 'a'").fetchone() == (
        "submitted", 1, "42")
    assert db.execute("SELECT state, first_submitted FROM asset WHERE asset_id = 'b'").fetchone() == ("fixed", 5)
    db.close()


# -- serve ------------------------------------------------------------------------------------------------


async def test_serve_verifies_its_own_requests_within_a_minute(
    imm: Immich, fake: SimulatedApi, valkey: EmbeddedValkey, tmp_path: Path
) -> None:
    """Problems found by one file check are fixed and verified well before the next one, and an asset
    Immich queued nothing for, or whose first job did nothing, is counted as such and fixed on retry."""
    fixable, _, _ = await expected_sets(imm)
    dropped, flaky = sorted(fixable)[:2]
    fake.drop_first = {dropped}
    overrides = {
        "database.url": imm.dsn, "media.root": imm.media, "immich.url": fake.url, "immich.api_key": API_KEY,
        "redis.url": valkey.url, "checks.verify_headers": True,
        "intervals.files": "1h", "intervals.queues": "5s",
        "remediation.enabled": True, "remediation.interval": "15s", "remediation.verify_after": "5s",
        "remediation.confirm_within": "2s", "remediation.requests_per_second": 20,
        "remediation.state_dir": str(tmp_path),
    }
    async with thumbnail_worker(imm, valkey, flaky={flaky}), running_exporter(overrides) as (exporter, base):
        found = await wait_for(lambda: exporter.store.last_success("files"), timeout=60)

        async def counters() -> dict[str, float | None] | None:
            _status, text, _ = await fetch(f"{base}/metrics")
            parsed = samples(text)
            got = {r: value(parsed, "immich_regeneration_verified_total", result=r)
                   for r in ("fixed", "still_missing", "not_queued", "gave_up")}
            return got if got["fixed"] == len(fixable) else None

        got = await wait_for(counters, timeout=90, interval=0.5)
        took = time.time() - found
        assert took < 60, f"fixed and verified {took:.0f}s after the file check found the problems"
        assert got == {"fixed": len(fixable), "still_missing": 1, "not_queued": 1, "gave_up": 0}
        # No later file check did it (the files loop may run twice at start-up, as sources come up).
        last = exporter.store.last_success("files")
        assert last is not None and last - found < 10
        (remediation,) = [c for c in exporter.runner.collections if isinstance(c, RemediationCollection)]
        assert remediation.ledger is not None and remediation.ledger.counts() == {"fixed": len(fixable)}
    rows = ledger_rows(tmp_path)
    assert {a: r["attempts"] for a, r in rows.items() if r["attempts"] > 1} == {dropped: 2, flaky: 2}
    assert fake.submissions() == Counter({a: 2 if a in (dropped, flaky) else 1 for a in fixable})


async def test_serve_records_why_in_the_ledger(
    imm: Immich, fake: SimulatedApi, valkey: EmbeddedValkey, tmp_path: Path
) -> None:
    """No worker: once an attempt's window is over the asset is still missing, and the ledger says why."""
    fixable, _, _ = await expected_sets(imm)
    overrides = {
        "database.url": imm.dsn, "media.root": imm.media, "immich.url": fake.url, "immich.api_key": API_KEY,
        "redis.url": valkey.url, "checks.verify_headers": True, "intervals.files": "1h",
        "remediation.enabled": True, "remediation.interval": "2s", "remediation.verify_after": "2s",
        "remediation.confirm_within": "2s", "remediation.requests_per_second": 20,
        "remediation.state_dir": str(tmp_path),
    }
    async with running_exporter(overrides) as (_exporter, base):

        async def still_missing() -> float | None:
            _status, text, _ = await fetch(f"{base}/metrics")
            n = value(samples(text), "immich_regeneration_verified_total", result="still_missing")
            return n if n == len(fixable) else None

        await wait_for(still_missing, timeout=60, interval=0.5)
    rows = ledger_rows(tmp_path)
    assert {rows[a]["state"] for a in fixable} == {"still_missing"}
    assert {rows[a]["why"] for a in fixable} == {"no_worker"}
    assert all("which has no live worker" in rows[a]["why_text"] for a in fixable)
    # Their jobs still wait in the queue: nothing is asked twice.
    assert fake.submissions() == Counter({a: 1 for a in fixable})


async def test_confirmation_and_reasons_need_read_commands_only(
    imm: Immich, fake: SimulatedApi, valkey: EmbeddedValkey, tmp_path: Path
) -> None:
    """Under the README's read-only ACL user, every read regenerate makes (the event stream, job hashes,
    the queue's lists, positions, locks, CLIENT LIST) is allowed, and it still says why."""
    fixable, _, _ = await expected_sets(imm)
    dropped = sorted(fixable)[0]
    fake.drop = {dropped}
    admin = redis.Redis.from_url(valkey.url, decode_responses=True)
    admin.execute_command("ACL", "LOG", "RESET")
    admin.execute_command("ACL", "SETUSER", "exporter", *REDIS_ACL.format(password="acl-pw").split())
    try:
        config = make_config(imm, fake, tmp_path, f"redis://exporter:acl-pw@127.0.0.1:{valkey.port}/0")
        report = await regenerate(config, options(tmp_path, apply=True, wait=True, retry_after=30, timeout=3,
                                                  confirm_within=2))
        assert admin.acl_log() == [], admin.acl_log()
    finally:
        admin.execute_command("ACL", "DELUSER", "exporter")
        admin.close()
    assert (report.rows[dropped].result, report.rows[dropped].why) == ("not_queued", "not_queued")
    assert {report.rows[a].why for a in fixable - {dropped}} == {"no_worker"}
    assert report.errors == []


async def test_redis_lost_while_confirming_calls_nothing_not_queued(
    imm: Immich, valkey: EmbeddedValkey, tmp_path: Path
) -> None:
    """Redis goes away during the confirmation window: the run says so, keeps its report, and claims
    nothing about jobs it could not see."""
    fixable, _, _ = await expected_sets(imm)
    own = EmbeddedValkey()
    own.start()
    api = SimulatedApi(imm.dsn, own.url, {API_KEY: None})
    api.drop = set(fixable)  # no job will appear: only the watch's failure can end the window early
    await api.start()
    try:
        config = make_config(imm, api, tmp_path, own.url)

        async def stop_after_the_request() -> None:
            await wait_for(lambda: api.accepted >= 1, timeout=30, interval=0.05)
            await asyncio.to_thread(own.stop)

        stopper = asyncio.create_task(stop_after_the_request())
        report = await regenerate(config, options(tmp_path, apply=True, confirm_within=5))
        await stopper
    finally:
        await api.stop()
        own.cleanup()
    assert {a for a, r in report.rows.items() if r.result == "submitted"} == fixable
    assert any(n.startswith("whether Immich queued the jobs could not be confirmed: ") for n in report.notes)
    assert {r["state"] for r in ledger_rows(tmp_path).values()} == {"submitted"}
