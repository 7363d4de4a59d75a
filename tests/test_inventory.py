"""Exact counts for every schema era, through ``scan --format json`` and through ``/metrics``.

Each era gets a database built from Immich's own table and column names (``demo/schemas/*.sql``)
and a media folder with known problems injected by ``demo/seed.py``.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import asyncpg
import pytest

from immich_thumbnail_exporter.demo.seed import ERAS
from immich_thumbnail_exporter.vocabulary import KINDS, REASONS
from tests.conftest import Immich, wait_for
from tests.helpers import fetch, run_cli, running_exporter, samples, value

pytestmark = pytest.mark.asyncio

# What the default Plan injects, written out so that a seeder bug cannot hide an exporter bug.
DEFAULT_COUNTS = {
    "assets": {"image": 229, "video": 20},
    ("thumbnail", "no_record"): 2,
    ("preview", "no_record"): 1,
    ("thumbnail", "file_missing"): 3,
    ("preview", "file_missing"): 5,  # four lost previews + one asset whose original is gone too
    ("fullsize", "file_missing"): 1,
    ("thumbnail", "file_empty"): 2,
    ("preview", "file_corrupt"): 2,
    ("thumbnail", "file_unreadable"): 1,  # a symlink pointing outside the media root
    "thumbhash_missing": 3,
    "metadata_pending": 2,
    "orphaned_files": 3,
    "orphaned_bytes": 1500,
    "refused": 1,
    "files": {"thumbnail": 247, "preview": 248, "fullsize": 3},
}


def _missing(doc: dict[str, Any], kind: str, reason: str) -> int:
    return int(doc["missing"][kind].get(reason, 0))


@pytest.mark.parametrize("era", sorted(ERAS))
async def test_scan_json_exact_counts(immich_factory: Any, era: str) -> None:
    imm: Immich = await immich_factory(era)
    exp = imm.expected
    res = run_cli("scan", "--format", "json", "--media.root", imm.media, env=imm.env())
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    doc = json.loads(res.stdout)
    s = doc["summary"]
    assert s["schema"] == era
    assert s["immich_version"] == exp.version
    assert s["media_location"] == exp.location
    assert s["assets"] == DEFAULT_COUNTS["assets"] == exp.assets
    for kind in KINDS:
        for reason in REASONS:
            want = 0 if reason == "file_corrupt" else exp.missing[(kind, reason)]  # headers not verified
            if kind == "fullsize" and reason == "no_record":
                assert "no_record" not in s["missing"]["fullsize"]
                continue
            assert _missing(s, kind, reason) == want, (kind, reason)
            if reason != "file_corrupt":
                assert want == DEFAULT_COUNTS.get((kind, reason), 0), (kind, reason)
    assert s["thumbhash_missing"] == exp.thumbhash_missing == DEFAULT_COUNTS["thumbhash_missing"]
    assert s["metadata_pending"] == exp.metadata_pending == DEFAULT_COUNTS["metadata_pending"]
    assert s["orphaned_files"] == exp.orphaned_files == DEFAULT_COUNTS["orphaned_files"]
    assert s["orphaned_bytes"] == exp.orphaned_bytes == DEFAULT_COUNTS["orphaned_bytes"]
    assert s["paths_refused"] == DEFAULT_COUNTS["refused"]
    assert s["files"] == dict(exp.files) == DEFAULT_COUNTS["files"]
    assert s["bytes"] == {k: exp.bytes[k] for k in KINDS}
    # Every problem row names an asset we injected a problem into, and nothing else.
    ids = {p["asset_id"] for p in doc["problems"]}
    assert ids <= exp.problem_asset_ids
    assert len(exp.problem_asset_ids - ids) == 2  # the corrupt previews: headers are not verified here
    assert len(doc["problems"]) == s["problems"] == 15
    unfixable = [p for p in doc["problems"] if p["original_exists"] is False]
    assert len(unfixable) == 1 and unfixable[0]["kind"] == "preview"
    for p in doc["problems"]:
        assert p["reason"] in REASONS and p["kind"] in KINDS
        if p["reason"] != "no_record":
            assert p["path"]


def _scan_with_checks(imm: Immich, tmp_path: Any, checks: str) -> tuple[dict[str, Any], str]:
    """``scan --format json`` with a config file whose ``checks`` section is ``checks``: the document,
    and the config file's path."""
    cfg = tmp_path / "config.yml"
    cfg.write_text(f"database: {{url: '{imm.dsn}'}}\nmedia: {{root: '{imm.media}'}}\nchecks: {{{checks}}}\n")
    res = run_cli("scan", "--format", "json", "--config.file", str(cfg))
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout), str(cfg)


async def test_verify_headers_finds_corrupt_previews(immich_factory: Any, tmp_path: Any) -> None:
    imm: Immich = await immich_factory("v1.136+")
    s = (await asyncio.to_thread(_scan_with_checks, imm, tmp_path, "verify_headers: true"))[0]["summary"]
    assert _missing(s, "preview", "file_corrupt") == DEFAULT_COUNTS[("preview", "file_corrupt")] == 2


async def test_check_originals(immich_factory: Any, tmp_path: Any) -> None:
    imm: Immich = await immich_factory("v1.136+")
    doc, _ = await asyncio.to_thread(_scan_with_checks, imm, tmp_path, "check_originals: true")
    assert doc["summary"]["originals_missing"] == imm.expected.originals_missing == 2


@pytest.mark.parametrize("era", sorted(ERAS))
async def test_metrics_exact_counts(immich_factory: Any, era: str) -> None:
    imm: Immich = await immich_factory(era)
    exp = imm.expected
    overrides = {"media.root": imm.media, "checks.verify_headers": True, "checks.check_originals": True}
    async with running_exporter(overrides, env=imm.env()) as (exporter, url):
        await wait_for(lambda: exporter.store.ready, timeout=30)
        status, text, headers = await fetch(f"{url}/metrics")
        assert status == 200
        assert headers["Content-Type"].startswith("text/plain")
        m = samples(text)
        assert value(m, "immich_exporter_collection_success", collection="inventory") == 1
        assert value(m, "immich_exporter_collection_success", collection="files") == 1
        assert value(m, "immich_exporter_source_up", source="postgres") == 1
        assert value(m, "immich_exporter_source_up", source="filesystem") == 1
        assert value(m, "immich_assets", asset_type="image") == exp.assets["image"]
        assert value(m, "immich_assets", asset_type="video") == exp.assets["video"]
        for kind in KINDS:
            for reason in REASONS:
                got = value(m, "immich_asset_files_missing", kind=kind, reason=reason)
                if kind == "fullsize" and reason == "no_record":
                    assert got is None
                else:
                    assert got == exp.missing[(kind, reason)], (kind, reason)
            assert value(m, "immich_thumbnail_files", kind=kind) == exp.files[kind]
            assert value(m, "immich_thumbnail_bytes", kind=kind) == exp.bytes[kind]
        assert value(m, "immich_assets_thumbhash_missing") == exp.thumbhash_missing
        assert value(m, "immich_assets_metadata_pending") == exp.metadata_pending
        assert value(m, "immich_assets_original_missing") == exp.originals_missing
        assert value(m, "immich_thumbnail_orphaned_files") == exp.orphaned_files
        assert value(m, "immich_thumbnail_orphaned_bytes") == exp.orphaned_bytes
        assert value(m, "immich_exporter_paths_refused", kind="thumbnail") == 1
        assert value(m, "immich_server_info", version=exp.version, schema=era) == 1

        # /problems: the same problems, filterable and paged.
        status, body, headers = await fetch(f"{url}/problems?kind=preview&reason=file_missing")
        assert status == 200
        rows = json.loads(body)
        assert len(rows) == exp.missing[("preview", "file_missing")] == int(headers["X-Total-Count"])
        assert set(rows[0]) == {"asset_id", "owner_id", "asset_type", "kind", "reason", "path",
                                "original_path", "original_exists"}
        status, body, _ = await fetch(f"{url}/problems?limit=2&offset=1")
        assert status == 200 and len(json.loads(body)) == 2
        status, _, _ = await fetch(f"{url}/problems?kind=nonsense")
        assert status == 400
        status, body, _ = await fetch(f"{url}/")
        assert status == 200 and "Immich thumbnail exporter" in body
        status, body, _ = await fetch(f"{url}/readyz")
        assert status == 200


def _comparable(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in summary.items() if k not in ("scanned_at", "duration_seconds", "regeneration")}


async def _scan_summary(imm: Immich, **overrides: Any) -> tuple[dict[str, Any], list[str]]:
    from immich_thumbnail_exporter.config import load_config
    from immich_thumbnail_exporter.model import ProblemStore
    from immich_thumbnail_exporter.output.scan_report import summary
    from immich_thumbnail_exporter.scan.run import run_scan
    from immich_thumbnail_exporter.sources.postgres import PostgresSource

    config = load_config(None, environ={}, overrides={"database.url": imm.dsn, "media.root": imm.media, **overrides})
    pg = PostgresSource(config.database)
    store = ProblemStore()
    try:
        result = await asyncio.wait_for(run_scan(pg, config, store), 60)
        return summary(result), sorted(f"{p.asset_id} {p.kind} {p.reason}" for p in store)
    finally:
        store.close()
        await pg.close()


async def test_file_check_beside_counts_shares_one_snapshot(immich_factory: Any, monkeypatch: Any) -> None:
    """With a connection to spare, the file list is read on a second connection while the first counts,
    in the same snapshot: a row deleted in between is still seen, and the report is the one-connection
    report exactly."""
    from immich_thumbnail_exporter.scan import run as scanner

    imm: Immich = await immich_factory("v1.136+")
    alone, alone_problems = await _scan_summary(imm, **{"database.pool_size": 1})
    assert alone["orphaned_files"] == DEFAULT_COUNTS["orphaned_files"]

    used: list[bool] = []
    real = scanner._beside

    async def change_then_beside(*args: Any, **kwargs: Any) -> bool:
        # Immich deletes a file row after the scan's snapshot was taken, before the file list is read.
        conn = await asyncpg.connect(imm.dsn)
        try:
            deleted = await conn.fetchval(
                "DELETE FROM asset_file WHERE ctid = (SELECT ctid FROM asset_file WHERE type = 'preview' "
                "ORDER BY path LIMIT 1 OFFSET 10) RETURNING path"
            )
            assert deleted
        finally:
            await conn.close()
        used.append(await real(*args, **kwargs))
        return used[-1]

    monkeypatch.setattr(scanner, "_beside", change_then_beside)
    beside, beside_problems = await _scan_summary(imm, **{"database.pool_size": 2})
    assert used == [True]
    assert _comparable(beside) == _comparable(alone)
    assert beside_problems == alone_problems
    # The deletion is real: a scan in a fresh snapshot sees one more orphan.
    monkeypatch.setattr(scanner, "_beside", real)
    after, _ = await _scan_summary(imm)
    assert after["orphaned_files"] == alone["orphaned_files"] + 1


async def test_file_sizes_off(immich_factory: Any, tmp_path: Any) -> None:
    """``checks.file_sizes: false``: no lstat per file, so no bytes and no file_empty; everything else as
    with sizes."""
    imm: Immich = await immich_factory("v1.136+")
    doc, cfg = await asyncio.to_thread(_scan_with_checks, imm, tmp_path, "file_sizes: false")
    s = doc["summary"]
    empty = DEFAULT_COUNTS[("thumbnail", "file_empty")]
    assert all("file_empty" not in s["missing"][k] for k in KINDS)
    assert s["bytes"] is None and s["orphaned_bytes"] is None
    assert s["files"] == DEFAULT_COUNTS["files"]  # an empty file is a file on disk, with sizes or without
    assert _missing(s, "thumbnail", "file_missing") == DEFAULT_COUNTS[("thumbnail", "file_missing")]
    assert _missing(s, "preview", "file_missing") == DEFAULT_COUNTS[("preview", "file_missing")]
    assert _missing(s, "thumbnail", "file_unreadable") == DEFAULT_COUNTS[("thumbnail", "file_unreadable")]
    assert s["orphaned_files"] == DEFAULT_COUNTS["orphaned_files"]
    assert len(doc["problems"]) == s["problems"] == 15 - empty  # as with sizes (headers not read), less empty
    table = run_cli("scan", "--config.file", cfg)
    assert table.returncode == 0, table.stderr
    assert "sizes not read" in table.stdout

    overrides = {"media.root": imm.media, "checks.file_sizes": False}
    async with running_exporter(overrides, env=imm.env()) as (exporter, url):
        await wait_for(lambda: exporter.store.ready, timeout=30)
        status, text, _ = await fetch(f"{url}/metrics")
        assert status == 200
        m = samples(text)
        assert value(m, "immich_exporter_collection_success", collection="files") == 1
        assert value(m, "immich_thumbnail_files", kind="thumbnail") == s["files"]["thumbnail"]
        assert value(m, "immich_asset_files_missing", kind="thumbnail", reason="file_missing") == 3
        # Not read, so not shown: never a 0 that would claim there are no empty files.
        assert "immich_thumbnail_bytes{" not in text
        assert "immich_thumbnail_orphaned_bytes " not in text
        assert 'reason="file_empty"' not in text


async def test_first_session_does_not_idle_through_a_long_file_check(immich_factory: Any, monkeypatch: Any) -> None:
    """The counting session's transaction ends once the second session holds the snapshot: it does not
    sit idle in a transaction for the whole file check, where ``idle_in_transaction_session_timeout``
    (twice ``statement_timeout``: 2 s here) would end it and fail the scan."""
    from immich_thumbnail_exporter.scan import run as scanner

    imm: Immich = await immich_factory("v1.136+")
    baseline, baseline_problems = await _scan_summary(imm)
    real = scanner.reconcile

    async def slow_reconcile(conn: Any, *args: Any, **kwargs: Any) -> None:
        for _ in range(7):  # 3.5 s of a file check that keeps its own session busy
            await conn.fetchval("SELECT 1")
            await asyncio.sleep(0.5)
        await real(conn, *args, **kwargs)

    monkeypatch.setattr(scanner, "reconcile", slow_reconcile)
    slow, slow_problems = await _scan_summary(imm, **{"database.statement_timeout": "1s", "database.pool_size": 2})
    assert _comparable(slow) == _comparable(baseline)
    assert slow_problems == baseline_problems
