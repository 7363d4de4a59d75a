"""Immich's real schemas as databases for the tests: ``../shared/immich-schema/<release>.sql``.

Each file is the SQL that Immich's own migrations sent on a fresh install of one release (its header
names the release commit and every migration; only extension statements were replaced). They are read
from beside the repository at test time, as CI has them, and never copied into it. Where that folder is
absent (a plain clone), every test that needs it is skipped with one reason, ``SCHEMAS_MISSING``, which
the session sums up in one line; with ``IMMICH_SCHEMA_REQUIRED=1`` (set by ``.ci/run``) each fails instead.

A *build* is how a test database gets its tables: an era's hand-written DDL (``demo/schemas/``, which
the demo ships), a fresh install of a release, or an upgraded install: one release's file, then the
sections of a later release's file for the migrations the first lacks, which is what Kysely runs when
Immich starts on an older database.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from immich_thumbnail_exporter.demo.seed import ERAS

ROOT = Path(__file__).resolve().parent.parent
# IMMICH_SCHEMA_DIR points elsewhere: a git worktree, whose ../shared is not the checkout's.
SHARED = Path(os.environ.get("IMMICH_SCHEMA_DIR") or ROOT.parent / "shared" / "immich-schema")
SCHEMAS_MISSING = f"{os.environ.get('IMMICH_SCHEMA_DIR') or '../shared/immich-schema'} not found"
REQUIRED = "IMMICH_SCHEMA_REQUIRED"

# Each recorded release and the schema era the exporter should detect on it.
RELEASES = {"v1.132.3": "v1.113+", "v1.135.3": "v1.133+", "v2.4.1": "v1.136+", "v3.1.0": "v2.5+"}

_MIGRATION = re.compile(r"^--   migration (\S+)  \(", re.MULTILINE)
_SECTION = re.compile(r"^-- >>> (\S+)\n", re.MULTILINE)
# The captures ran on a database named "immich" and inlined its name (``current_database()``).
_DATABASE = re.compile(r'(alter database )"immich"', re.IGNORECASE)


@dataclass(frozen=True)
class Build:
    """How a test database is made. ``release`` empty: the era's hand-written DDL. Else a fresh install
    of ``release``, seeded, then upgraded in turn to each of ``upgrades`` by Immich's own migrations, so
    the seeded rows go through them (renames, path conversions) as a real library's do."""

    id: str
    era: str
    release: str = ""
    upgrades: tuple[str, ...] = ()

    @property
    def real(self) -> bool:
        return bool(self.release)

    @property
    def seed_era(self) -> str:
        """The era the rows are written in: the installed release's, before any upgrade."""
        return RELEASES[self.release] if self.real else self.era

    @property
    def versions(self) -> tuple[str, ...] | None:
        """``version_history`` at seeding, as Immich writes it (``serverVersion.toString()``: no v)."""
        return (self.release.lstrip("v"),) if self.real else None

    def sql(self, database: str) -> str:
        """The fresh install of ``release``."""
        text = release_sql(self.release)
        return in_database(text, database) + _kysely_rows(migrations(text))

    def upgrade_sql(self, database: str) -> str:
        """Each later release's remaining migrations, then the version row Immich adds when it starts."""
        applied = migrations(release_sql(self.release))
        out = []
        for release in self.upgrades:
            added, now = upgrade(applied, release)
            out.append(in_database(added, database) + _kysely_rows(now[len(applied):]))
            out.append(f"INSERT INTO version_history (version) VALUES ('{release.lstrip('v')}');\n")
            applied = now
        return "".join(out)


def in_database(text: str, database: str) -> str:
    return _DATABASE.sub(lambda m: f'{m.group(1)}"{database}"', text)


def require_schemas() -> None:
    """Skip the running test when Immich's schemas are not beside the repository; fail it instead where
    they must be (``IMMICH_SCHEMA_REQUIRED=1``: CI), so a missing folder never passes for a green run."""
    if SHARED.is_dir():
        return
    if os.environ.get(REQUIRED, "") not in ("", "0"):
        pytest.fail(f"{SCHEMAS_MISSING} ({SHARED}), and {REQUIRED} is set", pytrace=False)
    pytest.skip(SCHEMAS_MISSING)


@functools.cache
def release_sql(release: str) -> str:
    require_schemas()
    path = SHARED / f"{release}.sql"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: the tests build databases from Immich's real schemas, which live in "
            "../shared/immich-schema/ beside the repository (as in CI); they are never copied into it"
        )
    return path.read_text(encoding="utf-8")


def migrations(text: str) -> list[str]:
    """The migrations a file's header names, in the order Kysely applied them."""
    return _MIGRATION.findall(text)


def sections(text: str) -> dict[str, str]:
    """The statements each migration sent, by migration name (``kysely-migrator`` first)."""
    marks = list(_SECTION.finditer(text))
    return {m.group(1): text[m.end(): nxt.start() if nxt else len(text)]
            for m, nxt in zip(marks, [*marks[1:], None], strict=True)}


def upgrade(applied: list[str], release: str) -> tuple[str, list[str]]:
    """The SQL that brings a database with ``applied`` migrations to ``release``, and the new list. A
    migration that sent nothing has no section; it is still recorded as applied."""
    text = release_sql(release)
    parts = sections(text)
    todo = [name for name in migrations(text) if name not in applied]
    sql = "".join(f"-- >>> {name} (upgrade to {release})\n{parts[name]}" for name in todo if name in parts)
    return sql, [*applied, *todo]


def _kysely_rows(names: list[str]) -> str:
    # The headers say the recording left kysely_migrations empty for whoever replays it to fill.
    if not names:
        return ""
    values = ",\n".join(f"('{name}', '2026-07-27T00:00:00.000Z')" for name in names)
    return f'\nINSERT INTO "kysely_migrations" ("name", "timestamp") VALUES\n{values};\n'


HAND_WRITTEN = {era: Build(era, era) for era in sorted(ERAS)}
REAL = {
    **{release: Build(release, era, release) for release, era in RELEASES.items()},
    "v1.135.3-to-v3.1.0": Build("v1.135.3-to-v3.1.0", "v2.5+", "v1.135.3", ("v3.1.0",)),
}
BUILDS = {**HAND_WRITTEN, **REAL}
