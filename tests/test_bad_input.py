"""Bad input gets one clear line and exit code 2, never a traceback; the server keeps serving."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from immich_thumbnail_exporter.demo.embedded import EmbeddedPostgres, free_port
from immich_thumbnail_exporter.demo.seed import create_database
from tests.conftest import Immich, wait_for
from tests.helpers import fetch, run_cli, running_exporter, samples, value


def _clean_failure(res: Any, *words: str) -> None:
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    for word in words:
        assert word in res.stderr, (word, res.stderr)


def test_malformed_yaml(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yml"
    cfg.write_text("database:\n  host: [unclosed\n")
    _clean_failure(run_cli("check-config", "--config.file", str(cfg)), "malformed YAML", "line")


def test_unknown_key_is_named(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yml"
    cfg.write_text("database:\n  hots: db\nmedia: {rooot: /data}\n")
    res = run_cli("scan", "--config.file", str(cfg))
    _clean_failure(res, "database.hots: unknown key", "media.rooot: unknown key")


def test_bad_values_listed_together(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yml"
    cfg.write_text("database: {port: abc}\nintervals: {files: soon}\nmedia: {root: relative/dir}\n")
    res = run_cli("check-config", "--config.file", str(cfg))
    _clean_failure(res, "database.port: expected an integer", "intervals.files: expected a duration",
                   "media.root: expected an absolute path")
    assert len([line for line in res.stderr.splitlines() if line.startswith("error:")]) == 3


def test_missing_password_file(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yml"
    cfg.write_text(f"database: {{password_file: {tmp_path}/nope}}\n")
    _clean_failure(run_cli("scan", "--config.file", str(cfg)), "cannot read secret file", "nope")


def test_password_never_printed(tmp_path: Path) -> None:
    port = free_port()
    res = run_cli("check-config", "--log.level", "debug",
                  env={"DB_URL": f"postgresql://immich:s3cr3t-pw@127.0.0.1:{port}/immich"})
    _clean_failure(res, "cannot connect", "immich:***@127.0.0.1")
    assert "s3cr3t-pw" not in res.stdout + res.stderr


def test_unreachable_database(tmp_path: Path) -> None:
    port = free_port()
    res = run_cli("scan", env={"DB_HOSTNAME": "127.0.0.1", "DB_PORT": str(port)})
    _clean_failure(res, "cannot connect to postgres@127.0.0.1", "connection refused")


@pytest.mark.asyncio
async def test_unknown_schema(postgres: EmbeddedPostgres) -> None:
    await create_database(postgres.dsn, "not_immich")
    conn = await asyncpg.connect(postgres.dsn_for("not_immich"))
    await conn.execute("CREATE TABLE invoices (id int); CREATE TABLE customers (id int)")
    await conn.close()
    res = run_cli("scan", env={"DB_URL": postgres.dsn_for("not_immich")})
    _clean_failure(res, "not an Immich database", "found: customers, invoices")
    # Under serve: the inventory round fails with that line, no traceback; PostgreSQL is not down.
    async with running_exporter({}, env={"DB_URL": postgres.dsn_for("not_immich")}) as (exporter, url):
        await wait_for(lambda: exporter.store.ready, timeout=20)
        _, text, _ = await fetch(f"{url}/metrics")
        m = samples(text)
        assert value(m, "immich_exporter_collection_success", collection="inventory") == 0
        assert value(m, "immich_assets", asset_type="image") is None
        _, page, _ = await fetch(f"{url}/")
        assert "not an Immich database" in page and "internal error" not in page


@pytest.mark.asyncio
async def test_pre_asset_files_schema_refused(postgres: EmbeddedPostgres) -> None:
    from importlib import resources

    await create_database(postgres.dsn, "immich_old")
    conn = await asyncpg.connect(postgres.dsn_for("immich_old"))
    ddl = resources.files("immich_thumbnail_exporter.demo.schemas").joinpath("prefiles_v1_106.sql")
    await conn.execute(ddl.read_text())
    await conn.close()
    res = run_cli("check-config", env={"DB_URL": postgres.dsn_for("immich_old")})
    _clean_failure(res, "unsupported Immich schema", "previewPath", "v1.112 or older")


@pytest.mark.asyncio
async def test_media_root_without_thumbs(immich_factory: Any, tmp_path: Path) -> None:
    imm: Immich = await immich_factory("v1.136+")
    res = run_cli("scan", "--media.root", str(tmp_path), env=imm.env())
    _clean_failure(res, "thumbs does not exist", "is media.root the folder")


@pytest.mark.asyncio
async def test_odd_paths_are_counted_not_fatal(immich_factory: Any) -> None:
    """A stored path with '..' escaping the root is refused and counted; a non-UTF-8 file name on disk is
    an orphan; a symlink out of the root is not followed."""
    imm: Immich = await immich_factory("v1.136+")
    res = run_cli("scan", "--format", "json", "--media.root", imm.media, env=imm.env())
    assert res.returncode == 0 and "Traceback" not in res.stderr
    s = json.loads(res.stdout)["summary"]
    assert s["paths_refused"] == 1
    assert "/etc/passwd" in res.stderr and "refusing thumbnail path" in res.stderr
    assert s["orphaned_files"] == 3  # includes b"bad-\xff\xfe-name.webp"
    assert s["missing"]["thumbnail"]["file_unreadable"] == 1
    assert "not following symlink" in res.stderr


@pytest.mark.asyncio
async def test_server_keeps_serving_without_database() -> None:
    port = free_port()
    env = {"DB_HOSTNAME": "127.0.0.1", "DB_PORT": str(port)}
    async with running_exporter({"intervals.inventory": "1s"}, env=env) as (exporter, url):
        await wait_for(lambda: exporter.store.ready, timeout=20)
        status, text, _ = await fetch(f"{url}/metrics")
        assert status == 200
        m = samples(text)
        assert value(m, "immich_exporter_source_up", source="postgres") == 0
        assert value(m, "immich_exporter_collection_success", collection="inventory") == 0
        assert value(m, "immich_assets", asset_type="image") is None
        status, _, _ = await fetch(f"{url}/healthz")
        assert status == 200
        status, _, _ = await fetch(f"{url}/readyz")
        assert status == 200  # ready means "a round finished", whatever its outcome
        status, body, _ = await fetch(f"{url}/")
        assert "down: cannot connect" in body
