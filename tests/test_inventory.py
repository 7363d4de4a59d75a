"""Exact counts for every schema era, through ``scan --format json`` and through ``/metrics``.

Each era gets a database built twice over: from the hand-written DDL the demo ships
(``demo/schemas/*.sql``) and from Immich's real schema of each recorded release, fresh and upgraded
(``../shared/immich-schema/``, see ``tests/immich_schema.py``), with a media folder and known problems
injected by ``demo/seed.py``. Immich v3's own integrity report, and its "Missing" rule for edited
assets, are checked on the real v3.1.0 schema.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import asyncpg
import pytest

from immich_thumbnail_exporter.demo.seed import Plan
from immich_thumbnail_exporter.vocabulary import KINDS, REASONS
from tests.conftest import BUILD_IDS, Immich, wait_for
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


@pytest.mark.parametrize("build", BUILD_IDS)
async def test_scan_json_exact_counts(immich_factory: Any, build: str) -> None:
    imm: Immich = await immich_factory(build)
    exp = imm.expected
    res = run_cli("scan", "--format", "json", "--media.root", imm.media, env=imm.env())
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    doc = json.loads(res.stdout)
    s = doc["summary"]
    assert s["schema"] == imm.era
    assert s["immich_version"] == exp.version
    assert s["media_location"] == exp.location
    assert s["assets"] == DEFAULT_COUNTS["assets"] == exp.assets
    for kind in KINDS:
        for reason in REASONS:
            want = 0 if reason == "file_corrupt" else exp.missing[(kind, reason)]  # headers not verified
            if kind == "fullsize" and reason == "no_record":
                # Judged only where assets can be edited (Immich's rule: an edited asset's fullsize).
                assert s["missing"]["fullsize"].get("no_record") == (0 if imm.era == "v2.5+" else None)
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


@pytest.mark.parametrize("build", BUILD_IDS)
async def test_metrics_exact_counts(immich_factory: Any, build: str) -> None:
    imm: Immich = await immich_factory(build)
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
                    assert got == (0 if imm.era == "v2.5+" else None)
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
        assert value(m, "immich_server_info", version=exp.version, schema=imm.era) == 1
        # Immich v3's own report is there where its table is (real v3 schemas), empty, and nowhere else.
        has_report = bool(imm.build.real and imm.era == "v2.5+")
        assert (value(m, "immich_integrity_report_entries", type="missing_file", kind="preview") == 0) is has_report
        assert "immich_integrity_report_newest_timestamp_seconds" not in text

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
    from immich_thumbnail_exporter.findings import ProblemStore
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


# -- Immich's "Missing" rule for edited assets (v2.5+) ------------------------------------------------


@pytest.mark.parametrize("build", ["v2.5+", "v3.1.0", "v2.4.1"])
async def test_edited_asset_without_edited_fullsize_is_missing_one(immich_factory: Any, build: str) -> None:
    """Immich's "Missing" rule (``streamForThumbnailJob``, v2.5 to v3) counts an edited asset without an
    edited fullsize row as missing one; before edits existed (v2.4.1) nothing is edited and the planted
    edits are not made."""
    imm: Immich = await immich_factory(build, Plan(edited_assets=3, edited_fullsize_no_record=1))
    edits = imm.era == "v2.5+"
    res = await asyncio.to_thread(run_cli, "scan", "--format", "json", "--media.root", imm.media, env=imm.env())
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    s = doc["summary"]
    assert s["missing"]["fullsize"].get("no_record") == (1 if edits else None)
    assert imm.expected.missing[("fullsize", "no_record")] == (1 if edits else 0)
    # The edited renditions are files like any other: two edited assets keep all three on disk.
    assert s["files"] == {k: DEFAULT_COUNTS["files"][k] + (3 if edits and k != "fullsize" else 0)
                          + (2 if edits and k == "fullsize" else 0) for k in KINDS}
    rows = [p for p in doc["problems"] if p["kind"] == "fullsize" and p["reason"] == "no_record"]
    assert len(rows) == (1 if edits else 0)
    if edits:
        assert rows[0]["asset_id"] in imm.expected.problem_asset_ids and rows[0]["path"] is None
        conn = await asyncpg.connect(imm.dsn)
        try:
            assert await conn.fetchval('SELECT "isEdited" FROM asset WHERE id = $1', rows[0]["asset_id"])
        finally:
            await conn.close()
    assert len(doc["problems"]) == s["problems"] == 15 + (1 if edits else 0)


# -- Immich v3's own integrity report ---------------------------------------------------------------


async def _plant_integrity_report(imm: Immich) -> dict[tuple[str, str], int]:
    """Rows as Immich v3.1.0's integrity checks write them; returns the counts they make by (type, kind)."""
    conn = await asyncpg.connect(imm.dsn)
    try:
        files = await conn.fetch(
            "SELECT f.id, f.type, f.path, f.\"assetId\" FROM asset_file f ORDER BY f.path LIMIT 40")
        assets = await conn.fetch('SELECT id, "originalPath" FROM asset ORDER BY id LIMIT 10')
        by_kind: dict[str, list[Any]] = {}
        for row in files:
            by_kind.setdefault(row["type"], []).append(row)
        rows: list[tuple[str, str, Any, Any, str]] = []
        # Missing generated files name their asset_file row; missing originals and checksum failures
        # name the asset; untracked files name nothing.
        for kind, n in (("thumbnail", 3), ("preview", 2), ("fullsize", 1)):
            rows += [("missing_file", r["path"], None, r["id"], "2026-07-28 03:00:00+00")
                     for r in by_kind[kind][:n]]
        rows += [("missing_file", a["originalPath"], a["id"], None, "2026-07-28 03:00:05+00") for a in assets[:2]]
        rows += [("checksum_mismatch", a["originalPath"], a["id"], None, "2026-07-29 04:10:00+00")
                 for a in assets[2:5]]
        rows += [("untracked_file", f"/data/thumbs/orphan-{i}.webp", None, None, "2026-07-28 02:59:00+00")
                 for i in range(4)]
        rows += [("untracked_file", "/data/upload/orphan.jpg", None, None, "2026-07-28 02:58:00+00")]
        await conn.executemany(
            'INSERT INTO integrity_report (type, path, "assetId", "fileAssetId", "createdAt") '
            "VALUES ($1, $2, $3, $4, $5::text::timestamptz)",
            rows,
        )
    finally:
        await conn.close()
    return {("missing_file", "thumbnail"): 3, ("missing_file", "preview"): 2, ("missing_file", "fullsize"): 1,
            ("missing_file", "original"): 2, ("checksum_mismatch", "original"): 3, ("untracked_file", "unknown"): 5}


NEWEST = 1785298200.0  # 2026-07-29 04:10:00 UTC, the newest row planted


@pytest.mark.parametrize("build", ["v3.1.0", "v1.135.3-to-v3.1.0"])
async def test_integrity_report_exact_counts(immich_factory: Any, build: str) -> None:
    """On Immich's real v3.1.0 schema, fresh and upgraded: every planted entry counted by type and kind,
    and the newest entry's time, following the table as Immich clears entries."""
    imm: Immich = await immich_factory(build)
    want = await _plant_integrity_report(imm)
    overrides = {"media.root": imm.media, "intervals.inventory": "1s"}
    async with running_exporter(overrides, env=imm.env()) as (exporter, url):
        await wait_for(lambda: exporter.store.ready, timeout=30)
        _, text, _ = await fetch(f"{url}/metrics")
        m = samples(text)
        got = {dict(k[1])["type"] + "/" + dict(k[1])["kind"]: v for k, v in m.items()
               if k[0] == "immich_integrity_report_entries"}
        assert got == {
            **{f"{t}/{k}": 0.0 for t, k in [("missing_file", "original"), ("missing_file", "thumbnail"),
                                            ("missing_file", "preview"), ("missing_file", "fullsize"),
                                            ("untracked_file", "unknown"), ("checksum_mismatch", "original")]},
            **{f"{t}/{k}": float(n) for (t, k), n in want.items()},
        }
        assert value(m, "immich_integrity_report_newest_timestamp_seconds") == NEWEST
        assert value(m, "immich_assets", asset_type="image") == imm.expected.assets["image"]
        # Immich clears an entry once its check finds the file again: the next round shows it.
        conn = await asyncpg.connect(imm.dsn)
        try:
            await conn.execute("DELETE FROM integrity_report WHERE type = 'checksum_mismatch'")
        finally:
            await conn.close()

        async def cleared() -> bool:
            m2 = samples((await fetch(f"{url}/metrics"))[1])
            return value(m2, "immich_integrity_report_entries", type="checksum_mismatch", kind="original") == 0

        await wait_for(cleared, timeout=15)
        _, text, _ = await fetch(f"{url}/metrics")
        assert value(samples(text), "immich_integrity_report_newest_timestamp_seconds") == 1785207605.0


async def test_integrity_report_absent_without_its_table(immich_factory: Any, caplog: Any) -> None:
    """Immich before v3 (the real v2.4.1 schema) has no integrity_report: no series, no warning."""
    imm: Immich = await immich_factory("v2.4.1")
    caplog.set_level("WARNING")
    async with running_exporter({"media.root": imm.media}, env=imm.env()) as (exporter, url):
        await wait_for(lambda: exporter.store.ready, timeout=30)
        _, text, _ = await fetch(f"{url}/metrics")
        assert value(samples(text), "immich_exporter_collection_success", collection="inventory") == 1
        assert not [line for line in text.splitlines() if line.startswith("immich_integrity_report")]
    assert not [r for r in caplog.records if "integrity" in r.getMessage()]


async def test_server_version_with_a_prerelease(immich_factory: Any) -> None:
    """Immich writes ``serverVersion.toString()`` into version_history, "3.1.0-rc.1" for a release
    candidate: ``immich_server_info{version}`` shows it as Immich's web UI does, "v3.1.0-rc.1"."""
    imm: Immich = await immich_factory("v3.1.0")
    conn = await asyncpg.connect(imm.dsn)
    try:
        await conn.execute("INSERT INTO version_history (version) VALUES ('3.2.0-rc.1')")
    finally:
        await conn.close()
    async with running_exporter({"media.root": imm.media}, env=imm.env()) as (exporter, url):
        await wait_for(lambda: exporter.store.ready, timeout=30)
        _, text, _ = await fetch(f"{url}/metrics")
        assert value(samples(text), "immich_server_info", version="v3.2.0-rc.1", schema="v2.5+") == 1


async def test_integrity_series_go_with_postgres_and_come_back() -> None:
    """PostgreSQL down: the report's series are dropped like every other it feeds, then return."""
    from tests.conftest import make_immich
    from tests.faultkit import dedicated_postgres, until

    pg = dedicated_postgres()
    try:
        imm = await make_immich(pg, "v3.1.0")
        await _plant_integrity_report(imm)
        overrides = {"media.root": imm.media, "intervals.inventory": "1s", "intervals.files": "1h"}
        async with running_exporter(overrides, env=imm.env()) as (_, url):
            async def entries() -> float | None:
                m = samples((await fetch(f"{url}/metrics"))[1])
                return value(m, "immich_integrity_report_entries", type="missing_file", kind="thumbnail")

            await until(lambda: entries(), 30)
            assert await entries() == 3
            pg.stop()

            async def gone() -> bool:
                _, text, _ = await fetch(f"{url}/metrics")
                m = samples(text)
                return (value(m, "immich_exporter_source_up", source="postgres") == 0
                        and not [ln for ln in text.splitlines() if ln.startswith("immich_integrity_report")])

            await until(gone, 30)
            pg.start()
            await until(lambda: entries(), 60)
            assert await entries() == 3
    finally:
        pg.cleanup()


async def test_integrity_report_appears_when_immich_is_upgraded_under_a_running_exporter(
    immich_factory: Any,
) -> None:
    """A v2.4.1 library upgraded to v3.1.0 by Immich's own migrations while the exporter runs: the
    report's series appear with the table, without a restart."""
    from tests.immich_schema import in_database, migrations, release_sql, upgrade

    imm: Immich = await immich_factory("v2.4.1")
    overrides = {"media.root": imm.media, "intervals.inventory": "1s", "intervals.files": "1h"}
    async with running_exporter(overrides, env=imm.env()) as (_, url):
        async def entries() -> float | None:
            m = samples((await fetch(f"{url}/metrics"))[1])
            if value(m, "immich_exporter_collection_success", collection="inventory") != 1:
                return None
            return value(m, "immich_integrity_report_entries", type="untracked_file", kind="unknown")

        await wait_for(lambda: exporter_ready(url), timeout=30)
        assert await entries() is None
        sql, _ = upgrade(migrations(release_sql("v2.4.1")), "v3.1.0")
        conn = await asyncpg.connect(imm.dsn)
        try:
            await conn.execute(in_database(sql, imm.database))
            await conn.execute("INSERT INTO integrity_report (type, path) VALUES ('untracked_file', '/data/x')")
        finally:
            await conn.close()
        await wait_for(lambda: entries(), timeout=20)
        assert await entries() == 1


async def exporter_ready(url: str) -> bool:
    status, _, _ = await fetch(f"{url}/readyz")
    return status == 200
