"""Immich v3's own integrity report: the table ``integrity_report``, read-only.

Immich's scheduled integrity checks (queue ``integrityCheck``) write one row per problem they find:
``type`` (``missing_file``, ``untracked_file``, ``checksum_mismatch``), the ``path``, and what it
belongs to: ``"fileAssetId"`` for an asset's generated file (a thumbnail, a preview, a fullsize, an
encoded video...), ``"assetId"`` for an asset's original, neither for an untracked file. Outdated rows
are deleted by Immich's refresh jobs, so the table is the report's current state.

We read counts by type and kind of file, and the time of the newest row; never a path. Where the
table does not exist (Immich before v3.0) there is nothing to read: see ``schema.has_integrity_report``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Protocol

from immich_thumbnail_exporter.vocabulary import ORIGINAL_KIND, UNKNOWN_KIND


class Queryable(Protocol):
    async def fetch(self, query: str, *args: Any, timeout: float | None = None) -> list[Any]: ...


@dataclass(frozen=True)
class IntegrityReport:
    """Entries of Immich's report by ``(type, kind)``, and the Unix time of the newest (None: empty)."""

    entries: dict[tuple[str, str], int] = field(default_factory=dict)
    newest: float | None = None


# The kind of an entry: the asset_file row's type when it names one (the foreign key cascades, so the
# row exists), an original when it names an asset (checksums are only ever of originals), else unknown.
SQL = f"""
SELECT r.type AS type,
  CASE
    WHEN r."fileAssetId" IS NOT NULL THEN coalesce(f.type, '{UNKNOWN_KIND}')
    WHEN r."assetId" IS NOT NULL OR r.type = 'checksum_mismatch' THEN '{ORIGINAL_KIND}'
    ELSE '{UNKNOWN_KIND}'
  END AS kind,
  count(*) AS entries,
  extract(epoch FROM max(r."createdAt"))::float8 AS newest
FROM integrity_report r LEFT JOIN asset_file f ON f.id = r."fileAssetId"
GROUP BY 1, 2
"""

# Label values come from Immich's own words (an enum in its code, varchar in the table); anything else
# (a fork, a newer release) is kept, counted under a bounded, well-formed name.
_WORD = re.compile(r"[a-z][a-z0-9_]{0,39}")


def _label(value: object) -> str:
    text = str(value) if value is not None else UNKNOWN_KIND
    return text if _WORD.fullmatch(text) else "other"


async def read(db: Queryable, timeout: float) -> IntegrityReport:
    """One aggregate over the table (it holds problems, not assets: small, and indexed where it is not)."""
    rows = await db.fetch(SQL, timeout=timeout)
    entries: dict[tuple[str, str], int] = {}
    newest: float | None = None
    for row in rows:
        key = (_label(row["type"]), _label(row["kind"]))
        entries[key] = entries.get(key, 0) + int(row["entries"])
        if row["newest"] is not None:
            newest = max(newest or 0.0, float(row["newest"]))
    return IntegrityReport(entries, newest)
