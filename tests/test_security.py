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
import base64
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import bcrypt
import pytest
import redis
import yarl
from aiohttp import web

from immich_thumbnail_exporter.demo.embedded import EmbeddedPostgres, EmbeddedValkey, free_port
from immich_thumbnail_exporter.demo.simulation.api import ApiKey, SimulatedApi
from immich_thumbnail_exporter.sources.postgres import APPLICATION_NAME
from tests.conftest import BUILD_IDS, Immich, make_immich
from tests.faultkit import dedicated_postgres, until
from tests.helpers import Calls, fetch, rounds, run_cli, running_exporter, samples, value

# The tables each era's exporter reads (besides the catalogue, which every role can read). Kept in step
# with README.md, "Least privilege".
READ_TABLES = {
    "v1.113+": ("assets", "asset_files", "asset_job_status", "person", "version_history", "system_metadata"),
    "v1.133+": ("assets", "asset_files", "asset_job_status", "person", "version_history", "system_metadata"),
    "v1.136+": ("asset", "asset_file", "asset_job_status", "person", "version_history", "system_metadata"),
    "v2.5+": ("asset", "asset_file", "asset_job_status", "person", "version_history", "system_metadata"),
}
# Immich v3.0 and later: its own integrity report, granted where the table exists.
INTEGRITY_TABLE = "integrity_report"

# The README's Redis ACL line, verbatim apart from the password.
REDIS_ACL = (
    "on >{password} %R~immich_bull:* resetchannels -@all +@read +ping +hello +auth +select +client|setname "
    "+client|setinfo +client|list +info +multi +exec"
)


def test_readme_grants_are_the_tested_ones() -> None:
    """The README's least-privilege GRANTs name exactly the tables these tests grant, era by era."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("### PostgreSQL", 1)[1].split("###", 1)[0]
    grants = [
        tuple(t.strip() for t in m.split(","))
        for m in re.findall(r"GRANT SELECT ON ([a-z_, \n]+?)\s+TO immich_exporter;", section)
    ]
    assert sorted(grants) == sorted({*READ_TABLES.values(), (INTEGRITY_TABLE,)})


@pytest.fixture(scope="module")
def sec_pg() -> Iterator[EmbeddedPostgres]:
    """Our own PostgreSQL, with password authentication for every role but ``postgres``."""
    pg = dedicated_postgres(password_auth=True)
    try:
        yield pg
    finally:
        pg.cleanup()


def grant_read_only(pg: EmbeddedPostgres, database: str, role: str, password: str, era: str) -> str:
    """Create a login role with SELECT on the era's tables (and Immich v3's integrity report where the
    database has it) and nothing else; return its DSN."""
    has_report = pg.psql(database, f"SELECT to_regclass('{INTEGRITY_TABLE}') IS NOT NULL").strip() == "t"
    tables = ", ".join(f'"{t}"' for t in (*READ_TABLES[era], *([INTEGRITY_TABLE] if has_report else [])))
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


async def reads_counted(
    pg: EmbeddedPostgres, database: str, role: str, before: dict[str, tuple[int, int]], table: str | None = None
) -> dict[str, tuple[int, int]]:
    """The table statistics once the role's sessions are gone and their reads (of ``table``, or of any
    table) show: a backend hands its counts over as it exits, reads and writes together, so once the
    reads are counted a write would be too."""
    await until(lambda: no_sessions_of(pg, database, role), 10)
    after: dict[str, tuple[int, int]] = {}

    def scans(stats: dict[str, tuple[int, int]]) -> int:
        return sum(sc for t, (_, sc) in stats.items() if table is None or t == table)

    async def counted() -> bool:
        nonlocal after
        after = await table_writes(pg, database)
        return scans(after) > scans(before)

    await until(counted, 10, 0.1)
    return after


async def no_sessions_of(pg: EmbeddedPostgres, database: str, role: str) -> bool:
    conn = await asyncpg.connect(pg.dsn_for(database), timeout=10)
    try:
        n = await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE usename = $1", role)
        return int(n) == 0
    finally:
        await conn.close()


# -- PostgreSQL: least privilege, read-only by construction -------------------------------------------


@pytest.mark.parametrize("build", BUILD_IDS)
@pytest.mark.asyncio
async def test_scan_as_a_select_only_role(sec_pg: EmbeddedPostgres, build: str) -> None:
    imm = await make_immich(sec_pg, build)
    era = imm.era
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
        # Control: the statistics did see the scan's reads (waited for); then no write is among them.
        after = await reads_counted(sec_pg, imm.database, role, before)
        assert {t: w for t, (w, _) in after.items()} == {t: w for t, (w, _) in before.items()}
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
        # Control: our reads of the asset table were counted (waited for); then no write is among them.
        after = await reads_counted(sec_pg, imm.database, role, before, "asset")
        assert {t: w for t, (w, _) in after.items()} == {t: w for t, (w, _) in before.items()}, (before, after)
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
            # A probe round after the collections failed: it must not call PostgreSQL down.
            async with Calls(ex.runner, "probe") as probes:
                await probes.wait(1)
            inventory = ex.store.result("inventory")
            assert inventory is not None and not inventory.success
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


@pytest.mark.asyncio
async def test_missing_integrity_report_grant_is_one_line_and_the_rest_is_published(
    sec_pg: EmbeddedPostgres, caplog: pytest.LogCaptureFixture
) -> None:
    """Immich v3.1.0 with the README's grants but not the one on integrity_report: one warning for
    any number of rounds, every other inventory series published, PostgreSQL up; the report's series
    appear once the grant is given, and a grant taken away again warns again, once."""
    imm = await make_immich(sec_pg, "v3.1.0")
    try:
        role = f"ro_{uuid.uuid4().hex[:8]}"
        dsn = grant_read_only(sec_pg, imm.database, role, "ro-pw", imm.era)
        sec_pg.psql(imm.database, f'REVOKE SELECT ON {INTEGRITY_TABLE} FROM "{role}";')
        caplog.set_level(logging.INFO)
        flags = {"media.root": imm.media, "intervals.inventory": "1s", "intervals.files": "1h"}

        def warnings() -> list[str]:
            return [r.getMessage() for r in caplog.records
                    if r.levelno == logging.WARNING and INTEGRITY_TABLE in r.getMessage()]

        async with running_exporter(flags, env={"DB_URL": dsn}) as (ex, url):
            async def rounds(n: int) -> None:
                seen: set[float] = set()

                def more() -> bool:
                    result = ex.store.result("inventory")
                    if result is not None:
                        seen.add(result.finished_at)
                    return len(seen) > n

                await until(more, 30)

            await rounds(3)
            _, text, _ = await fetch(url + "/metrics")
            s = samples(text)
            assert value(s, "immich_exporter_collection_success", collection="inventory") == 1
            assert value(s, "immich_exporter_source_up", source="postgres") == 1
            assert value(s, "immich_assets", asset_type="image") == imm.expected.assets["image"]
            assert value(s, "immich_server_info", version="v3.1.0", schema="v2.5+") == 1
            assert not [ln for ln in text.splitlines() if ln.startswith("immich_integrity_report")]
            assert len(warnings()) == 1, warnings()
            assert "permission denied for table integrity_report" in warnings()[0]
            assert "GRANT SELECT ON integrity_report" in warnings()[0]

            sec_pg.psql(imm.database, f'GRANT SELECT ON {INTEGRITY_TABLE} TO "{role}";')

            async def shown() -> bool:
                m = samples((await fetch(url + "/metrics"))[1])
                return value(m, "immich_integrity_report_entries", type="missing_file", kind="preview") == 0

            await until(shown, 30)
            sec_pg.psql(imm.database, f'REVOKE SELECT ON {INTEGRITY_TABLE} FROM "{role}";')
            await until(lambda: len(warnings()) == 2, 30)
            await rounds(2)
            assert len(warnings()) == 2
        assert not [r for r in caplog.records if r.exc_info]
    finally:
        shutil.rmtree(imm.media, ignore_errors=True)


# -- Redis: an ACL user with read commands only -------------------------------------------------------


@pytest.fixture(scope="module")
def sec_valkey() -> Iterator[EmbeddedValkey]:
    server = EmbeddedValkey()
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


async def _add_jobs(url: str, n: int) -> None:
    from bullmq import Queue

    queue = Queue("thumbnailGeneration", {"connection": url, "prefix": "immich_bull"})
    try:
        for _ in range(n):
            await queue.add("AssetGenerateThumbnails", {"id": str(uuid.uuid4())}, {"removeOnComplete": True})
    finally:
        await queue.close()


def _write_commands(admin: redis.Redis) -> set[str]:
    admin.set_response_callback("COMMAND", lambda response, **_: response)  # the raw list of names
    return {str(c).lower() for c in admin.execute_command("COMMAND", "LIST", "FILTERBY", "ACLCAT", "write")}


@pytest.mark.asyncio
async def test_least_privilege_serve_postgres_role_and_redis_acl_user(
    sec_pg: EmbeddedPostgres, sec_valkey: EmbeddedValkey
) -> None:
    """The whole exporter with a SELECT-only role and a read-only Redis ACL user: every series, no write."""
    imm = await make_immich(sec_pg, "v1.136+")
    admin = redis.Redis.from_url(sec_valkey.url, decode_responses=True)
    try:
        admin.flushall()
        admin.execute_command("ACL", "LOG", "RESET")
        admin.execute_command("ACL", "SETUSER", "exporter", *REDIS_ACL.format(password="acl-pw").split())
        dsn = grant_read_only(sec_pg, imm.database, f"ro_{uuid.uuid4().hex[:8]}", "ro-pw", "v1.136+")
        await _add_jobs(sec_valkey.url, 3)
        admin.config_resetstat()
        env = {"DB_URL": dsn, "REDIS_URL": f"redis://exporter:acl-pw@127.0.0.1:{sec_valkey.port}/0"}
        flags = {"media.root": imm.media, "intervals.queues": "1s"}
        async with running_exporter(flags, env=env) as (ex, url):
            async def scrape() -> dict[Any, float]:
                return samples((await fetch(url + "/metrics"))[1])

            async def waiting_is(n: int) -> bool:
                s = await scrape()
                return value(s, "immich_queue_jobs", queue="thumbnailGeneration", state="waiting") == n

            await until(lambda: waiting_is(3), 20)
            await rounds(ex.store, "queues", 3)  # a few more rounds, each of which could have written
            s = await scrape()
            assert value(s, "immich_exporter_source_up", source="redis") == 1
            assert value(s, "immich_queue_workers", queue="thumbnailGeneration") == 0  # CLIENT LIST allowed
            assert value(s, "immich_queue_orphaned_jobs", queue="thumbnailGeneration") == 3  # via PostgreSQL
            stats = admin.info("commandstats")
            # Only the exporter talked to the server since the statistics were reset (and this INFO).
            used = {name.removeprefix("cmdstat_") for name in stats}
            writes = _write_commands(admin)
            assert not {c for c in used if c in writes or c.split("|")[0] in writes}, used
            assert not any(int(v.get("rejected_calls", 0)) for v in stats.values()), stats

            await _add_jobs(sec_valkey.url, 2)  # events the exporter must read with XRANGE
            await until(lambda: waiting_is(5), 20)
            await until(lambda: _accepted(scrape(), 2), 20)
        assert admin.acl_log() == [], admin.acl_log()
        # The user really cannot write.
        as_exporter = redis.Redis(host="127.0.0.1", port=sec_valkey.port, username="exporter", password="acl-pw")
        with pytest.raises(redis.exceptions.NoPermissionError):
            as_exporter.set("immich_bull:x", "1")
        as_exporter.close()
    finally:
        admin.execute_command("ACL", "DELUSER", "exporter")
        admin.close()
        shutil.rmtree(imm.media, ignore_errors=True)


async def _accepted(pending: Any, n: int) -> bool:
    s = await pending
    return sum(v for (name, labels), v in s.items()
               if name == "immich_jobs_accepted_total" and ("queue", "thumbnailGeneration") in labels) == n


# -- --web.config.file on the real Exporter: TLS 1.2+ and bcrypt basic auth ---------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", "server.key", "-out", "server.crt", "-days", "2", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        cwd=d, check=True, capture_output=True,
    )
    return d


def client_tls(cafile: Path, maximum: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(cafile))
    if maximum is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.1: that is the point
            ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
            ctx.maximum_version = maximum
        with contextlib.suppress(ssl.SSLError):
            ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    return ctx


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


async def _get(url: str, ctx: ssl.SSLContext | bool, auth: dict[str, str] | None = None,
               method: str = "GET") -> tuple[int, str, dict[str, str]]:
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as session, session.request(
        method, yarl.URL(url, encoded=True), ssl=ctx, headers=auth or {}
    ) as resp:
        return resp.status, await resp.text(), dict(resp.headers)


@pytest.mark.asyncio
async def test_tls_and_basic_auth_on_the_exporter(immich_factory: Any, tls_files: Path) -> None:
    imm = await immich_factory("v1.136+")
    web_yml = tls_files / "web.yml"
    hashed = bcrypt.hashpw(b"correct horse", bcrypt.gensalt(10)).decode()
    web_yml.write_text(
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n  min_version: TLS12\n"
        f"basic_auth_users:\n  prometheus: '{hashed}'\n"
    )
    ctx = client_tls(tls_files / "server.crt")
    good = basic("prometheus", "correct horse")
    async with running_exporter({"media.root": imm.media}, env=imm.env(), web_config_file=str(web_yml)) as (ex, url):
        assert url.startswith("https://")
        await until(lambda: ex.store.ready and ex.store.result("files") is not None, 30)
        # /healthz is open: probes need no password.
        assert (await _get(f"{url}/healthz", ctx))[0] == 200
        for path in ("/metrics", "/problems", "/", "/readyz"):
            status, _, headers = await _get(url + path, ctx)
            assert status == 401 and headers.get("WWW-Authenticate", "").startswith("Basic"), (path, status)
            for wrong in (basic("prometheus", "wrong"), basic("nobody", "correct horse"),
                          basic("prometheus", ""), {"Authorization": "Basic !!!"}, {"Authorization": "Bearer x"}):
                assert (await _get(url + path, ctx, wrong))[0] == 401, (path, wrong)
            status, body, _ = await _get(url + path, ctx, good)
            assert status == 200, (path, status, body[:200])
        assert (await _get(f"{url}/metrics", ctx, method="HEAD"))[0] == 401
        status, body, _ = await _get(f"{url}/metrics", ctx, good)
        assert "immich_assets" in body
        # No path trick reaches a protected page through the open one.
        for trick in ("/healthz/../metrics", "/healthz/%2e%2e/metrics", "/healthz%2F..%2Fmetrics", "//metrics",
                      "/metrics/", "/./metrics", "/healthz/../problems", "/%6detrics"):
            status, body, _ = await _get(url + trick, ctx)
            assert status in (401, 404), (trick, status)
            assert "immich_" not in body and "asset_id" not in body, trick
        # TLS 1.2 and 1.3 are accepted; TLS 1.1 is refused; plain HTTP gets nothing.
        assert (await _get(f"{url}/healthz", client_tls(tls_files / "server.crt", ssl.TLSVersion.TLSv1_2)))[0] == 200
        with pytest.raises((aiohttp.ClientError, ssl.SSLError, OSError)):
            await _get(f"{url}/healthz", client_tls(tls_files / "server.crt", ssl.TLSVersion.TLSv1_1))
        plain = url.replace("https://", "http://")
        try:
            status, body, _ = await _get(f"{plain}/metrics", False)
        except (aiohttp.ClientError, OSError):
            pass
        else:
            assert status != 200 and "immich_" not in body
        # And an unverified client cannot be fooled into thinking it reached something else: the
        # certificate is the one configured.
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await _get(f"{url}/healthz", ssl.create_default_context())


# -- secrets: never shown; rotated without a restart ---------------------------------------------------

PG_SECRET, REDIS_SECRET, API_SECRET = "pg-S3cret-1a", "redis-S3cret-2b", "api-S3cret-3c"
WRONG = ("pg-Wr0ng-4d", "redis-Wr0ng-5e", "api-Wr0ng-6f")


async def keyed_immich(redis_url: str, key: str) -> tuple[SimulatedApi, set[str]]:
    """The simulated Immich (v2.4) with one admin key, started; and the set of every key it was sent.

    The keys are recorded by wrapping the fake's request dispatcher before it starts serving: a test's
    look at what arrived, not a second fake."""
    fake = SimulatedApi(None, redis_url, {key: ApiKey(None, ("all",), admin=True)}, release="v2.4")
    seen: set[str] = set()
    dispatch = fake._dispatch

    async def recording(request: web.Request) -> web.StreamResponse:
        seen.add(request.headers.get("x-api-key", ""))
        return await dispatch(request)

    setattr(fake, "_dispatch", recording)  # noqa: B010 - start() routes every request through it
    await fake.start()
    return fake, seen


async def _cli(*args: str, env: dict[str, str]) -> tuple[int, str]:
    """Run the CLI without blocking the loop (the fake Immich answers from it); stdout + stderr."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DB_", "REDIS_", "IMMICH_"))}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "immich_thumbnail_exporter", *args, env={**base, **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    return int(proc.returncode or 0), out.decode(errors="replace")


async def _serve_and_read(env: dict[str, str], imm: Immich, tmp_path: Path, want_up: bool) -> str:
    """``serve --log.level debug`` in a child process; everything it printed and served."""
    port = free_port()
    cfg = tmp_path / "config.yml"
    cfg.write_text("intervals: {queues: 1s, inventory: 2s, files: 2s}\n")
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DB_", "REDIS_", "IMMICH_"))}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "immich_thumbnail_exporter", "serve", "--config.file", str(cfg), "--log.level", "debug",
        "--media.root", imm.media, "--web.listen-address", f"127.0.0.1:{port}",
        env={**base, **env}, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    served: list[str] = []
    lines: list[str] = []

    async def read() -> None:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            lines.append(raw.decode(errors="replace"))

    def queue_rounds() -> int:
        # Every round of a collection logs one line (at debug when it succeeds): the child's round counter.
        return sum("collection queues " in line for line in lines)

    reader = asyncio.create_task(read())
    try:
        async def state() -> bool:
            try:
                s = samples((await fetch(url + "/metrics"))[1])
            except (aiohttp.ClientError, OSError):
                return False
            ups = [value(s, "immich_exporter_source_up", source=src) for src in ("postgres", "redis", "immich_api")]
            return all(u == (1 if want_up else 0) for u in ups) and value(
                s, "immich_exporter_collection_success", collection="files") is not None

        await until(state, 40, 0.3)
        done = queue_rounds()
        await until(lambda: queue_rounds() >= done + 3, 30)  # more rounds: retries, debug lines
        for path in ("/", "/metrics", "/problems", "/readyz", "/healthz", "/problems?kind=bogus"):
            status, body, headers = await fetch(url + path)
            served.append(f"{path} {status} {headers} {body}")
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 30)
        await asyncio.wait_for(reader, 10)
    return "".join(lines) + "\n".join(served)


@pytest.mark.asyncio
async def test_secrets_never_shown(sec_pg: EmbeddedPostgres, tmp_path: Path) -> None:
    imm = await make_immich(sec_pg, "v1.136+")
    valkey = EmbeddedValkey(password=REDIS_SECRET)
    valkey.start()
    immich, seen = await keyed_immich(valkey.url, API_SECRET)
    role = f"sec_{uuid.uuid4().hex[:8]}"
    grant_read_only(sec_pg, imm.database, role, PG_SECRET, "v1.136+")
    try:
        def env(pg_pw: str, redis_pw: str, api_key: str) -> dict[str, str]:
            return {
                "DB_URL": sec_pg.dsn_for(imm.database, role, pg_pw),
                "REDIS_HOSTNAME": "127.0.0.1", "REDIS_PORT": str(valkey.port), "REDIS_PASSWORD": redis_pw,
                "IMMICH_URL": immich.url, "IMMICH_API_KEY": api_key,
            }

        good, bad = env(PG_SECRET, REDIS_SECRET, API_SECRET), env(*WRONG)
        outputs = {
            "serve": await _serve_and_read(good, imm, tmp_path, want_up=True),
            "serve, wrong secrets": await _serve_and_read(bad, imm, tmp_path, want_up=False),
        }
        for name, e in (("good", good), ("wrong", bad)):
            code, out = await _cli("check-config", "--log.level", "debug", "--media.root", imm.media, env=e)
            assert code == (0 if name == "good" else 2), out
            outputs[f"check-config ({name})"] = out
            code, out = await _cli("scan", "--log.level", "debug", "--no-progress", "--media.root", imm.media, env=e)
            outputs[f"scan ({name})"] = out
        (tmp_path / "outputs.txt").write_text("\n\n".join(f"== {k}\n{v}" for k, v in outputs.items()))
        # The secrets were really used (and the wrong ones really tried) ...
        assert API_SECRET in seen and WRONG[2] in seen
        assert "password authentication failed" in outputs["serve, wrong secrets"]
        assert "level=debug" in outputs["serve"] and "configuration ok" in outputs["check-config (good)"]
        # ... and never shown anywhere.
        for name, text in outputs.items():
            for secret in (PG_SECRET, REDIS_SECRET, API_SECRET, *WRONG):
                assert secret not in text, f"{secret} shown by {name}"
            assert "Traceback" not in text, (name, text[-3000:])
    finally:
        await immich.stop()
        valkey.cleanup()
        shutil.rmtree(imm.media, ignore_errors=True)


@pytest.mark.parametrize("how", ["password_file", "url_file"])
@pytest.mark.asyncio
async def test_password_rotation_without_restart(sec_pg: EmbeddedPostgres, tmp_path: Path, how: str) -> None:
    """Change the role's password and the file under a running exporter, kill its sessions: it recovers."""
    imm = await make_immich(sec_pg, "v1.136+")
    role = f"rot_{uuid.uuid4().hex[:8]}"
    grant_read_only(sec_pg, imm.database, role, "first-pw", "v1.136+")
    secret = tmp_path / "secret"

    def write(password: str) -> None:
        text = password if how == "password_file" else sec_pg.dsn_for(imm.database, role, password)
        secret.write_text(text + "\n")

    write("first-pw")
    if how == "password_file":
        env = {"DB_HOSTNAME": "127.0.0.1", "DB_PORT": str(sec_pg.port), "DB_USERNAME": role,
               "DB_DATABASE_NAME": imm.database, "DB_PASSWORD_FILE": str(secret)}
    else:
        env = {"DB_URL_FILE": str(secret)}
    flags = {"media.root": imm.media, "intervals.queues": "1s", "intervals.inventory": "2s"}

    def kill_sessions() -> None:
        sec_pg.psql(imm.database, f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}';")

    try:
        async with running_exporter(flags, env=env) as (ex, url):
            def pg_state() -> tuple[bool, str | None]:
                st = ex.store.sources["postgres"]
                return st.up, st.error

            def fresh_inventory(after: float) -> bool:
                r = ex.store.result("inventory")
                return bool(pg_state()[0] and r and r.success and r.finished_at > after)

            await until(lambda: fresh_inventory(0), 20)
            # The password changes on the server; the file still has the old one.
            sec_pg.psql("postgres", f"ALTER ROLE \"{role}\" PASSWORD 'second-pw';")
            kill_sessions()
            await until(lambda: not pg_state()[0], 15)
            await until(lambda: "password authentication failed" in (pg_state()[1] or ""), 15)
            _, page, _ = await fetch(url + "/")
            assert "password authentication failed" in page and "second-pw" not in page and "first-pw" not in page
            # The operator updates the file: no restart, it reconnects with the new password.
            write("second-pw")
            t0 = time.time()
            took = await until(lambda: fresh_inventory(t0), 2 + 2 + 5)
            _, text, _ = await fetch(url + "/metrics")
            assert value(samples(text), "immich_assets", asset_type="image") == imm.expected.assets["image"]
            # Killed again mid-life: it reconnects by itself with the (current) file.
            t1 = time.time()
            kill_sessions()
            await until(lambda: fresh_inventory(t1), 15)
        print(f"rotation ({how}): recovered {took:.2f}s after the file was updated")
    finally:
        shutil.rmtree(imm.media, ignore_errors=True)


@pytest.mark.asyncio
async def test_orphan_check_without_grant_is_a_failed_round_not_an_outage(
    sec_pg: EmbeddedPostgres, sec_valkey: EmbeddedValkey, caplog: pytest.LogCaptureFixture
) -> None:
    """The queue collection's orphaned-jobs lookup refused (no SELECT on the asset table): the orphan
    series is left out and the round fails with that line, but PostgreSQL is not called down and the
    queue depths are still shown."""
    imm = await make_immich(sec_pg, "v1.136+")
    try:
        role = f"ro_{uuid.uuid4().hex[:8]}"
        dsn = grant_read_only(sec_pg, imm.database, role, "ro-pw", "v1.136+")
        sec_pg.psql(imm.database, f'REVOKE SELECT ON asset FROM "{role}";')
        redis.Redis.from_url(sec_valkey.url).flushall()
        await _add_jobs(sec_valkey.url, 3)
        env = {"DB_URL": dsn, "REDIS_URL": sec_valkey.url}
        async with running_exporter({"intervals.queues": "1s"}, env=env) as (ex, url):
            await until(lambda: ex.store.ready, 20)
            # A few queue rounds and a probe, each of which could have called PostgreSQL down.
            async with Calls(ex.runner, "probe") as probes:
                queues = await rounds(ex.store, "queues", 3)
                await probes.wait(1)
            assert not queues.success and "orphaned-jobs query failed" in (queues.error or ""), queues.error
            _, text, _ = await fetch(url + "/metrics")
            s = samples(text)
            assert value(s, "immich_exporter_source_up", source="postgres") == 1
            assert value(s, "immich_exporter_source_up", source="redis") == 1
            assert value(s, "immich_queue_jobs", queue="thumbnailGeneration", state="waiting") == 3
            assert value(s, "immich_queue_orphaned_jobs", queue="thumbnailGeneration") is None
            assert value(s, "immich_exporter_collection_success", collection="queues") == 0
            _, page, _ = await fetch(url + "/")
            assert "orphaned-jobs query failed" in page and "permission denied" in page
            # The schema is still recognised (from the catalogue, which needs no GRANT): the inventory
            # fails on the table's permission, not as an "unknown schema", and nothing logs a traceback.
            assert "permission denied for table asset" in page and "unknown Immich schema" not in page
        assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records if r.exc_info]
    finally:
        shutil.rmtree(imm.media, ignore_errors=True)
