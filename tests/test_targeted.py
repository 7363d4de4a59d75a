"""The targeted check (``scan.targeted.check_assets``) against real PostgreSQL and a seeded media tree.

It is the one file rule applied to given assets, so on every era and real schema it must agree, asset by
asset, with the full scan (headers verified) and the inventory's ``no_record`` rule (edited assets
included): the same (kind, reason) problems, the same original verdict. It reads the
database with one query per batch and never walks the tree (nothing is listed), and every look at the
disk happens off the event loop. (``tests/test_strace.py`` shows it names nothing outside the media root.)
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest

from immich_thumbnail_exporter.config import load_config
from immich_thumbnail_exporter.demo.seed import Plan
from immich_thumbnail_exporter.findings import ProblemStore
from immich_thumbnail_exporter.scan.file_sql import targeted_sql
from immich_thumbnail_exporter.scan.run import run_scan
from immich_thumbnail_exporter.scan.targeted import check_assets, media_mapper
from immich_thumbnail_exporter.sources.postgres import PostgresSource
from tests.audit import audited
from tests.conftest import Immich

pytestmark = pytest.mark.asyncio


class CountingSource(PostgresSource):
    """The real source, with every statement its connections run recorded (asyncpg's query logger)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.queries: list[str] = []

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[asyncpg.Connection]:
        async with super().connection() as conn:
            def record(q: Any) -> None:
                self.queries.append(q.query)

            conn.add_query_logger(record)
            try:
                yield conn
            finally:
                conn.remove_query_logger(record)


async def _all_assets(imm: Immich) -> list[tuple[str, bool]]:
    conn = await asyncpg.connect(imm.dsn, timeout=10)
    try:
        tables = {r[0] for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
        table = "asset" if "asset" in tables else "assets"
        rows = await conn.fetch(f'SELECT id::text, "deletedAt" IS NULL FROM {table}', timeout=10)
    finally:
        await conn.close()
    return [(r[0], bool(r[1])) for r in rows]


async def test_agrees_with_the_full_scan_on_every_asset(immich_factory: Callable[..., Any], era: str) -> None:
    # With edited assets where the schema has them, one without its edited fullsize row (no_record).
    imm: Immich = await immich_factory(era, Plan(edited_assets=3, edited_fullsize_no_record=1))
    config = load_config(None, environ={}, overrides={
        "database.url": imm.dsn, "media.root": imm.media, "checks.verify_headers": True})
    pg = CountingSource(config.database)
    store = ProblemStore()
    try:
        result = await run_scan(pg, config, store)
        scan: dict[str, set[tuple[str, str]]] = {}
        originals: dict[str, bool | None] = {}
        for p in store:
            scan.setdefault(p.asset_id, set()).add((p.kind, p.reason))
            originals[p.asset_id] = p.original_exists
        assets = await _all_assets(imm)
        schema = await pg.schema()
        mapper = await media_mapper(pg, config.media)
        pg.queries.clear()
        loop_thread = threading.get_ident()
        with audited() as seen:
            verdicts = await check_assets(pg, schema, mapper, [a for a, _ in assets], batch_size=100)
    finally:
        store.close()
        await pg.close()
    # One query per batch of 100, and nothing else.
    assert pg.queries == [targeted_sql(schema)] * -(-len(assets) // 100), pg.queries[:3]
    # No walk: nothing listed; every file opened (header checks) in a worker thread.
    assert not [s for s in seen if s[0] != "open"], seen[:5]
    assert seen and all(thread != loop_thread for *_, thread in seen)
    refused = 0
    for asset_id, _ in assets:
        v = verdicts[asset_id]
        assert v.exists
        if not v.eligible:
            continue  # the scan reports eligible assets only
        found = {(k, r) for k, r, _ in v.problems if r != "path_refused"}
        refused += sum(1 for _, r, _ in v.problems if r == "path_refused")
        assert found == scan.get(asset_id, set()), (asset_id, found, scan.get(asset_id))
        if asset_id in originals:
            assert v.original_exists is originals[asset_id], asset_id
        assert v.written == (not v.problems)
    assert result.stats is not None
    assert refused == sum(result.stats.refused.values()) == sum(imm.expected.refused.values())
    assert set(scan) == imm.expected.problem_asset_ids


async def test_ids_missing_invalid_or_spelt_otherwise(immich_factory: Callable[..., Any]) -> None:
    imm: Immich = await immich_factory("v1.136+")
    config = load_config(None, environ={}, overrides={"database.url": imm.dsn, "media.root": imm.media})
    pg = PostgresSource(config.database)
    healthy = next(a for a in imm.expected.asset_ids if a not in imm.expected.problem_asset_ids)
    gone = str(uuid.uuid4())
    try:
        verdicts = await check_assets(pg, await pg.schema(), await media_mapper(pg, config.media),
                                      [healthy, healthy.upper(), gone, "not-a-uuid", ""])
    finally:
        await pg.close()
    assert set(verdicts) == {healthy, healthy.upper(), gone, "not-a-uuid", ""}
    assert verdicts[healthy].exists and verdicts[healthy].eligible and verdicts[healthy].written
    assert verdicts[healthy].original_exists is True
    assert verdicts[healthy.upper()].written  # the same asset, whatever the spelling
    for absent in (gone, "not-a-uuid", ""):
        assert not verdicts[absent].exists and not verdicts[absent].written and verdicts[absent].asset_id == absent


async def test_no_ids_no_query(immich_factory: Callable[..., Any]) -> None:
    imm: Immich = await immich_factory("v1.136+")
    config = load_config(None, environ={}, overrides={"database.url": imm.dsn, "media.root": imm.media})
    pg = CountingSource(config.database)
    try:
        schema, mapper = await pg.schema(), await media_mapper(pg, config.media)
        pg.queries.clear()
        out = await check_assets(pg, schema, mapper, ["nope", "nope"])
    finally:
        await pg.close()
    assert list(out) == ["nope"] and not out["nope"].exists
    assert pg.queries == []  # no valid id: nothing to ask
