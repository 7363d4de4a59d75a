"""``regenerate`` and the ``remediation`` collection against the demo's simulated Immich.

Its API (``demo/simulation/api.py``, an aiohttp double: the only fake part) answers
``POST /api/assets/jobs`` like Immich (204) and queues real BullMQ jobs in the real Valkey (prefix
``immich_bull``, queue ``thumbnailGeneration``, ``AssetGenerateThumbnails``, Immich's job options), or
queues nothing for the assets it is told to drop, as Immich v3.0.0 did. Its worker (a real ``bullmq``
Worker) plays Immich's thumbnail worker on the seeded PostgreSQL database and media folder: it writes
valid files and rows, or (``writes=False``) completes every job with ``null`` and writes nothing, which
is what a broken Immich looks like from outside.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections import Counter
from pathlib import Path

import pytest

from immich_thumbnail_exporter.collectors.files import FilesCollection
from immich_thumbnail_exporter.collectors.remediation import RemediationCollection
from immich_thumbnail_exporter.demo.embedded import EmbeddedValkey
from immich_thumbnail_exporter.demo.simulation.api import JOB_OPTS, SimulatedApi
from immich_thumbnail_exporter.findings import ProblemFeed
from immich_thumbnail_exporter.output import scan_report
from immich_thumbnail_exporter.remediation.engine import regenerate
from immich_thumbnail_exporter.remediation.ledger import Ledger
from immich_thumbnail_exporter.sources.bullmq_queue import thumbnail_throughput
from immich_thumbnail_exporter.sources.postgres import PostgresSource
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
    owners_of,
    problem_assets,
    results,
    thumbnail_worker,
)

pytestmark = pytest.mark.asyncio
__all__ = ["fake", "imm"]  # fixtures used by name

REFUSED = "Not found or no asset.update access"  # Immich's utils/access.ts requireAccess, asset.update

# -- the ledger on its own -------------------------------------------------------------------------------


async def test_ledger_survives_restart_and_records_the_decisions(tmp_path: Path) -> None:
    """The ledger records; ``decision.decide`` decides (tests/unit/test_decision.py): windows, retries and
    giving up are its, the ledger only refuses to claim an asset twice or past its attempts."""
    state = tmp_path / "state" / "nested"
    ledger = Ledger(str(state))
    assert ledger._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    t0 = 1_000_000.0
    claims = ledger.claim({"a": {"preview"}, "b": {"thumbnail"}}, t0, max_attempts=3)
    assert [c.asset_id for c in claims] == ["a", "b"]
    ledger.accepted(["a"], t0)
    # "b" was claimed and then the process died before the answer: it stays "submitting".
    ledger.close()

    ledger = Ledger(str(state))  # a restart
    assert ledger.claim({"a": {"preview"}, "b": {"thumbnail"}}, t0 + 1, 3) == []  # nothing twice
    assert ledger.record("a", "waiting", "preview file_missing", t0 + 5) == "waiting"
    assert ledger.get(["a"])["a"].state == "submitted"
    assert ledger.record("a", "still_missing", "preview file_missing", t0 + 10) == "still_missing"
    assert ledger.record("a", "still_missing", "preview file_missing", t0 + 10) == "unchanged"
    assert ledger.record("b", "fixed", "all files present", t0 + 10) == "fixed"
    assert ledger.record("b", "still_missing", "x", t0 + 11) is None  # settled: not pending any more
    (_again,) = ledger.claim({"a": {"thumbnail"}}, t0 + 11, 3)
    ledger.accepted(["a"], t0 + 11)
    a = ledger.get(["a"])["a"]
    assert (a.state, a.attempts, a.kinds, a.first_submitted) == ("submitted", 2, {"preview", "thumbnail"}, t0)
    assert a.due_at(10) == t0 + 11 + 20  # the second window is twice as long
    assert ledger.record("a", "still_missing", "x", t0 + 11 + 20) == "still_missing"
    claims = ledger.claim({"a": {"preview"}}, t0 + 40, 3)
    # A refused request does not count as an attempt.
    ledger.release(claims, "rejected", "HTTP 403", t0 + 40)
    a = ledger.get(["a"])["a"]
    assert (a.state, a.attempts, a.last_submitted, a.last_outcome) == ("still_missing", 2, t0 + 11, "rejected")
    ledger.claim({"a": {"preview"}}, t0 + 41, 3)
    ledger.accepted(["a"], t0 + 41)
    assert ledger.claim({"a": {"preview"}}, t0 + 1000, 3) == []  # awaiting verification
    assert ledger.record("a", "gave_up", "preview file_missing", t0 + 41 + 40) == "gave_up"
    a = ledger.get(["a"])["a"]
    assert a.gave_up_reason == "preview file_missing after 3 attempt(s)"
    assert ledger.claim({"a": {"preview"}}, t0 + 1000, 3) == []
    assert [c.asset_id for c in ledger.claim({"a": {"preview"}}, t0 + 1000, 3, reset=["a"])] == ["a"]
    assert ledger.get(["a"])["a"].attempts == 1
    ledger.close()


# -- regenerate --------------------------------------------------------------------------------------------


async def test_dry_run_submits_nothing(imm: Immich, fake: SimulatedApi, valkey: EmbeddedValkey, tmp_path: Path) -> None:
    fixable, no_original, symlinked = await expected_sets(imm)
    state = tmp_path / "state"
    code, out, err = await cli(
        "regenerate", "--media.root", imm.media, "--state-dir", str(state), "--format", "json",
        env={"DB_URL": imm.dsn, "IMMICH_URL": fake.url, "IMMICH_API_KEY": API_KEY, "REDIS_URL": valkey.url},
    )
    assert code == 0, err
    assert "Traceback" not in err
    doc = json.loads(out)
    assert doc["mode"] == "dry_run"
    rows = {r["asset_id"]: r for r in doc["assets"]}
    assert {a for a, r in rows.items() if r["result"] == "would_submit"} == fixable
    assert {a for a, r in rows.items() if r["result"] == "skipped"} == no_original | symlinked
    assert fake.posts == []
    assert not state.exists()  # a dry run creates nothing
    code, out, err = await cli(
        "regenerate", "--media.root", imm.media, "--state-dir", str(state), "--kind", "preview",
        env={"DB_URL": imm.dsn, "IMMICH_URL": fake.url, "IMMICH_API_KEY": API_KEY},
    )
    assert code == 0, err
    assert "dry run, nothing submitted" in out
    assert "would submit" in out
    assert fake.posts == []


async def test_skip_reasons(imm: Immich, fake: SimulatedApi, valkey: EmbeddedValkey, tmp_path: Path) -> None:
    fixable, no_original, symlinked = await expected_sets(imm)
    queued = sorted(fixable)[0]
    # Immich already has a job for this asset and no worker has taken it yet.
    await fake.queue.add("AssetGenerateThumbnails", {"id": queued}, JOB_OPTS)
    config = make_config(imm, fake, tmp_path, valkey.url)
    report = await regenerate(config, options(tmp_path, apply=True))
    by = results(report)
    assert report.rows[queued].result == "skipped"
    assert "already waiting in the thumbnail queue" in report.rows[queued].detail
    (lost,) = no_original
    assert report.rows[lost].result == "skipped"
    assert "original file is missing" in report.rows[lost].detail
    (link,) = symlinked
    assert report.rows[link].result == "skipped"
    assert "cannot read the file" in report.rows[link].detail
    assert by["submitted"] == fixable - {queued}
    assert fake.submissions() == Counter({a: 1 for a in fixable - {queued}})
    assert report.exit_code() == 0

    missing_asset, bad_id = str(uuid.uuid4()), "not-a-uuid"
    report = await regenerate(config, options(tmp_path, assets=(missing_asset, bad_id, lost)))
    assert report.rows[missing_asset].result == "skipped"
    assert report.rows[missing_asset].detail == "asset not in the database"
    assert report.rows[bad_id].result == "skipped"
    assert report.rows[bad_id].detail == "not a valid asset id"
    assert report.rows[lost].result == "skipped"
    assert set(report.rows) == {missing_asset, bad_id, lost}


async def test_apply_wait_fixes_and_verifies(
    imm: Immich, fake: SimulatedApi, valkey: EmbeddedValkey, tmp_path: Path
) -> None:
    fixable, no_original, symlinked = await expected_sets(imm)
    assert await problem_assets(imm) == fixable | no_original | symlinked
    config = make_config(imm, fake, tmp_path, valkey.url)
    async with thumbnail_worker(imm, valkey):
        report = await regenerate(config, options(tmp_path, apply=True, wait=True, batch_size=4, retry_after=20))
    by = results(report)
    assert by["fixed"] == fixable
    assert report.exit_code() == 0
    # Batches of at most four, never mixing owners (Immich refuses a request naming another user's
    # asset); each asset asked for exactly once.
    owners = await owners_of(imm)
    per_owner = Counter(owners[a] for a in fixable)
    assert len(fake.posts) == sum(-(-n // 4) for n in per_owner.values())
    assert all(len(ids) <= 4 and len({owners[a] for a in ids}) == 1 for _, ids in fake.posts)
    assert fake.submissions() == Counter({a: 1 for a in fixable})
    assert report.requests["accepted"] == len(fake.posts)
    # Independently of the exporter's own verification: only what regeneration cannot fix is left.
    assert await problem_assets(imm) == no_original | symlinked
    rows = ledger_rows(tmp_path)
    assert {a for a, r in rows.items() if r["state"] == "fixed"} == fixable
    assert all(rows[a]["attempts"] == 1 and rows[a]["fixed_at"] >= rows[a]["first_submitted"] for a in fixable)

    # The post-restore review can now estimate from the queue's observed finish rate.
    throughput = await thumbnail_throughput(config.redis)
    assert throughput.completed >= len(fixable) and throughput.rate is not None and throughput.rate > 0
    review = scan_report.regeneration_estimate(10, throughput)
    assert review["rate_per_second"] > 0 and review["seconds"] is not None and review["seconds"] >= 0
    assert review["basis"].startswith(f"{throughput.completed} thumbnail jobs finished")


async def test_worker_that_never_writes_leads_to_retries_then_gave_up(
    imm: Immich, fake: SimulatedApi, valkey: EmbeddedValkey, tmp_path: Path
) -> None:
    fixable, _, _ = await expected_sets(imm)
    config = make_config(imm, fake, tmp_path, valkey.url)
    async with thumbnail_worker(imm, valkey, writes=False) as worker:
        report = await regenerate(config, options(tmp_path, apply=True, wait=True, retry_after=0.6, max_attempts=2))
    by = results(report)
    assert by["gave_up"] == fixable
    assert "fixed" not in by
    assert report.exit_code() == 1
    assert fake.submissions() == Counter({a: 2 for a in fixable})
    owners = await owners_of(imm)
    assert len(fake.posts) == 2 * len({owners[a] for a in fixable})  # one request per owner and attempt
    times: dict[str, list[float]] = {}
    for at, ids in fake.posts:
        for a in ids:
            times.setdefault(a, []).append(at)
    assert all(t[1] - t[0] >= 0.6 for t in times.values())  # never resubmitted before its window was over
    assert Counter(worker.processed) == Counter({a: 2 for a in fixable})
    for a in fixable:
        assert "after 2 attempt(s)" in report.rows[a].detail
    rows = ledger_rows(tmp_path)
    assert {rows[a]["state"] for a in fixable} == {"gave_up"}
    assert all("after 2 attempt(s)" in rows[a]["gave_up_reason"] for a in fixable)
    # A later run does not start over on its own, and says why.
    posts = len(fake.posts)
    report = await regenerate(config, options(tmp_path, apply=True))
    assert results(report)["gave_up"] == fixable
    assert len(fake.posts) == posts
    assert report.exit_code() == 1


async def test_deadline_leaves_assets_still_broken_and_tracked(
    imm: Immich, fake: SimulatedApi, valkey: EmbeddedValkey, tmp_path: Path
) -> None:
    fixable, _, _ = await expected_sets(imm)
    config = make_config(imm, fake, tmp_path, valkey.url)
    async with thumbnail_worker(imm, valkey, writes=False):
        report = await regenerate(config, options(tmp_path, apply=True, wait=True, retry_after=30, timeout=1.5))
    assert results(report)["still_missing"] == fixable
    assert report.exit_code() == 1
    assert all("when the run ended (attempt 1 of 3)" in report.rows[a].detail for a in fixable)
    # The worker took every job and wrote nothing: each attempt is over, and says so.
    rows = ledger_rows(tmp_path)
    ran = {a for a in fixable if report.rows[a].why == "no_effect"}
    assert ran and all("Immich ran its job (finished at" in report.rows[a].detail for a in ran)
    assert {rows[a]["state"] for a in ran} == {"still_missing"}
    assert {rows[a]["why"] for a in ran} == {"no_effect"}
    # Nothing is asked again before its window (30s) is over: the ledger keeps each one.
    assert {r["state"] for r in rows.values()} <= {"submitted", "still_missing"}
    assert fake.submissions() == Counter({a: 1 for a in fixable})


async def test_interrupted_run_resumes_from_the_ledger(
    imm: Immich, fake: SimulatedApi, valkey: EmbeddedValkey, tmp_path: Path
) -> None:
    fixable, _, _ = await expected_sets(imm)
    # Redis is left out of the configuration: only the ledger can prevent a second request.
    config = make_config(imm, fake, tmp_path)
    opts = options(tmp_path, apply=True, wait=True, retry_after=30, timeout=60)
    task = asyncio.create_task(regenerate(config, opts))
    await wait_for(lambda: set(fake.submissions()) == fixable, timeout=30)
    await wait_for(lambda: {r["state"] for r in ledger_rows(tmp_path).values()} == {"submitted"}, timeout=10)
    task.cancel()  # Ctrl-C while waiting for Immich
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(task, 10)
    assert set(ledger_rows(tmp_path)) == fixable
    posts = len(fake.posts)

    # Right after the restart: nothing is asked again before its window is over.
    report = await regenerate(config, options(tmp_path, apply=True, retry_after=30))
    assert results(report)["waiting"] == fixable
    assert len(fake.posts) == posts
    assert report.exit_code() == 0

    # Immich's worker comes back and works through the jobs queued before the interruption.
    async with thumbnail_worker(imm, valkey):
        report = await regenerate(config, opts)
    assert results(report)["fixed"] == fixable
    assert report.exit_code() == 0
    assert len(fake.posts) == posts
    assert fake.submissions() == Counter({a: 1 for a in fixable})
    assert {r["state"] for r in ledger_rows(tmp_path).values()} == {"fixed"}
    assert {r["attempts"] for r in ledger_rows(tmp_path).values()} == {1}


@pytest.mark.parametrize(("mode", "message"), [
    ("401", "API key rejected POST /api/assets/jobs (HTTP 401: Invalid API key)"),
    ("403", "API key lacks the permission for POST /api/assets/jobs (HTTP 403: Missing required permission"),
    ("500", "POST /api/assets/jobs: HTTP 500: Internal server error"),
])
async def test_api_errors_are_reported_and_nothing_is_marked_fixed(
    imm: Immich, fake: SimulatedApi, valkey: EmbeddedValkey, tmp_path: Path, mode: str, message: str
) -> None:
    fixable, no_original, symlinked = await expected_sets(imm)
    fake.mode = mode
    async with thumbnail_worker(imm, valkey) as worker:
        code, out, err = await cli(
            "regenerate", "--apply", "--wait", "--timeout", "5s", "--media.root", imm.media,
            "--state-dir", str(tmp_path), "--format", "json",
            env={"DB_URL": imm.dsn, "IMMICH_URL": fake.url, "IMMICH_API_KEY": API_KEY, "REDIS_URL": valkey.url},
        )
    assert code == 2, (out, err)
    assert "Traceback" not in err
    error_lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1 and message in error_lines[0], err
    doc = json.loads(out)
    rows = {r["asset_id"]: r for r in doc["assets"]}
    assert {a for a, r in rows.items() if r["result"] == "not_submitted"} == fixable
    assert not [r for r in doc["assets"] if r["result"] in ("fixed", "submitted")]
    assert doc["summary"]["requests"]["accepted"] == 0
    # 5xx is retried a few times, a refusal is not.
    assert len(fake.posts) == (4 if mode == "500" else 1)
    assert worker.processed == []
    ledger = ledger_rows(tmp_path)
    assert {r["attempts"] for r in ledger.values()} == {0}
    assert {r["state"] for r in ledger.values()} == {"error"}
    assert {r["last_outcome"] for r in ledger.values()} == {"error" if mode == "500" else "rejected"}
    assert await problem_assets(imm) == fixable | no_original | symlinked


async def test_api_failing_midway_reports_only_real_fixes(
    imm: Immich, fake: SimulatedApi, valkey: EmbeddedValkey, tmp_path: Path
) -> None:
    fixable, no_original, symlinked = await expected_sets(imm)
    fake.fail_after = 1  # the first batch is accepted, then Immich breaks
    config = make_config(imm, fake, tmp_path, valkey.url)
    async with thumbnail_worker(imm, valkey):
        report = await regenerate(config, options(tmp_path, apply=True, wait=True, batch_size=5))
    by = results(report)
    first = set(fake.posts[0][1])
    assert len(first) == 5
    assert by["fixed"] == first
    assert by["not_submitted"] == fixable - first
    assert report.exit_code() == 2
    assert any("HTTP 500" in e for e in report.errors)
    assert await problem_assets(imm) == (fixable - first) | no_original | symlinked


# -- serve: the remediation collection ---------------------------------------------------------------------


async def test_remediation_collection_moves_the_counters(
    imm: Immich, fake: SimulatedApi, valkey: EmbeddedValkey, tmp_path: Path
) -> None:
    fixable, _, _ = await expected_sets(imm)
    overrides = {
        "database.url": imm.dsn, "media.root": imm.media, "immich.url": fake.url, "immich.api_key": API_KEY,
        "redis.url": valkey.url, "remediation.enabled": True, "remediation.interval": "300ms",
        "remediation.verify_after": "1s", "remediation.requests_per_second": 20,
        "remediation.state_dir": str(tmp_path), "intervals.queues": "1s",
        # Without header checks the corrupt previews look fine to serve's scan, and are left alone.
        "checks.verify_headers": True,
    }
    async with thumbnail_worker(imm, valkey), running_exporter(overrides) as (exporter, base):

        async def counters() -> dict[str, float | None] | None:
            _status, text, _ = await fetch(f"{base}/metrics")
            parsed = samples(text)
            got = {
                "accepted": value(parsed, "immich_regeneration_requests_total", result="accepted"),
                "rejected": value(parsed, "immich_regeneration_requests_total", result="rejected"),
                "fixed": value(parsed, "immich_regeneration_verified_total", result="fixed"),
                "gave_up": value(parsed, "immich_regeneration_verified_total", result="gave_up"),
            }
            return got if got["fixed"] == len(fixable) else None

        got = await wait_for(counters, timeout=60, interval=0.3)
        assert got["accepted"] is not None and got["accepted"] >= 1
        assert got["rejected"] == 0 and got["gave_up"] == 0
        (remediation,) = [c for c in exporter.runner.collections if isinstance(c, RemediationCollection)]
        after = remediation.rounds
        await wait_for(lambda: remediation.rounds >= after + 3, timeout=30)  # a few more rounds:
        assert fake.submissions() == Counter({a: 1 for a in fixable})  # nothing is asked twice
        result = exporter.store.result("remediation")
        assert result is not None and result.success, result
        assert remediation.ledger is not None and remediation.ledger.counts() == {"fixed": len(fixable)}
    assert not await problem_assets(imm) & fixable


# -- scan: the post-restore review ------------------------------------------------------------------------


async def test_scan_review_by_reason_and_time_estimate(
    imm: Immich, fake: SimulatedApi, valkey: EmbeddedValkey
) -> None:
    _, no_original, symlinked = await expected_sets(imm)
    env = {"DB_URL": imm.dsn}
    code, out, err = await cli("scan", "--format", "json", "--media.root", imm.media, env=env)
    assert code == 0, err
    doc = json.loads(out)
    regen = doc["summary"]["regeneration"]
    problems = doc["problems"]
    fixable = {p["asset_id"] for p in problems} - no_original - symlinked
    assert regen["assets"] == {"can_fix": len(fixable), "original_missing": 1, "unreadable_by_exporter": 1}
    assert regen["cannot_fix_by_reason"] == {"original_missing": {"file_missing": 1},
                                             "unreadable_by_exporter": {"file_unreadable": 1}}
    assert sum(regen["can_fix_by_reason"].values()) == len(problems) - 2
    assert regen["can_fix_by_reason"]["no_record"] == 3
    assert regen["can_fix_original_not_checked"] == 0  # the scan checks problem assets' originals
    # The keys from before keep their meaning: problems, counting unreadable ones as fixable.
    assert regen["can_fix"] == len(problems) - 1 and regen["cannot_fix_original_missing"] == 1
    assert regen["estimate"]["seconds"] is None
    assert regen["estimate"]["basis"].startswith("unknown: Redis is not configured")

    # Immich's worker finished some thumbnail jobs: the review estimates from their rate.
    async with thumbnail_worker(imm, valkey, writes=False) as worker:
        for asset_id in sorted(fixable)[:6]:
            await fake.queue.add("AssetGenerateThumbnails", {"id": asset_id}, JOB_OPTS)
            await asyncio.sleep(0.05)
        await wait_for(lambda: len(worker.processed) == 6)
    env["REDIS_URL"] = valkey.url
    code, out, err = await cli("scan", "--media.root", imm.media, env=env)
    assert code == 0, err
    assert "Post-restore review:" in out
    assert f"Regeneration can fix {len(problems) - 1} problem(s); 1 have no original file" in out
    assert f"Regeneration can fix {len(fixable)} asset(s) (no_record 3, file_missing" in out
    assert "Cannot fix 1 asset(s) whose original is missing (file_missing 1)" in out
    assert "Time to regenerate: about" in out and "6 thumbnail jobs finished over" in out


async def test_only_the_key_users_assets_are_submitted(
    imm: Immich, fake: SimulatedApi, valkey: EmbeddedValkey, tmp_path: Path
) -> None:
    fixable, _, _ = await expected_sets(imm)
    owners = await owners_of(imm)
    key_user = owners[sorted(fixable)[0]]
    fake.keys[API_KEY] = key_user  # Immich refuses (400) a request naming an asset this user does not own
    mine = {a for a in fixable if owners[a] == key_user}
    assert 0 < len(mine) < len(fixable)
    config = make_config(imm, fake, tmp_path, valkey.url)

    # A key that may not say whose it is: requests go one owner at a time; Immich refuses the other
    # owner's request, which is split until each refused asset stands alone (each reported with
    # Immich's words), and stops neither the key user's request nor its verification.
    fake.me_allowed = False
    async with thumbnail_worker(imm, valkey):
        report = await regenerate(config, options(tmp_path, apply=True, wait=True))
    by = results(report)
    assert by["fixed"] == mine
    assert by["skipped"] & fixable == fixable - mine
    for a in fixable - mine:
        assert report.rows[a].reason == "refused"
        assert report.rows[a].detail == f"Immich refused it: {REFUSED}"
    accepted = [ids for _, ids in fake.posts if not set(ids) - mine]
    assert sorted(accepted) == [sorted(mine)]
    others = len(fixable - mine)
    assert len(fake.posts) == 1 + 2 * others - 1  # halved down to single assets
    assert report.requests["rejected"] == 2 * others - 1
    assert report.errors == [] and report.exit_code() == 0
    assert any("cannot tell which Immich user the API key belongs to" in n for n in report.notes)
    rows = ledger_rows(tmp_path)
    assert all(rows[a]["last_outcome"] == "refused" and rows[a]["attempts"] == 0 for a in fixable - mine)
    fake.posts.clear()

    # Run again at once: what Immich refused is not asked again before a window has passed.
    report = await regenerate(config, options(tmp_path, apply=True))
    assert all(report.rows[a].reason == "refused" and REFUSED in report.rows[a].detail for a in fixable - mine)
    assert fake.posts == [] and report.exit_code() == 0

    # A key that says whose it is: the other user's assets are skipped with the reason, nothing is sent.
    fake.me_allowed = True
    report = await regenerate(config, options(tmp_path, apply=True, wait=True))
    assert results(report) == {"skipped": (fixable - mine) | {a for a in report.rows if a not in fixable}}
    assert all("owned by another Immich user" in report.rows[a].detail for a in fixable - mine)
    assert all(report.rows[a].reason == "other_owner" for a in fixable - mine)
    assert fake.posts == []
    assert report.exit_code() == 0


async def test_remediation_reads_problems_from_the_files_result(
    imm: Immich, fake: SimulatedApi, valkey: EmbeddedValkey, tmp_path: Path
) -> None:
    """Given the files collection's problem feed, a round takes its problems instead of scanning."""
    fixable, _, _ = await expected_sets(imm)
    config = make_config(imm, fake, tmp_path, valkey.url, **{
        "remediation.enabled": True, "remediation.verify_after": "1s", "remediation.requests_per_second": 50,
        "checks.verify_headers": True,
    })
    pg = PostgresSource(config.database)
    feed = ProblemFeed()
    files = FilesCollection(config, pg, feed)
    collection = RemediationCollection(config, pg, feed)
    try:
        outcome = await asyncio.wait_for(collection.collect(), 30)
        assert collection.last is not None and collection.last.candidates == 0
        assert fake.posts == []  # no file check yet: no scan of its own
        assert outcome.error is None
        await asyncio.wait_for(files.collect(), 60)
        snapshot = feed.latest()
        assert snapshot is not None and {p.asset_id for p in snapshot.problems} >= fixable
        async with thumbnail_worker(imm, valkey):
            outcome = await asyncio.wait_for(collection.collect(), 30)
            assert collection.last is not None
            assert collection.last.submitted == len(fixable) and collection.last.not_queued == 0
            assert set(fake.submissions()) == fixable

            async def all_fixed() -> bool:
                await asyncio.wait_for(collection.collect(), 30)
                return collection.verified.get("fixed") == len(fixable)

            await wait_for(all_fixed, timeout=30, interval=0.2)
        # The feed still lists the old problems; the ledger knows better: nothing is asked twice.
        outcome = await asyncio.wait_for(collection.collect(), 30)
        assert collection.last is not None and collection.last.submitted == 0
        assert fake.submissions() == Counter({a: 1 for a in fixable})
        (part,) = outcome.parts
        assert part.needs == {"immich_api", "postgres"}
        values = {(s.name, s.labels["result"]): s.value for fam in part.families for s in fam.samples}
        assert values[("immich_regeneration_requests_total", "accepted")] == collection.requests["accepted"] >= 1
        assert values[("immich_regeneration_verified_total", "fixed")] == len(fixable)
        assert values[("immich_regeneration_verified_total", "still_missing")] == 0
        assert values[("immich_regeneration_verified_total", "not_queued")] == 0
    finally:
        await collection.close()
        await pg.close()
