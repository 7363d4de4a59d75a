"""What the remediation tests share: a seeded Immich, the demo's simulated Immich beside it, and helpers
to configure runs and read their results and the ledger."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest_asyncio

from immich_thumbnail_exporter.config import Config, load_config
from immich_thumbnail_exporter.demo.embedded import EmbeddedValkey
from immich_thumbnail_exporter.demo.seed import ERAS, Plan
from immich_thumbnail_exporter.demo.simulation.api import SimulatedApi
from immich_thumbnail_exporter.demo.simulation.worker import SimulatedWorker
from immich_thumbnail_exporter.findings import ProblemStore
from immich_thumbnail_exporter.remediation.engine import Options
from immich_thumbnail_exporter.remediation.ledger import FILENAME
from immich_thumbnail_exporter.remediation.report import RunReport
from immich_thumbnail_exporter.scan.run import run_scan
from immich_thumbnail_exporter.sources.postgres import PostgresSource
from tests.conftest import Immich

API_KEY = "test-api-key"
# Small enough to be quick, large enough for every injected problem.
PLAN = Plan(assets=60)
# The singular-table era (asset, asset_file, absolute paths under /data), which the fake worker writes to.
ERA = next(label for label, era in ERAS.items() if era.assets == "asset" and not era.relative)


# -- fixtures and helpers --------------------------------------------------------------------------------


@pytest_asyncio.fixture
async def imm(immich_factory: Any) -> Immich:
    result: Immich = await immich_factory(ERA, PLAN)
    return result


@pytest_asyncio.fixture
async def fake(imm: Immich, valkey: EmbeddedValkey) -> AsyncIterator[SimulatedApi]:
    api = SimulatedApi(imm.dsn, valkey.url, {API_KEY: None})
    await api.start()
    try:
        yield api
    finally:
        await api.stop()


@contextlib.asynccontextmanager
async def thumbnail_worker(
    imm: Immich, valkey: EmbeddedValkey, writes: bool = True, flaky: set[str] | None = None
) -> AsyncIterator[SimulatedWorker]:
    worker = SimulatedWorker(imm.dsn, imm.media, valkey.url, delay=0.05, writes=writes, flaky=flaky,
                             concurrency=4)
    await worker.start()
    try:
        yield worker
    finally:
        await worker.stop()


def make_config(imm: Immich, fake: SimulatedApi, state_dir: Path, redis_url: str | None = None,
                **overrides: Any) -> Config:
    values: dict[str, Any] = {
        "database.url": imm.dsn,
        "media.root": imm.media,
        "immich.url": fake.url,
        "immich.api_key": API_KEY,
        "remediation.state_dir": str(state_dir),
    }
    if redis_url:
        values["redis.url"] = redis_url
    values.update(overrides)
    return load_config(None, environ={}, overrides=values)


def options(state_dir: Path, **kw: Any) -> Options:
    base: dict[str, Any] = {"state_dir": str(state_dir), "rate": 50.0, "retry_after": 30.0, "timeout": 30.0}
    base.update(kw)
    return Options(**base)


def _exists(path: str) -> bool:
    return os.path.exists(path)


def _islink(path: str) -> bool:
    return os.path.islink(path)


async def expected_sets(imm: Immich) -> tuple[set[str], set[str], set[str]]:
    """(fixable, original missing, unreadable symlink) problem assets, from the database and the disk alone."""
    problem_ids = set(imm.expected.problem_asset_ids)
    conn = await asyncpg.connect(imm.dsn, timeout=10)
    try:
        assets = await conn.fetch('SELECT id::text, "originalPath" FROM asset WHERE id::text = ANY($1)',
                                  list(problem_ids), timeout=10)
        files = await conn.fetch('SELECT "assetId"::text, path FROM asset_file WHERE "assetId"::text = ANY($1)',
                                 list(problem_ids), timeout=10)
    finally:
        await conn.close()
    no_original = {r[0] for r in assets if not _exists(imm.media + r[1][len("/data"):])}
    symlinked = {r[0] for r in files if _islink(imm.media + r[1][len("/data"):])}
    fixable = problem_ids - no_original - symlinked
    assert len(fixable) >= 10 and len(no_original) == 1 and len(symlinked) == 1
    return fixable, no_original, symlinked


async def owners_of(imm: Immich) -> dict[str, str]:
    conn = await asyncpg.connect(imm.dsn, timeout=10)
    try:
        return {r[0]: r[1] for r in await conn.fetch('SELECT id::text, "ownerId"::text FROM asset', timeout=10)}
    finally:
        await conn.close()


async def problem_assets(imm: Immich) -> set[str]:
    """Asset ids a fresh full scan (headers verified) still calls broken."""
    config = load_config(None, environ={}, overrides={
        "database.url": imm.dsn, "media.root": imm.media, "checks.verify_headers": True})
    pg = PostgresSource(config.database)
    store = ProblemStore()
    try:
        await asyncio.wait_for(run_scan(pg, config, store), 60)
        return {p.asset_id for p in store}
    finally:
        store.close()
        await pg.close()


def results(report: RunReport) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for row in report.rows.values():
        out.setdefault(row.result, set()).add(row.asset_id)
    return out


def ledger_rows(state_dir: Path) -> dict[str, sqlite3.Row]:
    db = sqlite3.connect(state_dir / FILENAME)
    db.row_factory = sqlite3.Row
    try:
        return {r["asset_id"]: r for r in db.execute("SELECT * FROM asset")}
    finally:
        db.close()


async def cli(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DB_", "REDIS_", "IMMICH_"))}
    base.update(env)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "immich_thumbnail_exporter", *args, env=base,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()
