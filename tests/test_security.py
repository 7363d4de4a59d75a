"""Security, with real servers: read-only by construction, least privilege, secrets, TLS and basic auth.

* PostgreSQL: a role with nothing but SELECT on the tables the exporter reads (per era, as documented
  in the README's "Least privilege" section) runs ``scan`` and ``serve``; nothing is written (table
  statistics before and after), our sessions are read-only, and writes through our own pool fail.
* Redis: a Valkey ACL user allowed read commands only serves every queue series; the server's command
  statistics show no write command and its ACL log no refused one.
* ``--web.config.file``: TLS (1.2 minimum) and bcrypt basic auth on the real ``Exporter``.
* Secrets never reach logs, errors, ``/`` or ``check-config``; password files are re-read on reconnect,
  so a rotated password works without a restart.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import uuid
from collections.abc import Iterator

import asyncpg
import pytest

from exporter.embedded import EmbeddedPostgres
from exporter.seed import ERAS
from exporter.sources.postgres import APPLICATION_NAME
from tests.conftest import make_immich
from tests.faultkit import dedicated_postgres, until
from tests.helpers import fetch, run_cli, running_exporter, samples, value

# The tables each era's exporter reads (besides the catalogue, which every role can read). Kept in step
# with README.md, "Least privilege".
READ_TABLES = {
    "v1.113+": ("assets", "asset_files", "asset_job_status", "person", "version_history", "system_metadata"),
    "v1.133+": ("assets", "asset_files", "asset_job_status", "person", "version_history", "system_metadata"),
    "v1.136+": ("asset", "asset_file", "asset_job_status", "person", "version_history", "system_metadata"),
    "v2.5+": ("asset", "asset_file", "asset_job_status", "person", "version_history", "system_metadata"),
}

# The README's Redis ACL line, verbatim apart from the password.
REDIS_ACL = "on >{password} ~* resetchannels -@all +@read +@connection +multi +exec +info +client|list"


@pytest.fixture(scope="module")
def sec_pg() -> Iterator[EmbeddedPostgres]:
    """Our own PostgreSQL, with password authentication for every role but ``postgres``."""
    pg = dedicated_postgres(password_auth=True)
    try:
        yield pg
    finally:
        pg.cleanup()


def grant_read_only(pg: EmbeddedPostgres, database: str, role: str, password: str, era: str) -> str:
    """Create a login role with SELECT on the era's tables and nothing else; return its DSN."""
    tables = ", ".join(f'"{t}"' for t in READ_TABLES[era])
    pg.psql(database, f"""
        DROP ROLE IF EXISTS "{role}";
        CREATE ROLE "{role}" LOGIN PASSWORD '{password}';
        GRANT CONNECT ON DATABASE "{database}" TO "{role}";
        GRANT USAGE ON SCHEMA public TO "{role}";
        GRANT SELECT ON {tables} TO "{role}";
    """)
    return pg.dsn_for(database, role, password)


async def table_writes(pg: EmbeddedPostgres, database: str) -> dict[str, tuple[int, int]]:
    """Per table: (rows inserted + updated + deleted ever, scans ever), from pg_stat_user_tables."""
    conn = await asyncpg.connect(pg.dsn_for(database), timeout=10)
    try:
        rows = await conn.fetch(
            "SELECT relname, n_tup_ins + n_tup_upd + n_tup_del + n_tup_hot_upd AS writes, "
            "coalesce(seq_scan, 0) + coalesce(idx_scan, 0) AS scans FROM pg_stat_user_tables"
        )
        return {r["relname"]: (int(r["writes"]), int(r["scans"])) for r in rows}
    finally:
        await conn.close()


async def no_sessions_of(pg: EmbeddedPostgres, database: str, role: str) -> bool:
    conn = await asyncpg.connect(pg.dsn_for(database), timeout=10)
    try:
        n = await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE usename = $1", role)
        return int(n) == 0
    finally:
        await conn.close()


# -- PostgreSQL: least privilege, read-only by construction -------------------------------------------


@pytest.mark.parametrize("era", sorted(ERAS))
@pytest.mark.asyncio
async def test_scan_as_a_select_only_role(sec_pg: EmbeddedPostgres, era: str) -> None:
    imm = await make_immich(sec_pg, era)
    try:
        role = f"ro_{uuid.uuid4().hex[:8]}"
        dsn = grant_read_only(sec_pg, imm.database, role, "ro-pw", era)
        before = await table_writes(sec_pg, imm.database)
        res = run_cli("scan", "--format", "json", "--media.root", imm.media, env={"DB_URL": dsn})
        assert res.returncode == 0, res.stderr
        s = json.loads(res.stdout)["summary"]
        exp = imm.expected
        assert s["schema"] == era and s["assets"] == exp.assets and s["files"] == dict(exp.files)
        assert s["orphaned_files"] == exp.orphaned_files and s["metadata_pending"] == exp.metadata_pending
        await until(lambda: no_sessions_of(sec_pg, imm.database, role), 10)
        await asyncio.sleep(1.2)  # backends flush their statistics on exit; give the collector a moment
        after = await table_writes(sec_pg, imm.database)
        assert {t: w for t, (w, _) in after.items()} == {t: w for t, (w, _) in before.items()}
        # Control: the statistics did see the scan's reads.
        assert sum(sc for _, sc in after.values()) > sum(sc for _, sc in before.values())
    finally:
        shutil.rmtree(imm.media, ignore_errors=True)


@pytest.mark.asyncio
async def test_serve_as_a_select_only_role_writes_nothing(sec_pg: EmbeddedPostgres) -> None:
    era = "v1.136+"
    imm = await make_immich(sec_pg, era)
    role = f"ro_{uuid.uuid4().hex[:8]}"
    dsn = grant_read_only(sec_pg, imm.database, role, "ro-pw", era)
    before = await table_writes(sec_pg, imm.database)
    flags = {"media.root": imm.media, "intervals.inventory": "1s", "intervals.files": "1s", "intervals.queues": "1s"}
    try:
        async with running_exporter(flags, env={"DB_URL": dsn}) as (ex, url):
            async def rounds_done() -> bool:
                inv, files = ex.store.result("inventory"), ex.store.result("files")
                return bool(inv and inv.success and files and files.success
                            and files.finished_at > ex.store.started_at + 2)

            await until(rounds_done, 30)
            _, text, _ = await fetch(url + "/metrics")
            s = samples(text)
            assert value(s, "immich_assets", asset_type="image") == imm.expected.assets["image"]
            assert value(s, "immich_exporter_source_up", source="postgres") == 1

            async with ex.pg.connection() as conn:
                assert await conn.fetchval("SELECT current_user") == role
                assert await conn.fetchval("SHOW default_transaction_read_only") == "on"
                assert await conn.fetchval("SHOW transaction_read_only") == "on"
                assert await conn.fetchval("SHOW application_name") == APPLICATION_NAME
                # A write in one of our sessions fails twice over: the session is read-only...
                with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
                    await conn.execute('DELETE FROM asset_job_status')
                # ... and even a transaction forced read-write has no privilege to write.
                for statement in (
                    'DELETE FROM asset_job_status',
                    """UPDATE asset SET "deletedAt" = now()""",
                    "INSERT INTO system_metadata (key, value) VALUES ('x', '{}')",
                    "CREATE TABLE public.exporter_was_here (id int)",
                ):
                    await conn.execute("BEGIN READ WRITE")
                    try:
                        with pytest.raises(asyncpg.InsufficientPrivilegeError):
                            await conn.execute(statement)
                    finally:
                        await conn.execute("ROLLBACK")
                # A session someone turned read-write is reset when it goes back to the pool.
                await conn.execute("SET default_transaction_read_only = off")
            async with ex.pg.connection() as conn:
                assert await conn.fetchval("SHOW default_transaction_read_only") == "on"
        await until(lambda: no_sessions_of(sec_pg, imm.database, role), 10)
        await asyncio.sleep(1.2)
        after = await table_writes(sec_pg, imm.database)
        assert {t: w for t, (w, _) in after.items()} == {t: w for t, (w, _) in before.items()}, (before, after)
        assert after["asset"][1] > before["asset"][1]  # control: our reads were counted
    finally:
        shutil.rmtree(imm.media, ignore_errors=True)


@pytest.mark.asyncio
async def test_missing_grant_is_one_clear_line(sec_pg: EmbeddedPostgres, caplog: pytest.LogCaptureFixture) -> None:
    """A role without SELECT on a table it needs: a clear 'permission denied', no traceback."""
    imm = await make_immich(sec_pg, "v1.136+")
    try:
        role = f"ro_{uuid.uuid4().hex[:8]}"
        dsn = grant_read_only(sec_pg, imm.database, role, "ro-pw", "v1.136+")
        sec_pg.psql(imm.database, f'REVOKE SELECT ON asset_job_status FROM "{role}";')
        res = run_cli("scan", "--media.root", imm.media, env={"DB_URL": dsn})
        assert res.returncode == 2, (res.stdout, res.stderr)
        assert "Traceback" not in res.stderr
        assert "permission denied" in res.stderr and "asset_job_status" in res.stderr, res.stderr
        assert "ro-pw" not in res.stderr
        # Under serve: the collections fail with that line, PostgreSQL itself is not called down (it
        # answers), nothing stale is shown, and no traceback is logged as if it were a bug.
        caplog.set_level(logging.WARNING)
        flags = {"media.root": imm.media, "intervals.queues": "1s"}
        async with running_exporter(flags, env={"DB_URL": dsn}) as (ex, url):
            await until(lambda: ex.store.ready, 20)
            await asyncio.sleep(1.5)  # a probe round
            _, text, _ = await fetch(url + "/metrics")
            s = samples(text)
            assert value(s, "immich_exporter_source_up", source="postgres") == 1
            assert value(s, "immich_exporter_collection_success", collection="inventory") == 0
            assert value(s, "immich_assets", asset_type="image") is None
            _, page, _ = await fetch(url + "/")
            assert "permission denied for table asset_job_status" in page
        assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records if r.exc_info]
    finally:
        shutil.rmtree(imm.media, ignore_errors=True)
